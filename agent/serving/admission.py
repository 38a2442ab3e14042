"""Admission by KV tokens: a request reserves min(prompt + max_tokens, context) of the backend's
real KV capacity; when the budget is spent it waits in a bounded FIFO queue with a deadline, then
gets ``Overloaded`` with a Retry-After computed from recent throughput.

One ``Admission`` per backend; all of its state is touched only from the event loop. A
reservation is a ``Ticket``: ``async with admission.reserve(n) as ticket`` gives it back on every
exit path. A waiter that leaves the queue (deadline, cancelled client) wakes the queue behind
it, so a big request at the head that gave up never blocks smaller ones that fit.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from agent.backends.base import Capacity
from agent.serving.errors import Overloaded

log = logging.getLogger(__name__)
RATE_WINDOW_S = 30  # throughput behind Retry-After is measured over this window (whole seconds)
MAX_RETRY_AFTER_S = 60  # the openai client stops honouring Retry-After above 60 s


@dataclass(eq=False)
class Ticket:
    """A reservation of ``tokens`` KV tokens and one sequence slot."""

    tokens: int
    admission: Admission
    completion_tokens: int = 0  # what the request generated, for the throughput behind Retry-After
    released: bool = False
    _closing: asyncio.Future | None = field(default=None, repr=False)

    def release(self) -> None:
        """Give the reservation back (idempotent). While ``hold_until`` runs, the engine still
        holds the memory: the reservation goes back when that ends."""
        if self._closing is not None and not self._closing.done():
            return
        self.admission._give_back(self)

    async def hold_until(self, cleanup: Awaitable[None]) -> None:
        """Run ``cleanup`` (the engine's abort) to its end even if the caller is cancelled, and
        keep the reservation until it has ended: until then the engine really holds the slot."""
        self._closing = asyncio.ensure_future(cleanup)

        def ended(task: asyncio.Future) -> None:
            if not task.cancelled() and task.exception() is not None:
                log.warning("cleaning up a request failed: %r", task.exception())
            self.admission._give_back(self)
        self._closing.add_done_callback(ended)
        with contextlib.suppress(Exception):
            await asyncio.shield(self._closing)


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
        # Completion tokens finished per whole second, at most RATE_WINDOW_S buckets.
        self._done: collections.deque[list[int]] = collections.deque()

    # --- budget --------------------------------------------------------------------------
    def budget(self) -> tuple[int, int]:
        """(KV tokens, sequence slots) this backend may hold at once right now."""
        cap = self._capacity()
        return int(cap.kv_tokens_total * self.pressure), cap.slots_total

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def full(self) -> bool:
        """A request arriving now would be refused whatever its size: others already wait and the
        queue is at its bound. Checked before any tokenization."""
        return bool(self._queue) and len(self._queue) >= self.max_queue

    def _fits(self, tokens: int) -> bool:
        kv, slots = self.budget()
        # An idle backend always takes one request: a reservation is capped at the context, which
        # the engine itself accepts even when pressure has shrunk the budget below it.
        return self.active == 0 or (self.reserved + tokens <= kv and self.active < slots)

    def _take(self, tokens: int) -> Ticket:
        self.reserved += tokens
        self.active += 1
        return Ticket(tokens, self)

    def _overloaded(self, message: str, tokens: int) -> Overloaded:
        self.rejected += 1
        return Overloaded(message, self.retry_after(tokens))

    async def acquire(self, tokens: int) -> Ticket:
        """Reserve ``tokens`` now, or wait in FIFO order up to the deadline; else ``Overloaded``."""
        if not self._queue and self._fits(tokens):
            return self._take(tokens)
        if len(self._queue) >= self.max_queue:
            raise self._overloaded(f"{self.name}: {self.active} requests running and {len(self._queue)} queued "
                                   f"(the queue holds {self.max_queue}); retry later", tokens)
        waiter = _Waiter(tokens, asyncio.get_running_loop().create_future())
        self._queue.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), self.timeout_s)
        except (asyncio.TimeoutError, asyncio.CancelledError) as exc:
            if waiter.future.done() and not waiter.future.cancelled():
                ticket = waiter.future.result()  # admitted in the same instant it gave up
                if isinstance(exc, asyncio.TimeoutError):
                    return ticket
                ticket.release()
                raise
            self._leave(waiter)
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise self._overloaded(f"{self.name}: no KV capacity freed within {self.timeout_s:g} s; retry later",
                                   tokens) from None
        return waiter.future.result()

    @contextlib.asynccontextmanager
    async def reserve(self, tokens: int) -> AsyncIterator[Ticket]:
        """``acquire`` as a context manager: the ticket is given back on every exit path."""
        ticket = await self.acquire(tokens)
        try:
            yield ticket
        finally:
            ticket.release()

    def release(self, ticket: Ticket, completion_tokens: int = 0) -> None:
        """Give a reservation back (idempotent) and admit waiters that now fit, in order."""
        ticket.completion_tokens = ticket.completion_tokens or completion_tokens
        ticket.release()

    def _give_back(self, ticket: Ticket) -> None:
        if ticket.released:
            return
        ticket.released = True
        self.reserved -= ticket.tokens
        self.active -= 1
        if ticket.completion_tokens:
            self._record(ticket.completion_tokens)
        self._wake()

    def _leave(self, waiter: _Waiter) -> None:
        """A waiter gave up: out of the queue, and whoever waited behind it may fit now."""
        if waiter in self._queue:
            self._queue.remove(waiter)
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
    def _record(self, tokens: int) -> None:
        second = int(self._clock())
        if self._done and self._done[-1][0] == second:
            self._done[-1][1] += tokens
        else:
            self._done.append([second, tokens])
        self._prune(second)

    def _prune(self, now: float) -> None:
        while self._done and now - self._done[0][0] > RATE_WINDOW_S:
            self._done.popleft()

    def tokens_per_second(self) -> float:
        """Completion tokens per second over the last RATE_WINDOW_S."""
        now = self._clock()
        self._prune(now)
        if not self._done:
            return 0.0
        span = max(1.0, now - self._done[0][0])
        return sum(n for _, n in self._done) / span

    def retry_after(self, tokens: int) -> int:
        """Seconds until the work ahead (reserved + queued + this) drains at the recent rate,
        between 1 and MAX_RETRY_AFTER_S."""
        rate = self.tokens_per_second()
        ahead = self.reserved + sum(w.tokens for w in self._queue) + tokens
        if rate <= 0:
            return min(MAX_RETRY_AFTER_S, max(1, math.ceil(self.timeout_s)))
        return min(MAX_RETRY_AFTER_S, max(1, math.ceil(ahead / rate)))
