"""The agent's endpoint against llama-cpp-python's own server on the same GGUF, and failover time.

    .venv/bin/python -m bench.serve [--requests 16] [--tokens 64] [--repeats 3] [--skip-failover]

1. Throughput and time-to-first-token: `node-agent serve` (llama.cpp only) vs
   `python -m llama_cpp.server` (the anchor, `--interrupt_requests False` so it does not cut
   streams short), same GGUF, n_ctx, threads and flash attention, streamed chats at temperature 0,
   at concurrency 1 and 4. Prints the throughput ratio and the TTFT the agent adds (p50, p99).
2. Failover: `node-agent serve` with vLLM first and llama.cpp warm behind it; a stream is running
   on vLLM when its EngineCore is SIGKILLed; prints the time from the kill to the next token.

Needs the `bench` extra (sse-starlette, starlette-context: what llama_cpp.server imports) for the
anchor, and vLLM for part 2. Results and the command: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import yaml

from tests.conftest import CACHE
from tests.e2e.conftest import free_port, node_agent
from tests.support.models import make_smollm2_hf, smollm2_gguf

N_CTX = 2048
PROMPT = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]
# llama_cpp.server samples with top_k 40, min_p 0.05, repeat_penalty 1.1 unless told otherwise;
# the agent uses top_k 0, min_p 0, repeat_penalty 1 (vLLM's defaults). Same settings for both.
SAMPLING = {"temperature": 0, "top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0}


def wait_ready(url: str, path: str, proc: subprocess.Popen, timeout: float = 300, backend: str | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            r = httpx.get(url + path, timeout=2)
            if r.status_code == 200 and (backend is None or r.json().get("backend") == backend):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"{url} not ready after {timeout} s")


def start_agent(config: dict) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cfg = Path(tempfile.mkdtemp(prefix="bench-serve-")) / "config.yaml"
    cfg.write_text(yaml.safe_dump({**config, "server": {**config.get("server", {}), "port": port}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("NODE_AGENT_")}
    proc = subprocess.Popen([*node_agent(), "serve", "--config", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def start_anchor(gguf: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--n_ctx", str(N_CTX),
                             "--n_threads", str(psutil.cpu_count(logical=False) or 1), "--flash_attn", "True",
                             "--interrupt_requests", "False", "--port", str(port), "--model_alias", "smollm2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


async def one_stream(client: httpx.AsyncClient, model: str, tokens: int) -> tuple[float, int]:
    """(seconds to the first content token, completion chunks) for one streamed chat."""
    body = {"model": model, "messages": PROMPT, "max_tokens": tokens, "stream": True, **SAMPLING}
    t0 = time.perf_counter()
    ttft, chunks = None, 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"]
            if delta and delta[0]["delta"].get("content"):
                chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
    return ttft or 0.0, chunks


async def load(url: str, model: str, requests: int, concurrency: int, tokens: int) -> tuple[float, list[float]]:
    """(completion tokens per second, TTFTs) for ``requests`` streams, ``concurrency`` at a time."""
    sem = asyncio.Semaphore(concurrency)

    async def limited(client):
        async with sem:
            return await one_stream(client, model, tokens)
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        await one_stream(client, model, 8)  # warm-up
        t = time.perf_counter()
        results = await asyncio.gather(*(limited(client) for _ in range(requests)))
    elapsed = time.perf_counter() - t
    return sum(n for _, n in results) / elapsed, [ttft for ttft, _ in results]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def bench_throughput(args) -> None:
    gguf = smollm2_gguf()
    agent, agent_url = start_agent({"model": {"ref": "default"}, "engines": {"chain": ["llamacpp"]},
                                    "planner": {"target_context": N_CTX, "min_context": 512},
                                    "admission": {"max_queue": 1000, "queue_timeout_s": 600}})
    anchor, anchor_url = start_anchor(gguf)
    try:
        wait_ready(agent_url, "/health/ready", agent)
        wait_ready(anchor_url, "/v1/models", anchor)
        for c in (1, 4):
            ours, theirs, ttft_ours, ttft_theirs = [], [], [], []
            for r in range(args.repeats):  # alternate which goes first
                runs = [("agent", agent_url, "smollm2-135m-instruct"), ("anchor", anchor_url, "smollm2")]
                for who, url, model in (runs if r % 2 == 0 else runs[::-1]):
                    tps, ttfts = asyncio.run(load(url, model, args.requests, c, args.tokens))
                    (ours if who == "agent" else theirs).append(tps)
                    (ttft_ours if who == "agent" else ttft_theirs).extend(ttfts)
            ratio = statistics.median(ours) / statistics.median(theirs)
            added50 = (pct(ttft_ours, 0.5) - pct(ttft_theirs, 0.5)) * 1000
            added99 = (pct(ttft_ours, 0.99) - pct(ttft_theirs, 0.99)) * 1000
            print(f"concurrency {c}: agent {statistics.median(ours):6.1f} tok/s, llama_cpp.server "
                  f"{statistics.median(theirs):6.1f} tok/s, ratio {ratio:.3f}; TTFT p50 agent "
                  f"{pct(ttft_ours, 0.5) * 1000:.1f} ms vs {pct(ttft_theirs, 0.5) * 1000:.1f} ms (added {added50:+.1f} ms), "
                  f"p99 added {added99:+.1f} ms")
    finally:
        for proc in (agent, anchor):
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)


def bench_failover(args) -> None:
    hf = make_smollm2_hf(Path(CACHE) / "smollm2-hf")
    agent, url = start_agent({"model": {"ref": str(hf), "gguf": str(smollm2_gguf())},
                              "planner": {"target_context": N_CTX, "min_context": 512},
                              "router": {"restart_backoff_s": 1.0}, "server": {"model_name": "smollm2"}})
    latencies = []
    try:
        for _ in range(args.failovers):
            wait_ready(url, "/health/ready", agent, backend="vllm")
            core = next(p for p in psutil.Process(agent.pid).children(recursive=True) if "EngineCore" in p.name())

            async def run() -> float:
                body = {"model": "smollm2", "messages": PROMPT, "max_tokens": 200, "stream": True, "temperature": 0}
                async with httpx.AsyncClient(base_url=url, timeout=300) as client:
                    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                        killed_at, chunks = None, 0
                        async for line in r.aiter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            event = json.loads(line[6:])
                            if "error" in event:
                                raise SystemExit(f"the stream ended with an error: {event['error']}")
                            choices = event["choices"]
                            if not (choices and choices[0]["delta"].get("content")):
                                continue
                            chunks += 1
                            if killed_at is not None:
                                return time.perf_counter() - killed_at
                            if chunks == 10:
                                killed_at = time.perf_counter()
                                os.kill(core.pid, signal.SIGKILL)
                raise SystemExit("the stream ended without a token after the kill")
            latencies.append(asyncio.run(run()))
            print(f"failover: kill -> next token {latencies[-1] * 1000:.1f} ms")
        print(f"failover median {statistics.median(latencies) * 1000:.1f} ms over {len(latencies)} kills")
    finally:
        os.killpg(agent.pid, signal.SIGTERM)
        agent.wait(timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16, help="streams per measurement")
    parser.add_argument("--tokens", type=int, default=64, help="max tokens per stream")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per point (median)")
    parser.add_argument("--failovers", type=int, default=3, help="EngineCore kills to time")
    parser.add_argument("--skip-failover", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    if not args.skip_throughput:
        bench_throughput(args)
    if not args.skip_failover:
        bench_failover(args)


if __name__ == "__main__":
    main()
