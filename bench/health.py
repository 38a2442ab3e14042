"""Health endpoints under generation load: /health, /health/ready, /v1/node and /metrics throughput and latency.

    .venv/bin/python -m bench.health [--seconds 5] [--connections 8] [--streams 4] [--vllm]

Starts `node-agent serve` on the embedded default (llama.cpp; `--vllm` puts vLLM first), then
measures each health endpoint for ``--seconds`` with ``--connections`` keep-alive connections
from a minimal HTTP/1.1 client (asyncio streams, one request in flight per connection), first
idle and then while ``--streams`` streamed chats run without pause in another process. The
anchor, measured in the same run, is /health/live on the idle server: the HTTP stack's own floor.
Targets (#6): >= 2,000 requests/s and p99 <= 10 ms under generation load.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import time

import httpx

from bench.serve import one_stream, pct, start_agent, wait_ready
from tests.conftest import CACHE
from tests.support.models import make_smollm2_hf, smollm2_gguf

MODEL = "smollm2"


async def _one_connection(host: str, port: int, path: str, until: float, latencies: list[float]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    try:
        while time.perf_counter() < until:
            t = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            await reader.readexactly(length)
            if not head.startswith(b"HTTP/1.1 200"):
                raise SystemExit(f"{path} answered {head.splitlines()[0].decode()}")
            latencies.append(time.perf_counter() - t)
    finally:
        writer.close()


async def hammer(url: str, path: str, seconds: float, connections: int) -> tuple[float, list[float]]:
    """(requests per second, latencies) for ``path``."""
    host, port = url.removeprefix("http://").split(":")
    latencies: list[float] = []
    t0 = time.perf_counter()
    until = t0 + seconds
    await asyncio.gather(*(_one_connection(host, int(port), path, until, latencies) for _ in range(connections)))
    return len(latencies) / (time.perf_counter() - t0), latencies


def _generate_forever(url: str, streams: int, stop, produced) -> None:
    """Runs in its own process: ``streams`` chats back to back until ``stop`` is set."""
    async def worker(client):
        while not stop.is_set():
            _, n = await one_stream(client, MODEL, 64)
            with produced.get_lock():
                produced.value += n

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            await asyncio.gather(*(worker(client) for _ in range(streams)))

    asyncio.run(main())


def measure(url: str, path: str, args) -> tuple[float, float, float]:
    rps, lat = asyncio.run(hammer(url, path, args.seconds, args.connections))
    return rps, pct(lat, 0.5) * 1000, pct(lat, 0.99) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--connections", type=int, default=8, help="keep-alive connections hammering health")
    parser.add_argument("--streams", type=int, default=4, help="concurrent streamed chats as generation load")
    parser.add_argument("--vllm", action="store_true", help="vLLM first, llama.cpp behind it")
    args = parser.parse_args()

    gguf = smollm2_gguf()
    config = {"model": {"ref": str(gguf), "gguf": str(gguf)}, "engines": {"chain": ["llamacpp"]},
              "planner": {"target_context": 2048}, "server": {"model_name": MODEL}}
    if args.vllm:
        config["model"]["ref"] = str(make_smollm2_hf(CACHE / "smollm2-hf"))
        config["engines"]["chain"] = ["vllm", "llamacpp"]
    proc, url = start_agent(config)
    try:
        wait_ready(url, "/health/ready", proc, backend="vllm" if args.vllm else None)
        rows = []
        anchor = measure(url, "/health/live", args)
        rows.append(("/health/live (anchor)", "idle", *anchor))
        for path in ("/health", "/health/ready", "/v1/node"):
            rows.append((path, "idle", *measure(url, path, args)))
        stop, produced = multiprocessing.Event(), multiprocessing.Value("q", 0)
        gen = multiprocessing.Process(target=_generate_forever, args=(url, args.streams, stop, produced))
        gen.start()
        try:
            time.sleep(3)  # the streams are running
            before, t = produced.value, time.perf_counter()
            for path in ("/health", "/health/ready", "/v1/node", "/metrics"):
                rows.append((path, f"{args.streams} streams", *measure(url, path, args)))
            tok_s = (produced.value - before) / (time.perf_counter() - t)
        finally:
            stop.set()
            gen.join(timeout=120)
            if gen.is_alive():
                gen.terminate()
    finally:
        proc.terminate()
        proc.wait(timeout=60)

    print(f"\n{args.connections} connections, {args.seconds:g} s each; generation load {args.streams} streams "
          f"({tok_s:.1f} completion tok/s while measured)\n")
    print(f"| endpoint | load | requests/s | vs anchor | p50 ms | p99 ms |\n|---|---|---|---|---|---|")
    for path, load, rps, p50, p99 in rows:
        print(f"| {path} | {load} | {rps:,.0f} | {rps / anchor[0]:.2f}x | {p50:.2f} | {p99:.2f} |")


if __name__ == "__main__":
    main()
