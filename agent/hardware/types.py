"""What detection sees: frozen, engine-neutral descriptions of the host and its GPUs.

Memory is in bytes everywhere below the CLI; profiles and tables speak MiB/GiB.
A value NVML cannot give on this device (NotSupported) is ``None``, never a guess.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MIB = 1024**2
GIB = 1024**3


@dataclass(frozen=True)
class GpuProcess:
    """A process holding memory on a GPU, as NVML lists it."""

    pid: int
    name: str
    used_bytes: int
    kind: str  # "compute" or "graphics"


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as CUDA will number it (PCI bus order, after CUDA_VISIBLE_DEVICES)."""

    index: int  # CUDA ordinal the engines will use
    nvml_index: int  # NVML's own ordinal (both follow PCI bus order)
    uuid: str
    name: str
    pci_bus_id: str
    memory_total_bytes: int
    memory_free_bytes: int
    memory_used_bytes: int
    memory_reserved_bytes: int  # driver/firmware reserve (NVML v2); 0 where only v1 exists
    compute_capability: tuple[int, int]
    power_limit_watts: float | None = None
    temperature_c: int | None = None
    utilization_gpu_pct: int | None = None
    utilization_memory_pct: int | None = None
    mig_enabled: bool | None = None  # None: the device does not support MIG
    display_active: bool | None = None  # drives a monitor: the planner keeps a larger margin
    pcie_generation: int | None = None
    pcie_width: int | None = None
    processes: tuple[GpuProcess, ...] = ()


@dataclass(frozen=True)
class GpuSample:
    """One GPU's live figures, read while serving (``NvmlSampler``); ``None``: not supported."""

    index: int  # CUDA ordinal
    uuid: str
    name: str
    memory_total_bytes: int
    memory_used_bytes: int
    memory_free_bytes: int
    utilization_gpu_pct: int | None
    temperature_c: int | None
    power_watts: float | None


@dataclass(frozen=True)
class GpuLink:
    """How two GPUs (CUDA indices ``a`` < ``b``) talk to each other."""

    a: int
    b: int
    p2p: bool  # CUDA peer-to-peer reads allowed (NCCL P2P / custom all-reduce need it)
    nvlink: bool  # at least one active NVLink between them
    nvlink_count: int
    topology: str  # PCIe common ancestor from NVML: internal|single|multiple|hostbridge|node|system


@dataclass(frozen=True)
class HostInfo:
    """The whole host: CPU, RAM, GPUs, links, and why there are no GPUs when there are none."""

    hostname: str
    cpu_model: str
    cpu_physical_cores: int
    cpu_logical_cores: int
    ram_total_bytes: int
    ram_available_bytes: int
    gpus: tuple[GpuInfo, ...] = ()
    links: tuple[GpuLink, ...] = ()
    driver_version: str | None = None
    cuda_driver_version: str | None = None  # e.g. "12.8"
    nvml_version: str | None = None
    gpu_reason: str | None = None  # set when gpus is empty: "NVML library not found", ...
    hidden_gpus: int = 0  # devices NVML sees that CUDA_VISIBLE_DEVICES hides
    source: str = "nvml"  # "nvml" or "profile:<name>"; informative only, never branched on
    notes: tuple[str, ...] = field(default=())
    # AVX-512F on the CPU (None: not known, as for a profile). vLLM's CPU build has its W4A16
    # kernel (cpu_gemm_wna16) only in its AVX-512 library, so W4A16 checkpoints need it there.
    cpu_avx512: bool | None = None

    def link(self, a: int, b: int) -> GpuLink | None:
        """The link between CUDA GPUs ``a`` and ``b`` (order does not matter)."""
        lo, hi = sorted((a, b))
        return next((l for l in self.links if l.a == lo and l.b == hi), None)
