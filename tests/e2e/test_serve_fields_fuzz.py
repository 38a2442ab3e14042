"""Property-based fuzz of the #12 fields against the real server (llama.cpp, the tiny model):
bodies valid by construction get a 200 whose answer honours what they asked (choices, token
budget, logprobs, constraints, tool calls, echo, stop strings, usage), and a body with one
invalid field gets a 4xx naming that field. No 5xx, no field accepted and ignored.

(The #5/#11 fuzz of broken bodies is tests/e2e/test_serve_fuzz.py.)"""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.serving.fields import BY_ENDPOINT, RULES

MODEL = "tiny"
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["a"], "additionalProperties": False}
TOOL = {"type": "function", "function": {"name": "f", "parameters": SCHEMA}}
ids = st.integers(0, 300)  # inside the tiny model's vocabulary
word = st.text(alphabet="abcdefgh xyz", min_size=1, max_size=6)

COMMON = {
    "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "top_k": st.integers(-1, 50),
    "min_p": st.floats(0, 1), "seed": st.integers(0, 2**40), "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2), "repetition_penalty": st.floats(0.5, 2),
    "stop": st.lists(word, max_size=4), "n": st.integers(1, 3), "ignore_eos": st.booleans(),
    "include_stop_str_in_output": st.booleans(), "user": word,
    "logit_bias": st.dictionaries(ids.map(str), st.floats(-100, 100), max_size=3),
    "stop_token_ids": st.lists(ids, max_size=3), "min_tokens": st.integers(0, 2),
}
CHAT_ONLY = {"metadata": st.dictionaries(word, word, max_size=3), "safety_identifier": word,
             "prompt_cache_key": word, "parallel_tool_calls": st.booleans()}
NULLABLE = [n for n in BY_ENDPOINT["chat"] if n not in ("model", "messages", "max_tokens")]
DEFAULTS = [(r.name, v) for r in RULES if not r.honoured and "chat" in r.endpoints for v in r.allowed]


@st.composite
def chat_body(draw):
    body = {"model": MODEL, "messages": [{"role": "user", "content": draw(word)}], "max_tokens": draw(st.integers(2, 8))}
    for name, strat in {**COMMON, **CHAT_ONLY}.items():
        if draw(st.booleans()):
            body[name] = draw(strat)
    body.update(draw(st.dictionaries(st.sampled_from(NULLABLE), st.none(), max_size=3)))
    name, value = draw(st.sampled_from(DEFAULTS))
    body[name] = value
    if draw(st.booleans()):
        body["logprobs"], body["top_logprobs"] = True, draw(st.integers(0, 5))
    extra = draw(st.sampled_from(["none", "json_object", "json_schema", "required", "named", "auto"]))
    if extra in ("json_object", "json_schema"):
        body["response_format"] = {"type": "json_object"} if extra == "json_object" else {
            "type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}}
        body["max_tokens"] = 16
    elif extra != "none":
        body["tools"] = [TOOL]
        body["tool_choice"] = {"named": {"type": "function", "function": {"name": "f"}}}.get(extra, extra)
        body["max_tokens"] = 16
    if "response_format" in body or body.get("tool_choice") not in (None, "auto"):
        body.pop("min_tokens", None)  # a constraint decides where the answer ends (a 400 otherwise)
        body.pop("ignore_eos", None)
    if draw(st.booleans()):
        body["stream"] = True
        if draw(st.booleans()):
            body["stream_options"] = {"include_usage": True}
    return body


INVALID = {
    "temperature": st.sampled_from([2.5, -0.1, "warm"]), "top_p": st.sampled_from([0, 1.5]),
    "n": st.sampled_from([0, 17, "two"]), "max_tokens": st.sampled_from([0, -3]), "seed": st.just(-1),
    "presence_penalty": st.just(3), "top_k": st.just(-2), "min_p": st.just(1.5), "repetition_penalty": st.just(0),
    "logit_bias": st.sampled_from([{"5": 200}, {"x": 1}, {"99999999": 1}]), "stop": st.sampled_from([[""], ["a"] * 5]),
    "stop_token_ids": st.sampled_from([[-1], [10**9]]), "top_logprobs": st.just(21),
    "response_format": st.sampled_from([{"type": "xml"}, {"type": "json_schema", "json_schema": {
        "name": "s", "schema": {"type": "nope"}}}]),
    "tools": st.just([{"type": "custom", "custom": {"name": "x"}}]), "tool_choice": st.just("sometimes"),
    "messages": st.just([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]),
    "min_tokens": st.just(99),
    **{r.name: st.just("please") for r in RULES if not r.honoured and "chat" in r.endpoints},
}


@pytest.fixture(scope="module")
def server(start_server, tiny_model):
    s = start_server({"model": {"ref": str(tiny_model.gguf_path)}, "engines": {"chain": ["llamacpp"]},
                      "planner": {"target_context": 1024, "min_context": 512}, "server": {"model_name": MODEL}})
    s.wait_ready()
    return s


def send(server, body) -> tuple[int, list | dict]:
    with httpx.Client(base_url=server.url, timeout=120) as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
        raw = r.read()
    if r.status_code == 200 and body.get("stream"):
        data = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]
        assert data[-1] == "[DONE]"
        return 200, [json.loads(d) for d in data[:-1]]
    return r.status_code, json.loads(raw)


def answers(body, payload) -> tuple[list[dict], dict | None]:
    """(choices as whole messages, usage) of a streamed or whole answer."""
    if not body.get("stream"):
        return [{"content": c["message"]["content"], "tool_calls": c["message"].get("tool_calls") or [],
                 "finish": c["finish_reason"], "logprobs": (c["logprobs"] or {}).get("content")}
                for c in payload["choices"]], payload["usage"]
    out: dict[int, dict] = {}
    usage = None
    for chunk in payload:
        assert "error" not in chunk, chunk
        usage = chunk.get("usage") or usage
        for ch in chunk["choices"]:
            a = out.setdefault(ch["index"], {"content": "", "tool_calls": {}, "finish": None, "logprobs": []})
            a["content"] += ch["delta"].get("content") or ""
            for tc in ch["delta"].get("tool_calls", []):
                t = a["tool_calls"].setdefault(tc["index"], {"function": {"name": "", "arguments": ""}})
                t["function"]["name"] += tc.get("function", {}).get("name") or ""
                t["function"]["arguments"] += tc.get("function", {}).get("arguments") or ""
            a["finish"] = ch["finish_reason"] or a["finish"]
            a["logprobs"] += (ch.get("logprobs") or {}).get("content") or []
    return [{**a, "tool_calls": list(a["tool_calls"].values())} for _, a in sorted(out.items())], usage


def honoured(body, choices, usage) -> None:
    n, budget = body.get("n") or 1, body["max_tokens"]
    assert len(choices) == n
    if usage is not None:
        assert usage["completion_tokens"] <= n * budget
    elif not body.get("stream"):
        raise AssertionError("no usage")
    if body.get("stream") and not (body.get("stream_options") or {}).get("include_usage"):
        assert usage is None
    stops = bool(body.get("stop") or body.get("stop_token_ids"))  # may end any answer early, as asked
    for c in choices:
        assert c["finish"] in ("stop", "length", "tool_calls")
        if body.get("logprobs"):
            assert all(len(e["top_logprobs"]) == body["top_logprobs"] for e in c["logprobs"])
        elif not body.get("stream"):
            assert c["logprobs"] is None
        if c["finish"] == "stop" and not stops and (body.get("response_format") or {}).get("type", "text") != "text":
            assert isinstance(json.loads(c["content"]), dict)
        if body.get("tool_choice") in ("required",) or isinstance(body.get("tool_choice"), dict):
            assert c["finish"] in ("tool_calls", "length") or stops
            if c["finish"] == "tool_calls":
                assert all(t["function"]["name"] == "f" and json.loads(t["function"]["arguments"]) is not None
                           for t in c["tool_calls"])
        if body.get("stop") and not body.get("include_stop_str_in_output") and not body.get("min_tokens") \
                and c["content"]:  # (before min_tokens stop strings are not checked, as on vLLM)
            assert not any(s in c["content"] for s in body["stop"])


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(body=chat_body())
def test_valid_bodies_are_answered_as_asked(server, body):
    status, payload = send(server, body)
    assert status == 200, (body, payload)
    honoured(body, *answers(body, payload))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(body=chat_body(), bad=st.sampled_from(sorted(INVALID)).flatmap(lambda k: st.tuples(st.just(k), INVALID[k])))
def test_one_invalid_field_is_a_4xx_naming_it(server, body, bad):
    name, value = bad
    if name == "top_logprobs":
        body["logprobs"] = True
    body[name] = value
    status, payload = send(server, body)
    assert 400 <= status < 500, (body, payload)
    param = payload["error"]["param"] or ""
    assert param == name or param.startswith(name + "."), (name, payload)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(name=st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=3, max_size=12))
def test_an_unknown_field_is_a_400_naming_it(server, name):
    if name in BY_ENDPOINT["chat"]:
        return
    status, payload = send(server, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], name: 1})
    assert status == 400 and payload["error"]["param"] == name
