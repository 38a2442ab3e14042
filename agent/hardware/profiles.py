"""Hardware profiles: a YAML description of a host exactly as detection would see it.

A profile feeds the fake NVML (``agent.hardware.fake_nvml``) and the host probe, so a profiled
host goes through the same detection code as a real one. Schema: docs/profiles.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agent.errors import ProfileError
from agent.files import read_mapping, shipped_dir, shipped_names

# Fields a device may refuse with NVMLError_NotSupported (GeForce: mig; some boards: power).
Unsupportable = Literal[
    "temperature", "power_limit", "utilization", "mig", "display", "pcie", "processes", "memory_v2"
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProfileProcess(_Strict):
    pid: int = Field(ge=1)
    name: str
    used_mib: int = Field(ge=0)
    kind: Literal["compute", "graphics"] = "compute"


class ProfilePcie(_Strict):
    generation: int = Field(ge=1, le=6)
    width: int = Field(ge=1, le=32)


class ProfileGpu(_Strict):
    name: str
    uuid: str = Field(pattern=r"^GPU-[0-9a-f-]{36}$")
    pci_bus_id: str = Field(pattern=r"^[0-9A-F]{8}:[0-9A-F]{2}:[0-9A-F]{2}\.[0-7]$")
    memory_total_mib: int = Field(gt=0, description="What NVML reports as total (e.g. 24564 for an RTX 4090).")
    memory_used_mib: int = Field(ge=0, description="Used as NVML v1 reports it (includes the reserve).")
    memory_reserved_mib: int = Field(0, ge=0, description="Driver reserve, reported separately by NVML v2.")
    compute_capability: tuple[int, int]
    power_limit_w: float = Field(gt=0)
    power_draw_w: float | None = Field(None, ge=0, description="Live draw; absent: NVML answers NotSupported.")
    temperature_c: int = Field(ge=0, le=120)
    utilization_gpu_pct: int = Field(0, ge=0, le=100)
    utilization_memory_pct: int = Field(0, ge=0, le=100)
    mig_enabled: bool = False
    display_active: bool = False
    pcie: ProfilePcie
    nvlink_count: int = Field(0, ge=0, le=18, description="NVLink links on this GPU (active).")
    processes: tuple[ProfileProcess, ...] = ()
    unsupported: tuple[Unsupportable, ...] = Field(
        (), description="Queries this device answers with NVMLError_NotSupported."
    )

    @model_validator(mode="after")
    def _memory_adds_up(self) -> ProfileGpu:
        if self.memory_used_mib > self.memory_total_mib:
            raise ValueError("memory_used_mib exceeds memory_total_mib")
        if self.memory_reserved_mib > self.memory_used_mib:
            raise ValueError("memory_reserved_mib is part of memory_used_mib and cannot exceed it")
        held = sum(p.used_mib for p in self.processes)
        if held > self.memory_used_mib - self.memory_reserved_mib:
            raise ValueError(f"processes hold {held} MiB, more than memory_used_mib minus the reserve")
        return self


class ProfileLink(_Strict):
    gpus: tuple[int, int] = Field(description="Positions in the gpus list (NVML order).")
    topology: Literal["internal", "single", "multiple", "hostbridge", "node", "system"]
    p2p: bool
    nvlinks: int = Field(0, ge=0, le=18, description="NVLink links joining the two GPUs.")


class ProfileHost(_Strict):
    hostname: str
    cpu_model: str
    physical_cores: int = Field(ge=1)
    logical_cores: int = Field(ge=1)
    ram_total_mib: int = Field(gt=0)
    ram_available_mib: int = Field(gt=0)


class ProfileDriver(_Strict):
    version: str
    cuda_version: str = Field(pattern=r"^\d+\.\d+$")
    nvml_version: str


class Profile(_Strict):
    """A whole host. ``nvml: absent`` simulates a host without the NVIDIA library."""

    name: str
    description: str
    host: ProfileHost
    nvml: Literal["present", "absent", "driver-not-loaded"] = "present"
    driver: ProfileDriver | None = None
    gpus: tuple[ProfileGpu, ...] = ()
    links: tuple[ProfileLink, ...] = ()

    @model_validator(mode="after")
    def _consistent(self) -> Profile:
        if self.gpus and self.driver is None:
            raise ValueError("a profile with GPUs needs a driver section")
        if self.nvml != "present" and self.gpus:
            raise ValueError(f"nvml: {self.nvml} cannot list GPUs")
        bus_ids = [g.pci_bus_id for g in self.gpus]
        if bus_ids != sorted(bus_ids):
            raise ValueError("list gpus in PCI bus order (NVML and CUDA both number them so)")
        n = len(self.gpus)
        pairs = {tuple(sorted(l.gpus)) for l in self.links}
        for a, b in pairs:
            if not (0 <= a < n and 0 <= b < n) or a == b:
                raise ValueError(f"link {a}-{b} names a GPU that is not in the list")
        missing = [(a, b) for a in range(n) for b in range(a + 1, n) if (a, b) not in pairs]
        if missing:
            raise ValueError(f"links must describe every GPU pair; missing {missing}")
        for i, gpu in enumerate(self.gpus):
            joined = sum(l.nvlinks for l in self.links if i in l.gpus)
            if joined > gpu.nvlink_count:
                raise ValueError(f"gpus[{i}] has {gpu.nvlink_count} NVLinks but its links use {joined}")
        if self.host.ram_available_mib > self.host.ram_total_mib:
            raise ValueError("host.ram_available_mib exceeds host.ram_total_mib")
        return self


def profiles_dir() -> Path:
    """The shipped profiles: ``profiles/`` in a checkout, ``agent/_data/profiles`` when installed."""
    return shipped_dir("profiles")


def available_profiles() -> list[str]:
    """Names of the shipped profiles, sorted."""
    return shipped_names("profiles")


def load_profile(ref: str | Path) -> Profile:
    """Load a profile by shipped name (``rtx4090``) or by path to a YAML file."""
    path = Path(ref)
    if not (path.suffix in (".yaml", ".yml") or path.exists()):
        path = profiles_dir() / f"{ref}.yaml"
        if not path.is_file():
            known = ", ".join(available_profiles()) or "none found"
            raise ProfileError(f"unknown profile {ref!r}; shipped profiles: {known}; or pass a path to a YAML file")
    data = read_mapping(path, "profile", ProfileError)
    try:
        return Profile.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ProfileError(f"profile {path}: {where}: {first['msg']}") from exc
