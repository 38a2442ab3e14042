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
import hashlib
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol


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
class Constraint:
    """Output the engine must produce, compiled and validated once by ``agent.constraints``.

    ``grammar`` is a Lark grammar in llguidance's dialect (a JSON schema inside is ``%json {...}``).
    vLLM gets it as ``StructuredOutputsParams(grammar=...)`` (its guidance backend compiles it
    with llguidance); llama.cpp applies it through a logits processor over llguidance's matcher
    for the same grammar. ``kind`` says what it is for ("json_schema", "json_object",
    "tool_call", "tool_calls", "tools_strict"), for messages and logs only.
    """

    grammar: str
    kind: str


@dataclass(frozen=True)
class GenerationRequest:
    """A normalized request: the same for every engine, so failover re-dispatches it as is.

    Exactly one of ``prompt`` (completions) or ``messages`` (chat) is set. ``assistant_prefix`` is
    text already produced for this answer (continuation after a failover): the engine renders
    the chat template, appends the prefix, and generates what follows it (under ``constraint``
    too, when the engine can: ``Features.continue_constrained``).

    Sampling is explicit: every field has the value it means (``top_k`` 0 and ``min_p`` 0 are
    off), and each engine is given every one of them, so a request means the same on both
    (llama.cpp's own defaults, top_k 40 and min_p 0.05, are never used). ``logit_bias`` and
    ``stop_token_ids`` (and ``allowed_token_ids``) are token ids of the vocabulary whose fingerprint is ``token_space``;
    only engines with that vocabulary serve the request. ``logprobs``: how many alternatives
    to report per generated token (0: only the sampled token's own), None: none. ``tools``
    are the OpenAI tool definitions the chat template renders (empty: none), and
    ``chat_template_kwargs`` extra variables for the template.
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
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    allowed_token_ids: tuple[int, ...] = ()  # only these may be sampled (empty: any)
    include_stop_str_in_output: bool = False
    token_space: str = ""
    logprobs: int | None = None
    constraint: Constraint | None = None
    tools: tuple[dict, ...] = ()
    chat_template_kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability and its most likely alternatives (best first), as
    the engine's raw distribution gave them (before penalties and temperature, as vLLM's
    default ``raw_logprobs``)."""

    token: str
    bytes: bytes
    logprob: float
    top: tuple[tuple[str, bytes, float], ...] = ()


@dataclass(frozen=True)
class Delta:
    """One step of a generation: new text (one token's or several: stop-string hold-back and
    UTF-8 sequences release several at once), the prompt's token count, the completion tokens
    generated so far (cumulative, on every delta), and on the last step why it ended.
    ``logprobs``: one entry per token this delta's text covers, when the request asked."""

    text: str
    finish_reason: str | None = None  # "stop" | "length" on the last delta
    prompt_tokens: int = 0
    completion_tokens: int = 0  # cumulative: tokens generated up to and including this delta
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Features:
    """What one engine can honour as it runs now; the field policy and the router read it.

    ``constraints``: it can apply a ``Constraint`` (``constraints_reason`` says why not);
    ``continue_constrained``: it can resume a constrained answer after an ``assistant_prefix``;
    ``max_logprobs``: the most alternatives per token it reports; ``vocab``: a fingerprint of its
    token vocabulary ("" until started), ``vocab_size`` its size; ``chat_template``: the source of
    its chat template (tool rendering and the tool-call parser follow it), None without one;
    ``special_tokens``: the texts of its added and control tokens (a tool-call marker such as
    ``<tool_call>`` may be one).
    """

    constraints: bool = True
    constraints_reason: str = ""
    continue_constrained: bool = False
    max_logprobs: int = 20
    vocab: str = ""
    vocab_size: int = 0
    chat_template: str | None = None
    special_tokens: frozenset[str] = frozenset()

    def refuses(self, request: GenerationRequest) -> str | None:
        """Why this engine cannot serve ``request`` as it runs now, or None."""
        if request.constraint is not None:
            if not self.constraints:
                return self.constraints_reason or "it cannot apply an output constraint"
            if request.assistant_prefix and not self.continue_constrained:
                return "it cannot continue a constrained answer after a failover"
        if request.token_space and self.vocab != request.token_space:
            return "its token vocabulary differs from the one the request's token ids refer to"
        if request.logprobs is not None and request.logprobs > self.max_logprobs:
            return f"it reports at most {self.max_logprobs} logprobs per token"
        return None


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
    token_ids: tuple[int, ...] = ()  # the prompt's token ids (POST /tokenize)


@dataclass(frozen=True)
class Health:
    """A snapshot for /health and /v1/node."""

    state: BackendState
    since: float  # time.time() of the last state change
    last_error: str | None = None
    restarts: int = 0
    detail: dict = field(default_factory=dict)


def vocab_fingerprint(tokens: list[str]) -> str:
    """Of a vocabulary's token strings in id order: two engines with the same fingerprint number
    the same tokens the same way (token ids in a request mean the same on both)."""
    return hashlib.sha256("\x00".join(tokens).encode()).hexdigest()[:16]


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


class CannotServe(BackendError):
    """This engine cannot honour the request as it runs now (``Features.refuses`` says why: a
    constraint on an engine that cannot apply one, a constrained continuation it cannot resume):
    not the client's fault nor the engine's; the router tries the next engine and counts no
    failure."""


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

    async def detokenize(self, token_ids: list[int]) -> str:
        """Text of ``token_ids`` in this engine's vocabulary; ``InvalidInput`` for an id outside it."""

    def features(self) -> Features:
        """What this engine can honour now (constraints, logprobs, its vocabulary, its template)."""

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
