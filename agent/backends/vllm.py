"""vLLM in-process: ``AsyncLLM`` in the agent's event loop; its EngineCore is vLLM's child process.

Start-up (~15-60 s) and shutdown run on a thread of the backend's own so the loop keeps
answering health checks. A monitor task watches ``engine.errored``: a killed EngineCore is
noticed within one poll (0.1 s) and the backend moves to failed; in-flight streams end with
``BackendDied``. Environment for the engine (devices, P2P, layer split, CPU KV space) is set
while the engine spawns its processes, which inherit it. The HF fast tokenizer is not
thread-safe ("Already borrowed", huggingface/tokenizers#537): it runs on one thread of its own.

Output constraints go to vLLM's ``guidance`` structured-outputs backend as the request's Lark
grammar (``agent.constraints``). On the CPU build with Model Runner V2 a grammar kills the
EngineCore (vllm-project/vllm#51283): there ``features()`` says so and the router sends
constrained requests to llama.cpp instead. vLLM cannot resume a constrained answer after a
prefix (its matcher starts with the answer), so a constrained stream never fails over onto it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from agent.backends.base import (
    BackendDied,
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
from agent.backends.vllm_requests import engine_features, logprobs, sampling_params
from agent.backends.vllm_measured import read_measurements
from agent.planner.types import VllmPlan
from agent.tools import render

log = logging.getLogger(__name__)
MONITOR_INTERVAL_S = 0.1


def engine_environment(plan: VllmPlan, cpu_kvcache_gib: int, physical: Mapping[int, int] | None = None
                       ) -> dict[str, str]:
    """Variables the engine's processes must see (they read them at spawn).

    ``plan.devices`` are CUDA ordinals of this process (after the operator's
    CUDA_VISIBLE_DEVICES); the engine's processes get the physical (NVML, PCI bus order) indices
    behind them in ``physical``, so CUDA_VISIBLE_DEVICES=2,3 and a plan on ordinals 0,1 run on
    GPUs 2 and 3, not 0 and 1.
    """
    env = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "VLLM_CPU_KVCACHE_SPACE": str(cpu_kvcache_gib)}
    if plan.devices:
        ids = [(physical or {}).get(d, d) for d in plan.devices]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in ids)
    if plan.disable_p2p:
        env["NCCL_P2P_DISABLE"] = "1"
    if plan.pp_layer_partition:
        env["VLLM_PP_LAYER_PARTITION"] = ",".join(str(n) for n in plan.pp_layer_partition)
    return env


@contextlib.contextmanager
def spawn_environment(env: Mapping[str, str]) -> Iterator[None]:
    """``env`` in os.environ while the engine spawns its processes, the old values after.

    Set only for the spawn: llama.cpp runs in this process and must keep numbering the GPUs
    the operator made visible. The supervisor never runs two starts at once.
    """
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def engine_args(plan: VllmPlan, model_dir: Path) -> dict[str, Any]:
    """AsyncEngineArgs keyword arguments for the plan."""
    args: dict[str, Any] = dict(
        model=str(model_dir),
        tensor_parallel_size=max(1, plan.tensor_parallel_size),
        pipeline_parallel_size=max(1, plan.pipeline_parallel_size),
        dtype=plan.dtype,
        max_model_len=plan.max_model_len,
        max_num_seqs=plan.max_num_seqs,
        max_num_batched_tokens=plan.max_num_batched_tokens,
        gpu_memory_utilization=plan.gpu_memory_utilization,
        kv_cache_dtype=plan.kv_cache_dtype,
        disable_log_stats=True,
        enable_log_requests=False,
        # Constraints arrive as llguidance Lark grammars (agent.constraints); "auto" would try
        # xgrammar first, which does not read them.
        structured_outputs_config={"backend": "guidance"},
    )
    if plan.quantization != "none":
        args["quantization"] = plan.quantization
    if plan.disable_p2p:
        args["disable_custom_all_reduce"] = True
    if not plan.devices:  # the CPU build: no CUDA graphs to capture
        args["enforce_eager"] = True
    if not plan.chunked_prefill:
        args["enable_chunked_prefill"] = False
    return args


class VllmBackend:
    """Backend over vLLM's AsyncLLM, built from a vLLM plan."""

    name = "vllm"

    def __init__(self, plan: VllmPlan | None, model_dir: Path, model_name: str, cpu_kvcache_gib: int = 1,
                 physical_gpus: Mapping[int, int] | None = None, learn: Callable[[Any], None] | None = None) -> None:
        self.plan = plan
        self.learn = learn  # gets what vLLM measured after each start (agent/backends/vllm_measured.py)
        self.model_dir = Path(model_dir)
        self.model_name = model_name
        self.cpu_kvcache_gib = cpu_kvcache_gib
        self.physical_gpus = dict(physical_gpus or {})  # CUDA ordinal -> NVML index
        self._state = StateOwner(self.name)
        self._engine: Any = None
        self._tokenizer: Any = None
        self._monitor: asyncio.Task | None = None
        self._kv_tokens = 0
        self._block_size = 16  # vLLM's default until the engine says
        self._max_len = plan.max_model_len if plan is not None else 0  # None: planned at start (a cluster)
        self._max_token_bytes = 64
        self._features = Features(vocab="")
        self._active: dict[str, int] = {}  # request id -> reserved tokens
        self._aborting: dict[str, asyncio.Future] = {}
        self._lifecycle = Workers("vllm-life", 1)
        self._tok = Workers("vllm-tok", 1)  # one thread: the tokenizer is not thread-safe

    @property
    def state(self) -> BackendState:
        return self._state.state

    @property
    def engine_pid(self) -> int | None:
        """PID of vLLM's EngineCore process (tests kill it to prove failover)."""
        try:
            return self._engine.engine_core.resources.engine_manager.processes[0].pid
        except (AttributeError, IndexError):
            return None

    # --- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        self._state.move(BackendState.STARTING)
        await self._launch()

    async def _launch(self) -> None:
        """Build the engine from ``starting``: ends ``ready``, or ``failed`` with BackendStartError."""
        errors = _ErrorLog()
        try:
            with spawn_environment(self._environment()):
                self._engine = await self._lifecycle.run(self._build, errors.config_path)
            await self._engine_built(self._engine)
        except Exception as exc:
            # The EngineCore child logs its real reason; the agent only gets "initialization failed".
            reason = errors.last_exception() or f"{type(exc).__name__}: {exc}"
            self._state.move(BackendState.FAILED, error=reason)
            raise BackendStartError(self.name, reason) from exc
        finally:
            errors.close()
        cfg = self._engine.vllm_config
        self._block_size = int(cfg.cache_config.block_size)
        self._kv_tokens = int(cfg.cache_config.num_gpu_blocks or 0) * self._block_size
        self._max_len = int(cfg.model_config.max_model_len)
        self._tokenizer = self._engine.get_tokenizer()
        self._max_token_bytes = await self._tok.run(_longest_token_bytes, self._tokenizer)
        self._features = await self._tok.run(engine_features, self._engine, self._tokenizer)
        if self.learn is not None:
            self.learn(await read_measurements(self._engine))
        self._monitor = asyncio.create_task(self._watch(), name="vllm-monitor")
        self._state.move(BackendState.READY)
        log.info("vLLM ready: %s, KV cache %d tokens, max_model_len %d", self.model_name, self._kv_tokens, self._max_len)

    def _environment(self) -> dict[str, str]:
        """What the engine's processes inherit (a subclass adds to it: agent/backends/vllm_cluster.py)."""
        return engine_environment(self.plan, self.cpu_kvcache_gib, self.physical_gpus)

    def _engine_kwargs(self) -> dict[str, Any]:
        """AsyncEngineArgs for this start (a subclass adds to them)."""
        return engine_args(self.plan, self.model_dir)

    async def _engine_built(self, engine: Any) -> None:
        """Called once the engine is built, before it is read and marked ready; an exception fails
        the start. Nothing to do for one host."""

    def _build(self, logging_config_path: str) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        kwargs = self._engine_kwargs()
        try:  # vLLM >= 0.32 passes its logging config to the engine's processes itself
            from vllm.config.logging import LoggingConfig

            kwargs["logging_config"] = LoggingConfig(pylogging_config_file=logging_config_path)
        except ImportError:  # older releases read it from the environment at import
            os.environ["VLLM_LOGGING_CONFIG_PATH"] = logging_config_path
        return AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))

    async def _watch(self) -> None:
        """Notice a dead EngineCore while idle; in-flight streams see EngineDeadError themselves."""
        while self._engine is not None and not self._engine.errored:
            await asyncio.sleep(MONITOR_INTERVAL_S)
        if self._engine is not None and self._state.state in (BackendState.READY, BackendState.DEGRADED):
            self._state.move(BackendState.FAILED, error="vLLM EngineCore died")
            log.error("vLLM EngineCore (pid %s) died", self.engine_pid)
        if self._engine is not None and self._engine.errored:
            _reap_orphans()

    async def stop(self) -> None:
        engine, self._engine = self._engine, None
        if self._monitor is not None:
            self._monitor.cancel()
            self._monitor = None
        if engine is not None:
            await self._lifecycle.run(engine.shutdown)
        if self._state.state != BackendState.STOPPED:
            self._state.move(BackendState.STOPPED)

    # --- requests ------------------------------------------------------------------------
    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        with boundary(self.name, rendering=True):
            tok = self._tokenizer
            if request.messages is None:
                return tok.encode((request.prompt or "") + request.assistant_prefix)
            messages, tools = render.for_template(request.messages, request.tools, self._features.chat_template)
            text = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False,
                                           **dict(request.chat_template_kwargs))
            return tok.encode(text + request.assistant_prefix, add_special_tokens=False)

    async def prepare(self, request: GenerationRequest) -> Prepared:
        self._state.require_serving()
        refusal = self._features.refuses(request)
        if refusal:
            raise CannotServe(f"{self.name}: {refusal}")
        ids = await self._tok.run(self._prompt_ids, request)
        return Prepared(len(ids), ids, tuple(ids))

    async def count_prompt_tokens(self, request: GenerationRequest) -> int:
        return (await self.prepare(request)).prompt_tokens

    async def generate(self, request: GenerationRequest, prepared: Prepared | None = None) -> AsyncIterator[Delta]:
        from vllm.v1.engine.exceptions import EngineDeadError

        self._state.require_serving()
        ids = (prepared or await self.prepare(request)).data
        if len(ids) >= self._max_len:
            raise PromptTooLong(len(ids), self._max_len)
        params = sampling_params(request, min(request.max_tokens, self._max_len - len(ids)))
        rid = request.request_id
        self._active[rid] = len(ids) + params.max_tokens
        finished = False
        done = 0
        try:
            with boundary(self.name, dead=(EngineDeadError,)):
                async for out in self._engine.generate({"prompt_token_ids": ids}, params, rid):
                    c = out.outputs[0]
                    done += len(c.token_ids)
                    finished = out.finished
                    if finished or c.text:
                        yield Delta(c.text, (c.finish_reason or "stop") if finished else None, len(ids), done,
                                    logprobs(c, request.logprobs) if request.logprobs is not None else ())
        except BackendDied:
            if self._state.state in (BackendState.READY, BackendState.DEGRADED):
                self._state.move(BackendState.FAILED, error="vLLM EngineCore died")
            raise
        finally:
            self._active.pop(rid, None)
            if not finished and self._engine is not None and not self._engine.errored:
                # A task, not an await: a client that left cancels this generator, and under anyio
                # every await in a finally is cancelled too; the engine must still drop the request.
                task = self._aborting[rid] = asyncio.ensure_future(self._engine.abort(rid))
                task.add_done_callback(lambda _: self._aborting.pop(rid, None))

    async def abort(self, request_id: str) -> None:
        """Stop the request; returns once the engine was told."""
        pending = self._aborting.get(request_id)
        if pending is not None:
            await asyncio.gather(asyncio.shield(pending), return_exceptions=True)
        elif self._engine is not None and request_id in self._active and not self._engine.errored:
            await self._engine.abort(request_id)

    async def detokenize(self, token_ids: list[int]) -> str:
        self._state.require_serving()
        size = self._features.vocab_size
        bad = [t for t in token_ids if not 0 <= t < size]
        if bad:
            raise InvalidInput(f"token id {bad[0]} is outside this model's vocabulary (0-{size - 1})", param="tokens")
        return await self._tok.run(self._tokenizer.decode, token_ids)

    # --- reporting -----------------------------------------------------------------------
    def features(self) -> Features:
        return self._features

    def capacity(self) -> Capacity:
        in_use = sum(min(v, self._max_len) for v in self._active.values())
        return Capacity(kv_tokens_total=self._kv_tokens, kv_tokens_in_use=in_use, max_context=self._max_len,
                        slots_total=self.plan.max_num_seqs, slots_in_use=len(self._active),
                        max_token_bytes=self._max_token_bytes, kv_block_size=self._block_size)

    def health(self) -> Health:
        return self._state.health({"model": self.model_name, "engine_pid": self.engine_pid,
                                   "kv_cache_tokens": self._kv_tokens})


def _longest_token_bytes(tokenizer: Any) -> int:
    """UTF-8 bytes of the vocabulary's longest entry: an upper bound on the text one token
    covers (byte-level BPE spells each byte as one character, SentencePiece's space as one)."""
    return max((len(t.encode()) for t in tokenizer.get_vocab()), default=64)


def _reap_orphans() -> None:
    """Kill what is left of a dead engine: vLLM's worker processes outlive a killed EngineCore by
    seconds, spinning on the CPU the fallback now needs."""
    import psutil

    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if proc.name().startswith("VLLM::"):
                proc.kill()


class _ErrorLog:
    """vLLM's logging plus a file that collects ERROR records from every vLLM process.

    EngineCore runs in a child process: when it fails to start, the agent only sees
    "Engine core initialization failed". The child logs the real exception (e.g. "To serve at
    least one request with the model's max seq len ... KV cache is needed ...") with
    ``logger.exception``; a logging dictConfig that vLLM hands to each of its processes copies
    ERROR records into a file the agent reads back. The text is only shown to the operator,
    never branched on.
    """

    # The last line of a traceback, after the "ERROR <date> [file:line] " prefix vLLM's formatter
    # puts on every line of a multi-line record.
    _TRACEBACK_END = re.compile(r"(?:^|\] )([A-Za-z_][\w.]*(?:Error|Exception)): (.+)$")

    def __init__(self) -> None:
        fd, self.path = tempfile.mkstemp(prefix="node-agent-vllm-errors-", suffix=".log")
        os.close(fd)
        cfg_fd, self.config_path = tempfile.mkstemp(prefix="node-agent-vllm-logging-", suffix=".json")
        with os.fdopen(cfg_fd, "w") as f:
            json.dump(self._config(), f)

    def _config(self) -> dict:
        fmt = {"()": "vllm.logging_utils.NewLineFormatter", "format": "%(levelname)s %(asctime)s "
               "[%(filename)s:%(lineno)d] %(message)s", "datefmt": "%m-%d %H:%M:%S"}
        return {
            "version": 1, "disable_existing_loggers": False,
            "formatters": {"vllm": fmt},
            "handlers": {
                "console": {"class": "logging.StreamHandler", "formatter": "vllm", "stream": "ext://sys.stderr"},
                "errors": {"class": "logging.FileHandler", "formatter": "vllm", "level": "ERROR",
                           "filename": self.path},
            },
            "loggers": {"vllm": {"handlers": ["console", "errors"], "level": "INFO", "propagate": False}},
        }

    def last_exception(self) -> str | None:
        """The last "SomethingError: message" line a vLLM process logged, if any."""
        try:
            lines = Path(self.path).read_text(errors="replace").splitlines()
        except OSError:
            return None
        for line in reversed(lines):
            m = self._TRACEBACK_END.search(line.strip())
            if m:
                return f"{m.group(1).rsplit('.', 1)[-1]}: {m.group(2)}"
        return None

    def close(self) -> None:
        """Remove the files; the engine keeps the handler open, which is harmless once unlinked."""
        for path in (self.path, self.config_path):
            with contextlib.suppress(OSError):
                os.unlink(path)
