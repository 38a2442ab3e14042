"""KV-token admission (#5): budget, FIFO queue with a deadline, 429 with Retry-After, pressure."""

from __future__ import annotations

import asyncio

import pytest

from agent.backends.base import Capacity
from agent.serving.admission import Admission
from agent.serving.errors import Overloaded


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def admission(kv=100, slots=4, queue=2, timeout=0.2, clock=None) -> Admission:
    return Admission("vllm", lambda: Capacity(kv, 0, kv, slots, 0), queue, timeout, clock or Clock())


def test_within_budget_is_immediate_and_released_tokens_come_back():
    async def run():
        a = admission()
        t1 = await a.acquire(60)
        t2 = await a.acquire(40)
        assert (a.reserved, a.active) == (100, 2)
        a.release(t1)
        a.release(t1)  # idempotent
        a.release(t2)
        return a
    a = asyncio.run(run())
    assert (a.reserved, a.active) == (0, 0)


def test_over_budget_waits_in_fifo_order():
    async def run():
        a = admission(queue=5, timeout=2)
        first = await a.acquire(80)
        order = []

        async def wait(name, tokens):
            t = await a.acquire(tokens)
            order.append(name)
            return t
        w1 = asyncio.create_task(wait("big", 50))
        await asyncio.sleep(0)
        w2 = asyncio.create_task(wait("small", 10))  # would fit now, but must not jump the queue
        await asyncio.sleep(0.01)
        assert order == [] and a.queue_depth == 2
        a.release(first)
        tickets = await asyncio.gather(w1, w2)
        return order, a, tickets
    order, a, _ = asyncio.run(run())
    assert order == ["big", "small"] and a.reserved == 60


def test_slots_bound_concurrency_too():
    async def run():
        a = admission(kv=10_000, slots=1, timeout=0.05)
        await a.acquire(1)
        with pytest.raises(Overloaded):
            await a.acquire(1)
    asyncio.run(run())


def test_full_queue_is_a_429_with_retry_after():
    async def run():
        a = admission(queue=1, timeout=5)
        await a.acquire(100)
        waiting = asyncio.create_task(a.acquire(50))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded) as info:
            await a.acquire(50)
        waiting.cancel()
        return info.value, a
    err, a = asyncio.run(run())
    assert err.status == 429 and int(err.headers["Retry-After"]) >= 1 and a.rejected == 1
    assert a.queue_depth == 0  # the cancelled waiter left the queue


def test_deadline_in_the_queue_is_a_429():
    async def run():
        a = admission(timeout=0.05)
        await a.acquire(100)
        with pytest.raises(Overloaded, match="within 0.05 s"):
            await a.acquire(10)
        return a
    assert asyncio.run(run()).queue_depth == 0


def test_retry_after_follows_recent_throughput():
    clock = Clock()

    async def run():
        a = admission(clock=clock)
        t = await a.acquire(100)
        clock.now += 10
        a.release(t, completion_tokens=200)  # 200 tokens in the last 10 s window -> ~20 tok/s
        t = await a.acquire(100)
        return a.retry_after(100)
    # ahead: 100 reserved + 100 asked = 200 tokens at 200 tokens / 1 s span (clamped to >= 1 s)
    assert asyncio.run(run()) == 1


def test_pressure_shrinks_the_budget_and_restoring_it_admits_waiters():
    async def run():
        a = admission(queue=2, timeout=2)
        await a.acquire(40)
        a.set_pressure(0.5)  # another process took VRAM: 50 tokens usable
        waiter = asyncio.create_task(a.acquire(30))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        a.set_pressure(1.0)
        await asyncio.wait_for(waiter, 1)
        return a
    assert asyncio.run(run()).reserved == 70
