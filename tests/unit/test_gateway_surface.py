"""What a gateway reads from the node (#15), in-process with scripted backends: GET /health as
vLLM answers it, Retry-After on every 429 and 503, ``x-should-retry: false`` on permanent errors,
the backend header on errors where an engine was involved, ``max_model_len`` on /v1/models, the
last fallback events in /v1/node, and the Model Server Protocol gauges moving with admission.
The same against real gateways and real node processes: tests/gateway."""

from __future__ import annotations

import asyncio
import contextlib

import jsonschema
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.serving.router import FALLBACK_EVENTS_KEPT, Counters
from tests.unit.fake_backend import FakeBackend, Script
from tests.unit.test_health import KEY, NODE_SCHEMA, client, make, metrics

COMPLETION = {"model": "m", "prompt": "one two", "max_tokens": 6}
MSP = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc")


def served(settings: dict, *backends, start: bool = True):
    """Run ``go(client, node)`` against an app over ``backends``; the router started unless not."""
    app, node = make(settings, *backends)

    def run(go):
        async def main():
            if start:
                await node.router.start()
            try:
                async with client(app) as c:
                    return await go(c, node)
            finally:
                await node.router.stop()
        return asyncio.run(main())
    return run


def msp(text: str) -> dict[str, float]:
    """The protocol's three gauges by name (one series each, or the test fails)."""
    families = {f.name: f for f in text_string_to_metric_families(text)}
    out = {}
    for name in MSP:
        samples = families[name].samples
        assert len(samples) == 1, f"{name}: a picker reads the first series; the node must have one, got {samples}"
        out[name] = samples[0].value
    return out


# --- GET /health ----------------------------------------------------------------------------
def test_health_is_200_and_empty_while_an_engine_serves_and_503_with_retry_after_otherwise():
    llamacpp = FakeBackend("llamacpp")
    run = served({}, llamacpp, start=False)

    async def go(c, node):
        loading = await c.get("/health")
        await node.router.start()
        ok = await c.get("/health")
        llamacpp.die()
        dead = await c.get("/health")
        return loading, ok, dead

    loading, ok, dead = run(go)
    assert ok.status_code == 200 and ok.content == b""
    assert loading.status_code == 503 and loading.json()["status"] == "loading" and loading.headers["retry-after"] == "5"
    # The supervisor restarts the dead engine at once: "loading" again, and soon back.
    assert dead.status_code == 503 and dead.json()["status"] in ("loading", "unavailable")
    assert "llamacpp" in dead.json()["reason"] and dead.headers["retry-after"] in ("5", "30")


# --- Retry-After, x-should-retry and the backend header --------------------------------------
def retry_after(r) -> int:
    value = int(r.headers["retry-after"])
    assert 1 <= value <= 60, f"Retry-After {value}: the openai client refuses to retry above 120 s; we cap at 60"
    return value


def test_a_full_queue_is_429_with_retry_after_naming_the_backend_and_no_retry_veto():
    run = served({"admission": {"max_queue": 0}}, FakeBackend("llamacpp", Script(slots=1, hang_after=1)))

    async def go(c, _):
        busy = asyncio.ensure_future(c.post("/v1/completions", json=COMPLETION))
        for _ in range(200):  # until the first request holds the only slot
            if msp((await c.get("/metrics")).text)["vllm:num_requests_running"] == 1:
                break
            await asyncio.sleep(0.01)
        refused = await c.post("/v1/completions", json=COMPLETION)
        busy.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await busy
        return refused

    r = run(go)
    assert r.status_code == 429 and r.json()["error"]["code"] == "overloaded"
    retry_after(r)
    assert r.headers["x-node-agent-backend"] == "llamacpp"
    assert "x-should-retry" not in r.headers  # a 429 is worth retrying: on this node later, or another now


def test_not_ready_is_503_with_retry_after_and_no_backend_header():
    r = served({}, FakeBackend("llamacpp"), start=False)(lambda c, _: c.post("/v1/completions", json=COMPLETION))
    assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
    retry_after(r)
    assert "x-node-agent-backend" not in r.headers and "x-should-retry" not in r.headers


def test_a_prompt_only_the_engine_that_is_down_could_hold_is_503_cannot_hold_with_retry_after():
    vllm = FakeBackend("vllm", Script(fail_starts=99, context=1000))
    llamacpp = FakeBackend("llamacpp", Script(context=10))
    run = served({"router": {"max_restart_attempts": 50, "restart_backoff_s": 60}}, vllm, llamacpp)
    body = {**COMPLETION, "prompt": " ".join(["w"] * 20)}

    r = run(lambda c, _: c.post("/v1/completions", json=body))
    assert r.status_code == 503 and r.json()["error"]["code"] == "context_unavailable"
    retry_after(r)
    assert r.headers["x-node-agent-backend"] == "llamacpp"


def test_health_ready_503s_carry_retry_after():
    llamacpp = FakeBackend("llamacpp")

    async def go(c, node):
        loading = await c.get("/health/ready")
        await node.router.start()
        llamacpp.die()
        return loading, await c.get("/health/ready")

    for r in served({}, llamacpp, start=False)(go):
        assert r.status_code == 503
        retry_after(r)


def test_permanent_errors_say_do_not_retry_and_name_the_engine_when_one_was_involved():
    settings = {"server": {"api_key": KEY, "max_request_bytes": 1024}}
    auth = {"authorization": f"Bearer {KEY}"}
    run = served(settings, FakeBackend("llamacpp", Script(template_error=True, context=50)))

    async def go(c, _):
        return {
            "bad value": await c.post("/v1/completions", json={**COMPLETION, "max_tokens": -1}, headers=auth),
            "unknown model": await c.post("/v1/completions", json={**COMPLETION, "model": "x"}, headers=auth),
            "no key": await c.post("/v1/completions", json=COMPLETION),
            "too large": await c.post("/v1/completions", content=b"x" * 2000, headers=auth),
            "unknown path": await c.get("/v2/nothing", headers=auth),
            "template": await c.post("/v1/chat/completions", headers=auth, json={
                "model": "m", "messages": [{"role": "user", "content": "hi"}]}),
            "too long": await c.post("/v1/completions", headers=auth, json={
                **COMPLETION, "prompt": " ".join(["w"] * 60)}),
            "ok": await c.post("/v1/completions", json=COMPLETION, headers=auth),
        }

    r = run(go)
    expected = {"bad value": 400, "unknown model": 404, "no key": 401, "too large": 413, "unknown path": 404,
                "template": 400, "too long": 400, "ok": 200}
    assert {k: v.status_code for k, v in r.items()} == expected
    for name, response in r.items():
        assert response.headers.get("x-should-retry") == (None if name == "ok" else "false"), name
    # An engine rendered or tokenized these: the answer names it, as a success does.
    for name in ("template", "too long", "ok"):
        assert r[name].headers["x-node-agent-backend"] == "llamacpp", name
    assert r["too long"].json()["error"]["code"] == "context_length_exceeded"
    for name in ("bad value", "unknown model", "no key", "too large"):
        assert "x-node-agent-backend" not in r[name].headers, name


def test_every_engine_failing_is_502_naming_the_last_one():
    run = served({}, FakeBackend("vllm", Script(die_after=0)), FakeBackend("llamacpp", Script(raw_error_after=0)))
    r = run(lambda c, _: c.post("/v1/completions", json=COMPLETION))
    assert r.status_code == 502 and r.json()["error"]["code"] == "engine_failed"
    assert r.headers["x-node-agent-backend"] == "llamacpp"


# --- /v1/models ------------------------------------------------------------------------------
def test_models_carry_the_longest_context_of_the_chain():
    run = served({}, FakeBackend("vllm", Script(context=4096)), FakeBackend("llamacpp", Script(context=1024)))
    data = run(lambda c, _: c.get("/v1/models")).json()["data"]
    assert [(m["id"], m["max_model_len"]) for m in data] == [("m", 4096)]


# --- fallback events -------------------------------------------------------------------------
def test_node_shows_the_fallback_event_of_a_request_with_its_id():
    run = served({}, FakeBackend("vllm", Script(die_after=2)), FakeBackend("llamacpp"))

    async def go(c, _):
        r = await c.post("/v1/completions", json=COMPLETION)
        return r, (await c.get("/v1/node")).json()

    r, doc = run(go)
    assert r.status_code == 200 and r.headers["x-node-agent-backend"] == "llamacpp"
    jsonschema.validate(doc, NODE_SCHEMA)
    [event] = doc["fallback_events"]
    assert (event["request_id"], event["from"], event["to"]) == (r.json()["id"], "vllm", "llamacpp")
    assert event["reason"].startswith("BackendDied") and event["latency_ms"] >= 0 and event["ts"] > 0
    assert doc["fallback_switches"] == [{"from": "vllm", "to": "llamacpp", "reason": "BackendDied", "count": 1}]


def test_fallback_events_keep_the_last_n_and_still_count_them_all():
    counters = Counters()
    for i in range(FALLBACK_EVENTS_KEPT + 10):
        counters.switched({"ts": float(i), "request_id": f"r{i}", "from": "vllm", "to": None, "reason": "x: y",
                           "latency_ms": 0.0}, "x")
    assert [e["request_id"] for e in counters.events] == [f"r{i}" for i in range(10, FALLBACK_EVENTS_KEPT + 10)]
    assert counters.switches == {("vllm", "none", "x"): FALLBACK_EVENTS_KEPT + 10}
    assert NODE_SCHEMA["properties"]["fallback_events"]["maxItems"] == FALLBACK_EVENTS_KEPT


# --- Model Server Protocol -------------------------------------------------------------------
def test_protocol_gauges_follow_the_queue_and_the_reserved_kv_under_a_burst():
    """One slot, a burst of four: one runs, three wait, and the serving engine's KV usage is the
    reservation (prompt 2 + max_tokens 6 = 8 of 1000 tokens); VRAM pressure halves the budget
    and doubles the usage; then everything drains back to zero."""
    run = served({}, FakeBackend("llamacpp", Script(slots=1, delay=0.05, kv=1000)))

    async def go(c, node):
        idle = msp((await c.get("/metrics")).text)
        burst = [asyncio.ensure_future(c.post("/v1/completions", json=COMPLETION)) for _ in range(4)]
        seen = None
        for _ in range(300):
            now = msp((await c.get("/metrics")).text)
            if now["vllm:num_requests_waiting"] == 3:
                seen = now
                node.router.routes[0].admission.set_pressure(0.5)
                pressed = msp((await c.get("/metrics")).text)
                node.router.routes[0].admission.set_pressure(1.0)
                break
            await asyncio.sleep(0.005)
        answers = await asyncio.gather(*burst)
        return idle, seen, pressed, msp((await c.get("/metrics")).text), answers

    idle, seen, pressed, after, answers = run(go)
    assert all(a.status_code == 200 for a in answers)
    assert idle == {"vllm:num_requests_waiting": 0, "vllm:num_requests_running": 0, "vllm:kv_cache_usage_perc": 0}
    assert seen == {"vllm:num_requests_waiting": 3, "vllm:num_requests_running": 1,
                    "vllm:kv_cache_usage_perc": pytest.approx(8 / 1000)}
    assert pressed["vllm:kv_cache_usage_perc"] == pytest.approx(8 / 500)
    assert after == idle


def test_protocol_info_gauges_and_a_full_kv_when_nothing_serves():
    run = served({}, FakeBackend("llamacpp", Script(kv=512)), start=False)

    async def go(c, node):
        before = (await c.get("/metrics")).text
        await node.router.start()
        return before, (await c.get("/metrics")).text

    before, serving = run(go)
    assert msp(before)["vllm:kv_cache_usage_perc"] == 1  # nothing serves: no KV to offer, pickers steer away
    m = metrics(serving)
    assert m[("vllm:kv_cache_usage_perc", (("model_name", "m"),))] == 0
    assert m[("vllm:gpu_cache_usage_perc", (("model_name", "m"),))] == 0
    assert m[("vllm:cache_config_info", (("backend", "llamacpp"), ("block_size", "1"), ("num_gpu_blocks", "512")))] == 1
    [(lora, value)] = [(k, v) for k, v in m.items() if k[0] == "vllm:lora_requests_info"]
    assert dict(lora[1]) == {"max_lora": "0", "running_lora_adapters": "", "waiting_lora_adapters": ""}
    assert value > 1.7e9  # a timestamp, as vLLM's: the agent's start
