"""The field policy (#12): every request field of the ``openai`` package's own request types, and
every extra of vLLM's and llama-cpp-python's servers, is honoured or refused, none ignored.

vLLM's own request models are checked against the table in
tests/integration/test_vllm_openai_surface.py (importing vLLM takes half a minute).

Refused fields: a value that asks for something is a 400 naming the field; the values that ask
for nothing are accepted. Honoured fields: each has an example that must change what reaches the
engines (the ``GenerationRequest``) or the answer, so a field dropped on the way fails here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging

import pytest

from agent.backends.base import GenerationRequest
from agent.serving.fields import BY_ENDPOINT, CHAT, COMPLETIONS, RULES
from agent.serving.jobs import chat_job, completion_job
from agent.serving.openai import ChatCompletionRequest, CompletionRequest
from tests.unit.fake_backend import FakeBackend, Script
from tests.unit.test_app import app_and_router, call, events

MSGS = [{"role": "user", "content": "hi there"}]
BASE = {CHAT: {"model": "m", "messages": MSGS}, COMPLETIONS: {"model": "m", "prompt": "hi there"}}
PATH = {CHAT: "/v1/chat/completions", COMPLETIONS: "/v1/completions"}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
    "a": {"type": "integer"}}, "required": ["a"]}}}
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}


def openai_fields(module: str) -> set[str]:
    import importlib

    params = importlib.import_module(module)
    return set(params.CompletionCreateParamsBase.__annotations__) | set(
        params.CompletionCreateParamsStreaming.__annotations__)


@pytest.mark.parametrize("endpoint, module", [(CHAT, "openai.types.chat.completion_create_params"),
                                              (COMPLETIONS, "openai.types.completion_create_params")])
def test_every_field_of_the_openai_request_types_has_a_rule(endpoint, module):
    missing = openai_fields(module) - set(BY_ENDPOINT[endpoint])
    assert not missing, f"{endpoint}: no policy for {sorted(missing)}"


def test_every_llama_cpp_server_extra_has_a_rule():
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (scripts/test installs it)")
    from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest

    for endpoint, model in ((CHAT, CreateChatCompletionRequest), (COMPLETIONS, CreateCompletionRequest)):
        missing = set(model.model_fields) - set(BY_ENDPOINT[endpoint])
        assert not missing, f"{endpoint}: llama-cpp-python's {sorted(missing)} have no policy"


def post(endpoint: str, body: dict, backend: FakeBackend | None = None):
    app, router = app_and_router({}, backend or FakeBackend("vllm"))
    return asyncio.run(call(app, router, "POST", PATH[endpoint], json=body))


REFUSED = [(e, r) for r in RULES if not r.honoured for e in r.endpoints]


@pytest.mark.parametrize("endpoint, rule", REFUSED, ids=[f"{e}-{r.name}" for e, r in REFUSED])
def test_a_refused_field_is_a_400_naming_it_and_its_default_values_are_accepted(endpoint, rule):
    asked = {"x": 1} if rule.allowed and not isinstance(rule.allowed[0], dict) else "something"
    r = post(endpoint, {**BASE[endpoint], rule.name: asked})
    assert r.status_code == 400 and r.json()["error"]["param"] == rule.name, r.text
    assert rule.how in r.json()["error"]["message"]
    for value in (None, *rule.allowed):
        r = post(endpoint, {**BASE[endpoint], rule.name: value})
        assert r.status_code == 200, (rule.name, value, r.text)


def test_an_unknown_field_is_a_400_naming_it():
    r = post(CHAT, {**BASE[CHAT], "guided_json": SCHEMA})
    assert r.status_code == 400 and r.json()["error"]["param"] == "guided_json"
    assert "unknown field" in r.json()["error"]["message"]


# What vllm-router 0.1.17 forwards for a plain client request: it re-serializes the body with its own
# (SGLang-derived) request type, so these defaults arrive whatever the client sent (captured from
# the router's Rust binary in front of a recording server).
ROUTER_DEFAULTS = {
    CHAT: {"stream": False, "logprobs": False, "no_stop_trim": False, "ignore_eos": False,
           "continue_final_message": False, "skip_special_tokens": True, "separate_reasoning": True,
           "stream_reasoning": True, "return_hidden_states": False, "include_reasoning": True},
    COMPLETIONS: {"stream": False, "echo": False, "no_stop_trim": False, "ignore_eos": False,
                  "skip_special_tokens": True, "return_hidden_states": False},
}


@pytest.mark.parametrize("endpoint", [CHAT, COMPLETIONS])
def test_a_request_as_vllm_router_forwards_it_is_served(endpoint):
    r = post(endpoint, {**BASE[endpoint], "max_tokens": 5, **ROUTER_DEFAULTS[endpoint]})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


# Honoured fields: an example that must reach the GenerationRequest (attribute ``maps_to``) ...
EXAMPLES = {
    "max_tokens": 7, "temperature": 0.3, "top_p": 0.5, "stop": ["x"], "seed": 5, "presence_penalty": 0.5,
    "frequency_penalty": 0.5, "logit_bias": {"3": 2.0}, "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2,
    "repeat_penalty": 1.2, "min_tokens": 2, "ignore_eos": True, "stop_token_ids": [4],
    "include_stop_str_in_output": True, "chat_template_kwargs": {"enable_thinking": False},
    "max_completion_tokens": 9, "response_format": {"type": "json_object"},
    "structured_outputs": {"regex": "[a-z]+"}, "grammar": 'root ::= "yes" | "no"', "allowed_token_ids": [1, 2],
    "tools": [TOOL], "tool_choice": "required", "parallel_tool_calls": False,
    "messages": [{"role": "user", "content": "another question"}], "prompt": "another prompt",
    "logprobs": {CHAT: True, COMPLETIONS: 2}, "top_logprobs": 3,
}
COMBINED = {"top_logprobs": {"logprobs": True}, "parallel_tool_calls": {"tools": [TOOL], "tool_choice": "required"},
            "tool_choice": {"tools": [TOOL]}, "continue_final_message": {"add_generation_prompt": None}}


def generation(endpoint: str, body: dict) -> GenerationRequest:
    features = [FakeBackend("x").features()]
    if endpoint == CHAT:
        return chat_job(ChatCompletionRequest.model_validate(body), "r", 16, features).requests[0]
    return completion_job(CompletionRequest.model_validate(body), "r", features).requests[0]


MAPPED = [(e, r) for r in RULES if r.honoured and r.maps_to not in ("response", "") for e in r.endpoints]


@pytest.mark.parametrize("endpoint, rule", MAPPED, ids=[f"{e}-{r.name}" for e, r in MAPPED])
def test_an_honoured_field_reaches_the_engines(endpoint, rule):
    if rule.name == "continue_final_message":
        body = {**BASE[CHAT], "messages": MSGS + [{"role": "assistant", "content": "Hel"}]}
        with_it = generation(CHAT, {**body, "continue_final_message": True})
        assert with_it.assistant_prefix == "Hel" and with_it.messages == tuple(generation(CHAT, BASE[CHAT]).messages)
        return
    if rule.name == "add_generation_prompt":
        assert generation(CHAT, {**BASE[CHAT], "add_generation_prompt": True}) is not None
        return
    example = EXAMPLES[rule.name]
    example = example[endpoint] if isinstance(example, dict) and endpoint in example else example
    base = {**BASE[endpoint], **{k: v for k, v in COMBINED.get(rule.name, {}).items() if k != rule.name}}
    if rule.name == "parallel_tool_calls":
        base = {**base, "parallel_tool_calls": True}
    before = generation(endpoint, base)
    after = generation(endpoint, {**base, rule.name: example})
    field = {"logit_bias_type": "logit_bias"}.get(rule.name, rule.maps_to)
    assert getattr(before, field) != getattr(after, field), f"{rule.name} did not reach {field}"
    assert dataclasses.replace(after, **{field: getattr(before, field)}) is not None


# ... or the answer.
def chat_stream(body: dict) -> list[dict]:
    r = post(CHAT, {**BASE[CHAT], "stream": True, **body})
    return [json.loads(e) for e in events(r)[:-1]]


def test_the_fields_that_shape_the_answer_change_it(caplog):
    assert len(post(CHAT, {**BASE[CHAT], "n": 3}).json()["choices"]) == 3
    assert post(CHAT, {**BASE[CHAT], "model": "other"}).status_code == 404
    assert "text/event-stream" in post(CHAT, {**BASE[CHAT], "stream": True}).headers["content-type"]
    assert "usage" in chat_stream({"stream_options": {"include_usage": True}})[-1]
    assert "usage" not in chat_stream({})[-1]
    r = post(COMPLETIONS, {**BASE[COMPLETIONS], "echo": True, "max_tokens": 2}).json()
    assert r["choices"][0]["text"] == "hi thereab"
    assert len(post(COMPLETIONS, {**BASE[COMPLETIONS], "best_of": 2, "n": 2}).json()["choices"]) == 2
    assert post(COMPLETIONS, {**BASE[COMPLETIONS], "best_of": 3}).status_code == 400
    caplog.set_level(logging.DEBUG, logger="agent.requests")
    ids = {"user": "u-1", "metadata": {"k": "v-2"}, "safety_identifier": "s-3", "prompt_cache_key": "c-4"}
    assert post(CHAT, {**BASE[CHAT], **ids}).status_code == 200
    for marker in ("u-1", "v-2", "s-3", "c-4"):
        assert marker in caplog.text
    response_rules = {r.name for r in RULES if r.honoured and r.maps_to == "response"}
    assert response_rules == {"model", "n", "stream", "stream_options", "user", "metadata", "prompt_cache_key",
                              "safety_identifier", "echo", "best_of"}  # each one checked above


def test_explicit_null_is_accepted_for_every_optional_field():
    for endpoint in (CHAT, COMPLETIONS):
        nulls = {name: None for name in BY_ENDPOINT[endpoint] if name not in ("model", "messages", "prompt")}
        r = post(endpoint, {**BASE[endpoint], **nulls})
        assert r.status_code == 200, r.text


def test_token_ids_need_one_vocabulary_across_the_chain():
    from agent.backends.base import Features

    app, router = app_and_router({}, FakeBackend("vllm", Script(features=Features(vocab="a", vocab_size=50))),
                                 FakeBackend("llamacpp", Script(features=Features(vocab="b", vocab_size=50))))
    r = asyncio.run(call(app, router, "POST", "/v1/completions", json={**BASE[COMPLETIONS], "logit_bias": {"3": 1}}))
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias"
    assert "token ids differ between this node's engines" in r.json()["error"]["message"]
    r = post(COMPLETIONS, {**BASE[COMPLETIONS], "stop_token_ids": [640]})
    assert r.status_code == 400 and "outside this model's vocabulary" in r.json()["error"]["message"]


def test_docs_list_every_field_with_its_policy():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "serving.md").read_text()
    for rule in RULES:
        assert f"| `{rule.name}` |" in doc and rule.how in doc, f"docs/serving.md does not list {rule.name}"
