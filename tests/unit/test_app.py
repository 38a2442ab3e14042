"""The HTTP layer in-process with scripted backends (#5): SSE framing when a stream cannot be
continued, the error envelope, the API key. The real-engine paths are in tests/e2e."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from agent.serving.app import create_app
from agent.serving.node import build_node
from agent.serving.router import Router
from agent.settings import Settings
from tests.unit.fake_backend import FakeBackend, Script


def app_and_router(settings: dict, *backends):
    s = Settings.model_validate(settings)
    router = Router(list(backends), s.router, s.admission)
    return create_app(s, build_node(s, router, "m")), router


async def call(app, router, method, path, **kwargs):
    await router.start()
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.request(method, path, **kwargs)
    finally:
        await router.stop()


def events(response: httpx.Response) -> list:
    return [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]


def test_stream_ends_with_an_error_event_and_done_when_continuation_is_off():
    app, router = app_and_router({"router": {"continue_streams": False}},
                                 FakeBackend("vllm", Script(die_after=2)), FakeBackend("llamacpp"))
    r = asyncio.run(call(app, router, "POST", "/v1/completions",
                         json={"model": "m", "prompt": "hi", "max_tokens": 6, "stream": True}))
    assert r.status_code == 200 and r.headers["x-node-agent-backend"] == "vllm"
    data = events(r)
    assert data[-1] == "[DONE]"
    err = json.loads(data[-2])["error"]
    assert err["code"] == "stream_interrupted" and "vllm failed mid-stream" in err["message"]
    assert "".join(json.loads(d)["choices"][0]["text"] for d in data[:-2]) == "ab"


def test_stream_continues_on_the_fallback_in_one_sse_stream():
    app, router = app_and_router({}, FakeBackend("vllm", Script(die_after=2)),
                                 FakeBackend("llamacpp", Script(words=list("XYZW"))))
    r = asyncio.run(call(app, router, "POST", "/v1/chat/completions",
                         json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
                               "stream": True, "stream_options": {"include_usage": True}}))
    data = [json.loads(d) for d in events(r)[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in data if c["choices"])
    assert text == "abXYZW"
    assert data[-1]["usage"]["completion_tokens"] == 6 and data[-1]["choices"] == []


@pytest.mark.parametrize("headers, status", [({}, 401), ({"authorization": "Bearer wrong-key-wrong-key"}, 401),
                                             ({"authorization": "Bearer 0123456789abcdef"}, 200)])
def test_api_key_guards_v1_but_not_health(headers, status):
    app, router = app_and_router({"server": {"api_key": "0123456789abcdef"}}, FakeBackend("llamacpp"))
    r = asyncio.run(call(app, router, "GET", "/v1/models", headers=headers))
    assert r.status_code == status
    if status == 401:
        assert r.json()["error"]["code"] == "invalid_api_key"
    app, router = app_and_router({"server": {"api_key": "0123456789abcdef"}}, FakeBackend("llamacpp"))
    assert asyncio.run(call(app, router, "GET", "/health/live")).status_code == 200


def test_unknown_path_uses_the_envelope():
    app, router = app_and_router({}, FakeBackend("llamacpp"))
    r = asyncio.run(call(app, router, "GET", "/v1/nope"))
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_ready_says_degraded_when_the_fallback_serves():
    app, router = app_and_router({}, FakeBackend("vllm", Script(fail_starts=99)), FakeBackend("llamacpp"))
    r = asyncio.run(call(app, router, "GET", "/health/ready"))
    body = r.json()
    assert r.status_code == 200 and (body["status"], body["backend"]) == ("degraded", "llamacpp")
    assert body["reason"] == "serving from the fallback llamacpp; vllm is failed"


@pytest.mark.parametrize("config, refusal", [
    ({"server": {"host": "127.0.0.1"}}, None), ({"server": {"host": "::1"}}, None),
    ({"server": {"host": "localhost"}}, None),
    ({"server": {"host": "0.0.0.0"}}, "without an API key .* and a health token"),
    ({"server": {"host": "0.0.0.0", "insecure": True}}, None),
    ({"server": {"host": "192.168.1.5", "api_key": "0123456789abcdef"}}, "without a health token"),
    ({"server": {"host": "192.168.1.5"}, "health": {"token": "0123456789abcdef"}}, "without an API key"),
    ({"server": {"host": "192.168.1.5", "api_key": "0123456789abcdef"}, "health": {"token": "fedcba9876543210"}},
     None),
])
def test_non_loopback_bind_needs_a_key_and_a_health_token_or_insecure(config, refusal):
    from agent.errors import UsageError
    from agent.serving.run import check_bind

    settings = Settings.model_validate(config)
    if refusal is None:
        check_bind(settings)
    else:
        with pytest.raises(UsageError, match=refusal):
            check_bind(settings)


@pytest.mark.parametrize("prompt", ["", [""]])
def test_an_empty_prompt_is_a_400_naming_the_prompt(prompt):
    """Found by the e2e fuzz: llama.cpp asserted on a prompt of no tokens and the client got a
    plain-text 500."""
    app, router = app_and_router({}, FakeBackend("llamacpp"))
    r = asyncio.run(call(app, router, "POST", "/v1/completions", json={"model": "m", "prompt": prompt}))
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "prompt" and "the prompt is empty" in err["message"]


def test_a_raw_engine_error_fails_over_and_a_bug_elsewhere_is_a_500_in_the_envelope():
    class Broken(FakeBackend):
        async def prepare(self, request):
            raise AssertionError("a bug")

    async def go(app, router):
        await router.start()
        try:
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                return await client.post("/v1/completions", json={"model": "m", "prompt": "hi"})
        finally:
            await router.stop()

    # Whatever an engine raises is an engine fault: the chain's next backend answers.
    app, router = app_and_router({}, Broken("vllm"), FakeBackend("llamacpp"))
    r = asyncio.run(go(app, router))
    assert r.status_code == 200 and r.headers["x-node-agent-backend"] == "llamacpp"
    assert router.routes[0].breaker.failures == 1
    # With nothing behind it, the client learns that the engine failed (502), in the envelope.
    app, router = app_and_router({}, Broken("llamacpp"))
    r = asyncio.run(go(app, router))
    assert r.status_code == 502 and r.json()["error"]["code"] == "engine_failed"
    assert "AssertionError: a bug" in r.json()["error"]["message"]
    # A bug outside the engines is a 500, still in the envelope.
    app, router = app_and_router({}, FakeBackend("llamacpp"))

    async def bug(request):
        raise AssertionError("a bug in the agent")
    router.complete_deltas = bug
    r = asyncio.run(go(app, router))
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "server_error" and "AssertionError" in r.json()["error"]["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_prompts_are_logged_only_when_asked(caplog, stream):
    body = {"model": "m", "messages": [{"role": "user", "content": "secret words"}], "max_tokens": 3,
            "stream": stream}
    for log_prompts in (False, True):
        caplog.clear()
        app, router = app_and_router({"server": {"log_prompts": log_prompts}}, FakeBackend("llamacpp"))
        with caplog.at_level("DEBUG", logger="agent.requests"):
            r = asyncio.run(call(app, router, "POST", "/v1/chat/completions", json=body))
        assert r.status_code == 200
        lines = [rec.getMessage() for rec in caplog.records if rec.name == "agent.requests"]
        if not log_prompts:
            assert lines and not any("secret" in line for line in lines)
            assert "12 prompt characters" in lines[0]
            continue
        request, answer = (json.loads(line) for line in lines)
        assert request["messages"] == [{"role": "user", "content": "secret words"}]
        assert (answer["event"], answer["backend"], answer["text"]) == ("answer", "llamacpp", "abc")
        assert router.routes[0].admission.active == 0  # the stream's reservation was given back


def test_a_logged_stream_that_failed_over_logs_the_whole_answer(caplog):
    """The client sees the primary's words and then the fallback's in one stream; the log must
    hold that same text, not only the fallback's part."""
    app, router = app_and_router({"server": {"log_prompts": True}}, FakeBackend("vllm", Script(die_after=2)),
                                 FakeBackend("llamacpp", Script(words=list("XYZW"))))
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "stream": True}
    with caplog.at_level("INFO", logger="agent.requests"):
        r = asyncio.run(call(app, router, "POST", "/v1/chat/completions", json=body))
    streamed = "".join(json.loads(d)["choices"][0]["delta"].get("content", "") for d in events(r)[:-1])
    answer = json.loads([rec.getMessage() for rec in caplog.records if rec.name == "agent.requests"][-1])
    assert streamed == "abXYZW" and (answer["text"], answer["backend"]) == ("abXYZW", "llamacpp")
