"""The serving core under faults (#11): each test reproduces one way the node stopped serving or
answered wrongly while /health/ready said ok. Faults are injected through the scripted backend,
which behaves like the real engines (multi-token deltas, cumulative counts, raw engine errors)."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest

from agent.backends.base import Capacity, GenerationRequest
from agent.serving.admission import RATE_WINDOW_S, Admission
from agent.serving.app import create_app
from agent.serving.errors import InvalidRequest, Overloaded
from agent.serving.node import build_node
from agent.serving.router import Router
from agent.settings import AdmissionSettings, RouterSettings, Settings
from tests.unit.fake_backend import FakeBackend, Script
from tests.unit.test_admission import Clock, admission


def router(*backends, ad: dict | None = None, **rs) -> Router:
    settings = RouterSettings(**{"restart_backoff_s": 0.01, "breaker_cooldown_s": 0.05, **rs})
    return Router(list(backends), settings, AdmissionSettings(**(ad or {})))


def req(max_tokens=6, rid="r1", prompt="hello there") -> GenerationRequest:
    return GenerationRequest(rid, max_tokens, prompt=prompt)


async def open_then_half_open(r: Router, index: int = 0) -> None:
    r.routes[index].breaker.trip("injected")
    await asyncio.sleep(r.settings.breaker_cooldown_s * 1.5)
    assert r.routes[index].breaker.state == "half_open"


# --- 1. breakers ---------------------------------------------------------------------------

def test_a_probe_whose_client_leaves_mid_stream_does_not_wedge_the_breaker():
    primary = FakeBackend("vllm", Script(words=list("abcdefgh"), delay=0.01))

    async def run():
        r = router(primary, FakeBackend("llamacpp"))
        await r.start()
        await open_then_half_open(r)
        stream = r.stream(req(8, "probe"))
        first = await anext(stream)  # the probe reached vLLM...
        await stream.aclose()  # ...and its client left
        after_leave = r.routes[0].breaker.describe()
        backend, _, _ = await r.complete(req(rid="next"))  # the next request probes, and closes it
        state = r.routes[0].breaker.state
        await r.stop()
        return first.backend, after_leave, backend, state
    first, after_leave, backend, state = asyncio.run(run())
    assert first == "vllm"
    assert after_leave["state"] == "half_open" and after_leave["probing"] is False
    assert backend == "vllm" and state == "closed"
    assert "probe" in primary.aborted  # the engine was told the probe's client left


def test_overflow_to_a_half_open_backend_that_fails_blames_that_backend_and_frees_its_probe():
    primary = FakeBackend("vllm", Script(slots=1, delay=0.05))
    fallback = FakeBackend("llamacpp")

    async def run():
        r = router(primary, fallback, ad={"max_queue": 0, "overflow": True}, breaker_failures=1)
        await r.start()
        await open_then_half_open(r, 1)
        fallback.script.die_on_count = True  # the overflow target dies in prepare()
        busy = asyncio.create_task(r.complete(req(rid="busy")))
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded):  # vLLM is full and the overflow target failed: a 429
            await r.complete(req(rid="overflow"))
        states = r.routes[0].breaker.describe(), r.routes[1].breaker.describe()
        await busy
        await r.stop()
        return states
    vllm, llamacpp = asyncio.run(run())
    assert vllm["state"] == "closed" and vllm["failures"] == 0  # vLLM only was full
    assert llamacpp["state"] == "open" and llamacpp["probing"] is False and "BackendDied" in llamacpp["last_failure"]


def test_readiness_and_node_report_show_an_open_breaker():
    primary = FakeBackend("vllm", Script(raw_error_after=0))
    s = Settings.model_validate({"router": {"breaker_failures": 1, "breaker_cooldown_s": 60}})

    async def run():
        r = Router([primary, FakeBackend("llamacpp")], s.router, s.admission)
        node = build_node(s, r, "m")
        await r.start()
        backend, _, _ = await r.complete(req())  # vLLM raises a raw engine error: llama.cpp answers
        readiness, doc = node.monitor.compute_readiness(), node.document()
        await r.stop()
        return backend, readiness, doc
    backend, readiness, doc = asyncio.run(run())
    assert backend == "llamacpp"
    assert (readiness.status, readiness.backend) == ("degraded", "llamacpp")
    assert "vllm breaker open after 1 failure(s)" in readiness.reason and "RuntimeError" in readiness.reason
    detail = doc["backends"][0]["breaker_detail"]
    assert doc["backends"][0]["breaker"] == "open" and detail["failures"] == 1 and detail["probe_in_s"] > 0


# --- 3. engine errors are typed ------------------------------------------------------------

def test_a_raw_engine_error_mid_stream_fails_over_and_counts_on_the_breaker():
    async def run():
        r = router(FakeBackend("vllm", Script(raw_error_after=2)), FakeBackend("llamacpp", Script(words=list("XYZW"))))
        await r.start()
        out = [s async for s in r.stream(req(6))]
        failures = r.routes[0].breaker.failures
        await r.stop()
        return out, failures, r.counters.switches
    out, failures, switches = asyncio.run(run())
    assert "".join(s.delta.text for s in out) == "abXYZW"
    assert failures == 1 and switches[("vllm", "llamacpp", "EngineFault")] == 1


def test_a_template_error_is_a_400_naming_the_reason_on_either_engine():
    for chain in (["vllm", "llamacpp"], ["llamacpp"]):
        backends = [FakeBackend(name, Script(template_error=True)) for name in chain]

        async def run():
            r = router(*backends)
            await r.start()
            try:
                with pytest.raises(InvalidRequest) as info:
                    await r.complete(GenerationRequest("t", 4, messages=({"role": "user", "content": "hi"},)))
                return info.value, [b.requests for b in backends], r.routes[0].breaker.failures
            finally:
                await r.stop()
        err, generated, failures = asyncio.run(run())
        assert err.status == 400 and err.param == "messages" and "roles must alternate" in err.message
        assert generated == [[] for _ in chain] and failures == 0  # the client's fault: no failover


def events_of(body: bytes) -> list[str]:
    return [line[6:] for line in body.decode().splitlines() if line.startswith("data: ")]


def asgi_call(app, path: str, body: dict, disconnect_after: float | None = None):
    """Drive the ASGI app like a server: the body, then (optionally) a client disconnect."""
    sent: list[dict] = []
    payload = json.dumps(body).encode()
    queue: asyncio.Queue = asyncio.Queue()
    queue.put_nowait({"type": "http.request", "body": payload, "more_body": False})

    async def receive():
        return await queue.get()

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8080)}

    async def run():
        task = asyncio.create_task(app(scope, receive, send))
        if disconnect_after is not None:
            await asyncio.sleep(disconnect_after)
            queue.put_nowait({"type": "http.disconnect"})
        await asyncio.wait_for(task, 10)
    return run, sent


def test_a_stream_that_fails_with_nothing_behind_it_ends_with_an_error_event_then_done():
    s = Settings.model_validate({})
    backend = FakeBackend("llamacpp", Script(raw_error_after=2))
    r = Router([backend], s.router, s.admission)
    app = create_app(s, build_node(s, r, "m"))
    run, sent = asgi_call(app, "/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": 6, "stream": True})

    async def go():
        await r.start()
        await run()
        await r.stop()
    asyncio.run(go())
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    data = events_of(body)
    assert data[-1] == "[DONE]"
    err = json.loads(data[-2])["error"]
    assert err["code"] == "engine_failed" and "RuntimeError" in err["message"]
    assert "".join(json.loads(d)["choices"][0]["text"] for d in data[:-2]) == "ab"


# --- 5. usage is what the client received ---------------------------------------------------

def test_usage_after_a_failover_counts_every_engine_and_the_original_prompt():
    """vLLM releases 1 then 3 tokens per delta (stop-string hold-back) and dies after 4 tokens of
    a 12-token request: llama.cpp gets the 8 tokens left, and usage says 12 with the prompt the
    client sent (not the prefix llama.cpp was re-fed)."""
    primary = FakeBackend("vllm", Script(words=[f"t{i} " for i in range(20)], pattern=(1, 3), die_after=2))
    fallback = FakeBackend("llamacpp", Script(words=[f"u{i} " for i in range(20)], pattern=(2,)))

    async def run():
        r = router(primary, fallback)
        await r.start()
        out = [s async for s in r.stream(req(12, prompt="one two three"))]
        await r.stop()
        return out
    out = asyncio.run(run())
    last = out[-1].delta
    assert fallback.requests[0].max_tokens == 8 and fallback.requests[0].assistant_prefix == "t0 t1 t2 t3 "
    assert last.completion_tokens == 12 and last.finish_reason == "length"
    assert last.prompt_tokens == 3  # "one two three"; llama.cpp itself counted 7 with the prefix
    assert [s.delta.completion_tokens for s in out] == [1, 4, 6, 8, 10, 12]  # cumulative on every delta


def test_a_continuation_is_refused_nothing_when_the_primary_had_produced_every_token():
    primary = FakeBackend("vllm", Script(words=list("abcdef"), pattern=(3,), die_after=2))

    async def run():
        r = router(primary, FakeBackend("llamacpp"))
        await r.start()
        # die_after=2 with max_tokens 6: both deltas (6 tokens) arrive, then the fake dies
        # before its finish delta; nothing is left to generate.
        primary.script.words = list("abcdefgh")
        out = [s async for s in r.stream(req(6))]
        await r.stop()
        return out
    out = asyncio.run(run())
    assert "".join(s.delta.text for s in out) == "abcdef"
    assert out[-1].delta.finish_reason == "length" and out[-1].delta.completion_tokens == 6


# --- 6. admission ----------------------------------------------------------------------------

@pytest.mark.parametrize("leave", ["timeout", "cancel"])
def test_a_waiter_that_leaves_wakes_the_queue_behind_it(leave):
    async def run():
        a = admission(kv=100, queue=5, timeout=0.3 if leave == "timeout" else 5)
        await a.acquire(60)
        big = asyncio.create_task(a.acquire(80))  # head of line: does not fit while 60 are held
        await asyncio.sleep(0)
        small = asyncio.create_task(a.acquire(30))  # fits now, but waits behind the big one
        await asyncio.sleep(0.05)
        assert not small.done()
        if leave == "cancel":
            big.cancel()
        with contextlib.suppress(Overloaded, asyncio.CancelledError):
            await big
        t0 = asyncio.get_running_loop().time()
        await asyncio.wait_for(small, 0.1)  # admitted as the big one left, not after its own deadline
        return asyncio.get_running_loop().time() - t0, a
    waited, a = asyncio.run(run())
    assert waited < 0.02 and a.reserved == 90 and a.queue_depth == 0


def test_the_throughput_history_stays_bounded_on_a_node_that_never_rejects():
    clock = Clock()
    a = Admission("vllm", lambda: Capacity(10_000, 0, 1000, 64, 0), 4, 1.0, clock)

    async def run():
        for _ in range(5000):
            t = await a.acquire(10)
            clock.now += 0.05
            a.release(t, completion_tokens=7)
    asyncio.run(run())
    assert len(a._done) <= RATE_WINDOW_S + 1
    assert a.tokens_per_second() == pytest.approx(7 / 0.05, rel=0.05)


# --- 7. a non-streamed request whose client leaves is aborted -----------------------------------

def test_a_non_streamed_request_whose_client_disconnects_is_aborted_in_the_engine():
    s = Settings.model_validate({})
    backend = FakeBackend("llamacpp", Script(words=[f"w{i}" for i in range(400)], delay=0.01))
    r = Router([backend], s.router, s.admission)
    app = create_app(s, build_node(s, r, "m"))
    run, sent = asgi_call(app, "/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": 400},
                          disconnect_after=0.2)

    async def go():
        await r.start()
        await run()
        state = (list(backend.aborted), set(backend.active), r.routes[0].admission.active)
        await r.stop()
        return state
    aborted, active, admitted = asyncio.run(go())
    assert aborted == [backend.requests[0].request_id] and active == set() and admitted == 0
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] in ([], [499])


# --- 8. the terminal backend: no first-token deadline ------------------------------------------

def test_a_slow_first_token_on_the_last_backend_left_is_still_an_answer():
    async def run():
        r = router(FakeBackend("llamacpp", Script(delay=0.2)), first_token_timeout_s=0.05)
        await r.start()
        out = await r.complete(req(2))
        await r.stop()
        return out
    backend, text, _ = asyncio.run(run())
    assert (backend, text) == ("llamacpp", "ab")


def test_the_first_token_deadline_still_fails_over_while_a_fallback_serves():
    async def run():
        r = router(FakeBackend("vllm", Script(delay=0.2)), FakeBackend("llamacpp"), first_token_timeout_s=0.05)
        await r.start()
        out = await r.complete(req(2))
        await r.stop()
        return out, r.counters.switches
    (backend, _, _), switches = asyncio.run(run())
    assert backend == "llamacpp" and switches[("vllm", "llamacpp", "FirstTokenTimeout")] == 1


# --- bad input: size first, and no work for a request the queue would refuse --------------------

def test_a_prompt_too_large_by_its_size_is_refused_without_tokenizing():
    backend = FakeBackend("llamacpp", Script(context=100))

    async def run():
        r = router(backend)
        await r.start()
        with pytest.raises(InvalidRequest, match="at least"):
            await r.complete(req(prompt="x" * 10_000))  # 10,000 bytes > 100 tokens x 8 bytes
        await r.stop()
    asyncio.run(run())
    assert backend.prepared == []


def test_a_request_the_full_queue_would_refuse_is_never_tokenized():
    backend = FakeBackend("llamacpp", Script(slots=1, delay=0.05, words=list("abcdefgh")))

    async def run():
        r = router(backend, ad={"max_queue": 1, "queue_timeout_s": 5})
        await r.start()
        running = asyncio.create_task(r.complete(req(8, "running")))
        await asyncio.sleep(0.01)
        queued = asyncio.create_task(r.complete(req(8, "queued")))
        await asyncio.sleep(0.01)
        prepared_before = len(backend.prepared)
        with pytest.raises(Overloaded):
            await r.complete(req(8, "refused"))
        prepared_after = len(backend.prepared)
        await asyncio.gather(running, queued)
        await r.stop()
        return prepared_before, prepared_after
    before, after = asyncio.run(run())
    assert before == after == 2
