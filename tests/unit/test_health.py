"""Health for the gateway and systemd (#6), in-process with scripted backends and NVML answered
from a hardware profile: /health/ready states, /v1/node against its schema, /metrics against
docs/health.md, VRAM pressure, giving up, the health token, and the notify protocol. The real
server process and the real engines are in tests/e2e/test_serve_health.py."""

from __future__ import annotations

import asyncio
import json
import re
import socket
from pathlib import Path

import httpx
import jsonschema
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.catalog import resolve_model
from agent.hardware import detect
from agent.hardware.fake_nvml import FakeNvml
from agent.hardware.nvml import NvmlSampler
from agent.hardware.profiles import load_profile
from agent.hardware.types import MIB
from agent.planner import Pins, plan
from agent.serving.app import create_app
from agent.serving.node import build_node, default_node_id
from agent.serving.router import Router
from agent.settings import Settings
from agent.systemd import Notifier
from tests.unit.fake_backend import FakeBackend, Script

ROOT = Path(__file__).resolve().parents[2]
NODE_SCHEMA = json.loads((ROOT / "docs/schemas/node.schema.json").read_text())
TOKEN = "health-token-0123456789"
KEY = "api-key-0123456789abcdef"


def documented_metrics() -> set[str]:
    """Metric names from the table in docs/health.md (the contract with dashboards)."""
    text = (ROOT / "docs/health.md").read_text()
    return set(re.findall(r"^\| `((?:node_agent_|vllm:)[a-z_]+)` \|", text, flags=re.M))


def make(settings: dict, *backends, sampler=None):
    s = Settings.model_validate(settings)
    router = Router(list(backends), s.router, s.admission)
    node = build_node(s, router, "m", sampler=sampler, hostname="box")
    return create_app(s, node), node


def client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


def metrics(text: str) -> dict[tuple, float]:
    """{(sample name, sorted labels): value}"""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_ready_is_503_loading_with_progress_before_the_engines_start():
    app, node = make({}, FakeBackend("vllm"), FakeBackend("llamacpp"))

    async def go():
        async with client(app) as c:
            return await c.get("/health/ready")

    r = asyncio.run(go())
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    body = r.json()
    assert body["status"] == "loading" and body["reason"] == "loading the model (vllm stopped, llamacpp stopped)"
    assert body["progress"]["backends_ready"] == 0 and body["progress"]["backends_total"] == 2
    assert [b["name"] for b in body["progress"]["backends"]] == ["vllm", "llamacpp"]


def test_ok_then_degraded_on_the_fallback_then_unavailable_when_everything_is_given_up():
    settings = {"router": {"restart_backoff_s": 0.01, "max_restart_attempts": 2}}
    vllm = FakeBackend("vllm", Script(die_after=1))
    llamacpp = FakeBackend("llamacpp")
    app, node = make(settings, vllm, llamacpp)
    router = node.router

    async def go():
        seen = []
        await router.start()
        try:
            async with client(app) as c:
                seen.append((await c.get("/health/ready")).json())
                vllm.script.fail_starts = 99  # it dies below and never comes back
                await c.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 3})
                seen.append((await c.get("/health/ready")).json())
                llamacpp.script.fail_starts, llamacpp.script.die_after = 99, 1
                await c.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 3})
                await asyncio.wait_for(router.exhausted.wait(), 5)
                last = await c.get("/health/ready")
                return seen, last, (await c.get("/v1/node")).json()
        finally:
            await router.stop()

    seen, last, doc = asyncio.run(go())
    assert seen[0] == {"status": "ok", "backend": "vllm"}
    assert (seen[1]["status"], seen[1]["backend"]) == ("degraded", "llamacpp")
    assert last.status_code == 503 and last.json()["status"] == "unavailable"
    jsonschema.validate(doc, NODE_SCHEMA)
    assert [(b["name"], b["state"], b["given_up"]) for b in doc["backends"]] == [
        ("vllm", "failed", True), ("llamacpp", "failed", True)]
    assert doc["backends"][0]["last_error"] == "scripted start failure"


def test_metrics_cover_the_doc_and_move_with_a_request_and_a_fallback():
    app, node = make({}, FakeBackend("vllm", Script(die_after=2)), FakeBackend("llamacpp"))
    body = {"model": "m", "prompt": "hi", "max_tokens": 4}

    async def go():
        await node.router.start()
        try:
            async with client(app) as c:
                before = (await c.get("/metrics")).text
                r = await c.post("/v1/completions", json=body)  # vllm dies after 2 words; llamacpp answers
                after = (await c.get("/metrics")).text
                await c.post("/v1/completions", json={**body, "model": "other"})  # 404, no backend
                last = (await c.get("/metrics")).text
                return before, r, after, last
        finally:
            await node.router.stop()

    before, r, after, last = asyncio.run(go())
    assert r.status_code == 200 and r.headers["x-node-agent-backend"] == "llamacpp"
    exposed = {f.name for f in text_string_to_metric_families(before)}
    # The parser names counter families without their _total suffix; the doc uses the full names.
    documented = {re.sub(r"_total$", "", n) for n in documented_metrics()}
    assert len(documented) > 20 and exposed == documented, (documented - exposed, exposed - documented)
    m0, m1, m2 = metrics(before), metrics(after), metrics(last)
    req = ("node_agent_requests_total",
           (("backend", "llamacpp"), ("endpoint", "/v1/completions"), ("status", "200")))
    assert req not in m0 and m1[req] == 1
    assert m2[("node_agent_requests_total",
               (("backend", "none"), ("endpoint", "/v1/completions"), ("status", "404")))] == 1
    switch = ("node_agent_fallback_switches_total", (("from", "vllm"), ("reason", "BackendDied"), ("to", "llamacpp")))
    assert switch not in m0 and m1[switch] == 1
    assert m1[("node_agent_backend_state", (("backend", "vllm"), ("state", "failed")))] == 1
    assert m1[("node_agent_tokens_total", (("backend", "llamacpp"), ("kind", "completion")))] == 4
    assert m1[("node_agent_time_to_first_token_seconds_count", (("backend", "vllm"),))] == 1
    assert m1[("node_agent_ready", (("status", "degraded"),))] == 1
    assert m0[("node_agent_ready", (("status", "ok"),))] == 1


def test_node_document_reports_gpus_and_vram_pressure_shrinks_the_budget():
    """8B on an RTX 4090 (NVML from the profile); then another process takes memory."""
    profile = load_profile("rtx5090-rtx4090")
    host = detect(profile, env={})
    vllm_plan = plan(host, resolve_model("llama-3.1-8b-instruct"), Settings(), Pins(engine="vllm")).primary
    assert vllm_plan.fits and vllm_plan.per_gpu
    fake = FakeNvml(profile)
    vllm = FakeBackend("vllm")
    vllm.plan = vllm_plan
    app, node = make({}, vllm, FakeBackend("llamacpp"), sampler=NvmlSampler(fake, host.gpus))
    gpu = vllm_plan.per_gpu[0]
    total = host.gpus[gpu.index].memory_total_bytes

    async def go():
        await node.router.start()
        try:
            async with client(app) as c:
                await node.monitor.poll_gpus()
                calm = (await c.get("/v1/node")).json()
                fake.hold(gpu.index, total)  # only 0 bytes left
                await node.monitor.poll_gpus()
                pressed = (await c.get("/v1/node")).json()
                ready = (await c.get("/health/ready")).json()
                fake.hold(gpu.index, 0)
                await node.monitor.poll_gpus()
                return calm, pressed, ready, (await c.get("/health/ready")).json()
        finally:
            await node.router.stop()

    calm, pressed, ready, again = asyncio.run(go())
    for doc in (calm, pressed):
        jsonschema.validate(doc, NODE_SCHEMA)
    devices = calm["gpus"]["devices"]
    assert [d["name"] for d in devices] == [g.name for g in host.gpus]
    assert devices[0]["power_watts"] == 31.5 and devices[0]["temperature_c"] == profile.gpus[0].temperature_c
    assert calm["plan"]["vllm"]["tensor_parallel_size"] == vllm_plan.tensor_parallel_size
    assert calm["backends"][0]["admission"]["vram_pressure"] == 1.0
    adm = pressed["backends"][0]["admission"]
    expected = max(0.0, 1 - 1024 * MIB / gpu.kv_bytes)  # free 0 vs the 1024 MiB margin
    assert adm["vram_pressure"] == pytest.approx(expected)
    assert adm["kv_budget_tokens"] == int(adm["kv_capacity_tokens"] * expected)
    assert "below the 1024 MiB margin" in adm["vram_pressure_reason"]
    assert ready["status"] == "degraded" and ready["backend"] == "vllm" and "another process" in ready["reason"]
    assert again == {"status": "ok", "backend": "vllm"}


@pytest.mark.parametrize("path", ["/health/live", "/health/ready", "/v1/node", "/metrics"])
def test_health_token_guards_health_and_is_separate_from_the_api_key(path):
    app, node = make({"health": {"token": TOKEN}, "server": {"api_key": KEY}}, FakeBackend("llamacpp"))

    async def go():
        await node.router.start()
        try:
            async with client(app) as c:
                return [(await c.get(path, headers=h)).status_code for h in (
                    {}, {"authorization": f"Bearer {KEY}"}, {"authorization": f"Bearer {TOKEN}"})] + [
                    (await c.get("/v1/models", headers={"authorization": f"Bearer {TOKEN}"})).status_code]
        finally:
            await node.router.stop()

    assert asyncio.run(go()) == [401, 401, 200, 401]


@pytest.mark.parametrize("open_check, expected", [(True, [200, 200]), (False, [401, 200])])
def test_get_health_is_open_by_default_even_with_a_health_token(open_check, expected):
    app, node = make({"health": {"token": TOKEN, "open_health_check": open_check}}, FakeBackend("llamacpp"))

    async def go():
        await node.router.start()
        try:
            async with client(app) as c:
                codes = [(await c.get("/health", headers=h)).status_code
                         for h in ({}, {"authorization": f"Bearer {TOKEN}"})]
                return codes, (await c.get("/health/ready")).status_code
        finally:
            await node.router.stop()

    codes, ready = asyncio.run(go())
    assert codes == expected and ready == 401  # /health/ready and the rest keep the token


def test_node_id_is_derived_from_the_machine_id_and_stable(tmp_path):
    mid = tmp_path / "machine-id"
    mid.write_text("0123456789abcdef0123456789abcdef\n")
    assert default_node_id(mid) == default_node_id(mid) != "0123456789abcdef0123456789abcdef"
    assert default_node_id(tmp_path / "absent") == socket.gethostname()


# --- the notify protocol ----------------------------------------------------------------------
@pytest.fixture
def notify_socket(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    sock.settimeout(2)
    yield str(path), sock
    sock.close()


def test_notifier_speaks_the_protocol(notify_socket):
    path, sock = notify_socket
    n = Notifier({"NOTIFY_SOCKET": path})
    n.ready("serving from vllm")
    n.status("serving from vllm")  # unchanged: not sent again
    n.status("degraded: vllm failed")
    n.watchdog()
    n.stopping()
    got = [sock.recv(4096).decode() for _ in range(4)]
    assert got == ["READY=1\nSTATUS=serving from vllm", "STATUS=degraded: vllm failed", "WATCHDOG=1",
                   "STOPPING=1\nSTATUS=draining requests"]


def test_notifier_reaches_an_abstract_socket():
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"node-agent-test-{id(sock)}"
    sock.bind("\0" + name)
    sock.settimeout(2)
    try:
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).send("READY=1")
        assert sock.recv(64) == b"READY=1"
    finally:
        sock.close()


def test_watchdog_pings_at_half_the_interval_and_only_for_this_pid(notify_socket):
    import os

    path, sock = notify_socket
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000", "WATCHDOG_PID": str(os.getpid())})
    assert n.watchdog_s == 0.1

    async def run_for(seconds):
        task = asyncio.create_task(n.watchdog_loop())
        await asyncio.sleep(seconds)
        task.cancel()

    asyncio.run(run_for(0.22))
    sock.settimeout(0.1)
    pings = []
    try:
        while True:
            pings.append(sock.recv(64))
    except TimeoutError:
        pass
    assert pings and set(pings) == {b"WATCHDOG=1"} and 4 <= len(pings) <= 6
    assert Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000", "WATCHDOG_PID": "1"}).watchdog_s is None
    assert not Notifier({}).send("READY=1")  # outside systemd: nothing, and no error


def test_a_manager_that_does_not_read_never_blocks_the_sender(notify_socket):
    """The receive queue fills (net.unix.max_dgram_qlen, often 10); sends are dropped, not blocked."""
    import threading

    path, _ = notify_socket
    n = Notifier({"NOTIFY_SOCKET": path})
    results: list[bool] = []
    sender = threading.Thread(target=lambda: results.extend(n.send("WATCHDOG=1") for _ in range(2000)), daemon=True)
    sender.start()
    sender.join(timeout=10)
    assert not sender.is_alive(), "send() blocked on a full queue"
    assert results[0] is True and results[-1] is False
