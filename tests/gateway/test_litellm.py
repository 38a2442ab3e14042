"""LiteLLM (the litellm package's Router, in-process) in front of two node-agent processes on
loopback, one model group of two deployments: node A serves SmolLM2 with vLLM and llama.cpp
behind it, node B with llama.cpp alone (one slot, a queue of four). Each deployment is the block
`node-agent gateway-config --litellm` prints for its node.

- requests spread over both nodes, and each node counts what LiteLLM says it served;
- node B overloaded: its 429 with Retry-After makes LiteLLM send the requests to node A, and
  keep B out for as long as B asked;
- vLLM's EngineCore on node A SIGKILLed under load: no client sees an error (the node fails over
  to its llama.cpp, the router retries what it must);
- LiteLLM's health check (what its proxy's /health runs: a real call to every deployment) finds
  both nodes healthy, then node B unhealthy once it is stopped.
"""

from __future__ import annotations

import asyncio
import copy
import os
import signal
import threading
import time

import httpx
import psutil
import pytest
import yaml
from litellm import Router
from litellm.proxy.health_check import perform_health_check

from tests.gateway.conftest import MODEL, PARIS, answered, gateway_config, gauge, scrape, wait_until
from tests.support.engines import NEEDS_VLLM

pytestmark = [pytest.mark.gateway, *NEEDS_VLLM]
STORY = [{"role": "user", "content": "Tell a short story about a dragon who learns to cook."}]
QUEUE_B = 4


@pytest.fixture(scope="module")
def nodes(start_server, smollm2_hf_dir, smollm2_gguf_path):
    # After the SIGKILL both nodes serve from one llama.cpp slot each, on the same 2 cores as the
    # killed engine's processes: a queued request may wait longer than the default 30 s before its
    # slot frees (a fresh clone's CI run timed out one, a 429 that both deployments then got).
    # A full queue is still an immediate 429, which the overload test relies on.
    queue = {"queue_timeout_s": 120}
    b = start_server({"engines": {"chain": ["llamacpp"]}, "model": {"ref": str(smollm2_gguf_path)},
                      "planner": {"target_context": 2048}, "server": {"model_name": MODEL},
                      "health": {"node_id": "node-b"}, "admission": {"max_queue": QUEUE_B, **queue}})
    a = start_server({"model": {"ref": str(smollm2_hf_dir), "gguf": str(smollm2_gguf_path)},
                      "admission": queue,
                      "planner": {"target_context": 2048, "min_context": 512, "max_num_seqs": 8},
                      # vLLM is not restarted within this module: on 2 cores its start would
                      # starve the llama.cpp fallback that serves after the kill (and the teardown)
                      "router": {"restart_backoff_s": 600}, "server": {"model_name": MODEL},
                      "health": {"node_id": "node-a"}})
    b.wait_ready()
    a.wait_ready(backend="vllm", timeout=300)
    return a, b


@pytest.fixture(scope="module")
def model_list(nodes) -> list[dict]:
    """One deployment per node, as gateway-config prints it."""
    entries = [entry for node in nodes for entry in yaml.safe_load(gateway_config(node, "--litellm"))["model_list"]]
    assert [e["model_info"]["id"] for e in entries] == ["node-a", "node-b"]
    assert {e["model_info"]["max_input_tokens"] for e in entries} == {2048}
    return entries


def served_by(response) -> tuple[str, str]:
    """(node id from LiteLLM's view, the engine named by the node's header)."""
    hidden = response._hidden_params
    return hidden["model_id"], hidden["additional_headers"]["llm_provider-x-node-agent-backend"]


async def ask(router: Router, **kwargs):
    return await router.acompletion(model=MODEL, messages=PARIS, temperature=0, max_tokens=12, **kwargs)


def test_requests_spread_over_both_nodes(nodes, model_list):
    a, b = nodes
    before = answered(a), answered(b)
    router = Router(model_list=copy.deepcopy(model_list), num_retries=2)

    async def go():  # 12 requests, 3 at a time (within node B's queue): all on one node: p = 2**-11
        return [r for _ in range(4) for r in await asyncio.gather(*(ask(router) for _ in range(3)))]

    responses = asyncio.run(go())
    assert all("Paris" in r.choices[0].message.content for r in responses)
    by_node = [served_by(r) for r in responses]
    assert {node for node, _ in by_node} == {"node-a", "node-b"}, by_node
    assert {engine for node, engine in by_node if node == "node-a"} == {"vllm"}
    assert {engine for node, engine in by_node if node == "node-b"} == {"llamacpp"}
    counted = answered(a) - before[0], answered(b) - before[1]
    assert counted == (sum(n == "node-a" for n, _ in by_node), sum(n == "node-b" for n, _ in by_node))


class Hog:
    """Long streams straight to a node, holding its slot and its queue until released."""

    def __init__(self, node, n: int) -> None:
        self.node, self.release = node, threading.Event()
        self.threads = [threading.Thread(target=self._stream) for _ in range(n)]

    def _stream(self) -> None:
        with httpx.stream("POST", f"{self.node.url}/v1/completions", timeout=300, json={
                "model": MODEL, "prompt": "Count: one, two, three,", "max_tokens": 1500, "stream": True}) as r:
            for _ in r.iter_lines():
                if self.release.is_set():
                    return

    def __enter__(self) -> Hog:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        for t in self.threads:
            t.join(timeout=120)


def test_overload_on_one_node_sends_its_requests_to_the_other(nodes, model_list):
    a, b = nodes
    entries = copy.deepcopy(model_list)
    for e in entries:  # node B first while it is not cooled down: every request meets its 429 first
        e["litellm_params"]["order"] = 1 if e["model_info"]["id"] == "node-b" else 2
    router = Router(model_list=entries, num_retries=2)
    with Hog(b, 1 + QUEUE_B):
        wait_until(lambda: (m := scrape(b)) and gauge(m, "vllm:num_requests_running") == 1
                   and gauge(m, "vllm:num_requests_waiting") == QUEUE_B, 60, "node B's slot and queue taken")
        probe = httpx.post(f"{b.url}/v1/chat/completions", timeout=30,
                           json={"model": MODEL, "messages": PARIS, "max_tokens": 12})
        assert probe.status_code == 429 and probe.headers["x-node-agent-backend"] == "llamacpp"
        retry_after = int(probe.headers["retry-after"])
        assert 1 <= retry_after <= 60
        refused = answered(b, 429)
        started = time.monotonic()

        async def go():
            return [await ask(router) for _ in range(4)]

        responses = asyncio.run(go())
        elapsed = time.monotonic() - started
        tried_b = answered(b, 429) - refused
    assert all("Paris" in r.choices[0].message.content for r in responses)
    assert [served_by(r)[0] for r in responses] == ["node-a"] * 4
    # LiteLLM met B's 429 once, then kept B out for the Retry-After it was given.
    assert retry_after > elapsed, (retry_after, elapsed)
    assert tried_b == 1


def engine_core_pid(node) -> int:
    procs = psutil.Process(node.proc.pid).children(recursive=True)
    return next(p.pid for p in procs if "EngineCore" in p.name())


def test_sigkill_of_a_nodes_serving_engine_is_invisible_to_clients(nodes, model_list):
    a, _ = nodes
    router = Router(model_list=copy.deepcopy(model_list), num_retries=2)
    pid = engine_core_pid(a)
    killed_at: list[float] = []
    errors: list[BaseException] = []

    async def client(i: int) -> list[str]:
        """Requests one after the other until two have started after the kill."""
        finishes, after_kill = [], 0
        while after_kill < 2 and len(finishes) < 40:
            after_kill += bool(killed_at)
            try:
                if i % 2:
                    stream = await router.acompletion(model=MODEL, messages=STORY, temperature=0, max_tokens=16,
                                                      stream=True)
                    reasons = [c.choices[0].finish_reason async for c in stream if c.choices]
                    finishes.append(next(r for r in reasons if r))
                else:
                    r = await router.acompletion(model=MODEL, messages=STORY, temperature=0, max_tokens=16)
                    finishes.append(r.choices[0].finish_reason)
            except Exception as exc:  # noqa: BLE001 - every one is a client-visible error: counted
                errors.append(exc)
                finishes.append("error")
        return finishes

    async def kill_under_load() -> None:
        while gauge(await asyncio.to_thread(scrape, a), "vllm:num_requests_running") < 1:
            await asyncio.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
        killed_at.append(time.time())

    async def go():
        killer = asyncio.create_task(asyncio.wait_for(kill_under_load(), 120))
        results = await asyncio.gather(*(client(i) for i in range(4)))  # within node B's queue
        await killer
        return results

    results = asyncio.run(go())
    assert errors == [], "\n".join(sorted({str(e)[:600] for e in errors}))
    assert all(f in ("stop", "length") for finishes in results for f in finishes)
    events = httpx.get(f"{a.url}/v1/node", timeout=10).json()["fallback_events"]
    died = [e for e in events if e["from"] == "vllm" and e["ts"] >= killed_at[0] - 1]
    assert died and all(e["to"] == "llamacpp" for e in died), events
    assert any(e["reason"].startswith("BackendDied") for e in died), died


def test_health_check_finds_both_healthy_then_the_stopped_node_unhealthy(nodes, model_list):
    _, b = nodes

    def check():
        healthy, unhealthy = asyncio.run(perform_health_check(copy.deepcopy(model_list)))[:2]
        return {h["model_id"] for h in healthy}, {u["model_id"] for u in unhealthy}

    assert check() == ({"node-a", "node-b"}, set())
    assert b.stop() == 0
    assert check() == ({"node-a"}, {"node-b"})
