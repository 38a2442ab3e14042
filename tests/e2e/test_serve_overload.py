"""Overload (#5): 200 concurrent requests against a node that holds 4 (1 running + 3 queued)
get only 200s and 429s with Retry-After; every 200 is a complete answer."""

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

    async def run() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=250)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(200)))

    responses = asyncio.run(run())
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
    # The server is healthy afterwards.
    assert httpx.get(f"{server.url}/health/ready", timeout=5).status_code == 200
