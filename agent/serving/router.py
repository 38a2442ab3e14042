"""The one place that decides which backend serves a request: the chain, admission, failover.

A request goes to the first backend of the chain that serves and whose breaker gives it a
permit. One attempt on one backend: refuse early what it cannot take (its queue is full, the
prompt is too large by its size alone), tokenize once, reserve KV, generate. The request moves
to the next backend when this one dies, raises an engine fault, cannot hold the request (a
smaller context than the chain's largest), gives no first token in time (except on the
terminal backend with nothing behind it), or (``admission.overflow``) its queue is full. A non-streamed request then
starts over (the client sees one answer); a stream continues after the text already sent (or
ends with an error event when ``router.continue_streams`` is off). Every switch is one
structured event and a counter. The client's own errors (a template error, a prompt longer than
any engine's context) are answered at once, never failed over.

Usage is what the client received: the original prompt's tokens, and the completion tokens of
every engine that contributed to the answer. Starting, restarting and giving up backends is the
``Supervisor``'s; breaker state is the ``Breaker``'s, reported only through a ``Permit``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from agent.backends.base import (
    Backend,
    BackendDied,
    BackendError,
    BackendNotReady,
    BackendState,
    CannotServe,
    Delta,
    EngineFault,
    GenerationRequest,
    InvalidInput,
    PromptTooLong,
)
from agent.serving.admission import Admission
from agent.serving.attempts import Answer, Moved, Served
from agent.serving.breaker import OPEN, Breaker, Permit
from agent.serving.errors import (
    ApiError,
    CannotHold,
    CannotHonour,
    ContextTooLong,
    EngineFailed,
    InvalidRequest,
    NotReady,
    Overloaded,
    StreamInterrupted,
)
from agent.serving.supervisor import Route, Supervisor
from agent.settings import AdmissionSettings, RouterSettings

log = logging.getLogger(__name__)
events = logging.getLogger("agent.events")
SERVING = (BackendState.READY, BackendState.DEGRADED)


class FirstTokenTimeout(EngineFault):
    """No first token within router.first_token_timeout_s."""


FALLBACK_EVENTS_KEPT = 50  # the last fallback events /v1/node shows


@dataclass
class Counters:
    """What the router has done, for /v1/node and /metrics: switches counted by (from, to, reason
    kind), and the last ``FALLBACK_EVENTS_KEPT`` fallback events as they were logged, oldest first."""

    switches: collections.Counter = field(default_factory=collections.Counter)  # (from, to, reason kind)
    events: collections.deque = field(default_factory=lambda: collections.deque(maxlen=FALLBACK_EVENTS_KEPT))

    def switched(self, event: dict, kind: str) -> None:
        """Count one fallback event and keep it (the oldest kept one goes when the buffer is full)."""
        self.switches[(event["from"], event["to"] or "none", kind)] += 1
        self.events.append(event)


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
        self.supervisor = Supervisor(self.routes, rs)

    @property
    def exhausted(self) -> asyncio.Event:
        return self.supervisor.exhausted

    async def start(self) -> None:
        await self.supervisor.start()

    async def stop(self) -> None:
        await self.supervisor.stop()

    # --- choosing ------------------------------------------------------------------------
    def serving(self) -> list[Route]:
        """Routes that could take a request now (serving, breaker not open), in chain order."""
        return [r for r in self.routes if r.backend.state in SERVING and r.breaker.state != OPEN]

    def _pick(self, tried: set[str], request: GenerationRequest) -> tuple[Route | None, Permit | None]:
        for route in self.routes:
            if route.name in tried or route.backend.state not in SERVING:
                continue
            if route.backend.features().refuses(request):  # cannot honour it as it runs now (#12)
                continue
            permit = route.breaker.permit()
            if permit is not None:
                return route, permit
        return None, None

    def _could_take_over(self, tried: set[str]) -> bool:
        return any(r.name not in tried for r in self.serving())

    def _switch(self, request_id: str, moved: Moved, to: str | None) -> None:
        event = {"ts": time.time(), "request_id": request_id, "from": moved.backend, "to": to,
                 "reason": moved.reason, "latency_ms": round((time.monotonic() - moved.at) * 1000, 2)}
        self.counters.switched(event, moved.kind)
        events.info(json.dumps({"event": "fallback", **event}))

    def _nothing_left(self, moved: Moved | None, request: GenerationRequest) -> ApiError:
        unable = [f"{r.name}: {why}" for r in self.routes if r.name not in ({moved.backend} if moved else set())
                  and r.backend.state in SERVING and (why := r.backend.features().refuses(request))]
        if unable:
            return CannotHonour(f"no engine of this node can serve this request now ({'; '.join(unable)}; "
                                f"{describe_states(self.routes)})", retry_after=5)
        if moved is None:
            return NotReady(f"no backend can serve yet ({describe_states(self.routes)})")
        if moved.refusal is not None:
            return moved.refusal
        failed = EngineFailed(f"every backend failed this request (last: {moved.backend}: {moved.reason})")
        failed.backend = moved.backend
        return failed

    # --- serving -------------------------------------------------------------------------
    async def stream(self, request: GenerationRequest, resume: bool = True) -> AsyncIterator[Served]:
        """Deltas for ``request``, failing over along the chain.

        ``resume``: on a mid-stream failure continue on the next backend after the text already
        yielded (streams); when False the next backend starts over and the caller discards what
        it buffered (non-streamed requests, via ``complete``).
        """
        answer = Answer(request, resume)
        moved: Moved | None = None
        refusal: ApiError | None = None  # the first refusal (e.g. a full queue) is what the client gets
        while True:
            if answer.text and answer.remaining() <= 0:  # the failed engine had already produced it all
                yield Served(moved.backend if moved else "", Delta("", "length", answer.prompt_tokens or 0, answer.tokens))
                return
            route, permit = self._pick(answer.tried, answer.next_request())
            if moved is not None:
                self._switch(request.request_id, moved, route.name if route else None)
            if route is None or permit is None:
                raise refusal or self._nothing_left(moved, answer.next_request())
            answer.tried.add(route.name)
            with permit:
                try:
                    async with contextlib.aclosing(self._attempt(route, permit, answer)) as attempt:
                        async for served in attempt:
                            yield served
                    return
                except Moved as exc:
                    moved, refusal = exc, refusal or exc.refusal
                    log.warning("request %s: %s could not serve it: %s", request.request_id, exc.backend, exc.reason)
                    answer.attempt_failed()
                    if answer.text and not self.settings.continue_streams:
                        self._switch(request.request_id, moved, None)
                        raise StreamInterrupted(f"{exc.backend} failed mid-stream: {exc.reason}") from exc

    async def _attempt(self, route: Route, permit: Permit, answer: Answer) -> AsyncIterator[Served]:
        """One backend's try at the request; ``Moved`` when another should take it."""
        request = answer.next_request()
        backend, admission = route.backend, route.admission
        try:
            if admission.full():
                raise admission._overloaded(f"{route.name}: {admission.queue_depth} requests queued (the queue "
                                            f"holds {admission.max_queue}); retry later", request.max_tokens)
            self._refuse_by_size(route, request)
            prepared = await backend.prepare(request)
            cap = backend.capacity()
            if prepared.prompt_tokens >= cap.max_context:
                raise PromptTooLong(prepared.prompt_tokens, cap.max_context)
            ticket = await admission.acquire(min(prepared.prompt_tokens + request.max_tokens, cap.max_context))
        except Overloaded as exc:
            exc.backend = route.name
            if not self.admission_settings.overflow:
                raise
            raise Moved(route.name, f"overflow: {exc}", refusal=exc) from exc
        except BaseException as exc:
            self._reraise(route, permit, exc, answer)
        answer.begin(prepared.prompt_tokens)
        gen = backend.generate(request, prepared)
        try:
            terminal = route is self.routes[-1] and not self._could_take_over(answer.tried)
            d = await self._first(gen, None if terminal else self.settings.first_token_timeout_s)
            while d is not None:
                if not answer.first_seen and d.text:
                    answer.first_seen = True
                    self.observer.first_token(route.name, time.monotonic() - answer.started)
                if d.finish_reason is not None:
                    permit.success()
                    yield answer.account(route.name, d)
                    return
                yield answer.account(route.name, d)
                d = await anext(gen, None)
            raise EngineFault(f"{route.name} ended the stream without a finish reason")
        except BaseException as exc:
            self._reraise(route, permit, exc, answer)
        finally:
            self.observer.finished(route.name, prepared.prompt_tokens, answer.attempt_tokens)
            ticket.completion_tokens = answer.attempt_tokens
            await ticket.hold_until(self._end(gen, backend, request.request_id))

    @staticmethod
    async def _end(gen: AsyncIterator[Delta], backend: Backend, request_id: str) -> None:
        """Close the generation and wait until the engine has let go of it."""
        await gen.aclose()
        await backend.abort(request_id)

    async def _first(self, gen: AsyncIterator[Delta], timeout: float | None) -> Delta | None:
        """The first delta, within ``timeout`` (None on the chain's terminal backend when nothing
        else could take over: there a slow first token is still an answer, a long prefill on
        the CPU is work, not a fault)."""
        if timeout is None:
            return await anext(gen, None)
        try:
            return await asyncio.wait_for(anext(gen, None), timeout)
        except asyncio.TimeoutError as exc:
            raise FirstTokenTimeout(f"no first token within {timeout:g} s") from exc

    def _refuse_by_size(self, route: Route, request: GenerationRequest) -> None:
        """A prompt that cannot fit by its size alone is refused without tokenizing it."""
        cap = route.backend.capacity()
        size = request_bytes(request)
        if size > cap.max_context * cap.max_token_bytes:
            raise PromptTooLong(math.ceil(size / cap.max_token_bytes), cap.max_context, at_least=True)

    def _reraise(self, route: Route, permit: Permit, exc: BaseException, answer: Answer) -> None:
        new = self._translate(route, permit, exc, answer)
        for err in (new, getattr(new, "refusal", None)):
            if isinstance(err, ApiError) and err.backend is None:
                err.backend = route.name  # the client's answer names the engine that was involved
        if new is exc:
            raise exc
        raise new from exc

    def _translate(self, route: Route, permit: Permit, exc: BaseException, answer: Answer) -> BaseException:
        """What an exception from one attempt means for the request and for the backend."""
        param = "messages" if answer.request.messages else "prompt"
        if isinstance(exc, (Moved, ApiError, asyncio.CancelledError, GeneratorExit)) or not isinstance(exc, Exception):
            return exc  # already decided, or the client left: the permit is given back neutrally
        if isinstance(exc, InvalidInput):
            return InvalidRequest(str(exc), param=exc.param)
        if isinstance(exc, CannotServe):  # neither the client's fault nor the engine's: no breaker failure
            return Moved(route.name, f"CannotServe: {exc}", refusal=CannotHonour(str(exc), retry_after=5))
        if isinstance(exc, PromptTooLong):
            largest = max(r.backend.capacity().max_context for r in self.routes)
            if exc.max_context >= largest:
                return ContextTooLong(str(exc), param=param)
            return Moved(route.name, f"CannotHold: {exc}", refusal=CannotHold(
                f"{exc}; a backend of this node with a longer context ({largest} tokens) is not serving "
                f"now ({describe_states(self.routes)}); retry later"))
        fatal = isinstance(exc, (BackendDied, BackendNotReady))
        if not isinstance(exc, BackendError):  # a backend let a raw error through: still an engine fault
            exc = EngineFault(f"{route.name}: {type(exc).__name__}: {exc}")
        reason = type(exc).__name__ + (f": {exc}" if str(exc) else "")
        permit.failure(fatal=fatal, reason=reason)
        return Moved(route.name, reason)

    async def complete(self, request: GenerationRequest) -> tuple[str, str, Delta]:
        """A whole answer: (backend, text, last delta). A backend that dies mid-way is replaced by
        the next one, which starts over; the client sees one answer."""
        backend, deltas = await self.complete_deltas(request)
        return backend, "".join(d.text for d in deltas), deltas[-1]

    async def complete_deltas(self, request: GenerationRequest) -> tuple[str, list[Delta]]:
        """``complete``, keeping every delta of the answer (its logprobs, for one)."""
        deltas: list[Delta] = []
        backend = ""
        async for served in self.stream(request, resume=False):
            if served.backend != backend:
                deltas, backend = [], served.backend  # a new backend started over
            deltas.append(served.delta)
        assert deltas
        return backend, deltas


def request_bytes(request: GenerationRequest) -> int:
    """UTF-8 bytes of the text a request feeds the engine (before its chat template)."""
    text = (request.prompt or "") + request.assistant_prefix
    size = len(text.encode())
    for m in request.messages or ():
        content = m.get("content")
        size += len(content.encode()) if isinstance(content, str) else 0
    return size


def describe_states(routes: list[Route]) -> str:
    """'vllm failed, llamacpp ready (breaker open)': for messages and health reasons."""
    parts = []
    for r in routes:
        breaker = r.breaker.state
        parts.append(f"{r.name} {r.backend.state.value}" + ("" if breaker == "closed" else f" (breaker {breaker})"))
    return ", ".join(parts)
