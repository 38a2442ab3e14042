"""The serving core under faults on the real engines and the real server (#11).

- vLLM first, llama.cpp behind it (SmolLM2): a non-streamed request whose client leaves is
  aborted in vLLM; a hung EngineCore (SIGSTOP) opens vLLM's breaker, and a stream that takes the
  half-open probe and then leaves does not wedge it: traffic returns to vLLM.
- llama.cpp alone on the tiny model, with an API key and a health token: a 200 MB body is
  refused by its size before it is read, while /health/live stays fast; unauthenticated bodies are
  refused before they are read; a chat-template error is a 400 naming the reason.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import httpx
import psutil
import pytest

from tests.support.engines import NEEDS_VLLM

MODEL = "smollm2"
PARIS = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]
KEY = "e2e-api-key-0123456789"
TOKEN = "e2e-health-token-0123456789"
# Long enough that, on 2 busy cores, the test reads the open breaker and then sends its probe before
# the supervisor's own probe (one cooldown after half-open) takes the permit.
COOLDOWN_S = 10.0


def node(server, headers=None) -> dict:
    return httpx.get(f"{server.url}/v1/node", timeout=5, headers=headers or {}).json()


def backend_of(doc: dict, name: str) -> dict:
    return next(b for b in doc["backends"] if b["name"] == name)


def needs_vllm(test):
    for mark in NEEDS_VLLM:
        test = mark(test)
    return test


def wait_for(predicate, timeout: float, what: str, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"not within {timeout} s: {what}")


# --- vLLM with llama.cpp behind it ------------------------------------------------------------

@pytest.fixture(scope="module")
def chain(start_server, smollm2_hf_dir, smollm2_gguf_path):
    s = start_server({
        "model": {"ref": str(smollm2_hf_dir), "gguf": str(smollm2_gguf_path)},
        "planner": {"target_context": 2048, "min_context": 512, "max_num_seqs": 4},
        "router": {"breaker_failures": 1, "breaker_cooldown_s": COOLDOWN_S, "first_token_timeout_s": 3.0},
        "server": {"model_name": MODEL},
    })
    s.wait_ready(backend="vllm")
    return s


def engine_core(server) -> psutil.Process:
    procs = psutil.Process(server.proc.pid).children(recursive=True)
    return next(p for p in procs if "EngineCore" in p.name())


@needs_vllm
def test_a_non_streamed_request_whose_client_leaves_is_aborted_in_vllm(chain):
    body = {"model": MODEL, "messages": STORY, "max_tokens": 600, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{chain.url}/v1/chat/completions", json=body, timeout=1.5)
    vllm = wait_for(lambda: (lambda b: b if b["admission"]["running"] == 0 and
                             b["admission"]["kv_in_use_tokens"] == 0 else None)(backend_of(node(chain), "vllm")),
                    5, "vLLM still generating for a client that left")
    assert vllm["admission"]["kv_reserved_tokens"] == 0


@needs_vllm
def test_a_stream_that_leaves_during_the_half_open_probe_does_not_wedge_vllm(chain):
    core = engine_core(chain)
    core.send_signal(signal.SIGSTOP)  # a hung engine: no first token, no death
    try:
        r = httpx.post(f"{chain.url}/v1/chat/completions", timeout=60,
                       json={"model": MODEL, "messages": PARIS, "max_tokens": 8, "temperature": 0})
    finally:
        core.send_signal(signal.SIGCONT)
    assert r.status_code == 200 and r.headers["x-node-agent-backend"] == "llamacpp"
    detail = backend_of(node(chain), "vllm")["breaker_detail"]
    assert detail["state"] == "open" and detail["failures"] >= 1 and "FirstTokenTimeout" in detail["last_failure"]
    assert httpx.get(f"{chain.url}/health/ready", timeout=5).json()["status"] == "degraded"
    wait_for(lambda: backend_of(node(chain), "vllm")["breaker"] == "half_open", COOLDOWN_S + 2, "half-open")
    # This stream is the probe: it reaches vLLM, then its client leaves after the first chunk.
    with httpx.stream("POST", f"{chain.url}/v1/chat/completions", timeout=60,
                      json={"model": MODEL, "messages": STORY, "max_tokens": 200, "stream": True}) as s:
        assert s.headers["x-node-agent-backend"] == "vllm"
        next(s.iter_lines())
    detail = wait_for(lambda: (lambda b: b["breaker_detail"] if b["admission"]["running"] == 0 else None)(
        backend_of(node(chain), "vllm")), 5, "the probe's request still running")
    assert detail["state"] == "half_open" and detail["probing"] is False  # given back, not wedged
    r = httpx.post(f"{chain.url}/v1/chat/completions", timeout=60,
                   json={"model": MODEL, "messages": PARIS, "max_tokens": 8, "temperature": 0})
    assert r.headers["x-node-agent-backend"] == "vllm" and "Paris" in r.json()["choices"][0]["message"]["content"]
    assert backend_of(node(chain), "vllm")["breaker"] == "closed"
    assert httpx.get(f"{chain.url}/health/ready", timeout=5).json() == {"status": "ok", "backend": "vllm"}


# --- llama.cpp alone, with an API key and a health token ----------------------------------------

@pytest.fixture(scope="module")
def guarded(start_server, tiny_model):
    s = start_server({
        "model": {"ref": str(tiny_model.gguf_path)},
        "engines": {"chain": ["llamacpp"]},
        "planner": {"target_context": 512, "min_context": 256},
        "server": {"model_name": "tiny", "max_request_bytes": 1024 * 1024},
    }, env={"NODE_AGENT_SERVER__API_KEY": KEY, "NODE_AGENT_HEALTH__TOKEN": TOKEN})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{s.url}/health/ready", headers={"authorization": f"Bearer {TOKEN}"}).status_code == 200:
                return s
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(s.log.read_text()[-3000:])


def raw_request(server, head: str, body: bytes = b"", read_first: bool = False) -> tuple[int, dict]:
    """Send ``head`` (and as much of ``body`` as the server takes); the status and JSON answer."""
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.encode())
        if body and not read_first:
            try:
                sock.sendall(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server answered and closed without reading it: the point
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, json.loads(data.split(b"\r\n\r\n", 1)[1] or b"{}")


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


def test_a_200_mb_unauthenticated_body_is_a_413_while_health_stays_fast(guarded):
    latencies: list[float] = []
    stop = threading.Event()

    def poll():
        with httpx.Client(base_url=guarded.url, headers={"authorization": f"Bearer {TOKEN}"}) as client:
            while not stop.is_set() and len(latencies) < 400:
                t = time.perf_counter()
                assert client.get("/health/live").status_code == 200
                latencies.append(time.perf_counter() - t)
    poller = threading.Thread(target=poll)
    poller.start()
    try:
        size = 200 * 1024 * 1024
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                f"content-length: {size}\r\n\r\n")
        t0 = time.monotonic()
        status, body = raw_request(guarded, head, b"x" * (4 * 1024 * 1024))
        refused_in = time.monotonic() - t0
    finally:
        time.sleep(0.5)
        stop.set()
        poller.join()
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert "max_request_bytes" in body["error"]["message"] and refused_in < 5
    latencies.sort()
    assert len(latencies) >= 50
    assert latencies[int(len(latencies) * 0.99) - 1] < 0.050, latencies[-5:]


def test_a_chunked_body_over_the_limit_is_a_413_and_an_unauthenticated_one_is_never_read(guarded):
    chunk = b"x" * 65536
    chunks = (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * 20 + b"0\r\n\r\n"  # 1.25 MiB > the 1 MiB limit
    head = ("POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            f"transfer-encoding: chunked\r\nauthorization: Bearer {KEY}\r\n\r\n")
    status, body = raw_request(guarded, head, chunks)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    # Without the key the answer comes before a byte of the body is sent.
    head = "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
    status, body = raw_request(guarded, head, chunks, read_first=True)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"


def test_the_bearer_scheme_is_case_insensitive_and_openapi_is_off(guarded):
    r = httpx.get(f"{guarded.url}/v1/models", headers={"authorization": f"bearer {KEY}"})
    assert r.status_code == 200 and r.json()["data"][0]["id"] == "tiny"
    assert httpx.get(f"{guarded.url}/v1/models", headers={"authorization": f"Bearer {TOKEN}"}).status_code == 401
    r = httpx.get(f"{guarded.url}/openapi.json", headers={"authorization": f"Bearer {KEY}"})
    assert r.status_code == 404


def test_a_chat_template_error_is_a_400_naming_the_reason(guarded):
    r = httpx.post(f"{guarded.url}/v1/chat/completions", headers={"authorization": f"Bearer {KEY}"}, timeout=30,
                   json={"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"},
                                                                        {"role": "user", "content": "again"}]})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "messages" and "roles must alternate" in err["message"]
    ok = httpx.post(f"{guarded.url}/v1/chat/completions", headers={"authorization": f"Bearer {KEY}"}, timeout=30,
                    json={"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
    assert ok.status_code == 200
