"""The OpenAI wire format, answers side: each choice's deltas shaped into content, tool calls and
logprobs (``Shaper``), and the response and chunk envelopes.

Streamed tool calls follow OpenAI's shape: the first chunk of a call carries its ``index``,
``id``, ``type`` and ``function.name`` (arguments ""), later chunks carry argument fragments; a
choice that called a tool ends with ``finish_reason: "tool_calls"``. Reassembled, the stream is
the non-streamed answer.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from agent.backends.base import Delta, TokenLogprob
from agent.serving.jobs import Job, ToolPlan
from agent.tools.parsers import Hermes, ToolCall


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(last: Delta) -> dict[str, int]:
    return {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
            "total_tokens": last.prompt_tokens + last.completion_tokens}


def job_usage(job: Job, lasts: list[Delta]) -> dict[str, int]:
    """The prompt counted once per prompt (not once per choice, as OpenAI counts n), completion
    tokens of every choice."""
    prompt = sum(lasts[i].prompt_tokens for i in range(0, len(lasts), job.n))
    completion = sum(d.completion_tokens for d in lasts)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


LOGPROB_FLOOR = -9999.0  # a token the constraint forbids has -inf, which JSON cannot carry (vLLM's server floors it too)


def _lp(value: float) -> float:
    return value if value >= LOGPROB_FLOOR else LOGPROB_FLOOR  # (NaN and -inf alike)


def _chat_logprobs(entries: list[TokenLogprob]) -> list[dict]:
    return [{"token": e.token, "logprob": _lp(e.logprob), "bytes": list(e.bytes),
             "top_logprobs": [{"token": t, "logprob": _lp(lp), "bytes": list(b)} for t, b, lp in e.top]}
            for e in entries]


def _completion_logprobs(entries: list[TokenLogprob], offset: int) -> dict[str, list]:
    offsets, at = [], offset
    for e in entries:
        offsets.append(at)
        at += len(e.token)
    return {"tokens": [e.token for e in entries], "token_logprobs": [_lp(e.logprob) for e in entries],
            "top_logprobs": [{t: _lp(lp) for t, _, lp in e.top} for e in entries], "text_offset": offsets}


class _Required:
    """A ``required`` answer, ``[{"name", "parameters"}, ...]``: each call released once it closes."""

    def __init__(self, new_id) -> None:
        self.new_id = new_id
        self.buf, self.at, self.done = "", 0, False
        self.decoder = json.JSONDecoder()

    def feed(self, text: str) -> list[ToolCall]:
        self.buf += text
        calls = []
        while not self.done:
            rest = self.buf[self.at:]
            stripped = rest.lstrip(" \n\t\r[,")
            if not stripped or stripped.startswith("]"):
                self.done = bool(stripped)
                break
            start = len(self.buf) - len(stripped)
            try:
                obj, end = self.decoder.raw_decode(self.buf, start)
            except ValueError:
                break
            self.at = end
            if isinstance(obj, dict) and "name" in obj:
                calls.append(ToolCall(obj["name"], json.dumps(obj.get("parameters", {}), ensure_ascii=False),
                                      self.new_id()))
        return calls


class Shaper:
    """One choice: deltas in, OpenAI delta fragments out (``feed``), and the whole choice (``whole``)."""

    def __init__(self, plan: ToolPlan, logprobs: int | None, chat: bool, echo: str = "") -> None:
        self.plan, self.want_logprobs, self.chat = plan, logprobs is not None, chat
        self.text, self.content = echo, echo
        self.calls: list[ToolCall] = []
        self.entries: list[TokenLogprob] = []
        self.pending: list[TokenLogprob] = []
        self.stream = plan.parser.stream() if plan.mode == "auto" and plan.parser else None
        new_id = (plan.parser or Hermes()).new_id
        self.required = _Required(new_id) if plan.mode == "required" else None
        self.named = ToolCall(plan.name, "", new_id()) if plan.mode == "named" else None
        self.named_opened = False
        self.offset = 0

    def _events(self, text: str, final: bool) -> list[Any]:
        if self.stream is not None:
            return self.stream.feed(text) + (self.stream.close() if final else [])
        if self.required is not None:
            return self.required.feed(text)
        return [text] if text else []

    def _fragments(self, events: list[Any]) -> list[dict]:
        out: list[dict] = []
        for e in events:
            if isinstance(e, str):
                if self.calls and not e.strip():
                    continue  # whitespace between calls is not content
                self.content += e
                out.append({"content": e})
            else:
                i = len(self.calls)
                self.calls.append(e)
                out.append({"tool_calls": [{"index": i, "id": e.id, "type": "function",
                                            "function": {"name": e.name, "arguments": ""}}]})
                out.append({"tool_calls": [{"index": i, "function": {"arguments": e.arguments}}]})
        return out

    def feed(self, d: Delta) -> list[dict]:
        """Delta fragments for ``d``, each a chat ``delta`` dict (``logprobs`` attached to the first)."""
        self.text += d.text
        self.pending.extend(d.logprobs)
        if self.named is not None:
            out = []
            if not self.named_opened:
                self.named_opened = True
                self.calls.append(self.named)
                out.append({"tool_calls": [{"index": 0, "id": self.named.id, "type": "function",
                                            "function": {"name": self.named.name, "arguments": ""}}]})
            if d.text:
                out.append({"tool_calls": [{"index": 0, "function": {"arguments": d.text}}]})
        else:
            out = self._fragments(self._events(d.text, d.finish_reason is not None))
        if out and self.want_logprobs and self.pending:
            out[0]["logprobs"], self.pending = list(self.pending), []
        self.entries.extend(d.logprobs)
        return out

    def finish_reason(self, last: Delta) -> str | None:
        """"tool_calls" when the answer ended on complete calls; a named call whose arguments a
        stop string or stop id cut short keeps "stop" (as one cut by max_tokens keeps "length")."""
        if self.calls and last.finish_reason == "stop":
            if self.named is not None:
                try:
                    json.loads(self.text)
                except ValueError:
                    return "stop"
            return "tool_calls"
        return last.finish_reason

    def logprobs(self, entries: list[TokenLogprob] | None = None) -> dict | None:
        if not self.want_logprobs:
            return None
        entries = self.entries if entries is None else entries
        if self.chat:
            return {"content": _chat_logprobs(entries), "refusal": None}
        lp = _completion_logprobs(entries, self.offset)
        self.offset += sum(len(e.token) for e in entries)
        return lp

    def message(self) -> dict:
        """The whole chat message."""
        if self.named is not None:
            self.named = ToolCall(self.named.name, self.text, self.named.id)
            self.calls = [self.named]
        calls = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                 for c in self.calls]
        content = self.content if self.named is None else None
        if calls and content is not None:
            content = content.strip() or None
        msg: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
        if calls:
            msg["tool_calls"] = calls
        return msg


def chat_response(rid: str, model: str, choices: list[tuple[Shaper, Delta]], usage_: dict) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "message": s.message(), "finish_reason": s.finish_reason(last),
                         "logprobs": s.logprobs()} for i, (s, last) in enumerate(choices)],
            "usage": usage_}


def completion_response(rid: str, model: str, choices: list[tuple[Shaper, Delta]], usage_: dict) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "text": s.text, "finish_reason": last.finish_reason, "logprobs": s.logprobs()}
                        for i, (s, last) in enumerate(choices)],
            "usage": usage_}


def chat_chunk(rid: str, model: str, created: int, delta: dict, finish: str | None,
               usage_: dict | None = None, index: int = 0, logprobs: dict | None = None) -> dict[str, Any]:
    choices = [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}] if usage_ is None else []
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if usage_ is not None:
        chunk["usage"] = usage_
    return chunk


def completion_chunk(rid: str, model: str, created: int, text: str, finish: str | None,
                     usage_: dict | None = None, index: int = 0, logprobs: dict | None = None) -> dict[str, Any]:
    choices = [{"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}] if usage_ is None else []
    chunk = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if usage_ is not None:
        chunk["usage"] = usage_
    return chunk
