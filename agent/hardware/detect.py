"""Detection: NVML + psutil (or a profile through the fake NVML) → one frozen HostInfo.

CUDA numbers GPUs in PCI bus order only when ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (the agent sets it
for the engines), and NVML numbers them in PCI bus order, so NVML index and CUDA index agree
before ``CUDA_VISIBLE_DEVICES`` is applied; after it, ``GpuInfo.index`` is the CUDA ordinal.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.hardware.host import HostReading, read_host
from agent.hardware.nvml import NvmlReading, read_gpus
from agent.hardware.profiles import Profile, load_profile
from agent.hardware.types import MIB, GpuInfo, HostInfo


def detect(profile: str | Path | Profile | None = None, env: Mapping[str, str] | None = None) -> HostInfo:
    """Describe this host, or the profiled host when ``profile`` is given."""
    env = os.environ if env is None else env
    if profile is None:
        nvml = _import_pynvml()
        host = read_host()
        source = "nvml"
    else:
        from agent.hardware.fake_nvml import FakeNvml

        prof = profile if isinstance(profile, Profile) else load_profile(profile)
        nvml, host, source = FakeNvml(prof), _profile_host(prof), f"profile:{prof.name}"
    reading = read_gpus(nvml) if nvml is not None else NvmlReading(
        (), (), None, None, None, "the nvidia-ml-py package is not installed (pip install nvidia-ml-py)")
    return build_host_info(host, reading, env.get("CUDA_VISIBLE_DEVICES"), source)


def _import_pynvml() -> Any:
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


def _profile_host(prof: Profile) -> HostReading:
    h = prof.host
    return HostReading(h.hostname, h.cpu_model, h.physical_cores, h.logical_cores,
                       h.ram_total_mib * MIB, h.ram_available_mib * MIB)


def visible_positions(gpus: tuple[GpuInfo, ...], cuda_visible: str | None) -> tuple[list[int], str | None]:
    """Which NVML positions CUDA will see, in CUDA order, and a note when the variable matters.

    Follows CUDA's rules: entries are indices or UUIDs (a unique prefix of ``GPU-...`` works);
    the list ends at the first entry that names no device; an empty value hides every GPU.
    """
    if cuda_visible is None:
        return list(range(len(gpus))), None
    chosen: list[int] = []
    stopped_at = None
    for raw in cuda_visible.split(","):
        token = raw.strip()
        pos = _resolve_token(gpus, token)
        if pos is None or pos in chosen:
            stopped_at = token
            break
        chosen.append(pos)
    note = f"CUDA_VISIBLE_DEVICES={cuda_visible!r} shows {len(chosen)} of {len(gpus)} GPUs"
    if stopped_at is not None and stopped_at != "":
        note += f"; CUDA ignores everything from {stopped_at!r} on (no such device or repeated)"
    return chosen, note


def _resolve_token(gpus: tuple[GpuInfo, ...], token: str) -> int | None:
    if token.isdigit():
        i = int(token)
        return i if i < len(gpus) else None
    if token.upper().startswith("GPU-"):
        matches = [i for i, g in enumerate(gpus) if g.uuid.lower().startswith(token.lower())]
        return matches[0] if len(matches) == 1 else None
    return None


def build_host_info(host: HostReading, reading: NvmlReading, cuda_visible: str | None, source: str) -> HostInfo:
    """Combine the readings; renumber GPUs the way CUDA will and keep only visible pairs."""
    positions, note = visible_positions(reading.gpus, cuda_visible)
    new_index = {reading.gpus[pos].index: cuda for cuda, pos in enumerate(positions)}
    gpus = tuple(dataclasses.replace(reading.gpus[pos], index=cuda) for cuda, pos in enumerate(positions))
    links = []
    for link in reading.links:
        if link.a in new_index and link.b in new_index:
            a, b = sorted((new_index[link.a], new_index[link.b]))
            links.append(dataclasses.replace(link, a=a, b=b))
    reason = reading.reason
    if reason is None and not gpus:
        reason = f"CUDA_VISIBLE_DEVICES={cuda_visible!r} hides every GPU"
    notes = reading.notes + ((note,) if note else ())
    return HostInfo(
        hostname=host.hostname,
        cpu_model=host.cpu_model,
        cpu_physical_cores=host.physical_cores,
        cpu_logical_cores=host.logical_cores,
        ram_total_bytes=host.ram_total_bytes,
        ram_available_bytes=host.ram_available_bytes,
        cpu_avx512=host.avx512,
        gpus=gpus,
        links=tuple(sorted(links, key=lambda l: (l.a, l.b))),
        driver_version=reading.driver_version,
        cuda_driver_version=reading.cuda_driver_version,
        nvml_version=reading.nvml_version,
        gpu_reason=reason,
        hidden_gpus=len(reading.gpus) - len(gpus),
        source=source,
        notes=notes,
    )
