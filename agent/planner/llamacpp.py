"""llama.cpp planning: how many layers go to which GPU, the context, threads and KV types.

Pure. Each offloaded layer costs its GGUF tensor bytes plus its KV for n_ctx; each GPU that
holds layers also holds a compute buffer. What does not fit on GPUs runs on the CPU from RAM
(weights are mmapped, so they count against available RAM too).
"""

from __future__ import annotations

from dataclasses import replace

from agent.catalog.types import ModelSpec, WeightSource
from agent.errors import PlanError
from agent.hardware.types import HostInfo, MIB
from agent.planner import memory as mem
from agent.planner.budget import budgets, gib, margin_reason
from agent.planner.types import GpuBudget, LlamaCppPlan, Pins
from agent.settings import PlannerSettings

N_BATCH = 512


def gguf_source(model: ModelSpec, pins: Pins) -> WeightSource | None:
    """The GGUF to run: the pinned quant type, else the model's first GGUF."""
    ggufs = [s for s in model.sources if s.format == "gguf"]
    if pins.quantization and pins.quantization.startswith("gguf:"):
        want = pins.quantization.split(":", 1)[1].upper()
        match = next((s for s in ggufs if (s.quant_type or "").upper() == want), None)
        if match is None:
            have = ", ".join(s.quant_type or "?" for s in ggufs) or "none"
            raise PlanError(f"--quantization gguf:{want}: no such GGUF for {model.name}; known: {have}")
        return match
    return ggufs[0] if ggufs else None


def _refusal(model: ModelSpec, reason: str, host: HostInfo, source: WeightSource | None = None) -> LlamaCppPlan:
    return LlamaCppPlan(
        fits=False, gguf_file=source.file if source else None, gguf_repo=source.repo if source else None,
        quant_type=source.quant_type if source else None, n_gpu_layers=0, tensor_split=None, main_gpu=0,
        n_ctx=0, n_threads=host.cpu_physical_cores, n_batch=N_BATCH, flash_attn=True, type_k="f16", type_v="f16",
        instances=1, layers_on_gpu=0, total_layers=model.arch.num_layers, weights_bytes=0, kv_bytes=0,
        ram_bytes=0, per_gpu=(), refusal=reason)


def _offload(layout: mem.GgufLayout, per_token_layer: int, n_ctx: int, compute: int,
             gpus: list[GpuBudget]) -> tuple[list[int], bool]:
    """Layers each GPU takes (in order) and whether the output head fits too."""
    left = len(layout.layer_bytes)
    counts, spare = [], []
    i = 0
    for g in gpus:
        room = g.usable_bytes - compute
        n = 0
        while left and room >= layout.layer_bytes[i] + per_token_layer * n_ctx:
            room -= layout.layer_bytes[i] + per_token_layer * n_ctx
            n, i, left = n + 1, i + 1, left - 1
        counts.append(n)
        spare.append(room)
    # The output head and final norm go to the GPU when every layer is there (n_gpu_layers = -1).
    # Token embeddings stay in host memory in llama.cpp either way.
    head = layout.non_layer_bytes // 2
    return counts, left == 0 and max(spare, default=0) >= head


def plan_llamacpp(host: HostInfo, model: ModelSpec, s: PlannerSettings, pins: Pins,
                  role: str) -> LlamaCppPlan:
    """role "primary": use all usable VRAM; "fallback": only what settings reserve for it."""
    arch = model.arch
    source = gguf_source(model, pins)
    if source is None:
        return _refusal(model, f"no GGUF is known for {model.name}: add a gguf source to its card, "
                               f"or pass a .gguf file with --model", host)
    layout = mem.gguf_layout(arch, source)
    gpus = budgets(host, s, reserve_fallback=False)
    if role == "fallback":
        gpus = [replace(g, usable_bytes=min(g.usable_bytes, s.fallback_reserve_mib * MIB)) for g in gpus]
    gpus = [g for g in gpus if g.usable_bytes > 0]
    reasons: list[str] = []
    if role == "primary":
        reasons += [margin_reason(g, s, reserve_fallback=False) for g in host.gpus]
    elif host.gpus:
        reasons.append(f"fallback: {s.fallback_reserve_mib} MiB per GPU reserved beside vLLM"
                       + ("" if s.fallback_reserve_mib else " (planner.fallback_reserve_mib), so it runs on the CPU"))
    ram_free = host.ram_available_bytes - s.ram_margin_mib * MIB
    model_max = arch.max_position_embeddings
    n_ctx = min(pins.max_model_len or s.target_context, model_max)
    floor_ctx = min(s.min_context, model_max)
    for kv_type in ("f16", "q8_0"):
        ctx = n_ctx
        while ctx >= floor_ctx:
            plan = _try(host, model, source, layout, gpus, ctx, kv_type, ram_free)
            if plan is not None:
                if ctx < n_ctx:
                    reasons.append(f"n_ctx lowered from {n_ctx} to {ctx} so weights + KV fit in memory")
                if kv_type != "f16":
                    reasons.append("KV cache quantized to q8_0 (needs flash attention) to fit")
                return replace(plan, reasons=tuple(reasons + list(plan.reasons)))
            if pins.max_model_len:
                break
            ctx //= 2
    need = layout.total + mem.llamacpp_kv_bytes_per_token_layer(arch, "q8_0") * arch.num_layers * floor_ctx
    room = ram_free + sum(g.usable_bytes for g in gpus)
    return _refusal(model, f"llama.cpp: {source.quant_type} weights {gib(layout.total)} GiB + KV for "
                           f"{floor_ctx} tokens need {gib(need)} GiB; VRAM + RAM usable is {gib(room)} GiB. "
                           f"Try a smaller GGUF quantization, a shorter context, or more RAM/VRAM", host, source)


def _try(host: HostInfo, model: ModelSpec, source: WeightSource, layout: mem.GgufLayout,
         gpus: list[GpuBudget], n_ctx: int, kv_type: str, ram_free: int) -> LlamaCppPlan | None:
    arch = model.arch
    per_tok = mem.llamacpp_kv_bytes_per_token_layer(arch, kv_type)
    compute = mem.llamacpp_compute_bytes(arch, n_ctx, flash_attn=True)
    counts, head_on_gpu = _offload(layout, per_tok, n_ctx, compute, gpus)
    on_gpu = sum(counts)
    cpu_layers = arch.num_layers - on_gpu
    cpu_weight = sum(layout.layer_bytes[on_gpu:]) + (layout.non_layer_bytes // 2 if head_on_gpu else layout.non_layer_bytes)
    ram = cpu_weight + cpu_layers * per_tok * n_ctx + compute
    if ram > ram_free:
        return None
    used = [g for g, n in zip(gpus, counts) if n]
    per_gpu, start = [], 0
    for g, n in zip(gpus, counts):
        if not n:
            continue
        w = sum(layout.layer_bytes[start:start + n])
        start += n
        per_gpu.append(replace(g, weights_bytes=w, kv_bytes=n * per_tok * n_ctx, overhead_bytes=compute, layers=n))
    total = sum(g.usable_bytes for g in used)
    split = tuple(round(g.usable_bytes / total, 3) for g in used) if len(used) > 1 else None
    n_gpu_layers = -1 if head_on_gpu else on_gpu
    where = ("all layers and the output head on GPU" if head_on_gpu else
             f"{on_gpu} of {arch.num_layers} layers on GPU, the rest on CPU" if on_gpu else "CPU only")
    exact = "from the GGUF's tensor table" if layout.exact else "estimated from the file size"
    reasons = [
        f"GGUF {source.quant_type}: {gib(layout.total)} GiB ({exact}), {layout.layer_bytes[0] // MIB} MiB per layer "
        f"+ {per_tok * n_ctx // MIB} MiB KV per layer at n_ctx {n_ctx}",
        f"n_gpu_layers {n_gpu_layers}: {where}",
        f"n_ctx {n_ctx}: target context capped by the model ({arch.max_position_embeddings}) and memory",
        f"n_threads {host.cpu_physical_cores}: one per physical core (hyper-threads slow llama.cpp down)",
        "flash attention on: smaller compute buffer, and required for a quantized V cache",
        f"host RAM needed {gib(ram)} GiB of {gib(ram_free)} GiB available after the margin",
        "one Llama instance: it serves one sequence at a time; concurrency comes from the queue in front",
    ]
    if split:
        reasons.insert(2, f"tensor_split {list(split)}: proportional to usable VRAM")
    return LlamaCppPlan(
        fits=True, gguf_file=source.file, gguf_repo=source.repo, quant_type=source.quant_type,
        n_gpu_layers=n_gpu_layers, tensor_split=split, main_gpu=used[0].index if used else 0, n_ctx=n_ctx,
        n_threads=host.cpu_physical_cores, n_batch=N_BATCH, flash_attn=True, type_k=kv_type, type_v=kv_type,
        instances=1, layers_on_gpu=on_gpu, total_layers=arch.num_layers, weights_bytes=layout.total,
        kv_bytes=arch.num_layers * per_tok * n_ctx, ram_bytes=ram, per_gpu=tuple(per_gpu), reasons=tuple(reasons))
