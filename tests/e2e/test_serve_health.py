"""Health as a gateway and systemd see it (#6), on the real server process with both real
engines: /health/ready polled from the moment the process starts through a SIGKILL of vLLM's
EngineCore and its restart; /metrics and /v1/node along the way; the notify protocol on a
datagram socket this test owns as NOTIFY_SOCKET."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import jsonschema
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.engines import NEEDS_VLLM

pytestmark = NEEDS_VLLM
MODEL = "smollm2"
PARIS = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
NODE_SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "docs/schemas/node.schema.json").read_text())


class Poller(threading.Thread):
    """GET /health/ready every 20 ms; keeps each change of (code, status, backend)."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.seen: list[tuple[int, str, str | None]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=2) as client:
            while not self.halt.is_set():
                try:
                    r = client.get(f"{self.url}/health/ready")
                    body = r.json()
                    now = (r.status_code, body["status"], body.get("backend"))
                    if not self.seen or self.seen[-1] != now:
                        self.seen.append(now)
                except httpx.HTTPError:
                    pass  # not listening yet
                time.sleep(0.02)


class NotifyListener(threading.Thread):
    """The service manager's end: a datagram socket, read as messages arrive (as systemd does)."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                pass


@pytest.fixture(scope="module")
def notify(tmp_path_factory):
    listener = NotifyListener(tmp_path_factory.mktemp("notify") / "notify.sock")
    listener.start()
    yield listener
    listener.halt.set()
    listener.join()
    listener.sock.close()


@pytest.fixture(scope="module")
def run(start_server, smollm2_hf_dir, smollm2_gguf_path, notify):
    server = start_server({
        "model": {"ref": str(smollm2_hf_dir), "gguf": str(smollm2_gguf_path)},
        "planner": {"target_context": 2048, "min_context": 512, "max_num_seqs": 8},
        "router": {"restart_backoff_s": 1.0},
        "server": {"model_name": MODEL},
        "health": {"node_id": "e2e-node"},
    }, env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "2000000"})
    poller = Poller(server.url)
    poller.start()
    server.wait_ready(backend="vllm")
    yield server, poller
    poller.halt.set()


def chat(server, **kwargs) -> httpx.Response:
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"model": MODEL, "messages": PARIS, "temperature": 0,
                                                               "max_tokens": 8, **kwargs}, timeout=120)
    assert r.status_code == 200, r.text
    return r


def scrape(server) -> dict[tuple, float]:
    text = httpx.get(f"{server.url}/metrics", timeout=5).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def node(server) -> dict:
    doc = httpx.get(f"{server.url}/v1/node", timeout=5).json()
    jsonschema.validate(doc, NODE_SCHEMA)
    return doc


def test_ready_goes_loading_ok_degraded_ok_across_a_kill_and_the_counters_follow(run):
    server, poller = run
    assert chat(server).headers["x-node-agent-backend"] == "vllm"
    before, doc = scrape(server), node(server)
    assert doc["node_id"] == "e2e-node" and doc["status"]["status"] == "ok"
    assert [(b["name"], b["state"]) for b in doc["backends"]] == [("vllm", "ready"), ("llamacpp", "ready")]
    assert doc["backends"][0]["admission"]["kv_capacity_tokens"] > 0

    core = next(p for p in psutil.Process(server.proc.pid).children(recursive=True) if "EngineCore" in p.name())
    os.kill(core.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while node(server)["backends"][0]["state"] != "failed" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert chat(server).headers["x-node-agent-backend"] == "llamacpp"
    server.wait_ready(timeout=240, backend="vllm")
    assert chat(server).headers["x-node-agent-backend"] == "vllm"
    time.sleep(0.2)  # one more poll of the final state
    seen = [(code, status) for code, status, _ in poller.seen]

    # 503 loading first; ok once vLLM serves; degraded on the fallback after the kill; ok again.
    assert seen[0] == (503, "loading"), poller.seen
    i = seen.index((200, "ok"))
    j = seen.index((200, "degraded"), i)
    assert (200, "ok") in seen[j:], poller.seen
    assert all(code in (200, 503) for code, _ in seen)

    after, doc = scrape(server), node(server)
    key = (("backend", "vllm"), ("endpoint", "/v1/chat/completions"), ("status", "200"))
    assert after[("node_agent_requests_total", key)] == before[("node_agent_requests_total", key)] + 1
    fb = (("backend", "llamacpp"), ("endpoint", "/v1/chat/completions"), ("status", "200"))
    assert after[("node_agent_requests_total", fb)] == 1
    assert after[("node_agent_backend_restarts_total", (("backend", "vllm"),))] == 1
    assert after[("node_agent_tokens_total", (("backend", "llamacpp"), ("kind", "completion")))] > 0
    assert doc["backends"][0]["restarts"] == 1 and doc["backends"][0]["state"] == "ready"
    assert doc["status"] == {"status": "ok", "backend": "vllm", "reason": None}


def test_systemd_sees_ready_watchdog_and_stopping(run, notify):
    """Last in the module: it stops the server."""
    server, _ = run
    time.sleep(2.5)  # at least two watchdog periods (WatchdogSec=2 s, pings every 1 s)
    assert server.stop() == 0
    time.sleep(0.5)
    messages = list(notify.messages)
    ready = [i for i, m in enumerate(messages) if m.startswith("READY=1")]
    assert len(ready) == 1 and "\nSTATUS=" in messages[ready[0]], messages
    assert sum(m == "WATCHDOG=1" for m in messages) >= 3, messages
    assert any(m.startswith("STATUS=degraded: serving from the fallback llamacpp; vllm is failed")
               for m in messages), messages
    assert any(m == "STATUS=serving from vllm" for m in messages), messages
    # STOPPING=1 is the last state message; only watchdog pings may follow it (the event loop
    # keeps feeding the watchdog while the drain lets a restarting engine finish its start).
    after = messages[next(i for i, m in enumerate(messages) if m.startswith("STOPPING=1")) + 1:]
    assert all(m == "WATCHDOG=1" for m in after), messages[-5:]
