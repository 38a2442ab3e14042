"""A scripted Backend for injecting faults into the router (the engines themselves are tested
for real in tests/integration). It follows the Backend protocol and its state machine."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from agent.backends.base import (
    BackendDied,
    BackendStartError,
    BackendState,
    Capacity,
    Delta,
    GenerationRequest,
    Prepared,
    PromptTooLong,
    StateOwner,
)


@dataclass
class Script:
    """What the fake does: its words, and the fault to inject."""

    words: list[str] = field(default_factory=lambda: ["a", "b", "c", "d", "e", "f"])
    die_after: int | None = None  # raise BackendDied after this many deltas (and move to failed)
    stall: bool = False  # never produce a first token
    fail_starts: int = 0  # the next N start() calls fail
    context: int = 100
    die_on_count: bool = False  # die while the router counts the prompt (before generate)
    delay: float = 0.0


class FakeBackend:
    def __init__(self, name: str, script: Script | None = None) -> None:
        self.name = name
        self.script = script or Script()
        self._state = StateOwner(name)
        self.requests: list[GenerationRequest] = []
        self.prepared: list[GenerationRequest] = []  # prepare() calls: once per admitted attempt
        self.starts = 0

    @property
    def state(self) -> BackendState:
        return self._state.state

    async def start(self) -> None:
        self._state.move(BackendState.STARTING)
        self.starts += 1
        if self.script.fail_starts:
            self.script.fail_starts -= 1
            self._state.move(BackendState.FAILED, error="scripted start failure")
            raise BackendStartError(self.name, "scripted start failure")
        self._state.move(BackendState.READY)

    async def stop(self) -> None:
        self._state.move(BackendState.STOPPED)

    async def prepare(self, request: GenerationRequest) -> Prepared:
        n = await self.count_prompt_tokens(request)
        self.prepared.append(request)
        return Prepared(n, request)

    async def count_prompt_tokens(self, request: GenerationRequest) -> int:
        self._state.require_serving()
        if self.script.die_on_count:
            self._state.move(BackendState.FAILED, error="scripted death")
            raise BackendDied(f"{self.name} died")
        text = request.prompt or " ".join(m["content"] for m in request.messages or ())
        n = len(text.split())
        if n >= self.script.context:
            raise PromptTooLong(n, self.script.context)
        return n

    async def generate(self, request: GenerationRequest, prepared: Prepared | None = None):
        self._state.require_serving()
        if prepared is not None and prepared.data is not request:
            raise AssertionError("generate() got another request's preparation")
        self.requests.append(request)
        if self.script.stall:
            await asyncio.sleep(3600)
        words = self.script.words[: request.max_tokens]
        for i, word in enumerate(words):
            if self.script.die_after is not None and i == self.script.die_after:
                self._state.move(BackendState.FAILED, error="scripted death")
                raise BackendDied(f"{self.name} died")
            await asyncio.sleep(self.script.delay)
            last = i == len(words) - 1
            yield Delta(word, "length" if last else None, 3 if last else 0, len(words) if last else 0)

    async def abort(self, request_id: str) -> None:
        return None

    def capacity(self) -> Capacity:
        return Capacity(1000, 0, self.script.context, 4, 0)

    def health(self):
        return self._state.health()
