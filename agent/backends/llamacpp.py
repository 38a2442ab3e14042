"""llama.cpp in-process through llama-cpp-python: the terminal fallback.

One ``llama_cpp.Llama`` is not thread-safe, so each instance has exactly one owner at a time: a
request takes an instance from the pool, a worker thread drives the blocking generator, and the
instance goes back only when that thread is done. The event loop never blocks on the engine.
Prompts are rendered (chat template from the GGUF) and tokenized here, so token counts, context
checks and failover continuation behave the same as with vLLM.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from agent.backends.base import (
    BackendStartError,
    BackendState,
    Capacity,
    Delta,
    GenerationRequest,
    Health,
    Prepared,
    PromptTooLong,
    StateOwner,
)
from agent.planner.types import LlamaCppPlan

log = logging.getLogger(__name__)

_GGML_TYPES = {"f16": 1, "q4_0": 2, "q8_0": 8}  # ggml_type enum values
_DONE = object()


class LlamaCppBackend:
    """Backend over ``llama_cpp.Llama`` instances built from a llama.cpp plan."""

    name = "llamacpp"

    def __init__(self, plan: LlamaCppPlan, model_path: Path, model_name: str) -> None:
        self.plan = plan
        self.model_path = Path(model_path)
        self.model_name = model_name
        self._state = StateOwner(self.name)
        self._pool: asyncio.Queue[Any] | None = None
        self._all: list[Any] = []
        self._vocab: Any = None  # a vocab-only Llama: tokenizing never touches a busy context
        self._formatter: Any = None
        self._active: dict[str, tuple[threading.Event, int]] = {}
        self._n_ctx = plan.n_ctx

    @property
    def state(self) -> BackendState:
        return self._state.state

    # --- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        self._state.move(BackendState.STARTING)
        try:
            self._all = await asyncio.to_thread(self._load)
        except Exception as exc:  # llama_cpp raises ValueError/RuntimeError with its own text
            self._state.move(BackendState.FAILED, error=str(exc))
            raise BackendStartError(self.name, f"{exc} (model {self.model_path})") from exc
        self._n_ctx = self._all[0].n_ctx()  # what llama.cpp really allocated (it raises tiny values)
        self._pool = asyncio.Queue()
        for llm in self._all:
            self._pool.put_nowait(llm)
        self._state.move(BackendState.READY)
        log.info("llama.cpp ready: %s, %d instance(s), n_ctx %d", self.model_path.name, len(self._all), self.plan.n_ctx)

    def _load(self) -> list[Any]:
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        if not self.model_path.is_file():
            raise FileNotFoundError(f"GGUF file {self.model_path} does not exist")
        p = self.plan
        kwargs: dict[str, Any] = dict(
            n_ctx=p.n_ctx, n_threads=p.n_threads, n_batch=p.n_batch, n_gpu_layers=p.n_gpu_layers,
            main_gpu=p.main_gpu, flash_attn=p.flash_attn, verbose=False,
        )
        if p.tensor_split:
            kwargs["tensor_split"] = list(p.tensor_split)
        if p.type_k != "f16":
            kwargs["type_k"] = _GGML_TYPES[p.type_k]
        if p.type_v != "f16":
            kwargs["type_v"] = _GGML_TYPES[p.type_v]
        instances = [llama_cpp.Llama(model_path=str(self.model_path), **kwargs) for _ in range(p.instances)]
        for llm in instances:
            # Warm-up: page the mmapped weights in and build the compute graph now, so the first
            # request (often a failover from vLLM) does not pay for it.
            llm.create_completion(prompt=llm.tokenize(b"Hello"), max_tokens=1, temperature=0)
        self._vocab = llama_cpp.Llama(model_path=str(self.model_path), vocab_only=True, verbose=False)
        first = instances[0]
        template = first.metadata.get("tokenizer.chat_template")
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
        for event, _ in list(self._active.values()):
            event.set()
        for llm in self._all:
            try:
                llm.close()
            except Exception:  # pragma: no cover - closing a half-built context
                log.debug("llama close failed", exc_info=True)
        self._all, self._pool = [], None
        if self._state.state != BackendState.STOPPED:
            self._state.move(BackendState.STOPPED)

    # --- requests ------------------------------------------------------------------------
    def _render(self, request: GenerationRequest) -> tuple[list[int], list[str]]:
        """Prompt token ids and extra stop strings, as llama-cpp-python's chat handler makes them."""
        if request.messages is None:
            text = (request.prompt or "") + request.assistant_prefix
            return self._vocab.tokenize(text.encode(), add_bos=True, special=True), []
        if self._formatter is None:
            raise ValueError(f"{self.model_path.name} has no chat template; use /v1/completions")
        result = self._formatter(messages=list(request.messages))
        text = result.prompt + request.assistant_prefix
        stops = [] if result.stop is None else ([result.stop] if isinstance(result.stop, str) else list(result.stop))
        return self._vocab.tokenize(text.encode(), add_bos=not result.added_special, special=True), stops

    async def prepare(self, request: GenerationRequest) -> Prepared:
        self._state.require_serving()
        tokens, stops = await asyncio.to_thread(self._render, request)
        return Prepared(len(tokens), (tokens, stops))

    async def count_prompt_tokens(self, request: GenerationRequest) -> int:
        return (await self.prepare(request)).prompt_tokens

    async def generate(self, request: GenerationRequest, prepared: Prepared | None = None) -> AsyncIterator[Delta]:
        self._state.require_serving()
        tokens, stops = (prepared or await self.prepare(request)).data
        n_ctx = self._n_ctx
        if len(tokens) >= n_ctx:
            raise PromptTooLong(len(tokens), n_ctx)
        assert self._pool is not None
        llm = await self._pool.get()
        cancel = threading.Event()
        self._active[request.request_id] = (cancel, len(tokens) + request.max_tokens)
        queue: asyncio.Queue[Any] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        worker = loop.run_in_executor(None, self._drive, llm, tokens, stops, request, cancel, queue, loop)
        text: list[str] = []
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                chunk_text, finish = item
                text.append(chunk_text)
                if finish is None:
                    if chunk_text:
                        yield Delta(chunk_text)
                    continue
                done = await asyncio.to_thread(self._count_completion, "".join(text))
                yield Delta(chunk_text, finish, len(tokens), done)
        finally:
            cancel.set()  # the worker closes the generator at its next token
            self._active.pop(request.request_id, None)
            # The instance goes back when the worker thread is done, with no await here: a client
            # that leaves cancels this task, and under anyio every await in a finally is cancelled too.
            pool = self._pool
            worker.add_done_callback(lambda _: pool.put_nowait(llm) if pool is not None else None)

    def _count_completion(self, text: str) -> int:
        return len(self._vocab.tokenize(text.encode(), add_bos=False, special=False)) if text else 0

    def _drive(self, llm: Any, tokens: list[int], stops: list[str], request: GenerationRequest,
               cancel: threading.Event, queue: asyncio.Queue, loop: asyncio.AbstractEventLoop) -> None:
        """Worker thread: run the blocking generator, hand chunks to the event loop."""
        put = lambda item: loop.call_soon_threadsafe(queue.put_nowait, item)  # noqa: E731
        gen = None
        try:
            gen = llm.create_completion(
                prompt=tokens, max_tokens=request.max_tokens, temperature=request.temperature,
                top_p=request.top_p, top_k=0, min_p=0.0, repeat_penalty=1.0,
                stop=list(request.stop) + stops or None, seed=request.seed, stream=True,
            )
            for chunk in gen:
                if cancel.is_set():
                    break
                choice = chunk["choices"][0]
                put((choice["text"], choice.get("finish_reason")))
        except Exception as exc:
            log.warning("llama.cpp generation %s failed: %s", request.request_id, exc)
            put(exc)
        finally:
            if gen is not None:
                gen.close()
            put(_DONE)

    async def abort(self, request_id: str) -> None:
        entry = self._active.get(request_id)
        if entry:
            entry[0].set()

    # --- reporting -----------------------------------------------------------------------
    def capacity(self) -> Capacity:
        n = len(self._all) or self.plan.instances
        in_use = sum(min(reserved, self._n_ctx) for _, reserved in self._active.values())
        return Capacity(kv_tokens_total=self._n_ctx * n, kv_tokens_in_use=in_use, max_context=self._n_ctx,
                        slots_total=n, slots_in_use=len(self._active))

    def health(self) -> Health:
        return self._state.health({"model": self.model_name, "n_ctx": self._n_ctx,
                                   "n_gpu_layers": self.plan.n_gpu_layers})
