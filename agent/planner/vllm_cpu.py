"""vLLM's CPU build: the KV cache is a fixed VLLM_CPU_KVCACHE_SPACE of RAM."""

from __future__ import annotations

from collections.abc import Mapping

from agent.catalog.types import ModelSpec, WeightSource
from agent.hardware.types import HostInfo
from agent.planner import kvcache, weights
from agent.planner.budget import gib
from agent.planner.learned import Measured, MeasuredKey, model_fingerprint
from agent.planner.types import Pins, VllmPlan
from agent.planner.vllm_layouts import PREQUANTIZED, source_for
from agent.planner.vllm_reasons import TYPICAL_SEQUENCE_TOKENS
from agent.settings import PlannerSettings

GIB = 1024**3
MIB = 1024**2


# vLLM's CPU build allocates KV in blocks of 128 tokens (logged by vllm-cpu 0.32).
CPU_BLOCK_SIZE = 128


def cpu_quantization(model: ModelSpec) -> str:
    """What the CPU build loads: a pre-quantized checkpoint as it is (compressed-tensors W4A16
    runs on its CPUWNA16 kernel), else the 16-bit weights."""
    first = model.sources[0] if model.sources else None
    return PREQUANTIZED.get(first.format, "none") if first is not None and model.origin == "hf-config" else "none"


def cpu_key(model: ModelSpec, vllm_version: str, max_model_len: int, batched_tokens: int) -> MeasuredKey:
    """The learned-store key of a CPU-build start."""
    return MeasuredKey(model=model_fingerprint(model), quantization=cpu_quantization(model), tp=1, pp=1, gpu="cpu",
                       vllm_version=vllm_version, max_model_len=max_model_len, max_num_batched_tokens=batched_tokens)


def plan_vllm_cpu(host: HostInfo, model: ModelSpec, s: PlannerSettings, kvcache_gib: int, pins: Pins,
                  vllm_version: str = "", measured: Mapping[str, Measured] | None = None,
                  source: WeightSource | None = None) -> VllmPlan:
    """vLLM's CPU build on a GPU-less host: the KV cache is a fixed VLLM_CPU_KVCACHE_SPACE in RAM.
    A measurement of this very start (same model, version, context, KV space) gives the capacity
    vLLM reported instead of the formula. ``source``: plan this checkpoint instead of the model's
    own (a variant the agent would quantize, agent/planner/quantize_option.py)."""
    arch = model.arch
    kv_per_token = kvcache.kv_bytes_per_token(arch, arch.num_layers, 1, weights.DTYPE_BYTES.get(arch.dtype, 2))
    budget = kvcache_gib * GIB
    tokens = (budget // kv_per_token) // CPU_BLOCK_SIZE * CPU_BLOCK_SIZE
    want = min(pins.max_model_len or s.target_context, arch.max_position_embeddings)
    batched = max(want, 2048)
    found = (measured or {}).get(cpu_key(model, vllm_version, want, batched).id())
    notes: tuple[str, ...] = ()
    if found is not None and found.requested_bytes == budget:
        tokens = found.kv_tokens
        notes = (f"measured on this host on {found.measured_at}",)
    quantization = PREQUANTIZED[source.format] if source is not None else cpu_quantization(model)
    source = source or (source_for(model, quantization) if quantization != "none" else None)
    weights_bytes = weights.weights_total(arch, quantization, source)
    max_len = min(want, tokens)
    seqs = pins.max_num_seqs or max(1, min(s.max_num_seqs, tokens // max(1, min(max_len, TYPICAL_SEQUENCE_TOKENS))))
    ram_free = host.ram_available_bytes - s.ram_margin_mib * MIB
    refusal = None
    low_bit = source is not None and (source.bits or 8) < 8
    if low_bit and host.cpu_avx512 is False:
        refusal = (f"vLLM on CPU: this {_describe(source)} checkpoint needs vLLM's W4A16 CPU kernel "
                   f"(cpu_gemm_wna16), which its CPU build has only for AVX-512 CPUs; this CPU ({host.cpu_model}) has "
                   "no AVX-512: serve the bf16 checkpoint, or a GGUF with llama.cpp")
    elif weights_bytes + budget > ram_free:
        refusal = (f"vLLM on CPU: weights {gib(weights_bytes)} GiB + KV cache {kvcache_gib} GiB exceed the "
                   f"{gib(ram_free)} GiB of RAM available after the margin")
    elif pins.max_model_len and pins.max_model_len > tokens:
        refusal = (f"vLLM on CPU: --max-model-len {pins.max_model_len} needs {pins.max_model_len} KV tokens; "
                   f"{kvcache_gib} GiB holds {tokens} (raise engines.vllm_cpu_kvcache_gib)")
    how = notes[0] if notes else f"{kv_per_token // 1024} KiB per token"
    reasons = (
        f"vLLM CPU build: KV cache {kvcache_gib} GiB (engines.vllm_cpu_kvcache_gib) = {tokens:,} tokens, {how}",
        f"max_model_len {max_len}: target {s.target_context}, model {arch.max_position_embeddings}, KV {tokens}",
        f"max_num_seqs {seqs}, dtype {arch.dtype}, weights {gib(weights_bytes)} GiB in RAM"
        + (f" ({_describe(source)} checkpoint, loaded as it is)" if source is not None else ""),
    )
    return VllmPlan(
        fits=refusal is None, tensor_parallel_size=1, pipeline_parallel_size=1, pp_layer_partition=None,
        quantization=quantization, dtype=arch.dtype, kv_cache_dtype="auto", gpu_memory_utilization=0.9,
        max_model_len=max_len, max_num_seqs=seqs, max_num_batched_tokens=max(batched, seqs),
        kv_cache_tokens=tokens, kv_bytes_per_token=kv_per_token, weights_bytes=weights_bytes, devices=(),
        disable_p2p=False, per_gpu=(), reasons=reasons, refusal=refusal, vllm_version=vllm_version,
        measured_notes=notes)


def _describe(source) -> str:
    what = source.scheme or source.quant_type or source.format
    return f"{source.format} {what}" + (f", group {source.group_size}" if source.group_size else "")
