"""The one place that decides which backend serves: the chain, breakers, failover, restarts.

A request goes to the first backend of the chain that is serving and whose breaker lets it
through. When that backend dies, stalls before its first token, or fails, the request moves to
the next one: a non-streamed request starts over there (the client sees one answer); a stream
continues there with the text produced so far as the assistant's prefix (or ends with an error
when ``router.continue_streams`` is off). Every switch is one structured log event and a counter.
A backend that fails is restarted in the background with exponential backoff; traffic returns
to it once it is ready again.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from agent.backends.base import (
    Backend,
    BackendDied,
    BackendError,
    BackendNotReady,
    BackendStartError,
    BackendState,
    Delta,
    GenerationRequest,
    PromptTooLong,
)
from agent.serving.admission import Admission
from agent.serving.errors import ContextTooLong, EngineFailed, NotReady, Overloaded
from agent.settings import AdmissionSettings, RouterSettings

log = logging.getLogger(__name__)
events = logging.getLogger("agent.events")
SERVING = (BackendState.READY, BackendState.DEGRADED)


class FirstTokenTimeout(BackendError):
    """No first token within router.first_token_timeout_s."""


class StreamInterrupted(Exception):
    """A stream's backend failed and continuation is off (or nothing is left to continue on)."""


@dataclass
class Breaker:
    """closed → open (on death or N consecutive failures) → half-open after the cooldown (one
    probe) → closed on success, open again on failure."""

    failures_to_open: int
    cooldown_s: float
    state: str = "closed"
    failures: int = 0
    opened_at: float = 0.0
    probing: bool = False

    def allows(self, now: float) -> bool:
        if self.state == "closed":
            return True
        if self.state == "open" and now - self.opened_at >= self.cooldown_s:
            self.state = "half_open"
        if self.state == "half_open" and not self.probing:
            self.probing = True
            return True
        return False

    def success(self) -> None:
        self.state, self.failures, self.probing = "closed", 0, False

    def failure(self, now: float, fatal: bool) -> None:
        self.failures += 1
        self.probing = False
        if fatal or self.failures >= self.failures_to_open or self.state == "half_open":
            self.state, self.opened_at = "open", now


@dataclass
class Route:
    """A backend with its admission and breaker."""

    backend: Backend
    admission: Admission
    breaker: Breaker
    restarts: int = 0
    failed_restarts: int = 0  # consecutive; reset by a successful restart
    gave_up: bool = False  # failed_restarts reached router.max_restart_attempts
    supervisor: asyncio.Task | None = None

    @property
    def name(self) -> str:
        return self.backend.name


@dataclass
class Served:
    """One delta and the backend that produced it."""

    backend: str
    delta: Delta


@dataclass
class Counters:
    """What the router has done, for /v1/node and /metrics."""

    switches: collections.Counter = field(default_factory=collections.Counter)  # (from, to, reason kind)


class Observer(Protocol):
    """Told about each request the router serves (``agent.serving.metrics.Telemetry``)."""

    def first_token(self, backend: str, seconds: float) -> None: ...

    def finished(self, backend: str, prompt_tokens: int, completion_tokens: int) -> None: ...


class _NoObserver:
    def first_token(self, backend: str, seconds: float) -> None:
        pass

    def finished(self, backend: str, prompt_tokens: int, completion_tokens: int) -> None:
        pass


class Router:
    """Owns the routes; the request handlers only call ``stream``/``complete``."""

    def __init__(self, backends: list[Backend], rs: RouterSettings, ad: AdmissionSettings,
                 observer: Observer | None = None) -> None:
        self.settings = rs
        self.observer: Observer = observer or _NoObserver()
        self.admission_settings = ad
        self.routes = [Route(b, Admission(b.name, b.capacity, ad.max_queue, ad.queue_timeout_s),
                             Breaker(rs.breaker_failures, rs.breaker_cooldown_s)) for b in backends]
        self.counters = Counters()
        self.exhausted = asyncio.Event()  # every backend given up: nothing will serve again
        self._stopping = False

    # --- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Start every backend, last (the terminal fallback, quickest) first, then watch them."""
        for route in reversed(self.routes):
            try:
                await route.backend.start()
            except BackendStartError as exc:
                log.error("%s did not start: %s", route.name, exc.reason)
                route.breaker.failure(time.monotonic(), fatal=True)
                route.failed_restarts = 1
            route.supervisor = asyncio.create_task(self._supervise(route), name=f"supervise-{route.name}")

    async def stop(self) -> None:
        self._stopping = True
        for route in self.routes:
            if route.supervisor:
                route.supervisor.cancel()
        await asyncio.gather(*(r.backend.stop() for r in self.routes), return_exceptions=True)

    async def _supervise(self, route: Route) -> None:
        """Restart a failed backend with bounded exponential backoff; give it up after
        ``max_restart_attempts`` failed restarts in a row."""
        delay = self.settings.restart_backoff_s
        while not self._stopping:
            if route.backend.state is not BackendState.FAILED:
                await asyncio.sleep(0.1)
                continue
            if route.failed_restarts >= self.settings.max_restart_attempts:
                self._give_up(route)
                return
            log.warning("%s failed (%s); restarting in %.1f s", route.name, route.backend.health().last_error, delay)
            await asyncio.sleep(delay)
            try:
                await route.backend.stop()
                await route.backend.start()
            except BackendStartError as exc:
                route.failed_restarts += 1
                log.error("%s restart failed (%d of %d): %s", route.name, route.failed_restarts,
                          self.settings.max_restart_attempts, exc.reason)
                delay = min(delay * 2, self.settings.restart_backoff_max_s)
                continue
            route.restarts += 1
            route.failed_restarts = 0
            route.breaker.success()
            delay = self.settings.restart_backoff_s
            log.info("%s is back (restart %d)", route.name, route.restarts)

    def _give_up(self, route: Route) -> None:
        route.gave_up = True
        log.error("%s is given up after %d failed starts in a row: %s", route.name, route.failed_restarts,
                  route.backend.health().last_error)
        if all(r.gave_up for r in self.routes):
            log.critical("no backend can serve: every engine of the chain failed and was given up")
            self.exhausted.set()

    # --- choosing ------------------------------------------------------------------------
    def serving(self) -> list[Route]:
        """Routes that could take a request now, in chain order."""
        return [r for r in self.routes if r.backend.state in SERVING]

    def _pick(self, exclude: set[str]) -> Route | None:
        now = time.monotonic()
        for route in self.routes:
            if route.name in exclude or route.backend.state not in SERVING:
                continue
            if route.breaker.allows(now):
                return route
        return None

    def _switch(self, request_id: str, frm: str, to: str | None, reason: str, started: float) -> None:
        self.counters.switches[(frm, to or "none", reason.split(":", 1)[0])] += 1
        events.info(json.dumps({"event": "fallback", "ts": time.time(), "request_id": request_id, "from": frm,
                                "to": to, "reason": reason, "latency_ms": round((time.monotonic() - started) * 1000, 2)}))

    # --- serving -------------------------------------------------------------------------
    async def _admit(self, route: Route, request: GenerationRequest, exclude: set[str]):
        """Reserve KV on ``route`` (or overflow to the next backend when allowed): (route, ticket,
        the request as that backend prepared it)."""
        try:
            prepared = await route.backend.prepare(request)
        except PromptTooLong as exc:
            raise ContextTooLong(str(exc), param="messages" if request.messages else "prompt") from exc
        prompt = prepared.prompt_tokens
        cap = route.backend.capacity()
        if prompt >= cap.max_context:
            raise ContextTooLong(f"the prompt has {prompt} tokens; this model's context holds {cap.max_context}",
                                 param="messages" if request.messages else "prompt")
        tokens = min(prompt + request.max_tokens, cap.max_context)
        try:
            return route, await route.admission.acquire(tokens), prepared
        except Overloaded:
            if not self.admission_settings.overflow:
                raise
            nxt = self._pick(exclude | {route.name})
            if nxt is None:
                raise
            return await self._admit(nxt, request, exclude | {route.name})

    async def stream(self, request: GenerationRequest, resume: bool = True) -> AsyncIterator[Served]:
        """Deltas for ``request``, failing over along the chain.

        ``resume``: on a mid-stream failure continue on the next backend after the text already
        yielded (streams); when False the caller discards what it buffered and the next backend
        starts over (non-streamed requests, via ``complete``).
        """
        tried: set[str] = set()
        t0, first = time.monotonic(), True
        produced, produced_tokens = "", 0
        prev, switch_started, reason = None, 0.0, ""
        while True:
            route = self._pick(tried)
            if prev is not None:
                self._switch(request.request_id, prev, route.name if route else None, reason, switch_started)
            if route is None:
                if prev is None:
                    raise NotReady(f"no backend can serve yet ({describe_states(self.routes)})")
                raise EngineFailed(f"every backend failed this request (last: {prev}: {reason})")
            tried.add(route.name)
            attempt = request if not produced else dataclasses.replace(
                request, assistant_prefix=request.assistant_prefix + produced,
                max_tokens=max(1, request.max_tokens - produced_tokens))
            try:
                route, ticket, prepared = await self._admit(route, attempt, tried)
            except (BackendDied, BackendNotReady) as exc:  # it died between the pick and the admission
                route.breaker.failure(time.monotonic(), fatal=True)
                reason = type(exc).__name__ + (f": {exc}" if str(exc) else "")
                prev, switch_started = route.name, time.monotonic()
                continue
            except BaseException:
                route.breaker.probing = False  # the probe never reached the engine: let the next one try
                raise
            carried, done = produced_tokens, 0
            gen = route.backend.generate(attempt, prepared)
            try:
                try:
                    d = await asyncio.wait_for(gen.__anext__(), self.settings.first_token_timeout_s)
                except asyncio.TimeoutError as exc:
                    raise FirstTokenTimeout(f"no first token within {self.settings.first_token_timeout_s:g} s") from exc
                except StopAsyncIteration:
                    d = None
                while d is not None:
                    done = d.completion_tokens or done
                    if first:
                        first = False
                        self.observer.first_token(route.name, time.monotonic() - t0)
                    if d.finish_reason is not None:
                        d = dataclasses.replace(d, completion_tokens=d.completion_tokens + carried)
                        self.observer.finished(route.name, d.prompt_tokens, d.completion_tokens)
                    elif resume and d.text:
                        produced += d.text
                        produced_tokens += 1  # engines stream about one token per delta
                    yield Served(route.name, d)
                    d = await anext(gen, None)
                route.breaker.success()
                return
            except PromptTooLong as exc:
                raise ContextTooLong(str(exc), param="messages" if request.messages else "prompt") from exc
            except (BackendDied, BackendNotReady, FirstTokenTimeout, BackendError) as exc:
                fatal = isinstance(exc, (BackendDied, BackendNotReady))
                route.breaker.failure(time.monotonic(), fatal=fatal)
                reason = type(exc).__name__ + (f": {exc}" if str(exc) else "")
                log.warning("request %s: %s failed: %s", request.request_id, route.name, reason)
                if produced and not self.settings.continue_streams:
                    self._switch(request.request_id, route.name, None, reason, time.monotonic())
                    raise StreamInterrupted(f"{route.name} failed mid-stream: {reason}") from exc
                prev, switch_started = route.name, time.monotonic()
                if not resume:
                    produced, produced_tokens = "", 0
            finally:
                route.admission.release(ticket, done)  # first: the await below may be cancelled
                await gen.aclose()  # aborts the engine request when the client went away

    async def complete(self, request: GenerationRequest) -> tuple[str, str, Delta]:
        """A whole answer: (backend, text, last delta). A backend that dies mid-way is replaced by
        the next one, which starts over; the client sees one answer."""
        parts: list[str] = []
        backend = ""
        last: Delta | None = None
        async for served in self.stream(request, resume=False):
            if served.backend != backend:
                parts, backend = [], served.backend  # a new backend started over
            parts.append(served.delta.text)
            last = served.delta
        assert last is not None
        return backend, "".join(parts), last


def describe_states(routes: list[Route]) -> str:
    """'vllm failed, llamacpp ready': for messages and health reasons."""
    return ", ".join(f"{r.name} {r.backend.state.value}" for r in routes)
