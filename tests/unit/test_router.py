"""Router: failover, continuation, breaker, restarts (#5), with faults injected by a scripted
backend. The same paths on the real engines: tests/e2e/test_serve_failover.py."""

from __future__ import annotations

import asyncio

import pytest

from agent.backends.base import BackendState, GenerationRequest
from agent.serving.errors import ContextTooLong, NotReady
from agent.serving.router import Breaker, Router, StreamInterrupted
from agent.settings import AdmissionSettings, RouterSettings
from tests.unit.fake_backend import FakeBackend, Script


def router(*backends, **rs) -> Router:
    settings = RouterSettings(**{"restart_backoff_s": 0.01, "breaker_cooldown_s": 0.05, **rs})
    return Router(list(backends), settings, AdmissionSettings())


def req(max_tokens=6, rid="r1") -> GenerationRequest:
    return GenerationRequest(rid, max_tokens, prompt="hello there")


async def started(r: Router) -> Router:
    await r.start()
    return r


async def stream_all(r: Router, request: GenerationRequest):
    return [s async for s in r.stream(request)]


def test_primary_serves_when_healthy():
    async def run():
        r = await started(router(FakeBackend("vllm"), FakeBackend("llamacpp")))
        backend, text, last = await r.complete(req())
        await r.stop()
        return backend, text, last
    backend, text, last = asyncio.run(run())
    assert backend == "vllm" and text == "abcdef" and last.finish_reason == "length"


def test_non_stream_dying_midway_is_answered_once_by_the_fallback():
    primary = FakeBackend("vllm", Script(die_after=3))
    fallback = FakeBackend("llamacpp", Script(words=list("uvwxyz")))

    async def run():
        r = await started(router(primary, fallback))
        out = await r.complete(req())
        await r.stop()
        return r, out
    r, (backend, text, _) = asyncio.run(run())
    assert backend == "llamacpp" and text == "uvwxyz"  # started over: no half answer from vllm
    assert fallback.requests[0].assistant_prefix == ""
    assert r.counters.switches[("vllm", "llamacpp", "BackendDied")] == 1


def test_stream_continues_on_the_fallback_after_the_text_so_far():
    primary = FakeBackend("vllm", Script(die_after=3))
    fallback = FakeBackend("llamacpp", Script(words=list("DEF")))

    async def run():
        r = await started(router(primary, fallback))
        out = await stream_all(r, req(6))
        await r.stop()
        return out
    served = asyncio.run(run())
    assert "".join(s.delta.text for s in served) == "abcDEF"
    assert [s.backend for s in served] == ["vllm"] * 3 + ["llamacpp"] * 3
    cont = fallback.requests[0]
    assert cont.assistant_prefix == "abc" and cont.max_tokens == 3
    assert served[-1].delta.completion_tokens == 6  # 3 carried from vllm + 3 from llama.cpp


def test_stream_ends_with_an_error_when_continuation_is_off():
    primary = FakeBackend("vllm", Script(die_after=2))

    async def run():
        r = await started(router(primary, FakeBackend("llamacpp"), continue_streams=False))
        got = []
        with pytest.raises(StreamInterrupted):
            async for s in r.stream(req()):
                got.append(s.delta.text)
        await r.stop()
        return got
    assert asyncio.run(run()) == ["a", "b"]


def test_no_first_token_in_time_fails_over():
    async def run():
        r = await started(router(FakeBackend("vllm", Script(stall=True)), FakeBackend("llamacpp"),
                                 first_token_timeout_s=0.05))
        out = await r.complete(req())
        await r.stop()
        return r, out
    r, (backend, _, _) = asyncio.run(run())
    assert backend == "llamacpp"
    assert any(reason.startswith("FirstTokenTimeout") for (_, _, reason) in r.counters.switches)


def test_breaker_opens_on_failures_and_half_opens_after_the_cooldown():
    b = Breaker(failures_to_open=2, cooldown_s=1.0)
    assert b.allows(0)
    b.failure(0, fatal=False)
    assert b.state == "closed" and b.allows(0)
    b.failure(0.1, fatal=False)
    assert b.state == "open" and not b.allows(0.5)
    assert b.allows(1.2) and b.state == "half_open"  # one probe...
    assert not b.allows(1.2)  # ...at a time
    b.failure(1.3, fatal=False)
    assert b.state == "open"
    assert b.allows(2.4)
    b.success()
    assert b.state == "closed" and b.failures == 0


def test_dead_backend_is_restarted_and_traffic_returns():
    primary = FakeBackend("vllm", Script(die_after=1, fail_starts=0))

    async def run():
        r = await started(router(primary, FakeBackend("llamacpp")))
        first, _, _ = await r.complete(req(rid="1"))  # vllm dies -> llama.cpp answers
        primary.script.die_after = None
        for _ in range(100):
            if primary.state is BackendState.READY and r.routes[0].restarts:
                break
            await asyncio.sleep(0.01)
        again, _, _ = await r.complete(req(rid="2"))
        await r.stop()
        return first, again, r.routes[0].restarts
    first, again, restarts = asyncio.run(run())
    assert first == "llamacpp" and again == "vllm" and restarts == 1 and primary.starts == 2


def test_restart_backs_off_after_failed_starts():
    primary = FakeBackend("vllm", Script(fail_starts=3))

    async def run():
        r = await started(router(primary, FakeBackend("llamacpp"), restart_backoff_s=0.01, restart_backoff_max_s=0.02))
        for _ in range(300):
            if primary.state is BackendState.READY:
                break
            await asyncio.sleep(0.01)
        await r.stop()
    asyncio.run(run())
    assert primary.starts == 4  # 1 + 3 failed retries, then up


def test_nothing_serving_is_not_ready():
    async def run():
        r = router(FakeBackend("llamacpp"))  # never started
        with pytest.raises(NotReady, match="llamacpp stopped"):
            await r.complete(req())
    asyncio.run(run())


def test_prompt_longer_than_the_context_is_a_400_not_a_failover():
    fallback = FakeBackend("llamacpp")

    async def run():
        r = await started(router(FakeBackend("vllm", Script(context=3)), fallback))
        with pytest.raises(ContextTooLong):
            await r.complete(GenerationRequest("x", 4, prompt="one two three four five"))
        await r.stop()
    asyncio.run(run())
    assert fallback.requests == []


def test_backend_dying_before_generation_fails_over_too():
    async def run():
        r = await started(router(FakeBackend("vllm", Script(die_on_count=True)), FakeBackend("llamacpp")))
        out = await r.complete(req())
        await r.stop()
        return out
    backend, text, _ = asyncio.run(run())
    assert backend == "llamacpp" and text == "abcdef"


def test_a_probe_that_never_reaches_the_engine_does_not_wedge_the_breaker():
    from agent.serving.errors import ContextTooLong as TooLong

    async def run():
        primary = FakeBackend("vllm", Script(context=3))
        r = await started(router(primary, FakeBackend("llamacpp")))
        r.routes[0].breaker.state = "half_open"
        with pytest.raises(TooLong):
            await r.complete(GenerationRequest("x", 4, prompt="one two three four five"))
        probing = r.routes[0].breaker.probing
        await r.stop()
        return probing
    assert asyncio.run(run()) is False


def test_each_attempt_is_tokenized_once_and_generate_gets_that_preparation():
    """prepare() feeds both admission (the count) and generate(): one tokenization per attempt,
    also when the request fails over mid-stream (FakeBackend.generate refuses another request's
    preparation)."""
    primary, fallback = FakeBackend("vllm", Script(die_after=2)), FakeBackend("llamacpp")

    async def run():
        r = await started(router(primary, fallback))
        out = await stream_all(r, req())
        await r.stop()
        return out

    out = asyncio.run(run())
    assert "".join(s.delta.text for s in out) == "ab" + "abcd"  # the fake fallback restarts its words
    assert primary.prepared == primary.requests and len(primary.prepared) == 1
    assert fallback.prepared == fallback.requests and len(fallback.prepared) == 1
    assert fallback.requests[0].assistant_prefix == "ab"
