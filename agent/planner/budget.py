"""What each GPU can give an engine: free memory minus the margins the settings ask for."""

from __future__ import annotations

from agent.hardware.types import GIB, MIB, GpuInfo, HostInfo
from agent.planner.types import GpuBudget
from agent.settings import PlannerSettings


def usable_bytes(gpu: GpuInfo, s: PlannerSettings, reserve_fallback: bool) -> int:
    """Free memory an engine may take on this GPU (never below zero)."""
    margin = s.safety_margin_mib + (s.display_margin_mib if gpu.display_active else 0)
    if reserve_fallback:
        margin += s.fallback_reserve_mib
    return max(0, gpu.memory_free_bytes - margin * MIB)


def cuda_total_bytes(gpu: GpuInfo) -> int:
    """Total memory as CUDA (and so vLLM's gpu_memory_utilization) sees it: NVML's total less the
    driver reserve. vLLM logs 79.22 GiB for an H100 whose NVML total is 79.65 GiB (81559 MiB)."""
    return gpu.memory_total_bytes - gpu.memory_reserved_bytes


def budgets(host: HostInfo, s: PlannerSettings, reserve_fallback: bool) -> list[GpuBudget]:
    """One budget per visible GPU, in CUDA order."""
    return [GpuBudget(index=g.index, name=g.name, total_bytes=cuda_total_bytes(g),
                      free_bytes=g.memory_free_bytes, usable_bytes=usable_bytes(g, s, reserve_fallback))
            for g in host.gpus]


def margin_reason(gpu: GpuInfo, s: PlannerSettings, reserve_fallback: bool) -> str:
    """One line: how a GPU's usable memory was derived."""
    parts = [f"{s.safety_margin_mib} MiB safety margin"]
    if gpu.display_active:
        parts.append(f"{s.display_margin_mib} MiB because it drives a display")
    if reserve_fallback and s.fallback_reserve_mib:
        parts.append(f"{s.fallback_reserve_mib} MiB reserved for the llama.cpp fallback")
    held = sum(p.used_bytes for p in gpu.processes)
    others = f"; other processes hold {gib(held)} GiB" if held else ""
    return (f"GPU {gpu.index} ({gpu.name}): {gib(gpu.memory_free_bytes)} of {gib(gpu.memory_total_bytes)} GiB "
            f"free{others}; usable {gib(usable_bytes(gpu, s, reserve_fallback))} GiB after " + ", ".join(parts))


def gib(n: float) -> str:
    """Bytes as GiB with one decimal, for reasons."""
    return f"{n / GIB:.1f}"
