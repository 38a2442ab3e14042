"""vLLM's router (the `vllm-router` wheel's Rust binary) in front of two llama.cpp nodes on
SmolLM2, and what an endpoint picker reads from a node (the Model Server Protocol) under a burst.

The router takes each node's URL from `node-agent gateway-config --vllm-router` and polls the
nodes' GET /health. A node that stops serving (here: restarted on a GGUF llama.cpp cannot load,
so the process is up and /health answers 503) is taken out; once its engine loads again it comes
back."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import openai
import pytest

from tests.gateway.conftest import MODEL, PARIS, answered, free_port, gateway_config, gauge, scrape, wait_until
from tests.support.models import swapped_embedding

pytestmark = pytest.mark.gateway


def node_config(gguf: Path, name: str, **extra) -> dict:
    return {"engines": {"chain": ["llamacpp"]}, "model": {"ref": str(gguf)}, "planner": {"target_context": 2048},
            "server": {"model_name": MODEL}, "health": {"node_id": name}, **extra}


@pytest.fixture(scope="module")
def node_c(start_server, smollm2_gguf_path):
    node = start_server(node_config(smollm2_gguf_path, "node-c"))
    node.wait_ready()
    return node


@pytest.fixture(scope="module")
def node_d_model(tmp_path_factory, smollm2_gguf_path) -> Path:
    """Node D's GGUF, a copy the test can break and mend in place."""
    path = tmp_path_factory.mktemp("node-d") / "model.gguf"
    shutil.copyfile(smollm2_gguf_path, path)
    return path


@pytest.fixture(scope="module")
def node_d(start_server, node_d_model):
    # Restarts quickly and never gives up, so it stays up answering 503 while its model is broken.
    node = start_server(node_config(node_d_model, "node-d", router={
        "restart_backoff_s": 0.5, "restart_backoff_max_s": 1, "max_restart_attempts": 10_000}))
    node.wait_ready()
    return node


def worker_url(node) -> str:
    [url] = [line for line in gateway_config(node, "--vllm-router").splitlines() if line and not line.startswith("#")]
    return url


@pytest.fixture(scope="module")
def router(node_c, node_d, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("vllm-router") / "router.log"
    exe = shutil.which("vllm-router", path=str(Path(sys.executable).parent))
    assert exe, "vllm-router is not installed: scripts/test installs the gateway extra"
    proc = subprocess.Popen([
        exe, "--host", "127.0.0.1", "--port", str(port), "--prometheus-host", "127.0.0.1",
        "--prometheus-port", str(free_port()), "--policy", "round_robin",
        "--worker-urls", worker_url(node_c), worker_url(node_d),
        # the health flags gateway-config suggests, faster: a test cannot wait 30 s per step
        "--health-check-endpoint", "/health", "--health-check-interval-secs", "1",
        "--health-failure-threshold", "2", "--health-success-threshold", "1",
        "--worker-startup-check-interval", "1", "--worker-startup-timeout-secs", "120",
    ], stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, "NO_COLOR": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: len(healthy_workers(url)) == 2, 60, f"vllm-router ready with two healthy workers\n"
                   f"{log.read_text()[-3000:] if log.exists() else ''}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def healthy_workers(router_url: str) -> set[str]:
    workers = httpx.get(f"{router_url}/workers", timeout=5).json()["workers"]
    return {w["url"] for w in workers if w["is_healthy"]}


def ask(router_url: str, n: int) -> list[str]:
    client = openai.OpenAI(base_url=f"{router_url}/v1", api_key="unused", max_retries=0, timeout=120)
    out = []
    for _ in range(n):
        r = client.chat.completions.create(model=MODEL, messages=PARIS, temperature=0, max_tokens=12)
        out.append(r.choices[0].message.content)
    return out


def test_protocol_gauges_move_with_a_burst_on_a_real_node(node_c):
    """Slots + 3 streams at once: the picker's gauges show them running and waiting, the KV usage
    is the reservation over the budget (read in the same scrape), then all of it drains."""
    slots = httpx.get(f"{node_c.url}/v1/node", timeout=10).json()["backends"][0]["admission"]["slots_total"]
    idle = scrape(node_c)
    assert gauge(idle, "vllm:num_requests_waiting") == 0 and gauge(idle, "vllm:kv_cache_usage_perc") == 0
    info = [labels for (n, labels), v in idle.items() if n == "vllm:cache_config_info" and v == 1]
    assert [dict(x) for x in info] == [{"backend": "llamacpp", "block_size": "1", "num_gpu_blocks": str(2048 * slots)}]

    def stream() -> str:
        with httpx.stream("POST", f"{node_c.url}/v1/completions", timeout=120, json={
                "model": MODEL, "prompt": "Count: one, two, three,", "max_tokens": 48, "stream": True}) as r:
            return "".join(r.iter_lines())

    threads = [threading.Thread(target=stream) for _ in range(slots + 3)]
    for t in threads:
        t.start()
    try:
        busy = wait_until(lambda: (s := scrape(node_c)) and gauge(s, "vllm:num_requests_waiting") == 3 and s,
                          60, "three requests waiting", every=0.05)
    finally:
        for t in threads:
            t.join(timeout=120)
    assert gauge(busy, "vllm:num_requests_running") == slots
    reserved = busy[("node_agent_kv_reserved_tokens", (("backend", "llamacpp"),))]
    budget = busy[("node_agent_kv_budget_tokens", (("backend", "llamacpp"),))]
    assert reserved > 0 and gauge(busy, "vllm:kv_cache_usage_perc") == pytest.approx(reserved / budget)
    assert gauge(busy, "vllm:gpu_cache_usage_perc") == gauge(busy, "vllm:kv_cache_usage_perc")
    after = scrape(node_c)
    assert [gauge(after, n) for n in ("vllm:num_requests_waiting", "vllm:num_requests_running",
                                     "vllm:kv_cache_usage_perc")] == [0, 0, 0]


def test_requests_through_the_router_are_served_by_both_nodes(router, node_c, node_d):
    before = answered(node_c), answered(node_d)
    answers = ask(router, 4)
    assert all("Paris" in a for a in answers), answers
    assert (answered(node_c) - before[0], answered(node_d) - before[1]) == (2, 2)  # round robin


def test_a_node_that_stops_serving_is_taken_out_and_comes_back(router, node_c, node_d, node_d_model, start_server):
    d_url = worker_url(node_d)
    good = node_d_model.with_name("good.gguf")
    shutil.copyfile(node_d_model, good)
    assert node_d.stop() == 0
    swapped_embedding(good, node_d_model)  # llama.cpp refuses it; the planner reads it as before
    config = node_config(node_d_model, "node-d", router={
        "restart_backoff_s": 0.5, "restart_backoff_max_s": 1, "max_restart_attempts": 10_000})
    broken = start_server({**config, "server": {**config["server"], "port": int(d_url.rsplit(":", 1)[1])}})
    wait_until(lambda: httpx.get(f"{broken.url}/health/live", timeout=2).status_code == 200, 60, "node D back up")
    assert httpx.get(f"{broken.url}/health", timeout=5).status_code == 503
    wait_until(lambda: healthy_workers(router) == {worker_url(node_c)}, 30, "the router takes node D out")

    before = answered(node_c)
    assert all("Paris" in a for a in ask(router, 3))
    assert answered(node_c) - before == 3 and answered(broken) == 0

    os.replace(good, node_d_model)  # the model is mended: D's next restart loads it
    wait_until(lambda: httpx.get(f"{broken.url}/health", timeout=2).status_code == 200, 60, "node D serving again")
    wait_until(lambda: healthy_workers(router) == {worker_url(node_c), d_url}, 30, "the router takes node D back")
    before = answered(node_c), answered(broken)
    assert all("Paris" in a for a in ask(router, 4))
    assert (answered(node_c) - before[0], answered(broken) - before[1]) == (2, 2)
