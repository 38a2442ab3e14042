"""llama.cpp in-process through llama-cpp-python: the terminal fallback.

One ``llama_cpp.Llama`` is not thread-safe, so each instance has exactly one owner at a time: a
request takes an instance from the pool, one of the backend's own generation threads drives the
blocking generator, and the instance goes back only when that thread is done. ``abort`` and
``stop`` return only once the thread has let go of the instance, so a slot that admission frees
is really free, and no instance is closed while a thread is inside it. Prompts are rendered
(chat template from the GGUF) and tokenized on a thread of their own, so token counts, context
checks and failover continuation behave the same as with vLLM. Generation runs token by token
(``llamacpp_sampling``): every sampling value explicit, logprobs, stop ids and output constraints
(llguidance's matcher over the request's grammar, which also resumes a constrained answer after
a failover: the text already sent is fed to the matcher first).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.backends import llamacpp_sampling as sampling
from agent.backends.base import (
    BackendStartError,
    BackendState,
    CannotServe,
    Capacity,
    Delta,
    Features,
    GenerationRequest,
    Health,
    InvalidInput,
    Prepared,
    PromptTooLong,
    StateOwner,
    boundary,
)
from agent.backends.threads import Workers
from agent.planner.types import LlamaCppPlan
from agent.tools import render

log = logging.getLogger(__name__)

_GGML_TYPES = {"f16": 1, "q4_0": 2, "q8_0": 8}  # ggml_type enum values
_DONE = object()


def llama_kwargs(plan: LlamaCppPlan, visible_gpus: int) -> dict[str, Any]:
    """``llama_cpp.Llama`` keyword arguments for the plan.

    llama.cpp numbers the devices CUDA shows this process, and its ``tensor_split`` has one
    share per visible device: a GPU the plan does not use gets 0, so layers never spill onto it
    (without a split llama.cpp spreads layers over every visible GPU).
    """
    kwargs: dict[str, Any] = dict(
        n_ctx=plan.n_ctx, n_threads=plan.n_threads, n_batch=plan.n_batch, n_gpu_layers=plan.n_gpu_layers,
        main_gpu=plan.main_gpu, flash_attn=plan.flash_attn, verbose=False,
    )
    if plan.n_gpu_layers and visible_gpus > 1 and plan.per_gpu:
        shares = plan.tensor_split or (1.0,)
        split = [0.0] * visible_gpus
        for gpu, share in zip(plan.per_gpu, shares):
            if gpu.index < visible_gpus:
                split[gpu.index] = share
        kwargs["tensor_split"] = split
    if plan.type_k != "f16":
        kwargs["type_k"] = _GGML_TYPES[plan.type_k]
    if plan.type_v != "f16":
        kwargs["type_v"] = _GGML_TYPES[plan.type_v]
    return kwargs


@dataclass
class _Running:
    """One generation on one instance: the thread's future and how to stop it."""

    cancel: threading.Event
    reserved: int  # prompt + max_tokens, for capacity()
    worker: asyncio.Future | None = None


class LlamaCppBackend:
    """Backend over ``llama_cpp.Llama`` instances built from a llama.cpp plan."""

    name = "llamacpp"

    def __init__(self, plan: LlamaCppPlan, model_path: Path, model_name: str, visible_gpus: int = 0) -> None:
        self.plan = plan
        self.model_path = Path(model_path)
        self.model_name = model_name
        self.visible_gpus = visible_gpus
        self._state = StateOwner(self.name)
        self._pool: asyncio.Queue[Any] | None = None
        self._all: list[Any] = []
        self._vocab: Any = None  # a vocab-only Llama: tokenizing never touches a busy context
        self._formatter: Any = None
        self._template: str | None = None
        self._words: sampling.Vocab | None = None
        self._running: dict[str, _Running] = {}
        self._n_ctx = plan.n_ctx
        self._max_token_bytes = 64
        self._gen = Workers("llamacpp-gen", max(1, plan.instances))
        self._tok = Workers("llamacpp-tok", 1)

    @property
    def state(self) -> BackendState:
        return self._state.state

    # --- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        self._state.move(BackendState.STARTING)
        try:
            self._all = await self._gen.run(self._load)
        except Exception as exc:  # llama_cpp raises ValueError/RuntimeError with its own text
            self._state.move(BackendState.FAILED, error=str(exc))
            raise BackendStartError(self.name, f"{exc} (model {self.model_path})") from exc
        self._n_ctx = self._all[0].n_ctx()  # what llama.cpp really allocated (it raises tiny values)
        self._pool = asyncio.Queue()
        for llm in self._all:
            self._pool.put_nowait(llm)
        self._state.move(BackendState.READY)
        log.info("llama.cpp ready: %s, %d instance(s), n_ctx %d", self.model_path.name, len(self._all), self._n_ctx)

    def _load(self) -> list[Any]:
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        if not self.model_path.is_file():
            raise FileNotFoundError(f"GGUF file {self.model_path} does not exist")
        kwargs = llama_kwargs(self.plan, self.visible_gpus)
        instances = [llama_cpp.Llama(model_path=str(self.model_path), **kwargs) for _ in range(self.plan.instances)]
        for llm in instances:
            # Warm-up: page the mmapped weights in and build the compute graph now, so the first
            # request (often a failover from vLLM) does not pay for it.
            llm.create_completion(prompt=llm.tokenize(b"Hello"), max_tokens=1, temperature=0)
        self._vocab = llama_cpp.Llama(model_path=str(self.model_path), vocab_only=True, verbose=False)
        model = self._vocab._model
        self._max_token_bytes = max(len(model.token_get_text(i).encode()) for i in range(model.n_vocab()))
        self._words = sampling.Vocab.read(model.vocab)
        first = instances[0]
        template = first.metadata.get("tokenizer.chat_template")
        self._template = template or None
        if template:
            eos, bos = first.token_eos(), first.token_bos()
            self._formatter = Jinja2ChatFormatter(
                template=template,
                eos_token=first._model.token_get_text(eos) if eos != -1 else "",
                bos_token=first._model.token_get_text(bos) if bos != -1 else "",
                stop_token_ids=[eos],
            )
        return instances

    async def stop(self) -> None:
        running = list(self._running.values())
        for run in running:
            run.cancel.set()
        workers = [r.worker for r in running if r.worker is not None]
        if workers:  # each stops at its next token; never close an instance a thread is inside
            await asyncio.gather(*(asyncio.shield(w) for w in workers), return_exceptions=True)
        for llm in self._all:
            try:
                llm.close()
            except Exception:  # pragma: no cover - closing a half-built context
                log.debug("llama close failed", exc_info=True)
        self._all, self._pool = [], None
        if self._state.state != BackendState.STOPPED:
            self._state.move(BackendState.STOPPED)

    # --- requests ------------------------------------------------------------------------
    def _render(self, request: GenerationRequest) -> tuple[list[int], list[str], list[int]]:
        """Prompt token ids, extra stop strings (as llama-cpp-python's chat handler makes them),
        and the ids of the assistant prefix (tokenized on its own, so a constraint's matcher can
        be fed exactly the text already sent)."""
        with boundary(self.name, rendering=True):
            prefix = request.assistant_prefix
            prefix_ids = self._vocab.tokenize(prefix.encode(), add_bos=False, special=False) if prefix else []
            if request.messages is None:
                ids = self._vocab.tokenize((request.prompt or "").encode(), add_bos=True, special=True)
                return ids + prefix_ids, [], prefix_ids
            if self._formatter is None:
                raise InvalidInput(f"{self.model_path.name} has no chat template; use /v1/completions")
            messages, tools = render.for_template(request.messages, request.tools, self._template)
            result = self._formatter(messages=messages, tools=tools, **dict(request.chat_template_kwargs))
            stops = [] if result.stop is None else ([result.stop] if isinstance(result.stop, str) else list(result.stop))
            ids = self._vocab.tokenize(result.prompt.encode(), add_bos=not result.added_special, special=True)
            return ids + prefix_ids, stops, prefix_ids

    async def prepare(self, request: GenerationRequest) -> Prepared:
        self._state.require_serving()
        refusal = self.features().refuses(request)
        if refusal:
            raise CannotServe(f"{self.name}: {refusal}")
        tokens, stops, prefix_ids = await self._tok.run(self._render, request)
        return Prepared(len(tokens), (tokens, stops, prefix_ids), tuple(tokens))

    def _matcher(self, request: GenerationRequest, prefix_ids: list[int]) -> Any:
        """llguidance's matcher for the request's grammar, having consumed the text already sent."""
        if request.constraint is None:
            return None
        import llguidance

        assert self._words is not None
        tokenizer = self._words.ll_tokenizer(self._vocab._model.vocab)
        matcher = llguidance.LLMatcher(tokenizer, llguidance.LLMatcher.grammar_from_lark(request.constraint.grammar),
                                       log_level=0)
        if matcher.is_error():
            raise CannotServe(f"{self.name}: the output constraint does not compile: {matcher.get_error()}")
        if prefix_ids and not matcher.consume_tokens(prefix_ids):
            raise CannotServe(f"{self.name}: the text already sent does not fit the output constraint as this "
                              f"engine tokenizes it: {matcher.get_error()}")
        return matcher

    async def count_prompt_tokens(self, request: GenerationRequest) -> int:
        return (await self.prepare(request)).prompt_tokens

    async def generate(self, request: GenerationRequest, prepared: Prepared | None = None) -> AsyncIterator[Delta]:
        self._state.require_serving()
        tokens, stops, prefix_ids = (prepared or await self.prepare(request)).data
        n_prompt, n_ctx = len(tokens), self._n_ctx
        if n_prompt >= n_ctx:
            raise PromptTooLong(n_prompt, n_ctx)
        assert self._pool is not None
        pool = self._pool
        run = _Running(threading.Event(), n_prompt + request.max_tokens)
        self._running[request.request_id] = run
        llm = None
        try:
            llm = await pool.get()
            matcher = await self._tok.run(self._matcher, request, prefix_ids)
            queue: asyncio.Queue[Any] = asyncio.Queue()
            loop = asyncio.get_running_loop()
            run.worker = self._gen.submit(self._drive, llm, tokens, stops, request, matcher, run.cancel, queue, loop)
            # The instance goes back when the thread is done, never earlier, whoever stops waiting.
            run.worker.add_done_callback(lambda _, llm=llm: pool.put_nowait(llm))
            with boundary(self.name):
                while True:
                    item = await queue.get()
                    if item is _DONE:
                        break
                    if isinstance(item, BaseException):
                        raise item
                    text, finish, generated, logprobs = item
                    if finish is not None or text:
                        yield Delta(text, finish, n_prompt, generated, logprobs)
        finally:
            run.cancel.set()  # the thread stops at its next token
            if run.worker is None:
                if llm is not None:
                    pool.put_nowait(llm)
                self._running.pop(request.request_id, None)
            else:
                run.worker.add_done_callback(lambda _: self._running.pop(request.request_id, None))
                # Closing returns once the thread let go of the instance. Cancelled here (a client
                # that left, under anyio), the callbacks above still give it back when it ends.
                await asyncio.gather(asyncio.shield(run.worker), return_exceptions=True)

    def _drive(self, llm: Any, tokens: list[int], stops: list[str], request: GenerationRequest, matcher: Any,
               cancel: threading.Event, queue: asyncio.Queue, loop: asyncio.AbstractEventLoop) -> None:
        """Generation thread: run ``llamacpp_sampling.generate`` on the instance, handing
        (text, finish, tokens so far, logprobs) to the loop; an error is handed over too and
        typed at the boundary there."""
        put = lambda item: loop.call_soon_threadsafe(queue.put_nowait, item)  # noqa: E731
        try:
            assert self._words is not None
            sampling.generate(llm, self._words, tokens, request, stops, matcher, cancel, put)
        except Exception as exc:  # noqa: BLE001 - handed to the loop, typed at the boundary there
            log.warning("llama.cpp generation %s failed: %s", request.request_id, exc)
            put(exc)
        finally:
            put(_DONE)

    async def abort(self, request_id: str) -> None:
        """Stop the request and return once its thread has let go of the instance."""
        run = self._running.get(request_id)
        if run is None:
            return
        run.cancel.set()
        if run.worker is not None:
            await asyncio.gather(asyncio.shield(run.worker), return_exceptions=True)

    async def detokenize(self, token_ids: list[int]) -> str:
        words = self._words
        if words is None:
            self._state.require_serving()
        assert words is not None
        bad = [t for t in token_ids if not 0 <= t < len(words.pieces)]
        if bad:
            raise InvalidInput(f"token id {bad[0]} is outside this model's vocabulary (0-{len(words.pieces) - 1})",
                               param="tokens")
        return b"".join(words.pieces[t] for t in token_ids).decode("utf-8", "replace")

    # --- reporting -----------------------------------------------------------------------
    def features(self) -> Features:
        words = self._words
        return Features(constraints=True, continue_constrained=True,
                        max_logprobs=len(words.pieces) if words else 20,
                        vocab=words.fingerprint if words else "", vocab_size=len(words.pieces) if words else 0,
                        chat_template=self._template, special_tokens=words.special if words else frozenset())

    def capacity(self) -> Capacity:
        n = len(self._all) or self.plan.instances
        in_use = sum(min(r.reserved, self._n_ctx) for r in self._running.values())
        return Capacity(kv_tokens_total=self._n_ctx * n, kv_tokens_in_use=in_use, max_context=self._n_ctx,
                        slots_total=n, slots_in_use=len(self._running), max_token_bytes=self._max_token_bytes)

    def health(self) -> Health:
        return self._state.health({"model": self.model_name, "n_ctx": self._n_ctx,
                                   "n_gpu_layers": self.plan.n_gpu_layers})
