"""A scripted Backend for injecting faults into the router (the engines themselves are tested
for real in tests/integration). It follows the Backend protocol and its state machine, and it
behaves like the real engines where the router depends on it:

- a word-level tokenizer with a chat-template overhead, so prompt counts are real counts of
  what was rendered (the assistant prefix of a continuation included);
- several tokens per delta when ``Script.pattern`` says so (as stop-string hold-back and UTF-8
  sequences do), with cumulative ``completion_tokens`` on every delta and the prompt count on
  every delta;
- what the real engines honour, as they honour it: ``features()`` (scriptable: an engine that
  cannot constrain, or cannot continue a constrained answer), per-token logprobs when asked, an
  output constraint answered with ``Script.constrained`` (the words a grammar would allow; a
  continuation resumes after the prefix already sent, as llguidance's matcher does), tools
  rendered into the prompt (they cost prompt tokens, as a template makes them);
- faults raised the way engines raise them: a raw ``RuntimeError`` or a jinja2
  ``TemplateError`` from inside the "engine", translated by the same ``boundary`` the real
  backends use; ``BackendDied`` with the state moved to failed; hangs; slow and failing starts.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field

from agent.backends.base import (
    BackendDied,
    BackendStartError,
    BackendState,
    CannotServe,
    Capacity,
    Delta,
    Features,
    GenerationRequest,
    InvalidInput,
    Prepared,
    PromptTooLong,
    StateOwner,
    TokenLogprob,
    boundary,
)

TEMPLATE_TOKENS = 2  # per chat message: the role and end-of-turn tokens a chat template adds


@dataclass
class Script:
    """What the fake does: its words (one token each), how many it releases per delta, and faults."""

    words: list[str] = field(default_factory=lambda: ["a", "b", "c", "d", "e", "f"])
    pattern: tuple[int, ...] = (1,)  # tokens per delta, cycled: (1, 3) releases 1, 3, 1, 3, ...
    die_after: int | None = None  # BackendDied (state failed) after this many deltas
    raw_error_after: int | None = None  # a raw RuntimeError from the "engine" after this many deltas
    stall: bool = False  # never produce a first token
    hang_after: int | None = None  # produce this many deltas, then hang
    fail_starts: int = 0  # the next N start() calls fail
    buggy_starts: int = 0  # the next N start() calls raise what no backend should (a bug), left starting
    start_delay: float = 0.0
    context: int = 100
    die_on_count: bool = False  # die while the router prepares the prompt (before generate)
    template_error: bool = False  # the chat template raises (as jinja's raise_exception does)
    delay: float = 0.0  # between deltas
    slots: int = 4
    kv: int = 1000
    # the words a grammar allows, one token each (a JSON object unless a test says otherwise)
    constrained: list[str] = field(default_factory=lambda: ['{"', 'city', '":"', 'Paris', '"}'])
    features: Features = field(default_factory=lambda: Features(continue_constrained=True, vocab="fake", vocab_size=64,
                                                                chat_template="{{ messages }}"))


class FakeBackend:
    def __init__(self, name: str, script: Script | None = None) -> None:
        self.name = name
        self.script = script or Script()
        self._state = StateOwner(name)
        self.requests: list[GenerationRequest] = []
        self.prepared: list[GenerationRequest] = []  # prepare() calls: once per admitted attempt
        self.starts = 0
        self.active: set[str] = set()  # request ids the "engine" works on now
        self.aborted: list[str] = []

    @property
    def state(self) -> BackendState:
        return self._state.state

    async def start(self) -> None:
        self._state.move(BackendState.STARTING)
        self.starts += 1
        if self.script.start_delay:
            await asyncio.sleep(self.script.start_delay)
        if self.script.buggy_starts:
            self.script.buggy_starts -= 1
            raise KeyError("scripted bug in start")
        if self.script.fail_starts:
            self.script.fail_starts -= 1
            self._state.move(BackendState.FAILED, error="scripted start failure")
            raise BackendStartError(self.name, "scripted start failure")
        self._state.move(BackendState.READY)

    async def stop(self) -> None:
        self._state.move(BackendState.STOPPED)

    def die(self) -> None:
        """The engine is gone (like a SIGKILLed EngineCore noticed by its monitor)."""
        if self._state.state in (BackendState.READY, BackendState.DEGRADED):
            self._state.move(BackendState.FAILED, error="scripted death")

    def tokenize(self, request: GenerationRequest) -> list[str]:
        with boundary(self.name, rendering=True):
            if self.script.template_error and request.messages:
                from jinja2.exceptions import TemplateError

                raise TemplateError("Conversation roles must alternate user/assistant/user/assistant/...")
            if request.messages is None:
                text = (request.prompt or "") + request.assistant_prefix
                return text.split()
            words = [w for m in request.messages for w in ["<role>", *(m.get("content") or "").split(), "<end>"]]
            words += [w for t in request.tools for w in ["<tool>", *t["function"]["name"].split()]]
            return words + ["<role>"] + request.assistant_prefix.split()

    def features(self) -> Features:
        return self.script.features

    async def detokenize(self, token_ids: list[int]) -> str:
        if any(not 0 <= t < len(self.script.words) for t in token_ids):
            raise InvalidInput("token id outside the vocabulary", param="tokens")
        return "".join(self.script.words[t] for t in token_ids)

    def _words_for(self, request: GenerationRequest) -> list[str]:
        """The answer's tokens: the script's words, or under a constraint what the grammar allows
        after the text already sent."""
        if request.constraint is None:
            return self.script.words
        done, words = "", list(self.script.constrained)
        while words and request.assistant_prefix.startswith(done + words[0]):
            done += words.pop(0)
        if done != request.assistant_prefix:
            raise CannotServe(f"{self.name}: the text already sent does not fit the constraint")
        return words

    async def prepare(self, request: GenerationRequest) -> Prepared:
        self._state.require_serving()
        refusal = self.features().refuses(request)
        if refusal:
            raise CannotServe(f"{self.name}: {refusal}")
        if self.script.die_on_count:
            self._state.move(BackendState.FAILED, error="scripted death")
            raise BackendDied(f"{self.name} died")
        words = self.tokenize(request)
        self.prepared.append(request)
        return Prepared(len(words), request, tuple(sum(map(ord, w)) % 64 for w in words))

    async def count_prompt_tokens(self, request: GenerationRequest) -> int:
        return (await self.prepare(request)).prompt_tokens

    async def generate(self, request: GenerationRequest, prepared: Prepared | None = None):
        self._state.require_serving()
        if prepared is not None and prepared.data is not request:
            raise AssertionError("generate() got another request's preparation")
        n_prompt = prepared.prompt_tokens if prepared else len(self.tokenize(request))
        if n_prompt >= self.script.context:
            raise PromptTooLong(n_prompt, self.script.context)
        self.requests.append(request)
        self.active.add(request.request_id)
        s = self.script
        finished = False
        try:
            if s.stall:
                await asyncio.sleep(3600)
            all_words = self._words_for(request)
            words = all_words[: max(0, min(request.max_tokens, s.context - n_prompt))]
            sizes = itertools.cycle(s.pattern)
            done, deltas = 0, 0
            with boundary(self.name):
                while done < len(words):
                    if s.die_after is not None and deltas == s.die_after:
                        self._state.move(BackendState.FAILED, error="scripted death")
                        raise BackendDied(f"{self.name} died")
                    if s.raw_error_after is not None and deltas == s.raw_error_after:
                        raise RuntimeError("llama_decode returned -3")  # raw, as an engine raises it
                    if s.hang_after is not None and deltas == s.hang_after:
                        await asyncio.sleep(3600)
                    if s.delay:
                        await asyncio.sleep(s.delay)
                    else:
                        await asyncio.sleep(0)
                    if self._state.state is BackendState.FAILED:
                        raise BackendDied(f"{self.name} died")
                    chunk = words[done:done + next(sizes)]
                    done += len(chunk)
                    deltas += 1
                    finish = None
                    if done == len(words):
                        finish = "length" if done == request.max_tokens or done < len(all_words) else "stop"
                        finished = True
                    yield Delta("".join(chunk), finish, n_prompt, done, self._logprobs(request, chunk))
        finally:
            self.active.discard(request.request_id)
            if not finished:
                self.aborted.append(request.request_id)

    @staticmethod
    def _logprobs(request: GenerationRequest, chunk: list[str]) -> tuple[TokenLogprob, ...]:
        """Logprobs as an engine reports them: one entry per token, ``logprobs`` alternatives each,
        the sampled token the likeliest."""
        if request.logprobs is None:
            return ()
        return tuple(TokenLogprob(w, w.encode(), -0.5, tuple((w if i == 0 else f"{w}~{i}", w.encode(), -0.5 - i)
                                                            for i in range(request.logprobs))) for w in chunk)

    async def abort(self, request_id: str) -> None:
        self.active.discard(request_id)

    def capacity(self) -> Capacity:
        return Capacity(self.script.kv, 0, self.script.context, self.script.slots, len(self.active),
                        max_token_bytes=max([len(w.encode()) for w in self.script.words] + [8]))

    def health(self):
        return self._state.health()
