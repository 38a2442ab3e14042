"""Which vLLM layouts and checkpoint formats a model can be planned with: TP x PP over the GPUs,
the quantizations in quality order, and the pins vLLM would reject (agent/planner/vllm.py sizes them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from agent.catalog.types import ModelSpec, WeightSource
from agent.errors import PlanError
from agent.hardware.types import HostInfo
from agent.planner import weights
from agent.planner.types import GpuBudget, Pins

FP8_MIN_CC = (8, 9)  # W8A8 fp8 and fp8 KV cache: Ada Lovelace and Hopper and newer


@dataclass(frozen=True)
class Layout:
    """TP x PP over a set of devices, with the decoder layers each pipeline stage holds."""

    tp: int
    pp: int
    devices: tuple[int, ...]  # positions in the budget list, rank order (stage-major)


# Checkpoint formats vLLM loads as they are, with the name its ``quantization`` argument takes.
PREQUANTIZED = {"fp8": "fp8", "compressed-tensors": "compressed-tensors", "mxfp4": "mxfp4", "awq": "awq",
                "gptq": "gptq"}


def quantizations(model: ModelSpec, min_cc: tuple[int, int]) -> tuple[list[str], list[str]]:
    """Quantizations this model can run with on these GPUs, best quality first, and why others not."""
    why_not: list[str] = []
    prequantized = [PREQUANTIZED[s.format] for s in model.sources if s.format in PREQUANTIZED]
    has_full = model.source("hf") is not None or (model.origin == "card" and not model.sources)
    out: list[str] = []
    if has_full:
        out.append("none")
        if min_cc >= FP8_MIN_CC:
            out.append("fp8")
        else:
            why_not.append(f"fp8 skipped: compute capability {min_cc[0]}.{min_cc[1]} < 8.9 runs it weight-only "
                           f"(pin --quantization fp8 to plan it anyway)")
    for q in weights.VLLM_QUANTIZATIONS:
        if q in prequantized and q not in out:
            out.append(q)
    if not any(q in out for q in ("awq", "gptq", "compressed-tensors", "mxfp4")) and "fp8" not in prequantized:
        why_not.append(f"AWQ not offered: no AWQ checkpoint is known for {model.name} (add one to its card)")
    return out, why_not


def source_for(model: ModelSpec, quantization: str) -> WeightSource | None:
    """The checkpoint a quantization loads (None: the full-precision weights, quantized on load)."""
    return next((s for s in model.sources if PREQUANTIZED.get(s.format) == quantization), None)


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
