"""Keeps the backends running: starts them, restarts a failed one with bounded exponential
backoff, gives one up after ``router.max_restart_attempts`` failed starts in a row, and says when
every backend is given up (``exhausted``: ``serve`` then exits 3).

A backend whose breaker stays half-open for another cooldown without a client request taking
the probe is probed by the supervisor itself with a one-token request, so a breaker closes
again even when no client traffic reaches that backend (a fallback whose primary came back
would otherwise stay half-open for good).

A backend may say when it can start at all (``until_startable``, awaited outside the start lock
before every start and not counted as a failed start): a vLLM group waits there until every
member host reports (agent/backends/vllm_cluster.py), a worker's engine until its head forms a
group (vllm_headless.py); meanwhile the other backends keep being restarted as usual.

Starts never overlap: one lock serializes them. On a small host two engines loading at once slow
each other down, and the vLLM backend sets the environment its processes inherit only while it
starts, which no other engine may observe half-way. A start is never cancelled half-way either
(an engine built after its caller left would be orphaned): ``stop`` waits for it, then stops
every backend.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from agent.backends.base import Backend, BackendError, BackendStartError, BackendState, GenerationRequest
from agent.serving.admission import Admission
from agent.serving.breaker import Breaker
from agent.settings import RouterSettings

log = logging.getLogger(__name__)
POLL_S = 0.1


@dataclass
class Route:
    """A backend with its admission and breaker; the restart counters belong to the supervisor."""

    backend: Backend
    admission: Admission
    breaker: Breaker
    restarts: int = 0
    failed_restarts: int = 0  # consecutive failed starts; reset by a successful one
    gave_up: bool = False  # failed_restarts reached router.max_restart_attempts
    watcher: asyncio.Task | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.backend.name


@dataclass
class _Watch:
    """A route's restart loop between steps: the next wait, and whether the last start failed
    (then it starts again whatever state the backend was left in)."""

    delay: float
    retry: bool = False

    def failed(self, route: Route, most_s: float) -> None:
        """A start failed: one more failed start in a row, and the next wait doubles (up to ``most_s``)."""
        route.failed_restarts += 1
        self.retry = True
        self.delay = min(self.delay * 2, most_s)


class Supervisor:
    """Owns every backend's lifecycle; the router only reads the states."""

    def __init__(self, routes: list[Route], settings: RouterSettings) -> None:
        self.routes = routes
        self.settings = settings
        self.exhausted = asyncio.Event()  # every backend given up: nothing will serve again
        self._starting = asyncio.Lock()
        self._starts: set[asyncio.Future] = set()
        self._stopping = False
        self._probes = 0
        self.probing: set[str] = set()  # routes with a supervisor probe in flight

    async def start(self) -> None:
        """Start every backend, last (the terminal fallback, quickest) first, then watch them."""
        for route in reversed(self.routes):
            if self._stopping:
                return
            try:
                await self._until_startable(route)
                started = await self._start(route)
            except Exception:  # noqa: BLE001 - a bug in the wait: its supervisor retries it like a failed start
                log.exception("%s: waiting to start it raised an unexpected error (a bug); retried like a failed "
                              "start", route.name)
                started = False
            if not started:
                route.failed_restarts = 1
            route.watcher = asyncio.create_task(self._watch(route), name=f"supervise-{route.name}")

    async def stop(self) -> None:
        """Stop watching, let a start in progress finish, then stop every backend."""
        self._stopping = True
        for route in self.routes:
            if route.watcher:
                route.watcher.cancel()
        if self._starts:
            log.info("waiting for an engine that is starting, to stop it cleanly")
            await asyncio.gather(*self._starts, return_exceptions=True)
        await asyncio.gather(*(r.backend.stop() for r in self.routes), return_exceptions=True)

    @staticmethod
    async def _until_startable(route: Route) -> None:
        """The backend's own precondition for a start, if it has one."""
        wait = getattr(route.backend, "until_startable", None)
        if wait is not None:
            await wait()

    async def _start(self, route: Route, restart: bool = False) -> bool:
        """One start (shielded: a caller that is cancelled does not cancel the engine's build)."""
        task = asyncio.ensure_future(self._start_locked(route, restart))
        self._starts.add(task)
        task.add_done_callback(self._starts.discard)
        return await asyncio.shield(task)

    async def _start_locked(self, route: Route, restart: bool) -> bool:
        async with self._starting:
            if self._stopping:
                return False
            try:
                if restart:
                    await route.backend.stop()
                await route.backend.start()
            except BackendStartError as exc:
                log.error("%s did not start: %s", route.name, exc.reason)
                return False
            except Exception:  # noqa: BLE001 - a bug in a backend's start must not end its supervision
                log.exception("%s did not start: its start raised an unexpected error (a bug; it is stopped and "
                              "retried like any failed start)", route.name)
                try:
                    await route.backend.stop()
                except Exception:  # noqa: BLE001
                    log.exception("%s: stopping it after that error failed too", route.name)
                return False
        route.breaker.reset()
        return True

    async def _watch(self, route: Route) -> None:
        """Restart a failed backend with bounded exponential backoff; give it up after
        ``max_restart_attempts`` failed starts in a row; probe a breaker left half-open. A bug on
        the way (an unexpected exception) is logged with its traceback: in a restart (or the wait
        before one) it counts as a failed start; in a probe the backend is left as it is.
        Supervision ends only by ``stop`` or by giving the backend up, never silently."""
        w = _Watch(self.settings.restart_backoff_s, retry=route.failed_restarts > 0)
        while not self._stopping:
            if route.backend.state is not BackendState.FAILED and not w.retry:
                try:
                    await self._look(route)
                except Exception:  # noqa: BLE001 - see the docstring
                    log.exception("%s: probing it raised an unexpected error (a bug); the backend is left as it is",
                                  route.name)
                await asyncio.sleep(POLL_S)
                continue
            try:
                if await self._restart(route, w):
                    return
            except Exception:  # noqa: BLE001 - see the docstring
                w.failed(route, self.settings.restart_backoff_max_s)
                log.exception("%s: restarting it raised an unexpected error (a bug; failed start %d of %d); next "
                              "try in %.1f s", route.name, route.failed_restarts, self.settings.max_restart_attempts,
                              w.delay)
                if route.failed_restarts > self.settings.max_restart_attempts:  # giving it up raised too
                    route.gave_up = True
                    if all(r.gave_up for r in self.routes):
                        self.exhausted.set()
                    return
                await asyncio.sleep(POLL_S)  # the next restart waits w.delay itself

    async def _look(self, route: Route) -> None:
        """A serving backend whose breaker stayed half-open for a cooldown gets a probe."""
        idle = route.breaker.half_open_for_s()
        if idle is not None and idle >= route.breaker.cooldown_s and \
                route.backend.state in (BackendState.READY, BackendState.DEGRADED):
            await self._probe(route)

    async def _restart(self, route: Route, w: _Watch) -> bool:
        """After the backoff, the backend's own wait, then a start. True: given up instead."""
        if route.failed_restarts >= self.settings.max_restart_attempts:
            self._give_up(route)
            return True
        log.warning("%s failed (%s); restarting in %.1f s", route.name,
                    route.backend.health().last_error or "its start failed", w.delay)
        await asyncio.sleep(w.delay)
        await self._until_startable(route)
        if not await self._start(route, restart=True):
            w.failed(route, self.settings.restart_backoff_max_s)
            log.error("%s restart failed (%d of %d)", route.name, route.failed_restarts,
                      self.settings.max_restart_attempts)
            return False
        w.retry = False
        route.restarts += 1
        route.failed_restarts = 0
        w.delay = self.settings.restart_backoff_s
        log.info("%s is back (restart %d)", route.name, route.restarts)
        return False

    async def _probe(self, route: Route) -> None:
        """One token through the breaker's probe permit (none when a request holds it already)."""
        permit = route.breaker.permit()
        if permit is None:
            return
        self._probes += 1
        request = GenerationRequest(f"probe-{route.name}-{self._probes}", 1, prompt="Hello")
        self.probing.add(route.name)
        try:
            await self._probe_with(route, permit, request)
        finally:
            self.probing.discard(route.name)

    async def _probe_with(self, route: Route, permit, request: GenerationRequest) -> None:
        with permit:
            try:
                async with asyncio.timeout(self.settings.first_token_timeout_s):
                    prepared = await route.backend.prepare(request)
                    async with route.admission.reserve(prepared.prompt_tokens + 1):
                        gen = route.backend.generate(request, prepared)
                        try:
                            async for d in gen:
                                if d.finish_reason is not None:
                                    break
                        finally:
                            await gen.aclose()
            except (BackendError, TimeoutError) as exc:
                permit.failure(fatal=route.backend.state is BackendState.FAILED,
                               reason=f"probe: {type(exc).__name__}: {exc}")
                log.warning("%s: probe failed (%s); its breaker stays open", route.name, exc)
                return
            except Exception:  # noqa: BLE001 - admission refused (busy): try again later
                return
            permit.success()
            log.info("%s: probe succeeded; its breaker is closed", route.name)

    def _give_up(self, route: Route) -> None:
        route.gave_up = True
        log.error("%s is given up after %d failed starts in a row: %s", route.name, route.failed_restarts,
                  route.backend.health().last_error)
        if all(r.gave_up for r in self.routes):
            log.critical("no backend can serve: every engine of the chain failed and was given up")
            self.exhausted.set()
