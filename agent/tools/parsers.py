"""Tool-call text of a model family → OpenAI tool calls, whole or while it streams.

Three formats, as the families write them (tests/unit/test_tool_parsers.py holds their real
outputs, and checks these parsers against vLLM's own where vLLM is installed):

- ``hermes`` (Hermes 2 Pro/3, Qwen2.5/Qwen3, and our rendering for templates without tools):
  ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, one block per call, text before.
- ``llama3_json`` (Llama 3.1-3.3): the answer is the call, ``{"name": ..., "parameters": {...}}``
  (``arguments`` too), optionally after ``<|python_tag|>``, several separated by ``;``.
- ``mistral``: ``[TOOL_CALLS]`` then a JSON array of ``{"name", "arguments"}`` (v3 tokenizers) or
  ``name[ARGS]{...}`` per call (v11+); the marker is a control token the detokenizer may drop, so a
  bare array of calls at the start counts too.

vLLM's parsers are not used directly: vLLM is optional here (a llama.cpp-only host has none), and
they need vLLM's request objects, its tokenizer and token ids while streaming. A stream holds back
text that may start a call and releases a call once it is complete; text that turns out not to
be a call is released as content, so nothing the model wrote is lost.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Union

_ALNUM = string.ascii_letters + string.digits


def _call_id() -> str:
    return "call_" + secrets.token_hex(12)


def mistral_call_id() -> str:
    """Mistral's templates require ids of exactly 9 letters and digits."""
    return "".join(secrets.choice(_ALNUM) for _ in range(9))


@dataclass(frozen=True)
class ToolCall:
    """One call: the function's name and its arguments as JSON text."""

    name: str
    arguments: str
    id: str = field(default_factory=_call_id)


Event = Union[str, ToolCall]  # a stream yields content text or a complete call


def _call(obj: Any, args_keys: tuple[str, ...], new_id) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    for key in args_keys:
        if key in obj:
            args = obj[key]
            text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
            return ToolCall(obj["name"], text, new_id())
    return ToolCall(obj["name"], "{}", new_id())


class Parser(ABC):
    """A format: ``parse`` a whole answer, or ``stream()`` one as it arrives."""

    name = ""
    new_id = staticmethod(_call_id)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a whole answer; content None when it was only calls."""
        stream = self.stream()
        events = stream.feed(text) + stream.close()
        content = "".join(e for e in events if isinstance(e, str))
        calls = [e for e in events if isinstance(e, ToolCall)]
        if calls:
            content = content.strip() or None
        return content, calls

    @abstractmethod
    def stream(self) -> Stream:
        """A fresh incremental parser for one answer."""


class Stream(ABC):
    """Feed text as it arrives; each call returns what can be released now."""

    @abstractmethod
    def feed(self, text: str) -> list[Event]:
        """The events ``text`` completes (content strings and tool calls)."""

    @abstractmethod
    def close(self) -> list[Event]:
        """What is left at the end of the answer."""


def _partial(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that begins ``marker``."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


class _MarkerStream(Stream):
    """Content until ``start``; then a block until ``end`` (or the end of the answer), parsed by
    ``block``; a block that does not parse is released as the text it was."""

    def __init__(self, start: str, end: str | None, block) -> None:
        self.start, self.end, self.block = start, end, block
        self.buf = ""
        self.inside = False

    def feed(self, text: str) -> list[Event]:
        self.buf += text
        out: list[Event] = []
        while True:
            if not self.inside:
                i = self.buf.find(self.start)
                if i < 0:
                    keep = _partial(self.buf, self.start)
                    if len(self.buf) > keep:
                        out.append(self.buf[: len(self.buf) - keep])
                    self.buf = self.buf[len(self.buf) - keep:]
                    return out
                if i:
                    out.append(self.buf[:i])
                self.buf, self.inside = self.buf[i + len(self.start):], True
            if self.end is None:
                return out  # the block runs to the end of the answer
            j = self.buf.find(self.end)
            if j < 0:
                return out
            body, self.buf, self.inside = self.buf[:j], self.buf[j + len(self.end):], False
            out.extend(self.block(body) or [self.start + body + self.end])

    def close(self) -> list[Event]:
        body, self.buf = self.buf, ""
        if not self.inside:
            return [body] if body else []
        self.inside = False
        return self.block(body) or [self.start + body]


class Hermes(Parser):
    name = "hermes"

    def stream(self) -> Stream:
        def block(body: str) -> list[Event] | None:
            try:
                call = _call(json.loads(body), ("arguments", "parameters"), self.new_id)
            except ValueError:
                return None
            return [call] if call else None
        return _MarkerStream("<tool_call>", "</tool_call>", block)

    @staticmethod
    def strict_tags() -> tuple[str, str, str]:
        """(trigger, begin, end) of one call, for a strict ``auto`` constraint."""
        return "<tool_call>", '<tool_call>\n{"name": "{name}", "arguments": ', "}\n</tool_call>"


def _json_objects(text: str, args_keys: tuple[str, ...], new_id, sep: str = ";") -> list[ToolCall] | None:
    """Every call in ``text`` (objects, or arrays of them, separated by ``sep`` or whitespace);
    None unless all of it is calls."""
    decoder, calls, i = json.JSONDecoder(), [], 0
    text = text.strip()
    while i < len(text):
        try:
            obj, end = decoder.raw_decode(text, i)
        except ValueError:
            return None
        for item in obj if isinstance(obj, list) else [obj]:
            call = _call(item, args_keys, new_id)
            if call is None:
                return None
            calls.append(call)
        i = end
        while i < len(text) and (text[i].isspace() or text[i] == sep):
            i += 1
    return calls or None


class _WholeAnswerStream(Stream):
    """An answer that is either calls from its first character (after ``prefixes``) or content:
    content passes straight through; calls are held to the end of the answer, then parsed (what
    does not parse is released as content)."""

    def __init__(self, opens: tuple[str, ...], prefixes: tuple[str, ...], parse) -> None:
        self.opens, self.prefixes, self.parse = opens, prefixes, parse
        self.buf = ""
        self.mode: str | None = None  # None: undecided, "content", "calls"

    def _head(self) -> str | None:
        """The answer after its prefixes; None while a prefix may still be arriving."""
        head = self.buf.lstrip()
        for p in self.prefixes:
            if head.startswith(p):
                head = head[len(p):].lstrip()
            elif head and p.startswith(head):
                return None
        return head

    def feed(self, text: str) -> list[Event]:
        if self.mode == "content":
            return [text] if text else []
        self.buf += text
        head = self._head()
        if self.mode is None and head:
            self.mode = "calls" if head.startswith(self.opens) else "content"
        if self.mode == "content":
            out, self.buf = self.buf, ""
            return [out]
        return []

    def close(self) -> list[Event]:
        head, out, self.buf = self._head(), self.buf, ""
        calls = self.parse(head) if self.mode == "calls" and head else None
        return list(calls) if calls else ([out] if out else [])


class Llama3Json(Parser):
    name = "llama3_json"

    def stream(self) -> Stream:
        return _WholeAnswerStream(("{",), ("<|python_tag|>",),
                                  lambda t: _json_objects(t, ("parameters", "arguments"), self.new_id))

    @staticmethod
    def strict_tags() -> tuple[str, str, str]:
        return '{"name": "', '{"name": "{name}", "parameters": ', "}"


_MISTRAL_ARGS = re.compile(r"\s*([A-Za-z0-9_.\-]+)\[ARGS\]")


class Mistral(Parser):
    name = "mistral"
    new_id = staticmethod(mistral_call_id)

    def _calls(self, text: str) -> list[ToolCall] | None:
        text = text.strip()
        if text.startswith("[TOOL_CALLS]"):
            text = text[len("[TOOL_CALLS]"):]
        if text.startswith(("[", "{")):
            return _json_objects(text, ("arguments", "parameters"), self.new_id)
        calls, decoder = [], json.JSONDecoder()
        for part in (p for p in text.split("[TOOL_CALLS]") if p.strip()):
            m = _MISTRAL_ARGS.match(part)
            if not m:
                return None
            try:
                args, _ = decoder.raw_decode(part, m.end())
            except ValueError:
                return None
            calls.append(ToolCall(m.group(1), json.dumps(args, ensure_ascii=False), self.new_id()))
        return calls or None

    def stream(self) -> Stream:
        return _MistralStream(self._calls)

    @staticmethod
    def strict_tags() -> tuple[str, str, str]:
        return "[TOOL_CALLS]", '[TOOL_CALLS][{"name": "{name}", "arguments": ', "}]"


class _MistralStream(_MarkerStream):
    """Content until ``[TOOL_CALLS]`` (calls to the end), or calls from the first character when the
    detokenizer dropped the marker."""

    def __init__(self, calls) -> None:
        super().__init__("[TOOL_CALLS]", None, lambda body: calls(body))
        self.first = True

    def feed(self, text: str) -> list[Event]:
        if self.first and not self.inside:
            head = (self.buf + text).lstrip()
            if len(head) < 2 and "[{".startswith(head):
                self.buf += text
                return []  # may still become a bare array of calls
            self.first = False
            if head.startswith("[{"):
                self.buf, self.inside = head, True
                return []
            self.buf, text = "", self.buf + text
        return super().feed(text)


PARSERS: dict[str, type[Parser]] = {p.name: p for p in (Hermes, Llama3Json, Mistral)}


def for_template(template: str | None, knows_tools: bool) -> Parser:
    """The parser for a chat template's family (Hermes for templates without tools: we render
    the Hermes format for them)."""
    if knows_tools and template:
        if "[TOOL_CALLS]" in template:
            return Mistral()
        if "<|python_tag|>" in template or '"parameters"' in template:
            return Llama3Json()
    return Hermes()
