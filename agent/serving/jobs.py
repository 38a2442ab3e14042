"""A validated request → a ``Job``: one engine-neutral ``GenerationRequest`` per choice, and how to
shape the engines' text back into OpenAI's answer (tool calls, logprobs, echo).

Choice ``i`` of ``n`` is its own sequence with seed ``seed + i`` (what vLLM's parallel sampling
does, vllm/v1/engine/parallel_sampling.py), so it fails over, and is admitted, on its own: ``n``
sequences reserve ``n`` times their tokens. A completions request with several prompts has
``n`` choices per prompt, indexed prompt by prompt, as OpenAI numbers them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from agent import constraints
from agent.backends.base import Constraint, Features, GenerationRequest
from agent.serving.errors import InvalidRequest
from agent.serving.fields import check_chain, vocabulary
from agent.serving.openai import (
    AllowedChoice,
    ChatCompletionRequest,
    CompletionRequest,
    NamedChoice,
    _Body,
)
from agent.tools import parsers, render

GREEDY_BELOW = 1e-5
RESERVED_TEMPLATE_VARS = {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token",
                          "raise_exception", "tool_choice", "functions", "function_call"}


@dataclass(frozen=True)
class ToolPlan:
    """How the answer's text becomes tool calls: ``auto`` (read by the family's ``parser``), ``named``
    (the text is the arguments of ``name``), ``required`` (a JSON array of calls), or ``none``. The
    parser also makes the call ids (Mistral's templates want their own kind)."""

    mode: str = "none"
    parser: parsers.Parser | None = None
    name: str | None = None


@dataclass
class Job:
    endpoint: str
    requests: list[GenerationRequest]
    stream: bool
    include_usage: bool
    n: int = 1
    tools: ToolPlan = field(default_factory=ToolPlan)
    logprobs: int | None = None
    echo: list[str] = field(default_factory=list)  # completions: text prepended to each choice
    log: dict[str, Any] = field(default_factory=dict)  # user, metadata, ...: for the request log line


def _constraint(body: _Body) -> Constraint | None:
    try:
        rf = body.response_format
        if rf is not None and rf.type == "json_object":
            return constraints.json_object()
        if rf is not None and rf.type == "json_schema":
            schema = rf.json_schema.schema_
            return constraints.json_schema(schema) if schema else constraints.json_object()
        so = body.structured_outputs
        if so is not None:
            if so.json_ is not None:
                import json

                schema = json.loads(so.json_) if isinstance(so.json_, str) else so.json_
                return constraints.json_schema(schema, "structured_outputs.json")
            if so.json_object:
                return constraints.json_object()
            if so.regex is not None:
                return constraints.regex(so.regex)
            if so.choice is not None:
                return constraints.choice(so.choice)
            return constraints.grammar(so.grammar, "structured_outputs.grammar")
        if body.grammar is not None:
            return constraints.grammar(body.grammar)
    except constraints.ConstraintError as exc:
        raise InvalidRequest(str(exc), param=exc.param) from exc
    except ValueError as exc:  # structured_outputs.json given as text that is not JSON
        raise InvalidRequest(f"structured_outputs.json: not JSON: {exc}", param="structured_outputs.json") from exc
    return None


def _token_ids(body: _Body, features: list[Features]) -> dict[str, Any]:
    """logit_bias / stop_token_ids / allowed_token_ids, checked against the chain's one vocabulary."""
    given = {k: getattr(body, k) for k in ("logit_bias", "stop_token_ids", "allowed_token_ids") if getattr(body, k)}
    if not given:
        return {}
    vocab, size = vocabulary(features)
    name = next(iter(given))
    check_chain(GenerationRequest("check", 1, token_space=vocab or "?"), features, param=name)
    for key, value in given.items():
        bad = [t for t in value if not 0 <= int(t) < size]
        if bad:
            raise InvalidRequest(f"{key}: token id {bad[0]} is outside this model's vocabulary (0-{size - 1})",
                                 param=key)
    return {"token_space": vocab, "logit_bias": tuple((int(t), float(b)) for t, b in (body.logit_bias or {}).items()),
            "stop_token_ids": tuple(body.stop_token_ids or ()), "allowed_token_ids": tuple(body.allowed_token_ids or ())}


def _sampling(body: _Body) -> dict[str, Any]:
    top_k = body.top_k if body.top_k is not None else 0
    rep = body.repetition_penalty if body.repetition_penalty is not None else body.repeat_penalty
    temperature = 1.0 if body.temperature is None else body.temperature
    return dict(
        # below 1e-5 vLLM samples greedily (its _SAMPLING_EPS); llama.cpp would divide logits by it
        temperature=0.0 if temperature < GREEDY_BELOW else temperature,
        top_p=1.0 if body.top_p is None else body.top_p, top_k=max(0, top_k),
        min_p=body.min_p or 0.0, presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0, repetition_penalty=1.0 if rep is None else rep,
        min_tokens=body.min_tokens or 0, ignore_eos=bool(body.ignore_eos),
        include_stop_str_in_output=bool(body.include_stop_str_in_output), stop=body.stops(), seed=body.seed,
    )


def _min_within_max(request: GenerationRequest) -> None:
    """Checks across fields that the engines would otherwise fail on, or answer differently."""
    if request.min_tokens > request.max_tokens:
        raise InvalidRequest(f"min_tokens: {request.min_tokens} is more than max_tokens ({request.max_tokens})",
                             param="min_tokens")
    if request.constraint is not None:
        # Once a grammar is complete only an end token may follow: masking it leaves nothing to sample.
        for name, value in (("min_tokens", request.min_tokens), ("ignore_eos", request.ignore_eos)):
            if value:
                raise InvalidRequest(f"{name}: not with an output constraint, which decides where the answer ends",
                                     param=name)


def _choices(base: GenerationRequest, n: int, first_index: int = 0) -> list[GenerationRequest]:
    if n == 1 and not first_index:
        return [base]
    return [dataclasses.replace(base, request_id=f"{base.request_id}-{first_index + i}",
                                seed=None if base.seed is None else base.seed + i) for i in range(n)]


def _messages(body: ChatCompletionRequest) -> tuple[list[dict], str]:
    """The conversation as templates take it, and the assistant prefix to continue from."""
    out = []
    for m in body.messages:
        d: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.name:
            d["name"] = m.name
        if m.tool_calls:
            d["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.tool_call_id:
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    prefix = ""
    if body.continue_final_message:
        prefix = out.pop()["content"] or ""
    return out, prefix


def _tool_plan(body: ChatCompletionRequest, template: str | None, specials: frozenset[str]
               ) -> tuple[tuple[dict, ...], ToolPlan, Constraint | None]:
    tools = [t.model_dump(exclude_none=True) for t in body.tools or ()]
    choice = body.tool_choice or ("auto" if tools else "none")
    if choice == "none" or not tools:
        return (), ToolPlan(), None
    parallel = body.parallel_tool_calls is not False
    if isinstance(choice, AllowedChoice):
        names = {c.function.name for c in choice.allowed_tools.tools}
        tools = [t for t in tools if t["function"]["name"] in names]
        choice = choice.allowed_tools.mode
    parser = parsers.for_template(template, render.knows_tools(template))  # its call ids suit the template
    try:
        if isinstance(choice, NamedChoice):
            tool = next(t for t in tools if t["function"]["name"] == choice.function.name)
            return tuple(tools), ToolPlan("named", parser, choice.function.name), constraints.tool_call(tool)
        if choice == "required":
            return tuple(tools), ToolPlan("required", parser), constraints.tool_calls(tools, parallel)
        strict = [t for t in tools if t["function"].get("strict")]
        constraint = None
        if strict:
            trigger, begin, end = parser.strict_tags()
            constraint = constraints.strict_tool_calls(strict, trigger, begin, end, special=trigger in specials)
        return tuple(tools), ToolPlan("auto", parser=parser), constraint
    except constraints.ConstraintError as exc:
        raise InvalidRequest(str(exc), param=exc.param) from exc


def chat_job(body: ChatCompletionRequest, request_id: str, default_max: int, features: Sequence[Features]) -> Job:
    features = list(features)
    primary = features[0] if features else Features()
    if body.chat_template_kwargs and RESERVED_TEMPLATE_VARS & set(body.chat_template_kwargs):
        bad = sorted(RESERVED_TEMPLATE_VARS & set(body.chat_template_kwargs))[0]
        raise InvalidRequest(f"chat_template_kwargs: {bad!r} is set by the request itself", param="chat_template_kwargs")
    messages, prefix = _messages(body)
    tools, plan, tool_constraint = _tool_plan(body, primary.chat_template, primary.special_tokens)
    constraint = _constraint(body)
    if constraint is not None and tool_constraint is not None:
        raise InvalidRequest("tool_choice: a tool choice that constrains the output cannot be combined with "
                             f"{constraint.kind} output; send one", param="tool_choice")
    if constraint is not None and plan.mode == "auto":
        raise InvalidRequest("response_format: with tools and tool_choice auto the output constraint would keep the "
                             "model from calling them; use tool_choice none or required", param="response_format")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    base = GenerationRequest(
        request_id=request_id, max_tokens=body.max_completion_tokens or body.max_tokens or default_max,
        messages=tuple(messages), assistant_prefix=prefix, logprobs=logprobs, constraint=constraint or tool_constraint,
        tools=tools, chat_template_kwargs=dict(body.chat_template_kwargs or {}), **_sampling(body),
        **_token_ids(body, features))
    _min_within_max(base)
    check_chain(base, features, param="top_logprobs" if logprobs else None)
    log = {k: getattr(body, k) for k in ("user", "metadata", "safety_identifier", "prompt_cache_key")
           if getattr(body, k) is not None}
    return Job("chat", _choices(base, body.choices()), bool(body.stream), body.include_usage(), body.choices(),
               plan, logprobs, log=log)


def completion_job(body: CompletionRequest, request_id: str, features: Sequence[Features]) -> Job:
    features = list(features)
    constraint = _constraint(body)
    common = dict(max_tokens=body.max_tokens or 16, logprobs=body.logprobs, constraint=constraint,
                  **_sampling(body), **_token_ids(body, features))
    requests: list[GenerationRequest] = []
    prompts = body.prompts()
    n = body.choices()
    for p, prompt in enumerate(prompts):
        base = GenerationRequest(request_id if len(prompts) == 1 else f"{request_id}-p{p}", prompt=prompt, **common)
        requests += _choices(base, n)
    _min_within_max(requests[0])
    check_chain(requests[0], features, param="logprobs" if body.logprobs is not None else None)
    echo = [r.prompt or "" for r in requests] if body.echo else []
    log = {"user": body.user} if body.user else {}
    return Job("completions", requests, bool(body.stream), body.include_usage(), n, ToolPlan(), body.logprobs,
               echo, log)
