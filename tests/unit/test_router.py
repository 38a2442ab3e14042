"""Router: failover, continuation, breaker, restarts (#5), with faults injected by a scripted
backend. The same paths on the real engines: tests/e2e/test_serve_failover.py."""

from __future__ import annotations

import asyncio

import pytest

from agent.backends.base import BackendState, GenerationRequest
from agent.serving.errors import ContextTooLong, NotReady
from agent.serving.breaker import Breaker
from agent.serving.errors import CannotHold, StreamInterrupted
from agent.serving.router import Router
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


async def died_and_back(r: Router, primary: FakeBackend) -> tuple[str, str]:
    """The primary (scripted to die on its first request) dies under request 1, which the fallback
    answers; once it has restarted, request 2: (who answered 1, who answered 2)."""
    first, _, _ = await r.complete(req(rid="1"))
    primary.script.die_after = None
    for _ in range(300):
        if primary.state is BackendState.READY and r.routes[0].restarts:
            break
        await asyncio.sleep(0.01)
    again, _, _ = await r.complete(req(rid="2"))
    return first, again


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
    now = [0.0]
    b = Breaker(failures_to_open=2, cooldown_s=1.0, clock=lambda: now[0])
    with b.permit() as p:
        p.failure(fatal=False, reason="EngineFault")
    assert b.state == "closed" and b.permit() is not None
    with b.permit() as p:
        p.failure(fatal=False, reason="EngineFault")
    assert b.state == "open" and b.permit() is None
    now[0] = 1.2
    probe = b.permit()
    assert probe is not None and probe.probe and b.state == "half_open"
    assert b.permit() is None  # one probe at a time
    probe.failure(fatal=False, reason="EngineFault")
    assert b.state == "open"
    now[0] = 2.4
    with b.permit() as probe:
        probe.success()
    assert b.state == "closed" and b.failures == 0


def test_a_probe_given_back_unresolved_lets_the_next_request_probe():
    now = [0.0]
    b = Breaker(failures_to_open=1, cooldown_s=1.0, clock=lambda: now[0])
    with b.permit() as p:
        p.failure(fatal=True, reason="BackendDied")
    now[0] = 1.5
    with b.permit() as probe:  # the client leaves: no success(), no failure()
        assert probe.probe
    assert b.state == "half_open"
    again = b.permit()
    assert again is not None and again.probe
    again.success()
    again.failure(fatal=True, reason="ignored: resolved once")
    assert b.state == "closed"


def test_dead_backend_is_restarted_and_traffic_returns():
    primary = FakeBackend("vllm", Script(die_after=1, fail_starts=0))

    async def run():
        r = await started(router(primary, FakeBackend("llamacpp")))
        first, again = await died_and_back(r, primary)
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


def test_a_start_that_raises_a_bug_is_logged_and_retried_not_left_starting(caplog):
    """A backend's start raising something other than BackendStartError (a bug) must not end its
    supervision: the node would stay up with that engine never started again."""
    primary = FakeBackend("vllm", Script(die_after=1, buggy_starts=2))

    async def run():
        r = await started(router(primary, FakeBackend("llamacpp"), restart_backoff_s=0.01, restart_backoff_max_s=0.02))
        for _ in range(300):
            if primary.state is BackendState.READY:
                break
            await asyncio.sleep(0.01)
        state, failed = primary.state, r.routes[0].failed_restarts
        await r.stop()
        return state, failed
    state, failed = asyncio.run(run())
    assert state is BackendState.READY and failed == 0 and primary.starts == 3  # 2 bugs, then up
    bugs = [rec for rec in caplog.records if "raised an unexpected error" in rec.getMessage()]
    assert len(bugs) == 2 and bugs[0].exc_info[0] is KeyError  # with its traceback


def test_a_bug_while_waiting_to_restart_is_logged_and_the_backend_still_comes_back(caplog):
    class Flaky(FakeBackend):
        bugs = 1

        async def until_startable(self) -> None:  # the supervisor awaits it before every start
            if self.starts and self.bugs:  # on the restart, not the first start
                self.bugs -= 1
                raise AttributeError("scripted bug in until_startable")

    primary = Flaky("vllm", Script(die_after=1))

    async def run():
        r = await started(router(primary, FakeBackend("llamacpp")))
        answered = await died_and_back(r, primary)
        await r.stop()
        return answered
    assert asyncio.run(run()) == ("llamacpp", "vllm")
    bugs = [rec for rec in caplog.records if "raised an unexpected error" in rec.getMessage()]
    assert len(bugs) == 1 and bugs[0].exc_info[0] is AttributeError and "failed start 1 of 5" in bugs[0].getMessage()


def test_a_bug_in_the_first_wait_and_in_a_probe_neither_ends_nor_restarts_anything_wrongly(caplog):
    """The wait before the very first start raising: the fallback still starts and the primary is
    retried. A probe raising (a bug in the breaker's bookkeeping): logged, and the serving backend
    is left serving, never restarted for it."""
    class Flaky(FakeBackend):
        bugs = 1

        async def until_startable(self) -> None:
            if self.bugs:
                self.bugs -= 1
                raise AttributeError("scripted bug before the first start")

    primary, fallback = Flaky("vllm"), FakeBackend("llamacpp")

    async def run():
        r = await started(router(primary, fallback, restart_backoff_s=0.01))
        for _ in range(300):
            if primary.state is BackendState.READY:
                break
            await asyncio.sleep(0.01)
        route = r.routes[0]
        up = primary.state, fallback.state, primary.starts, route.restarts
        route.breaker.half_open_for_s = lambda: (_ for _ in ()).throw(ValueError("scripted probe bug"))
        await asyncio.sleep(0.5)  # several looks, each raising
        after = primary.state, primary.starts, route.restarts
        await r.stop()
        return up, after
    up, after = asyncio.run(run())
    assert up == (BackendState.READY, BackendState.READY, 1, 1)  # the first start was the retry
    assert after == (BackendState.READY, 1, 1)  # not restarted for a probe's bug
    messages = [rec.getMessage() for rec in caplog.records if rec.exc_info]
    assert any("waiting to start it raised" in m for m in messages)
    assert any("probing it raised" in m for m in messages)


def test_nothing_serving_is_not_ready():
    async def run():
        r = router(FakeBackend("llamacpp"))  # never started
        with pytest.raises(NotReady, match="llamacpp stopped"):
            await r.complete(req())
    asyncio.run(run())


def test_prompt_longer_than_every_context_of_the_chain_is_a_400_not_a_failover():
    fallback = FakeBackend("llamacpp", Script(context=3))

    async def run():
        r = await started(router(FakeBackend("vllm", Script(context=3)), fallback))
        with pytest.raises(ContextTooLong):
            await r.complete(GenerationRequest("x", 4, prompt="one two three four five"))
        await r.stop()
    asyncio.run(run())
    assert fallback.requests == [] and fallback.prepared == []


def test_a_valid_request_the_fallback_cannot_hold_is_a_503_not_a_client_error():
    """vLLM holds 100 tokens, the llama.cpp fallback 10: with vLLM down, a 20-token prompt is
    not the client's fault."""
    async def run():
        primary = FakeBackend("vllm", Script(context=100))
        r = await started(router(primary, FakeBackend("llamacpp", Script(context=10))))
        primary.die()
        with pytest.raises(CannotHold) as info:
            await r.complete(GenerationRequest("x", 4, prompt=" ".join(["w"] * 20)))
        await r.stop()
        return info.value
    err = asyncio.run(run())
    assert err.status == 503 and int(err.headers["Retry-After"]) > 0
    assert "holds 10" in err.message and "100 tokens" in err.message


def test_backend_dying_before_generation_fails_over_too():
    async def run():
        r = await started(router(FakeBackend("vllm", Script(die_on_count=True)), FakeBackend("llamacpp")))
        out = await r.complete(req())
        await r.stop()
        return out
    backend, text, _ = asyncio.run(run())
    assert backend == "llamacpp" and text == "abcdef"


def test_a_probe_that_never_reaches_the_engine_does_not_wedge_the_breaker():
    async def run():
        primary = FakeBackend("vllm", Script(context=3))
        r = await started(router(primary, FakeBackend("llamacpp", Script(context=3)), breaker_failures=1,
                                 breaker_cooldown_s=0.01))
        r.routes[0].breaker.trip("test")
        await asyncio.sleep(0.02)
        assert r.routes[0].breaker.state == "half_open"
        with pytest.raises(ContextTooLong):
            await r.complete(GenerationRequest("x", 4, prompt="one two three four five"))
        detail = r.routes[0].breaker.describe()
        again, _, _ = await r.complete(req())  # the next request is the probe, and closes it
        await r.stop()
        return detail, again, r.routes[0].breaker.state
    detail, again, state = asyncio.run(run())
    assert detail["state"] == "half_open" and detail["probing"] is False
    assert again == "vllm" and state == "closed"


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
