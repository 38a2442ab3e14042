"""Output constraints: one grammar per request, compiled and checked here, applied by both engines.

Every constraint is a Lark grammar in llguidance's dialect (``start: %json {...}`` embeds a JSON
schema; ``StructTag`` builds "free text, then a constrained tool call after a trigger"). Why
llguidance (docs/serving.md, "Structured output"):

- vLLM's ``guidance`` structured-outputs backend compiles exactly this grammar text with
  llguidance (``StructuredOutputsParams(grammar=...)``), and llama.cpp gets the same grammar
  through a logits processor on llguidance's ``LLMatcher`` (agent/backends/llamacpp_sampling.py):
  one grammar, one compiler, the same language of outputs on both engines.
- The matcher accepts an already-sent prefix (``consume_tokens``), so a constrained stream that
  fails over continues under its constraint on llama.cpp.
- It has no dependencies (xgrammar needs torch and triton, too heavy for a llama.cpp-only host)
  and refuses what it cannot compile: a schema it cannot honour is a 400 here, never free text.

JSON is compiled without free whitespace (``whitespace_flexible: false``): compact JSON parses the
same, and small models otherwise fill the budget with newlines.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from agent.backends.base import Constraint

JSON_OPTIONS = {"whitespace_flexible": False}
MAX_SCHEMA_BYTES = 256 * 1024


class ConstraintError(ValueError):
    """A schema or grammar that cannot be compiled; ``param`` names the request field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def _llg():
    import llguidance

    return llguidance


def _schema_grammar(schema: Mapping[str, Any]) -> str:
    """``%json {...}`` with our JSON options under the schema's own ``x-guidance`` ones."""
    options = {**JSON_OPTIONS, **dict(schema.get("x-guidance") or {})}
    return "%json " + json.dumps({**schema, "x-guidance": options})


def _checked(lark: str, kind: str, param: str) -> Constraint:
    llg = _llg()
    error = llg.LLMatcher.validate_grammar(llg.LLMatcher.grammar_from_lark(lark))
    if error:
        raise ConstraintError(f"{param}: the schema cannot be compiled into a constraint: "
                              f"{error.strip().splitlines()[0]}", param)
    return Constraint(lark, kind)


def _object_schema(schema: Any, param: str) -> dict[str, Any]:
    if not isinstance(schema, Mapping):
        raise ConstraintError(f"{param}: a JSON schema must be an object", param)
    if len(json.dumps(schema)) > MAX_SCHEMA_BYTES:
        raise ConstraintError(f"{param}: the schema is larger than {MAX_SCHEMA_BYTES} bytes", param)
    return dict(schema)


def json_schema(schema: Any, param: str = "response_format.json_schema.schema") -> Constraint:
    """Output is one JSON value valid against ``schema``."""
    return _checked("start: " + _schema_grammar(_object_schema(schema, param)), "json_schema", param)


def json_object() -> Constraint:
    """Output is one JSON object (``response_format: json_object``)."""
    return _checked("start: " + _schema_grammar({"type": "object"}), "json_object", "response_format")


def closed(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on every object that lists its properties
    and says nothing about others. For tool arguments: a function takes the parameters it
    declares, and a small model given room for more fills its budget with invented ones (the
    output still validates against the original schema)."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, Mapping):
        return schema
    out = {k: closed(v) if k not in ("properties", "$defs", "definitions", "patternProperties", "enum", "const")
           else v for k, v in schema.items()}
    for key in ("properties", "$defs", "definitions"):
        if isinstance(schema.get(key), Mapping):
            out[key] = {name: closed(sub) for name, sub in schema[key].items()}
    if isinstance(schema.get("properties"), Mapping) and "additionalProperties" not in schema \
            and "patternProperties" not in schema:
        out["additionalProperties"] = False
    return out


def tool_parameters(tool: Mapping[str, Any]) -> dict[str, Any]:
    """A function tool's parameter schema (OpenAI: absent means no parameters), ``closed``."""
    params = tool["function"].get("parameters")
    return closed(dict(params)) if params else {"type": "object", "properties": {}, "additionalProperties": False}


def tool_call(tool: Mapping[str, Any], param: str = "tools") -> Constraint:
    """A named ``tool_choice``: output is the arguments object of ``tool``."""
    schema = _object_schema(tool_parameters(tool), f"{param}.function.parameters")
    return _checked("start: " + _schema_grammar(schema), "tool_call", param)


def tool_calls(tools: Iterable[Mapping[str, Any]], parallel: bool, param: str = "tools") -> Constraint:
    """``tool_choice: required``: output is a JSON array of ``{"name", "parameters"}`` calls (one
    when ``parallel`` is off), each valid against its tool's schema; the format vLLM uses for
    required tool calls, which needs no model-specific parser."""
    branches = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                   "parameters": _object_schema(tool_parameters(t), param)},
                 "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": branches}}
    if not parallel:
        schema["maxItems"] = 1
    return _checked("start: " + _schema_grammar(schema), "tool_calls", param)


def strict_tool_calls(tools: Iterable[Mapping[str, Any]], trigger: str, begin: str, end: str, special: bool,
                      param: str = "tools") -> Constraint:
    """``tool_choice: auto`` with ``strict`` tools: free text, and wherever the model starts a call
    (``trigger``, then ``begin`` with the tool's ``{name}``: the model family's format), the
    arguments valid against that tool's schema, then ``end``. ``special``: the trigger is one of
    the vocabulary's special tokens."""
    llg = _llg()
    tags = []
    for t in tools:
        opening = begin.replace("{name}", json.dumps(t["function"]["name"])[1:-1])
        schema = {**tool_parameters(t), "x-guidance": JSON_OPTIONS}
        tags.append(llg.StructTag(trigger=trigger, begin=opening, grammar=schema, end=end))
    return _checked(llg.StructTag.to_grammar(tags, assume_special=special), "tools_strict", param)


def regex(pattern: str, param: str = "structured_outputs.regex") -> Constraint:
    """Output matches ``pattern`` (vLLM's ``structured_outputs.regex``)."""
    return _checked("start: /" + _llg().regex_to_lark(pattern) + "/", "regex", param)


def choice(options: list[str], param: str = "structured_outputs.choice") -> Constraint:
    """Output is one of ``options`` exactly."""
    return _checked("start: " + " | ".join(json.dumps(o) for o in options), "choice", param)


def grammar(text: str, param: str = "grammar") -> Constraint:
    """A GBNF (llama.cpp's) or Lark grammar, as llguidance reads both."""
    from llguidance.gbnf_to_lark import any_to_lark

    try:
        lark = any_to_lark(text)
    except Exception as exc:  # noqa: BLE001 - its parser raises plain exceptions on bad grammars
        raise ConstraintError(f"{param}: the grammar cannot be read (GBNF or Lark): {exc}", param) from exc
    return _checked(lark, "grammar", param)
