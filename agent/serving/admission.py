"""Admission by KV tokens: a request reserves min(prompt + max_tokens, context) of the backend's
real KV capacity; when the budget is spent it waits in a bounded FIFO queue with a deadline, then
gets ``Overloaded`` with a Retry-After computed from recent throughput.

One ``Admission`` per backend; all of its state is touched only from the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from agent.backends.base import Capacity
from agent.serving.errors import Overloaded

RATE_WINDOW_S = 30.0  # throughput behind Retry-After is measured over this window


@dataclass
class Ticket:
    """A reservation; give it back with ``Admission.release``."""

    tokens: int
    released: bool = False


@dataclass
class _Waiter:
    tokens: int
    future: asyncio.Future


class Admission:
    """KV-token and slot budget for one backend, with a bounded FIFO queue."""

    def __init__(self, name: str, capacity: Callable[[], Capacity], max_queue: int, timeout_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self._capacity = capacity
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self._clock = clock
        self.pressure = 1.0  # share of the KV budget usable now (< 1 when another process took VRAM)
        self.reserved = 0
        self.active = 0
        self.rejected = 0
        self._queue: collections.deque[_Waiter] = collections.deque()
        self._done: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens) finished

    # --- budget --------------------------------------------------------------------------
    def budget(self) -> tuple[int, int]:
        """(KV tokens, sequence slots) this backend may hold at once right now."""
        cap = self._capacity()
        return int(cap.kv_tokens_total * self.pressure), cap.slots_total

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def _fits(self, tokens: int) -> bool:
        kv, slots = self.budget()
        # An idle backend always takes one request: a reservation is capped at the context, which
        # the engine itself accepts even when pressure has shrunk the budget below it.
        return self.active == 0 or (self.reserved + tokens <= kv and self.active < slots)

    def _take(self, tokens: int) -> Ticket:
        self.reserved += tokens
        self.active += 1
        return Ticket(tokens)

    async def acquire(self, tokens: int) -> Ticket:
        """Reserve ``tokens`` now, or wait in FIFO order up to the deadline; else ``Overloaded``."""
        if not self._queue and self._fits(tokens):
            return self._take(tokens)
        if len(self._queue) >= self.max_queue:
            self.rejected += 1
            raise Overloaded(f"{self.name}: {self.active} requests running and {len(self._queue)} queued "
                             f"(the queue holds {self.max_queue}); retry later", self.retry_after(tokens))
        waiter = _Waiter(tokens, asyncio.get_running_loop().create_future())
        self._queue.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), self.timeout_s)
        except asyncio.TimeoutError:
            if waiter.future.done() and not waiter.future.cancelled():
                return waiter.future.result()  # admitted in the same instant the deadline passed
            self._queue.remove(waiter)
            self.rejected += 1
            raise Overloaded(f"{self.name}: no KV capacity freed within {self.timeout_s:g} s; retry later",
                             self.retry_after(tokens)) from None
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self.release(waiter.future.result())
            elif waiter in self._queue:
                self._queue.remove(waiter)
            raise
        return waiter.future.result()

    def release(self, ticket: Ticket, completion_tokens: int = 0) -> None:
        """Give a reservation back (idempotent) and admit waiters that now fit, in order."""
        if ticket.released:
            return
        ticket.released = True
        self.reserved -= ticket.tokens
        self.active -= 1
        if completion_tokens:
            self._done.append((self._clock(), completion_tokens))
        self._wake()

    def _wake(self) -> None:
        while self._queue and self._fits(self._queue[0].tokens):
            waiter = self._queue.popleft()
            if not waiter.future.done():
                waiter.future.set_result(self._take(waiter.tokens))

    def set_pressure(self, share: float) -> None:
        """Shrink (or restore) the usable share of the KV budget; waiters are re-checked."""
        self.pressure = min(1.0, max(0.0, share))
        self._wake()

    # --- Retry-After ---------------------------------------------------------------------
    def tokens_per_second(self) -> float:
        """Completion tokens per second over the last RATE_WINDOW_S."""
        now = self._clock()
        while self._done and now - self._done[0][0] > RATE_WINDOW_S:
            self._done.popleft()
        if not self._done:
            return 0.0
        span = max(1.0, now - self._done[0][0])
        return sum(n for _, n in self._done) / span

    def retry_after(self, tokens: int) -> int:
        """Seconds until the work ahead (reserved + queued + this) drains at the recent rate."""
        rate = self.tokens_per_second()
        ahead = self.reserved + sum(w.tokens for w in self._queue) + tokens
        if rate <= 0:
            return max(1, math.ceil(self.timeout_s))
        return min(600, max(1, math.ceil(ahead / rate)))
