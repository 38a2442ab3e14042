"""One request's way along the chain, as the router keeps it: what was delivered, the usage
behind it, and why an attempt on one backend handed the request on.

Usage is what the client received: the original prompt's tokens (as the engine that began the
answer counted them; a continuation re-feeds the text sent, which is not the client's prompt),
and the completion tokens of every attempt whose text was delivered.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from agent.backends.base import Delta, GenerationRequest
from agent.serving.errors import ApiError


@dataclass
class Served:
    """One delta and the backend that produced it; counts are for the whole answer so far."""

    backend: str
    delta: Delta



class Moved(Exception):
    """An attempt ended without answering; the next backend may take the request.

    ``refusal``: what the client gets when no backend is left (e.g. the 429 of a full queue).
    """

    def __init__(self, backend: str, reason: str, refusal: ApiError | None = None) -> None:
        super().__init__(reason)
        self.backend, self.reason, self.refusal = backend, reason, refusal
        self.at = time.monotonic()

    @property
    def kind(self) -> str:
        return self.reason.split(":", 1)[0]


@dataclass
class Answer:
    """One request's progress across attempts: what was delivered, and the usage behind it."""

    request: GenerationRequest
    resume: bool  # a stream: continue after the text sent; else the next backend starts over
    tried: set[str] = field(default_factory=set)
    text: str = ""  # delivered by earlier attempts (resume only)
    tokens: int = 0  # completion tokens of earlier attempts whose text was delivered
    prompt_tokens: int | None = None  # the original prompt, as the engine that began the answer counted it
    attempt_text: str = ""
    attempt_tokens: int = 0
    started: float = field(default_factory=time.monotonic)
    first_seen: bool = False

    def next_request(self) -> GenerationRequest:
        if not self.text:
            return self.request
        return dataclasses.replace(self.request, assistant_prefix=self.request.assistant_prefix + self.text,
                                   max_tokens=self.remaining())

    def remaining(self) -> int:
        return self.request.max_tokens - self.tokens

    def begin(self, prompt_tokens: int) -> None:
        self.attempt_text, self.attempt_tokens = "", 0
        if not self.text:
            self.prompt_tokens = prompt_tokens

    def account(self, backend: str, d: Delta) -> Served:
        self.attempt_text += d.text
        self.attempt_tokens = max(self.attempt_tokens, d.completion_tokens)
        return Served(backend, dataclasses.replace(d, prompt_tokens=self.prompt_tokens or d.prompt_tokens,
                                                   completion_tokens=self.tokens + self.attempt_tokens))

    def attempt_failed(self) -> None:
        if self.resume:
            self.text += self.attempt_text
            self.tokens += self.attempt_tokens
        self.attempt_text, self.attempt_tokens = "", 0
