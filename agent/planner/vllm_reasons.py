"""The reasons of a vLLM plan: one line per decision with the numbers that drove it."""

from __future__ import annotations

from agent.hardware.types import HostInfo
from agent.planner.budget import gib, margin_reason
from agent.planner.types import VllmPlan
from agent.planner.versions import VllmRules

NEAR_BEST = 0.90
TYPICAL_SEQUENCE_TOKENS = 1024


def label(q: str, kv: str, tp: int, pp: int) -> str:
    """A candidate's short name: "bf16, fp8 KV TP=2 PP=1"."""
    qname = {"none": "bf16"}.get(q, q)
    kvname = "" if kv == "auto" else ", fp8 KV"
    return f"{qname}{kvname} TP={tp} PP={pp}"


def version_reason(rules: VllmRules, c: VllmPlan) -> str:
    """How the planned vLLM release profiles memory (versions.py)."""
    prefill = ("chunked prefill, so its profile runs max_num_batched_tokens" if c.chunked_prefill
               else "chunked prefill off, so its profile runs max_model_len tokens")
    graphs = ("CUDA-graph estimate taken from the KV budget" if rules.graphs_in_kv_budget
              else "CUDA graphs captured outside the requested memory (kept free beside it)")
    return f"{prefill}; {graphs}"


def reasons(ctx, c: VllmPlan, others: list[VllmPlan], host: HostInfo, refusals: list[str]) -> list[str]:
    """One line per decision of the chosen plan, with the numbers behind it."""
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
    r.append(f"vLLM {ctx.rules.label}: " + version_reason(ctx.rules, c))
    r.append(f"per rank: weights {gib(first.weights_bytes)} GiB, activation peak {gib(first.activation_bytes)} GiB "
             f"(max_num_batched_tokens {c.max_num_batched_tokens}, sampler warm-up of {c.max_num_seqs} sequences), "
             f"overhead {gib(first.overhead_bytes)} GiB, KV {gib(first.kv_bytes)} GiB")
    for note in c.measured_notes:
        r.append(f"non-KV memory (weights + activation + overhead) {note}; the KV cache follows from it")
    r.append(f"KV cache dtype {c.kv_cache_dtype}: {c.kv_bytes_per_token // 1024} KiB per token for the whole model")
    cap = "model limit" if c.max_model_len == c.kv_cache_tokens or c.max_model_len == ctx.model.arch.max_position_embeddings else "target"
    r.append(f"max_model_len {c.max_model_len}: {cap} (target {ctx.s.target_context}, model "
             f"{ctx.model.arch.max_position_embeddings}, KV {c.kv_cache_tokens})")
    r.append(f"max_num_seqs {c.max_num_seqs}: KV holds {c.kv_cache_tokens // TYPICAL_SEQUENCE_TOKENS} sequences of "
             f"{TYPICAL_SEQUENCE_TOKENS} tokens, capped at {ctx.pins.max_num_seqs or ctx.s.max_num_seqs}")
    if c.disable_p2p:
        r.append("no P2P between these GPUs: NCCL_P2P_DISABLE=1 and custom all-reduce off")
    return r


