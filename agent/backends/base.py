"""The one interface every engine implements, and the values that cross it.

State machine (one owner: the backend's own lifecycle methods and its monitor task)::

    stopped ──start()──▶ starting ──ok──▶ ready ◀──▶ degraded
       ▲                    │                │           │
       │                    └──error──▶ failed ◀─────────┘ (engine died / unrecoverable)
       └─────────── stop() from any state ───┘

- ``start()`` is only valid from ``stopped`` or ``failed``; it ends in ``ready`` or raises
  ``BackendStartError`` after moving to ``failed``.
- ``generate()`` is only valid in ``ready`` or ``degraded``; a backend that dies mid-stream moves
  to ``failed`` and the stream raises ``BackendDied`` (never hangs).
- ``stop()`` is valid from any state, idempotent, and ends in ``stopped``; it returns only once
  no worker is inside the engine any more.

Errors cross this interface typed, never raw (``boundary``): ``InvalidInput`` (the request cannot
be rendered or tokenized: a chat-template error, no template; the client's fault, a 400),
``PromptTooLong`` (this engine's context cannot hold it), ``BackendDied`` (the engine is gone),
``EngineFault`` (anything else the engine raised; the request fails over), ``BackendNotReady``.
Request handlers never branch on which engine is behind this interface.
"""

from __future__ import annotations

import contextlib
import enum
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Protocol


class BackendState(str, enum.Enum):
    """Lifecycle states; see the module docstring for the allowed transitions."""

    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    DEGRADED = "degraded"
    FAILED = "failed"


ALLOWED = {
    BackendState.STOPPED: {BackendState.STARTING, BackendState.STOPPED},
    BackendState.STARTING: {BackendState.READY, BackendState.FAILED, BackendState.STOPPED},
    BackendState.READY: {BackendState.DEGRADED, BackendState.FAILED, BackendState.STOPPED},
    BackendState.DEGRADED: {BackendState.READY, BackendState.FAILED, BackendState.STOPPED},
    BackendState.FAILED: {BackendState.STARTING, BackendState.STOPPED, BackendState.FAILED},
}


@dataclass(frozen=True)
class GenerationRequest:
    """A normalized request: the same for every engine, so failover re-dispatches it as is.

    Exactly one of ``prompt`` (completions) or ``messages`` (chat) is set. ``assistant_prefix`` is
    text already produced for this answer (continuation after a failover): the engine renders
    the chat template, appends the prefix, and generates what follows it.
    """

    request_id: str
    max_tokens: int
    prompt: str | None = None
    messages: tuple[dict, ...] | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    assistant_prefix: str = ""


@dataclass(frozen=True)
class Delta:
    """One step of a generation: new text (one token's or several: stop-string hold-back and
    UTF-8 sequences release several at once), the prompt's token count, the completion tokens
    generated so far (cumulative, on every delta), and on the last step why it ended."""

    text: str
    finish_reason: str | None = None  # "stop" | "length" on the last delta
    prompt_tokens: int = 0
    completion_tokens: int = 0  # cumulative: tokens generated up to and including this delta


@dataclass(frozen=True)
class Capacity:
    """What the engine can hold, as the engine itself reported it after start-up."""

    kv_tokens_total: int
    kv_tokens_in_use: int
    max_context: int
    slots_total: int  # sequences that can run at once
    slots_in_use: int
    # The longest token of the vocabulary in UTF-8 bytes (an upper bound): a prompt of B bytes
    # has at least B / max_token_bytes tokens, so one that cannot fit is refused by its size,
    # before any tokenization.
    max_token_bytes: int = 64
    # Tokens per KV block: vLLM allocates its cache in blocks; llama.cpp per token (1).
    kv_block_size: int = 1


@dataclass(frozen=True)
class Prepared:
    """A request rendered and tokenized by one engine: the router counts ``prompt_tokens`` for
    admission and hands the whole thing to ``generate``, so the prompt is tokenized once."""

    prompt_tokens: int
    data: object  # engine-private: token ids (and stop strings) ready to run


@dataclass(frozen=True)
class Health:
    """A snapshot for /health and /v1/node."""

    state: BackendState
    since: float  # time.time() of the last state change
    last_error: str | None = None
    restarts: int = 0
    detail: dict = field(default_factory=dict)


class BackendError(Exception):
    """Base of errors a backend raises to the router."""


class BackendStartError(BackendError):
    """The engine could not start; ``reason`` is the engine's own explanation."""

    def __init__(self, engine: str, reason: str) -> None:
        super().__init__(f"{engine} failed to start: {reason}")
        self.engine = engine
        self.reason = reason


class BackendDied(BackendError):
    """The engine died (process killed, fatal error) before or during a generation."""


class BackendNotReady(BackendError):
    """generate() called while the backend is not ready or degraded."""


class EngineFault(BackendError):
    """The engine raised an error of its own during a request (not the request's fault): the
    router fails the request over and counts a failure on the backend's breaker."""


class InvalidInput(BackendError):
    """The request cannot be rendered or tokenized by this engine (a chat-template error such as
    "roles must alternate", no chat template): the client's fault, answered with a 400."""

    def __init__(self, message: str, param: str = "messages") -> None:
        super().__init__(message)
        self.param = param


class PromptTooLong(BackendError):
    """The prompt plus the requested tokens cannot fit in the engine's context."""

    def __init__(self, prompt_tokens: int, max_context: int, at_least: bool = False) -> None:
        count = f"at least {prompt_tokens} tokens (by its size)" if at_least else f"{prompt_tokens} tokens"
        super().__init__(f"the prompt has {count}; this model's context holds {max_context}")
        self.prompt_tokens = prompt_tokens
        self.max_context = max_context


def _template_errors() -> tuple[type[BaseException], ...]:
    try:
        from jinja2 import TemplateError
    except ImportError:  # pragma: no cover - both engines bring jinja2
        return ()
    return (TemplateError,)


@contextlib.contextmanager
def boundary(engine: str, *, rendering: bool = False,
             dead: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Translate whatever an engine raises into this module's typed errors.

    ``rendering``: the block renders the chat template and tokenizes, where a template error or a
    ValueError/TypeError/KeyError describes the request (``InvalidInput``); elsewhere every
    unknown exception is an ``EngineFault``. ``dead``: the engine's own "I am gone" errors
    (``BackendDied``). Cancellation and generator exits pass through untouched.
    """
    try:
        yield
    except BackendError:
        raise
    except dead as exc:
        raise BackendDied(f"{engine} died: {exc or type(exc).__name__}") from exc
    except _template_errors() as exc:
        raise InvalidInput(f"the chat template rejected the messages: {exc}") from exc
    except (ValueError, TypeError, KeyError) as exc:
        if not rendering:
            raise EngineFault(f"{engine}: {type(exc).__name__}: {exc}") from exc
        raise InvalidInput(f"{engine} cannot render this request: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - the point: nothing raw crosses the boundary
        raise EngineFault(f"{engine}: {type(exc).__name__}: {exc}") from exc


class Backend(Protocol):
    """An inference engine the agent owns."""

    name: str

    @property
    def state(self) -> BackendState:
        """Current lifecycle state."""

    async def start(self) -> None:
        """Load the model; ready on return, or ``BackendStartError`` (state failed)."""

    async def prepare(self, request: GenerationRequest) -> Prepared:
        """Render the chat template and tokenize with this engine's tokenizer (in the backend's
        own worker thread); ``InvalidInput`` when the request cannot be rendered."""

    def generate(self, request: GenerationRequest, prepared: Prepared | None = None) -> AsyncIterator[Delta]:
        """Stream deltas (``prepared``: this backend's ``prepare`` of the same request, else it
        prepares itself). Closing the iterator early aborts the request in the engine; ``aclose()``
        returns once the engine no longer works on it (its slot is really free)."""

    async def abort(self, request_id: str) -> None:
        """Stop a running request and free its slot; unknown ids are ignored."""

    async def count_prompt_tokens(self, request: GenerationRequest) -> int:
        """Prompt tokens as this engine's tokenizer counts them, chat template applied
        (``prepare(request).prompt_tokens``)."""

    def capacity(self) -> Capacity:
        """KV tokens and sequence slots, total and in use."""

    def health(self) -> Health:
        """State, since when, last error, restarts."""

    async def stop(self) -> None:
        """Release the engine; idempotent."""


class StateOwner:
    """Holds a backend's state; the only writer of it, enforcing ``ALLOWED``."""

    def __init__(self, engine: str) -> None:
        self.engine = engine
        self.state = BackendState.STOPPED
        self.since = time.time()
        self.last_error: str | None = None
        self.restarts = 0

    def move(self, to: BackendState, error: str | None = None) -> None:
        """Change state; an illegal transition is a bug and raises."""
        if to not in ALLOWED[self.state]:
            raise RuntimeError(f"{self.engine}: illegal transition {self.state.value} -> {to.value}")
        if to != self.state:
            self.state, self.since = to, time.time()
        if error is not None:
            self.last_error = error

    def health(self, detail: dict | None = None) -> Health:
        """Snapshot."""
        return Health(self.state, self.since, self.last_error, self.restarts, detail or {})

    def require_serving(self) -> None:
        """Raise unless ready or degraded."""
        if self.state not in (BackendState.READY, BackendState.DEGRADED):
            if self.state == BackendState.FAILED:
                raise BackendDied(f"{self.engine} has failed: {self.last_error}")
            raise BackendNotReady(f"{self.engine} is {self.state.value}")
