"""Tools and tool conversations, shaped for a chat template.

A template that knows tools (it reads the ``tools`` variable: Qwen2.5, Hermes, Llama 3.1+,
Mistral) gets them as they are, and the conversation as HF templates expect it (tool-call
arguments as objects, as vLLM's server passes them). A template that does not (SmolLM2, a plain
ChatML) gets the Hermes format spelled out: the tools described in the system message, earlier
calls as ``<tool_call>`` blocks, results as ``<tool_response>`` blocks in user turns; the
Hermes parser then reads the model's calls. Both engines render through this module, so a
request is the same prompt on each.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

_USES_TOOLS = re.compile(r"\btools\b")

HERMES_SYSTEM = (
    "You can call functions to help with the user's request. The functions, as JSON signatures, are "
    "inside <tools></tools>:\n<tools>\n{tools}\n</tools>\n\nTo call a function, answer with a JSON object "
    "with its name and arguments inside <tool_call></tool_call> tags:\n<tool_call>\n"
    '{{"name": <function name>, "arguments": <arguments as a JSON object>}}\n</tool_call>'
)


def knows_tools(template: str | None) -> bool:
    """True when the chat template reads the ``tools`` variable."""
    return bool(template) and bool(_USES_TOOLS.search(template))


def _arguments(raw: Any) -> Any:
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    return raw


def for_template(messages: Iterable[Mapping[str, Any]], tools: tuple[dict, ...], template: str | None
                 ) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) to render ``template`` with; tools None when the template is not given them."""
    if knows_tools(template):
        out = []
        for m in messages:
            m = dict(m)
            if m.get("tool_calls"):
                m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": _arguments(c["function"]["arguments"])}}
                                   for c in m["tool_calls"]]
            if m.get("content") is None:
                m["content"] = ""
            out.append(m)
        return out, list(tools) or None
    return _hermes(messages, tools), None


def hermes_call(name: str, arguments: Any) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": _arguments(arguments)}, ensure_ascii=False) + \
        "\n</tool_call>"


def _hermes(messages: Iterable[Mapping[str, Any]], tools: tuple[dict, ...]) -> list[dict]:
    out: list[dict] = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            calls = "\n".join(hermes_call(c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"])
            out.append({"role": "assistant", "content": (content + "\n" if content else "") + calls})
        elif role == "tool":
            block = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1].get("_tool"):
                out[-1]["content"] += "\n" + block  # consecutive results: one user turn, as Qwen2.5 renders them
            else:
                out.append({"role": "user", "content": block, "_tool": True})
        else:
            out.append({"role": role, "content": content})
    for m in out:
        m.pop("_tool", None)
    if tools:
        described = HERMES_SYSTEM.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + described}
        else:
            out.insert(0, {"role": "system", "content": described})
    return out
