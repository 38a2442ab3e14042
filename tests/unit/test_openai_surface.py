"""The OpenAI surface through the router (#12), with scripted engines: tool calls whole and
streamed, n choices, logprobs, and how constrained requests fail over. The real engines:
tests/e2e/test_serve_openai_llamacpp.py and test_serve_openai_vllm.py."""

from __future__ import annotations

import asyncio
import json

from agent.backends.base import Features
from tests.unit.fake_backend import FakeBackend, Script
from tests.unit.test_app import app_and_router, call, events

MSGS = [{"role": "user", "content": "weather in Paris?"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
HERMES = ["I'll check.", '<tool_call>\n{"name": "get_weather", ', '"arguments": {"city": "Paris"}}\n</tool_call>']
NO_CONTINUE = Features(continue_constrained=False, vocab="fake", vocab_size=64)


def post(body, *backends, path="/v1/chat/completions", settings=None):
    app, router = app_and_router(settings or {}, *(backends or (FakeBackend("vllm"),)))
    return asyncio.run(call(app, router, "POST", path, json={"model": "m", **body})), router


def chunks(r) -> list[dict]:
    data = events(r)
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def reassemble(cs: list[dict]) -> dict:
    """A streamed chat answer put together the way clients do it."""
    content, calls, finish = "", {}, None
    for c in cs:
        for ch in c["choices"]:
            d = ch["delta"]
            content += d.get("content") or ""
            for tc in d.get("tool_calls", []):
                call_ = calls.setdefault(tc["index"], {"id": None, "name": None, "arguments": ""})
                call_["id"] = tc.get("id") or call_["id"]
                fn = tc.get("function", {})
                call_["name"] = fn.get("name") or call_["name"]
                call_["arguments"] += fn.get("arguments") or ""
            finish = ch["finish_reason"] or finish
    return {"content": content, "calls": [calls[i] for i in sorted(calls)], "finish": finish}


def test_auto_tool_calls_stream_in_openai_shape_and_reassemble_to_the_whole_answer():
    whole, _ = post({"messages": MSGS, "tools": [TOOL]}, FakeBackend("vllm", Script(words=HERMES)))
    choice = whole.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "I'll check."
    (tc,) = choice["message"]["tool_calls"]
    assert tc["type"] == "function" and tc["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    streamed, _ = post({"messages": MSGS, "tools": [TOOL], "stream": True}, FakeBackend("vllm", Script(words=HERMES)))
    cs = chunks(streamed)
    firsts = [c["choices"][0]["delta"]["tool_calls"][0] for c in cs if "tool_calls" in c["choices"][0]["delta"]]
    assert set(firsts[0]) == {"index", "id", "type", "function"} and firsts[0]["function"]["arguments"] == ""
    assert all("id" not in f and "name" not in f["function"] for f in firsts[1:])
    got = reassemble(cs)
    assert got["finish"] == "tool_calls" and got["content"] == "I'll check."
    assert [(c["name"], c["arguments"]) for c in got["calls"]] == [("get_weather", '{"city": "Paris"}')]


def test_a_named_tool_streams_its_arguments_as_they_come():
    r, router = post({"messages": MSGS, "tools": [TOOL], "stream": True,
                      "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    got = reassemble(chunks(r))
    assert got["finish"] == "tool_calls" and got["calls"][0]["name"] == "get_weather"
    assert json.loads(got["calls"][0]["arguments"]) == {"city": "Paris"}
    sent = router.routes[0].backend.requests[0]
    assert sent.constraint.kind == "tool_call" and sent.tools[0]["function"]["name"] == "get_weather"


def test_required_gives_every_call_of_the_constrained_array():
    out = ['[{"name":"get_weather","parameters":{"city":"Paris"}}', ',{"name":"get_weather",', '"parameters":{"city":"Rome"}}]']
    r, router = post({"messages": MSGS, "tools": [TOOL], "tool_choice": "required"},
                     FakeBackend("vllm", Script(constrained=out)))
    calls = r.json()["choices"][0]["message"]["tool_calls"]
    assert [json.loads(c["function"]["arguments"])["city"] for c in calls] == ["Paris", "Rome"]
    assert router.routes[0].backend.requests[0].constraint.kind == "tool_calls"


def test_the_next_turn_of_a_tool_loop_is_accepted_and_reaches_the_template():
    history = MSGS + [
        {"role": "assistant", "content": None, "refusal": None, "annotations": [], "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": '{"temp": 21}'}]},
    ]
    r, router = post({"messages": history, "tools": [TOOL]})
    assert r.status_code == 200, r.text
    sent = router.routes[0].backend.requests[0].messages
    assert sent[1]["tool_calls"][0]["function"]["name"] == "get_weather" and sent[1]["content"] is None
    assert sent[2] == {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "call_1"}


def test_n_choices_are_sequences_of_their_own_with_derived_seeds_and_usage_for_all():
    backend = FakeBackend("vllm", Script(delay=0.01))
    app, router = app_and_router({}, backend)
    peak = []

    async def go():
        await router.start()
        try:
            import httpx

            async def watch():
                while True:
                    peak.append(router.routes[0].admission.reserved)
                    await asyncio.sleep(0.002)
            watcher = asyncio.create_task(watch())
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                r = await c.post("/v1/chat/completions", json={"model": "m", "messages": MSGS, "n": 3, "seed": 10,
                                                               "max_tokens": 4})
            watcher.cancel()
            return r
        finally:
            await router.stop()
    body = asyncio.run(go()).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert sorted(q.seed for q in backend.requests) == [10, 11, 12]
    prompt = len(backend.tokenize(backend.requests[0]))
    assert max(peak) == 3 * (prompt + 4)  # n sequences reserve n times prompt + max_tokens of KV
    assert body["usage"] == {"prompt_tokens": prompt, "completion_tokens": 12, "total_tokens": prompt + 12}


def test_n_streams_name_each_choice_and_usage_comes_once_at_the_end():
    r, _ = post({"messages": MSGS, "n": 2, "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}})
    cs = chunks(r)
    texts = {0: "", 1: ""}
    for c in cs[:-1]:
        for ch in c["choices"]:
            texts[ch["index"]] += ch["delta"].get("content") or ""
    assert texts == {0: "abc", 1: "abc"} and cs[-1]["usage"]["completion_tokens"] == 6 and not cs[-1]["choices"]


def test_logprobs_have_the_asked_number_of_alternatives():
    r, _ = post({"messages": MSGS, "logprobs": True, "top_logprobs": 4, "max_tokens": 3})
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in content] == ["a", "b", "c"] and all(len(e["top_logprobs"]) == 4 for e in content)
    r, _ = post({"prompt": "hi", "logprobs": 2, "max_tokens": 3}, path="/v1/completions")
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["tokens"] == ["a", "b", "c"] and lp["text_offset"] == [0, 1, 2] and len(lp["top_logprobs"][0]) == 2


JSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "c", "schema": {"type": "object"}}}


def test_a_constrained_stream_continues_under_its_constraint_on_the_fallback():
    vllm = FakeBackend("vllm", Script(die_after=2, features=NO_CONTINUE))
    llama = FakeBackend("llamacpp")
    r, router = post({"messages": MSGS, "response_format": JSON_FORMAT, "stream": True}, vllm, llama)
    got = reassemble(chunks(r))
    assert json.loads(got["content"]) == {"city": "Paris"} and got["finish"] == "stop"
    assert llama.requests[0].assistant_prefix == '{"city' and llama.requests[0].constraint is not None


def test_a_constrained_stream_that_no_engine_can_continue_ends_with_an_error_not_invalid_json():
    vllm = FakeBackend("vllm", Script(die_after=2, features=NO_CONTINUE))
    llama = FakeBackend("llamacpp", Script(features=NO_CONTINUE))
    r, _ = post({"messages": MSGS, "response_format": JSON_FORMAT, "stream": True}, vllm, llama)
    data = events(r)
    assert data[-1] == "[DONE]" and "cannot continue a constrained answer" in json.loads(data[-2])["error"]["message"]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in map(json.loads, data[:-2]) if c["choices"])
    assert text == '{"city' and llama.requests == []


def test_a_constrained_answer_that_fails_over_starts_over_whole_and_valid():
    vllm = FakeBackend("vllm", Script(die_after=2, features=NO_CONTINUE))
    r, _ = post({"messages": MSGS, "response_format": JSON_FORMAT}, vllm, FakeBackend("llamacpp"))
    assert r.headers["x-node-agent-backend"] == "llamacpp"
    assert json.loads(r.json()["choices"][0]["message"]["content"]) == {"city": "Paris"}


def test_an_engine_that_cannot_constrain_is_passed_by_without_blame():
    cpu_v2 = Features(constraints=False, constraints_reason="vLLM's CPU build with Model Runner V2 ...",
                      vocab="fake", vocab_size=64)
    vllm, llama = FakeBackend("vllm", Script(features=cpu_v2)), FakeBackend("llamacpp")
    r, router = post({"messages": MSGS, "response_format": {"type": "json_object"}}, vllm, llama)
    assert r.status_code == 200 and r.headers["x-node-agent-backend"] == "llamacpp"
    assert vllm.requests == [] and router.routes[0].breaker.failures == 0
    r, _ = post({"messages": MSGS, "response_format": {"type": "json_object"}}, FakeBackend("vllm", Script(features=cpu_v2)))
    assert r.status_code == 400 and "Model Runner V2" in r.json()["error"]["message"]


def test_models_tokenize_and_detokenize():
    app, router = app_and_router({}, FakeBackend("vllm", Script(context=300)))

    async def go():
        await router.start()
        try:
            import httpx

            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                return [await c.get("/v1/models"), await c.get("/v1/models/m"), await c.get("/v1/models/other"),
                        await c.post("/tokenize", json={"prompt": "one two three"}),
                        await c.post("/tokenize", json={"messages": MSGS}),
                        await c.post("/detokenize", json={"tokens": [0, 1, 2]}),
                        await c.post("/detokenize", json={"tokens": [999]})]
        finally:
            await router.stop()
    models, one, other, tok, tok_chat, detok, bad = asyncio.run(go())
    assert models.json()["data"][0]["max_model_len"] == 300 and one.json()["id"] == "m" and other.status_code == 404
    assert tok.json()["count"] == 3 and tok.json()["max_model_len"] == 300
    assert tok_chat.json()["count"] == 6  # the template's role and end tokens counted, as the engine renders them
    assert detok.json() == {"prompt": "abc"} and bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
