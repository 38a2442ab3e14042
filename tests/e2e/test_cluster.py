"""A model across hosts (#16): two agent processes on loopback run SmolLM2 as one vLLM group with
pipeline parallel 2 (the head rank 0, the worker rank 1, vLLM's CPU build), the head's llama.cpp
behind it. One group start serves the checks in order: the answer and what /v1/node shows; the
worker's engine SIGKILLed mid-stream (failover, readiness naming the lost member, the group back);
the head crashed and restarted while the worker lives (the worker stops its engine and rejoins).

"Hosts" are processes here: the head's vLLM traffic uses 127.0.0.1, the worker's 127.0.0.2, over
the loopback interface; each gets a core of its own (VLLM_CPU_OMP_THREADS_BIND), as two hosts would.
Timings are printed (pytest -s) for docs/cluster.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import jsonschema
import openai
import psutil
import pytest
import yaml

from tests.e2e.conftest import free_port, node_agent
from tests.support.engines import NEEDS_VLLM

pytestmark = NEEDS_VLLM
ROOT = Path(__file__).parents[2]
NODE_SCHEMA = json.loads((ROOT / "docs/schemas/node.schema.json").read_text())
MODEL = "smollm2"
TOKEN = "cluster-e2e-health-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PARIS = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]
GROUP_START_S = 900  # a group start on 2 busy cores: imports, two engines, the rendezvous


@dataclass
class Agent:
    """One `node-agent serve` process of the group."""

    name: str
    config: Path
    log: Path
    port: int
    env: dict
    proc: subprocess.Popen | None = None
    seen: set[int] = field(default_factory=set)  # every process it ever had, for the teardown
    peers: list[Agent] = field(default_factory=list)  # the rest of the group: their logs explain a failure here

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen([*node_agent(), "serve", "--config", str(self.config)],
                                     stdout=self.log.open("a"), stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        self.seen.add(self.proc.pid)

    def get(self, path: str) -> httpx.Response:
        self.remember()
        return httpx.get(self.url + path, headers=AUTH, timeout=10)

    def node(self) -> dict:
        doc = self.get("/v1/node").json()
        jsonschema.validate(doc, NODE_SCHEMA)
        return doc

    def remember(self) -> None:
        with contextlib.suppress(psutil.Error):
            self.seen.update(p.pid for p in psutil.Process(self.proc.pid).children(recursive=True))

    def wait(self, check, what: str, timeout: float) -> float:
        """Poll ``check(agent)`` until it is true; the seconds it took."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.tails()}")
            with contextlib.suppress(httpx.HTTPError):
                if check(self):
                    return time.monotonic() - start
            time.sleep(0.2)
        raise AssertionError(f"{self.name}: not {what} after {timeout} s:\n{self.tails()}")

    def wait_vllm(self, timeout: float = GROUP_START_S) -> float:
        def ready(a: Agent) -> bool:
            r = a.get("/health/ready")
            return r.status_code == 200 and r.json()["backend"] == "vllm" and r.json()["status"] == "ok"
        return self.wait(ready, "serving from the vLLM group", timeout)

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def tails(self) -> str:
        """This agent's log tail, then its own lines (not vLLM's) from each peer's log."""
        out = [f"--- {self.name}.log ---", self.tail()]
        for peer in self.peers:
            mine = [line for line in peer.log.read_text(errors="replace").splitlines() if " agent." in line]
            out += [f"--- {peer.name}.log, the agent's own lines ---", *mine[-60:]]
        return "\n".join(out)

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.remember()
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def crash(self) -> None:
        """SIGKILL the agent and every process under it at once, as a host that loses power."""
        self.remember()
        for pid in [self.proc.pid, *(p.pid for p in psutil.Process(self.proc.pid).children(recursive=True))]:
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
        self.proc.wait()

    def kill_leftovers(self) -> None:
        for pid in self.seen:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()


@dataclass
class Group:
    head: Agent
    worker: Agent


def chat(agent: Agent, **kwargs):
    client = openai.OpenAI(base_url=f"{agent.url}/v1", api_key="unused", max_retries=0, timeout=300)
    return client.chat.completions.with_raw_response.create(model=MODEL, temperature=0, **kwargs)


@pytest.fixture(scope="module")
def group(tmp_path_factory, smollm2_hf_dir, smollm2_gguf_path):
    work = tmp_path_factory.mktemp("cluster")
    head_port, worker_port, rendezvous = free_port(), free_port(), free_port()
    base = {
        "model": {"ref": str(smollm2_hf_dir), "gguf": str(smollm2_gguf_path)},
        "planner": {"target_context": 2048, "min_context": 512, "max_num_seqs": 8},
        "router": {"restart_backoff_s": 1.0},
        # llama.cpp's one slot serves a continued stream and a restarted request in turn, on CPUs
        # that two starting vLLM engines share: give the queue time.
        "admission": {"queue_timeout_s": 300},
        "health": {"token": TOKEN},
    }
    agents = []
    for name, rank, port, ip in (("head", 0, head_port, "127.0.0.1"), ("worker", 1, worker_port, "127.0.0.2")):
        config = {**base, "server": {"port": port, "model_name": MODEL}, "state_dir": str(work / f"state-{name}"),
                  "cluster": {"nodes": 2, "rank": rank, "head": f"127.0.0.1:{rendezvous}", "head_api_port": head_port,
                              "interface": "lo", "host_ip": ip}}
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        env = {k: v for k, v in os.environ.items() if not k.startswith("NODE_AGENT_")}
        if (os.cpu_count() or 1) >= 2:
            env["VLLM_CPU_OMP_THREADS_BIND"] = str(rank)
        agents.append(Agent(name, path, work / f"{name}.log", port, env))
    head, worker = agents
    head.peers, worker.peers = [worker], [head]
    worker.start()  # a worker may come first: it waits for its head
    head.start()
    try:
        yield Group(head, worker)
    finally:
        for agent in (head, worker):
            agent.stop()
        for agent in (head, worker):
            agent.kill_leftovers()


def test_the_group_answers_and_node_shows_both_members_with_their_layers(group):
    took = group.head.wait_vllm()
    print(f"\ngroup start (head process start to ready on vLLM): {took:.0f} s")
    raw = chat(group.head, messages=PARIS)
    assert raw.headers["x-node-agent-backend"] == "vllm"
    assert "Paris" in raw.parse().choices[0].message.content

    doc = group.head.node()
    c = doc["cluster"]
    assert (c["role"], c["nodes"], c["group"], c["missing"]) == ("head", 2, "running", [])
    assert [(m["rank"], m["address"], m["state"], m["stages"], m["layers"]) for m in c["members"]] == [
        (0, "127.0.0.1", "ok", [0], 15), (1, "127.0.0.2", "ok", [1], 15)]
    assert doc["plan"]["vllm"]["pipeline_parallel_size"] == 2 and doc["plan"]["vllm"]["kv_cache_tokens"] == 93_184
    assert any("layers per host 15/15" in r for r in doc["plan"]["vllm"]["reasons"])
    ready = group.head.get("/health/ready").json()
    assert ready["status"] == "ok" and ready["cluster"]["group"] == "running"

    w = group.worker.node()
    assert w["cluster"]["role"] == "worker" and w["cluster"]["engine"] == "running"
    assert w["backends"][0]["state"] == "ready" and psutil.pid_exists(w["cluster"]["engine_pid"])
    # a worker serves layers, not requests: it says where to go
    r = httpx.post(f"{group.worker.url}/v1/chat/completions", json={"model": MODEL, "messages": PARIS}, timeout=30)
    assert r.status_code == 421 and r.json()["error"]["code"] == "cluster_worker"


def test_sigkill_of_the_worker_engine_mid_stream_fails_over_and_the_group_comes_back(group):
    head, worker = group.head, group.worker
    head.wait_vllm()
    engine = worker.node()["cluster"]["engine_pid"]
    times: dict[str, float] = {}

    async def run():
        client = openai.AsyncOpenAI(base_url=f"{head.url}/v1", api_key="unused", max_retries=0, timeout=600)
        first = asyncio.Event()

        async def stream():
            s = await client.chat.completions.create(model=MODEL, messages=STORY, temperature=0, max_tokens=60,
                                                     stream=True)
            text, finish = "", None
            async for chunk in s:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                    finish = chunk.choices[0].finish_reason or finish
                    if text:
                        first.set()
            return text, finish

        async def plain():
            raw = await client.chat.completions.with_raw_response.create(model=MODEL, messages=STORY, temperature=0,
                                                                         max_tokens=24)
            r = raw.parse()
            return raw.headers["x-node-agent-backend"], r.choices[0].finish_reason, r.choices[0].message.content

        streaming, answering = asyncio.create_task(stream()), asyncio.create_task(plain())
        await asyncio.wait_for(first.wait(), 300)  # both requests run on the group now
        os.kill(engine, signal.SIGKILL)
        killed = time.monotonic()
        while True:
            r = await asyncio.to_thread(head.get, "/health/ready")
            body = r.json()
            if body["status"] == "degraded" and "rank 1" in (body.get("reason") or ""):
                times["degraded"] = time.monotonic() - killed
                break
            assert time.monotonic() - killed < 5, f"readiness did not name the lost member within 5 s: {body}"
            await asyncio.sleep(0.1)
        results = await asyncio.wait_for(asyncio.gather(streaming, answering), 600)
        times["answered"] = time.monotonic() - killed
        await client.close()
        return body, results

    body, ((text, finish), (backend, plain_finish, plain_text)) = asyncio.run(run())
    print(f"\nreadiness degraded naming rank 1 after {times['degraded']:.2f} s; in-flight requests answered "
          f"after {times['answered']:.1f} s")
    assert body["backend"] == "llamacpp" and body["cluster"]["missing"][0]["rank"] == 1
    assert finish in ("stop", "length") and len(text) > 20  # the stream continued on llama.cpp
    assert backend == "llamacpp" and plain_finish in ("stop", "length") and plain_text
    log = head.log.read_text()
    assert '"event": "fallback"' in log and '"from": "vllm", "to": "llamacpp"' in log

    # the worker agent restarts its engine, the head restarts the whole group, traffic returns
    back = head.wait_vllm()
    print(f"group back on vLLM {back + times['answered']:.0f} s after the kill")
    worker.wait(lambda a: a.node()["cluster"]["engine"] == "running", "running its engine again", 30)
    assert worker.node()["cluster"]["engine_pid"] != engine
    raw = chat(head, messages=PARIS)
    assert raw.headers["x-node-agent-backend"] == "vllm" and "Paris" in raw.parse().choices[0].message.content
    assert head.node()["backends"][0]["restarts"] >= 1


def test_a_head_that_crashed_and_restarted_the_worker_stops_its_engine_and_rejoins(group):
    head, worker = group.head, group.worker
    head.wait_vllm()
    before = worker.node()["cluster"]
    engine, head_id = before["engine_pid"], before["head_id"]
    head.crash()  # no goodbye: the worker only sees its heartbeats go unanswered

    def stopped(a: Agent) -> bool:
        c = a.node()["cluster"]
        return c["engine"] == "idle" and c["engine_pid"] is None
    took = worker.wait(stopped, "idle after losing its head", 60)
    print(f"\nworker stopped its engine {took:.1f} s after the head crashed (heartbeat timeout 5 s)")
    gone = not psutil.pid_exists(engine) or psutil.Process(engine).status() == psutil.STATUS_ZOMBIE
    assert gone, "the worker's engine outlived its head"
    ready = worker.get("/health/ready")
    assert ready.status_code == 503 and "does not answer" in ready.json()["reason"]

    head.start()  # the same host and settings come back
    rejoined = head.wait_vllm()
    print(f"new head serving on the group {rejoined:.0f} s after it started")
    worker.wait(lambda a: a.node()["cluster"]["engine"] == "running", "running its engine again", 30)
    after = worker.node()["cluster"]
    assert after["head_id"] != head_id and after["engine_pid"] != engine
    raw = chat(head, messages=PARIS)
    assert raw.headers["x-node-agent-backend"] == "vllm" and "Paris" in raw.parse().choices[0].message.content
