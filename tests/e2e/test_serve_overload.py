"""Overload (#5): 200 concurrent requests against a node that holds 4 (1 running + 3 queued)
get only 200s and 429s with Retry-After; every 200 is a complete answer; /v1/node, polled
throughout, never shows more queued than the queue holds, and counts every 429."""

from __future__ import annotations

import asyncio

import httpx
import pytest

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def server(start_server):
    s = start_server({"engines": {"chain": ["llamacpp"]}, "planner": {"target_context": 1024, "min_context": 512},
                      "admission": {"max_queue": 3, "queue_timeout_s": 3}})
    s.wait_ready()
    return s


def test_200_concurrent_requests_get_200_or_429_only(server):
    async def one(client: httpx.AsyncClient, i: int) -> httpx.Response:
        return await client.post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": f"Say hello to number {i}."}],
            "max_tokens": 8, "temperature": 0})

    seen: list[dict] = []

    async def watch(client: httpx.AsyncClient, done: asyncio.Event) -> None:
        while not done.is_set():
            seen.append((await client.get("/v1/node")).json()["backends"][0]["admission"])
            await asyncio.sleep(0.01)

    async def run() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=250)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:
            before = (await client.get("/v1/node")).json()["backends"][0]["admission"]["rejections"]
            done = asyncio.Event()
            watcher = asyncio.create_task(watch(client, done))
            responses = await asyncio.gather(*(one(client, i) for i in range(200)))
            done.set()
            await watcher
            after = (await client.get("/v1/node")).json()["backends"][0]["admission"]
            return responses, before, after

    responses, before, after = asyncio.run(run())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, sorted(set(statuses))
    ok = [r for r in responses if r.status_code == 200]
    rejected = [r for r in responses if r.status_code == 429]
    assert ok and rejected
    for r in ok:
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] in ("stop", "length") and choice["message"]["content"]
    for r in rejected:
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["type"] == "rate_limit_error"
    # Server side: the queue stayed within its bound while it was full, and every 429 was counted.
    assert len(seen) > 10 and max(a["queue_depth"] for a in seen) == 3
    assert all(a["queue_depth"] <= a["queue_limit"] == 3 and a["running"] <= 1 for a in seen)
    assert after["rejections"] - before == len(rejected)
    assert (after["running"], after["queue_depth"], after["kv_reserved_tokens"]) == (0, 0, 0)
    # The server is healthy afterwards.
    assert httpx.get(f"{server.url}/health/ready", timeout=5).status_code == 200
