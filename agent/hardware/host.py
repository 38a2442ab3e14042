"""CPU and RAM of this host through psutil (and /proc/cpuinfo for the CPU's name)."""

from __future__ import annotations

import platform
import socket
from dataclasses import dataclass
from pathlib import Path

import psutil


@dataclass(frozen=True)
class HostReading:
    """CPU and memory as the OS reports them."""

    hostname: str
    cpu_model: str
    physical_cores: int
    logical_cores: int
    ram_total_bytes: int
    ram_available_bytes: int
    avx512: bool | None = None  # the CPU has AVX-512F (None: not known, e.g. a profile)


def _avx512(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool | None:
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return "avx512f" in line.split(":", 1)[1].split()
    except OSError:
        pass
    return None


def _cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def read_host() -> HostReading:
    """Read this machine. Physical cores fall back to logical where the OS cannot tell."""
    logical = psutil.cpu_count(logical=True) or 1
    mem = psutil.virtual_memory()
    return HostReading(
        hostname=socket.gethostname(),
        cpu_model=_cpu_model(),
        physical_cores=psutil.cpu_count(logical=False) or logical,
        logical_cores=logical,
        ram_total_bytes=mem.total,
        ram_available_bytes=mem.available,
        avx512=_avx512(),
    )
