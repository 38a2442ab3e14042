"""vLLM planning: enumerate (quantization, KV dtype, TP, PP) over the host's GPUs, keep the best.

Pure: no I/O, no clock. Quality comes first (bf16 → fp8 → AWQ); within the first quantization
that fits, the layout with the most KV tokens wins (TP over PP when they are within 10 % and the
GPUs have P2P or NVLink, PP over TP when they do not: TP's all-reduce crosses PCIe twice a layer).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from agent.catalog.types import ModelSpec, WeightSource
from agent.errors import PlanError
from agent.hardware.types import HostInfo
from agent.planner import kvcache, weights
from agent.planner.budget import budgets, gib
from agent.planner.learned import Measured, MeasuredKey, model_fingerprint
from agent.planner.profile import CUDA_GRAPH_BYTES, Profile, profile
from agent.planner.types import GpuBudget, Pins, VllmPlan
from agent.planner.versions import VllmRules
from agent.planner.vllm_layouts import FP8_MIN_CC, Layout, check_pins, layouts, quantizations, source_for
from agent.planner.vllm_reasons import label, reasons
from agent.settings import PlannerSettings

# vLLM refuses gpu_memory_utilization >= 1; keep a hair below what free memory allows.
MAX_UTILIZATION = 0.98
# Sequence length assumed when sizing max_num_seqs from the KV cache: most requests are short.
TYPICAL_SEQUENCE_TOKENS = 1024
# Layouts within this share of the best KV capacity count as equally good.
NEAR_BEST = 0.90


@dataclass(frozen=True)
class _Ctx:
    model: ModelSpec
    s: PlannerSettings
    pins: Pins
    gpus: tuple[GpuBudget, ...]
    p2p: bool  # every pair of GPUs has P2P or NVLink
    batched_tokens: int  # max_num_batched_tokens in force
    rules: VllmRules
    min_cc: tuple[int, int]
    gpu_name: str
    measured: Mapping[str, Measured]


def graphs_outside_budget(ctx: _Ctx) -> int:
    """CUDA-graph bytes vLLM takes beyond the requested memory: before 0.20 it captures graphs
    after sizing the KV cache, from the (1 - utilization) share (gpu_model_runner.capture_model)."""
    return 0 if ctx.rules.graphs_in_kv_budget else CUDA_GRAPH_BYTES


def _utilization(ctx: _Ctx, devices: Sequence[int]) -> float:
    """One fraction for every rank (vLLM takes one number): what the tightest GPU allows, less
    what CUDA graphs take outside the budget."""
    if ctx.pins.gpu_memory_utilization is not None:
        return ctx.pins.gpu_memory_utilization
    outside = graphs_outside_budget(ctx)
    frac = min((ctx.gpus[d].usable_bytes - outside) / ctx.gpus[d].total_bytes for d in devices)
    return max(0.0, min(MAX_UTILIZATION, math.floor(frac * 100) / 100))


def utilization_problem(ctx: _Ctx, devices: Sequence[int], util: float) -> str | None:
    """Why a (pinned) utilization cannot start, by the rules a chosen one follows: vLLM refuses to
    start when free memory < utilization x total (vllm/v1/worker/gpu_worker.py init_device), and
    the planner keeps its margins (and, before 0.20, the CUDA graphs) free beside it."""
    outside = graphs_outside_budget(ctx)
    for d in devices:
        g = ctx.gpus[d]
        requested = int(g.total_bytes * util)
        allowed = max(0.0, math.floor((g.usable_bytes - outside) / g.total_bytes * 100) / 100)
        graphs = f" + {gib(outside)} GiB of CUDA graphs outside it" if outside else ""
        if requested > g.free_bytes:
            return (f"gpu_memory_utilization {util:.2f} asks {gib(requested)} GiB of GPU {g.index} ({g.name}) but only "
                    f"{gib(g.free_bytes)} GiB are free: vLLM refuses to start (free memory < utilization x total); "
                    f"at most {allowed:.2f} fits with the margins")
        if requested + outside > g.usable_bytes:
            return (f"gpu_memory_utilization {util:.2f} asks {gib(requested)} GiB{graphs} of GPU {g.index} ({g.name}), "
                    f"more than the {gib(g.usable_bytes)} GiB usable after the margins; at most {allowed:.2f} fits")
    return None


@dataclass(frozen=True)
class _Rank:
    budget: GpuBudget
    kinds: tuple[str, ...]
    prof: Profile
    fit: kvcache.KvFit


def _kinds_by_stage(ctx: _Ctx, split: Sequence[int]) -> list[tuple[str, ...]]:
    kinds, out, start = ctx.model.arch.kinds(), [], 0
    for n in split:
        out.append(kinds[start:start + n])
        start += n
    return out


def _key(ctx: _Ctx, q: str, lay: Layout, max_len: int) -> MeasuredKey:
    return MeasuredKey(model=model_fingerprint(ctx.model), quantization=q, tp=lay.tp, pp=lay.pp, gpu=ctx.gpu_name,
                       vllm_version=ctx.rules.label, max_model_len=max_len, max_num_batched_tokens=ctx.batched_tokens)


def _layer_costs(ctx: _Ctx, q: str, kv_bytes: float, tp: int, source: WeightSource | None) -> tuple[int, int]:
    """(weights, KV bytes per token) of an average decoder layer on one rank, for the PP split."""
    arch = ctx.model.arch
    w = _rank_weights(ctx, q, tp, 1, False, False, source) - weights.rope_cache_bytes(arch)
    attn = sum(k != kvcache.LINEAR for k in arch.kinds()) / max(1, arch.num_layers)
    return w, math.ceil(kvcache.layer_token_bytes(arch, tp, kv_bytes) * attn)


def _rank_weights(ctx: _Ctx, q: str, tp: int, layers: int, first: bool, last: bool, source: WeightSource | None) -> int:
    return weights.vllm_rank_weights(ctx.model.arch, q, tp, layers, first, last, source, ctx.min_cc,
                                     ctx.rules.mxfp4_triton_on_hopper)


def _partition(ctx: _Ctx, q: str, kv_bytes: float, lay: Layout, requested: list[int], seqs: int, want: int,
               source: WeightSource | None) -> tuple[int, ...] | None:
    """Decoder layers per pipeline stage that maximize the smallest stage's KV tokens."""
    arch = ctx.model.arch
    if lay.pp == 1:
        return (arch.num_layers,)
    stage_room = []
    for stage in range(lay.pp):
        first, last = stage == 0, stage == lay.pp - 1
        fixed = (_rank_weights(ctx, q, lay.tp, 0, first, last, source) + weights.rope_cache_bytes(arch)
                 + _profile(ctx, lay, last, seqs, want, q).in_budget_bytes)
        stage_room.append(min(requested[stage * lay.tp + r] for r in range(lay.tp)) - fixed)
    w, k = _layer_costs(ctx, q, kv_bytes, lay.tp, source)

    def layers_at(tokens: int) -> list[int]:
        return [max(0, int(room // (w + tokens * k))) for room in stage_room]

    if sum(layers_at(kvcache.BLOCK_SIZE)) < arch.num_layers:
        return None
    lo, hi = kvcache.BLOCK_SIZE, 1 << 24
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


def sampler_path(ctx: _Ctx, q: str) -> str:
    """How this release's profile warms the sampler up for this model (profile.SAMPLER_BYTES_PER_LOGIT)."""
    arch = ctx.model.arch
    if ctx.rules.v2_runner(arch.architecture, q != "none", bool(arch.num_experts)):
        return "v2"
    return ctx.rules.sampler_for(ctx.min_cc)


def _profile(ctx: _Ctx, lay: Layout, last: bool, seqs: int, want: int, q: str) -> Profile:
    chunked = False if ctx.pins.enable_chunked_prefill is False else None
    return profile(ctx.model.arch, ctx.rules, lay.tp, lay.pp, last, ctx.batched_tokens, seqs, want, chunked,
                   sampler=sampler_path(ctx, q))


def _size(ctx: _Ctx, q: str, kv_bytes: float, lay: Layout, requested: list[int], seqs: int, want: int,
          source: WeightSource | None, measured: Measured | None) -> tuple[tuple[int, ...], list[_Rank]] | None:
    """Per-rank memory at ``seqs`` sequences and a max_model_len of ``want``; None if no split fits."""
    split = _partition(ctx, q, kv_bytes, lay, requested, seqs, want, source)
    if split is None:
        return None
    arch, gpus = ctx.model.arch, [ctx.gpus[d] for d in lay.devices]
    stage_kinds = _kinds_by_stage(ctx, split)
    ranks = []
    for rank, g in enumerate(gpus):
        stage = rank // lay.tp
        first, last = stage == 0, stage == lay.pp - 1
        w = _rank_weights(ctx, q, lay.tp, split[stage], first, last, source)
        prof = _profile(ctx, lay, last, seqs, want, q)
        if measured is not None:  # what vLLM measured on this host for this very key
            kv = requested[rank] - measured.non_kv_bytes
            w = measured.weights_bytes if measured.weights_bytes is not None else w
        else:
            kv = requested[rank] - w - prof.in_budget_bytes
        fit = kvcache.kv_fit(arch, stage_kinds[stage], lay.tp, kv_bytes, kv, want, prof.batched_tokens,
                             ctx.rules.hybrid_kv_manager)
        overhead = prof.non_torch_bytes + (prof.graph_bytes if prof.graphs_in_budget else 0)
        budget = dataclasses.replace(g, requested_bytes=requested[rank], weights_bytes=w, kv_bytes=max(kv, 0),
                                     activation_bytes=prof.activation_bytes, overhead_bytes=overhead,
                                     layers=split[stage])
        ranks.append(_Rank(budget, stage_kinds[stage], prof, fit))
    return split, ranks


def _max_len(ctx: _Ctx, kv_bytes: float, lay: Layout, ranks: list[_Rank], want: int) -> int:
    """The longest max_model_len up to ``want`` whose one request fits on every rank."""
    if all(r.fit.fits_max_len for r in ranks):
        return want
    arch = ctx.model.arch
    return min(kvcache.longest_fitting_len(arch, r.kinds, lay.tp, kv_bytes, r.budget.kv_bytes, want,
                                           r.prof.batched_tokens, ctx.rules.hybrid_kv_manager) for r in ranks)


def evaluate(ctx: _Ctx, q: str, kv_dtype: str, lay: Layout) -> VllmPlan:
    """The plan for one candidate: memory per GPU, KV tokens, and whether it fits."""
    arch, s = ctx.model.arch, ctx.s
    kv_bytes = 1 if kv_dtype == "fp8" else weights.DTYPE_BYTES.get(arch.dtype, 2)
    util = _utilization(ctx, lay.devices)
    gpus = [ctx.gpus[d] for d in lay.devices]
    requested = [int(g.total_bytes * util) for g in gpus]
    source = source_for(ctx.model, q)
    model_max = arch.max_position_embeddings
    want = min(ctx.pins.max_model_len or min(s.target_context, model_max), model_max)
    measured = ctx.measured.get(_key(ctx, q, lay, want).id())
    cap = ctx.pins.max_num_seqs or s.max_num_seqs
    chunked = ctx.pins.enable_chunked_prefill is not False
    mnbt = ctx.batched_tokens if chunked else max(want, ctx.batched_tokens)
    weights_total = weights.weights_total(arch, q, source)
    base = dict(
        tensor_parallel_size=lay.tp, pipeline_parallel_size=lay.pp, quantization=q, dtype=arch.dtype,
        kv_cache_dtype=kv_dtype, gpu_memory_utilization=util, max_num_batched_tokens=mnbt,
        kv_bytes_per_token=kvcache.kv_bytes_per_token(arch, arch.num_layers, 1, kv_bytes),
        weights_bytes=weights_total, devices=tuple(g.index for g in gpus),
        disable_p2p=lay.tp * lay.pp > 1 and not ctx.p2p, vllm_version=ctx.rules.label, chunked_prefill=chunked,
    )
    name = label(q, kv_dtype, lay.tp, lay.pp)
    seqs, sized = cap, None
    for _ in range(2):  # size at the cap, then again at the max_num_seqs that capacity gives
        sized = _size(ctx, q, kv_bytes, lay, requested, seqs, want, source, measured)
        if sized is None or ctx.pins.max_num_seqs:
            break
        tokens = min(r.fit.tokens for r in sized[1])
        seqs_next = max(1, min(cap, tokens // max(1, min(want, TYPICAL_SEQUENCE_TOKENS))))
        if seqs_next == seqs:
            break
        seqs = seqs_next
    if sized is None:
        usable = sum(g.usable_bytes for g in gpus)
        refusal = (f"{name}: weights {gib(weights_total)} GiB (+ activations and overhead) do not fit in "
                   f"{gib(usable)} GiB usable on {len(gpus)} GPU(s)")
        per = tuple(dataclasses.replace(g, requested_bytes=r) for g, r in zip(gpus, requested))
        return VllmPlan(fits=False, pp_layer_partition=None, max_model_len=0, max_num_seqs=0, kv_cache_tokens=0,
                        per_gpu=per, refusal=refusal, **base)
    split, ranks = sized
    max_len = _max_len(ctx, kv_bytes, lay, ranks, want)
    tokens = min(kvcache.kv_fit(arch, r.kinds, lay.tp, kv_bytes, r.budget.kv_bytes, max(max_len, 1),
                                r.prof.batched_tokens, ctx.rules.hybrid_kv_manager,
                                ctx.rules.kv_tokens_by_concurrency).tokens for r in ranks)
    per_gpu = [r.budget for r in ranks]
    starved = next((g for g in per_gpu if g.kv_bytes <= 0), None)
    floor_len = min(s.min_context, model_max)
    pinned_util = ctx.pins.gpu_memory_utilization is not None and utilization_problem(ctx, lay.devices, util)
    if pinned_util:
        refusal = f"{name}: {pinned_util}"
    elif starved is not None:
        refusal = (f"{name}: on GPU {starved.index} weights {gib(starved.weights_bytes)} GiB + activations "
                   f"{gib(starved.activation_bytes)} GiB + overhead {gib(starved.overhead_bytes)} GiB leave no KV "
                   f"cache within the {gib(starved.requested_bytes)} GiB vLLM may use")
    elif ctx.pins.max_model_len is not None and max_len < want:
        refusal = (f"{name}: --max-model-len {want} needs {gib(max(r.fit.needed_bytes for r in ranks))} GiB of KV "
                   f"cache per GPU for one request; the cache holds {max_len} tokens of context "
                   f"(vLLM refuses to start: 'To serve at least one request with the model's max seq len')")
    elif max_len < floor_len:
        refusal = (f"{name}: weights fit but leave KV for {max_len} tokens of context, under the {floor_len}-token "
                   f"minimum context")
    else:
        refusal = None
    uneven = split if lay.pp > 1 and len(set(split)) > 1 else None
    notes = (f"measured on this host on {measured.measured_at}",) if measured is not None else ()
    return VllmPlan(fits=refusal is None, pp_layer_partition=uneven, max_model_len=max(max_len, 0), max_num_seqs=seqs,
                    kv_cache_tokens=tokens, per_gpu=tuple(per_gpu), refusal=refusal, measured_notes=notes,
                    **{**base, "max_num_batched_tokens": max(mnbt, seqs)})


def default_batched_tokens(host: HostInfo, rules: VllmRules) -> int:
    """vLLM's own OpenAI-server default for these GPUs (get_batch_defaults, versions.py)."""
    g = min(host.gpus, key=lambda g: g.memory_total_bytes)
    return rules.batch_defaults(g.memory_total_bytes - g.memory_reserved_bytes, g.name)[0]


def _pick(cands: list[VllmPlan], p2p: bool) -> VllmPlan:
    best_tokens = max(c.kv_cache_tokens for c in cands)
    near = [c for c in cands if c.kv_cache_tokens >= NEAR_BEST * best_tokens]
    if p2p:  # TP first: lower latency when GPUs talk directly
        key = lambda c: (c.pipeline_parallel_size, -c.kv_cache_tokens)  # noqa: E731
    else:  # PP first: one activation hand-off per stage instead of two all-reduces per layer
        key = lambda c: (c.tensor_parallel_size, -c.kv_cache_tokens)  # noqa: E731
    return min(near, key=key)


class QuantizationUnavailable(PlanError):
    """A pinned quantization no checkpoint of the model provides."""


def _as_available(pinned: str, model: ModelSpec, quants: list[str]) -> str:
    """``--quantization awq`` (or gptq) with no checkpoint in that format, but a 4-bit weight-only
    one in compressed-tensors form (what llm-compressor, and so `node-agent quantize`, writes):
    that checkpoint is the pinned method as vLLM loads it."""
    if pinned in ("awq", "gptq") and pinned not in quants and "compressed-tensors" in quants:
        src = source_for(model, "compressed-tensors")
        if src is not None and src.quant_type == "w4a16":
            return "compressed-tensors"
    return pinned


def plan_vllm(host: HostInfo, model: ModelSpec, s: PlannerSettings, pins: Pins, reserve_fallback: bool,
              rules: VllmRules, measured: Mapping[str, Measured] | None = None, *,
              gpus: Sequence[GpuBudget] | None = None, lays: Sequence[Layout] | None = None,
              ) -> tuple[VllmPlan | None, list[VllmPlan], list[str], list[str]]:
    """(chosen plan or None, alternatives worth showing, reasons, refusals).

    ``gpus`` and ``lays`` replace this host's budgets and layouts: the cross-host planner
    (agent/planner/cluster.py) plans one group of hosts as one set of GPUs with the layouts
    vLLM's multi-node executor can run on them.
    """
    if not host.gpus:
        return None, [], [], [f"vLLM needs a GPU and this host has none ({host.gpu_reason})"]
    if model.arch.unmodelled:
        raise PlanError(f"{model.name}: the memory model has no formula for {model.arch.unmodelled}, so vLLM is "
                        f"not planned for it (a wrong formula would plan a start that fails); use --engine llamacpp "
                        f"with a GGUF")
    check_pins(model, host, pins)
    gpus = tuple(budgets(host, s, reserve_fallback)) if gpus is None else tuple(gpus)
    min_cc = min(g.compute_capability for g in host.gpus)
    quants, why_not = quantizations(model, min_cc)
    if pins.quantization is not None:
        pins = dataclasses.replace(pins, quantization=_as_available(pins.quantization, model, quants))
        if pins.quantization not in quants and not (pins.quantization == "fp8" and "none" in quants):
            raise QuantizationUnavailable(f"--quantization {pins.quantization} is not available for {model.name}; "
                            f"available: {', '.join(quants) or 'none'}")
        quants, why_not = [pins.quantization], []
    kv_dtypes = [pins.kv_cache_dtype] if pins.kv_cache_dtype else (
        ["auto", "fp8"] if min_cc >= FP8_MIN_CC else ["auto"])
    p2p = all(l.p2p or l.nvlink for l in host.links)
    smallest = min(host.gpus, key=lambda g: g.memory_total_bytes)
    ctx = _Ctx(model, s, pins, gpus, p2p, s.max_num_batched_tokens or default_batched_tokens(host, rules), rules,
               min_cc, smallest.name, measured or {})
    lays = layouts(model, gpus, pins) if lays is None else list(lays)
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
            why = reasons(ctx, chosen, others, host, refusals)
            return dataclasses.replace(chosen, reasons=tuple(why)), others, why, refusals
    return None, [], [], refusals


def _weights_refusal(ctx: _Ctx, q: str) -> str | None:
    """The headline refusal when the weights alone exceed all usable VRAM."""
    weights_bytes = weights.weights_total(ctx.model.arch, q, source_for(ctx.model, q))
    usable = sum(g.usable_bytes for g in ctx.gpus)
    if weights_bytes <= usable:
        return None
    total = sum(g.total_bytes for g in ctx.gpus)
    qname = {"none": ctx.model.arch.dtype}.get(q, q)
    return (f"{qname}: weights {weights_bytes / 1e9:.1f} GB ({gib(weights_bytes)} GiB) exceed the {gib(usable)} GiB "
            f"usable of {gib(total)} GiB VRAM on {len(ctx.gpus)} GPU(s)")
