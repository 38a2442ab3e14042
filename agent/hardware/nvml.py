"""The one place that talks to NVML. Returns frozen descriptions; interprets nothing.

``read_gpus(nvml)`` takes the ``pynvml`` module (or ``FakeNvml``) so tests and profiles run
the same code as a real host. Every per-device query that the device refuses with
NotSupported becomes ``None``; a missing library or driver becomes a reason, never a crash.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from agent.hardware.types import GpuInfo, GpuLink, GpuProcess, GpuSample

log = logging.getLogger(__name__)

_TOPOLOGY_NAMES = {
    "NVML_TOPOLOGY_INTERNAL": "internal",
    "NVML_TOPOLOGY_SINGLE": "single",
    "NVML_TOPOLOGY_MULTIPLE": "multiple",
    "NVML_TOPOLOGY_HOSTBRIDGE": "hostbridge",
    "NVML_TOPOLOGY_NODE": "node",
    "NVML_TOPOLOGY_SYSTEM": "system",
}


@dataclass(frozen=True)
class NvmlReading:
    """Everything NVML said, in NVML's own device order (PCI bus order)."""

    gpus: tuple[GpuInfo, ...]
    links: tuple[GpuLink, ...]
    driver_version: str | None
    cuda_driver_version: str | None
    nvml_version: str | None
    reason: str | None  # why there are no GPUs
    notes: tuple[str, ...] = ()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _init_failure(nvml: Any, exc: Exception) -> str:
    if isinstance(exc, nvml.NVMLError_LibraryNotFound):
        return "NVML library not found (no NVIDIA driver installed)"
    if isinstance(exc, nvml.NVMLError_DriverNotLoaded):
        return "NVIDIA driver not loaded"
    if isinstance(exc, nvml.NVMLError_NoPermission):
        return "no permission to open the NVIDIA devices (is the user in the video/render group?)"
    return f"NVML failed to initialize: {exc}"


def read_gpus(nvml: Any) -> NvmlReading:
    """Initialize NVML, read every device and every pair, shut NVML down."""
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        return NvmlReading((), (), None, None, None, _init_failure(nvml, exc))
    try:
        return _read_initialized(nvml)
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError:  # pragma: no cover - shutdown failure changes nothing we report
            log.debug("nvmlShutdown failed", exc_info=True)


def _read_initialized(nvml: Any) -> NvmlReading:
    optional = _Optional(nvml)
    driver = optional(lambda: _text(nvml.nvmlSystemGetDriverVersion()))
    cuda_raw = optional(nvml.nvmlSystemGetCudaDriverVersion)
    cuda = f"{cuda_raw // 1000}.{cuda_raw % 1000 // 10}" if cuda_raw else None
    nvml_version = optional(lambda: _text(nvml.nvmlSystemGetNVMLVersion()))
    count = nvml.nvmlDeviceGetCount()
    if count == 0:
        return NvmlReading((), (), driver, cuda, nvml_version, "NVIDIA driver loaded but it reports no GPUs")
    gpus, handles, notes = [], [], []
    for i in range(count):
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            gpus.append(_read_device(nvml, optional, i, handle))
            handles.append(handle)
        except nvml.NVMLError as exc:
            notes.append(f"NVML device {i} is unreadable and left out: {exc}")
    links = tuple(
        _read_link(nvml, optional, gpus[a], handles[a], gpus[b], handles[b])
        for a in range(len(gpus)) for b in range(a + 1, len(gpus))
    )
    reason = None if gpus else "every GPU NVML lists is unreadable"
    return NvmlReading(tuple(gpus), links, driver, cuda, nvml_version, reason, tuple(notes))


class _Optional:
    """Call an NVML query; NotSupported (and friends) become None."""

    def __init__(self, nvml: Any) -> None:
        self._soft = (nvml.NVMLError_NotSupported, nvml.NVMLError_FunctionNotFound,
                      nvml.NVMLError_NoPermission)

    def __call__(self, fn, *args):
        try:
            return fn(*args)
        except self._soft:
            return None


def _read_memory(nvml: Any, handle: Any) -> tuple[int, int, int, int]:
    """(total, free, used, reserved) in bytes; v2 separates the driver reserve from ``used``."""
    try:
        m = nvml.nvmlDeviceGetMemoryInfo(handle, version=nvml.nvmlMemory_v2)
        return int(m.total), int(m.free), int(m.used), int(m.reserved)
    except (nvml.NVMLError, TypeError):  # old driver or old bindings: v1 only
        m = nvml.nvmlDeviceGetMemoryInfo(handle)
        return int(m.total), int(m.free), int(m.used), 0


def _read_processes(nvml: Any, optional: _Optional, handle: Any) -> tuple[GpuProcess, ...]:
    procs: dict[int, GpuProcess] = {}
    for kind, query in (("compute", nvml.nvmlDeviceGetComputeRunningProcesses),
                        ("graphics", nvml.nvmlDeviceGetGraphicsRunningProcesses)):
        for p in optional(query, handle) or ():
            if p.pid in procs:
                continue
            try:
                name = _text(nvml.nvmlSystemGetProcessName(p.pid))
            except nvml.NVMLError:
                name = "?"
            used = p.usedGpuMemory if isinstance(p.usedGpuMemory, int) else 0  # None under some containers
            procs[p.pid] = GpuProcess(pid=p.pid, name=name, used_bytes=used, kind=kind)
    return tuple(procs.values())


def _read_device(nvml: Any, optional: _Optional, index: int, handle: Any) -> GpuInfo:
    total, free, used, reserved = _read_memory(nvml, handle)
    util = optional(nvml.nvmlDeviceGetUtilizationRates, handle)
    mig = optional(nvml.nvmlDeviceGetMigMode, handle)
    display = optional(nvml.nvmlDeviceGetDisplayActive, handle)
    power_mw = optional(nvml.nvmlDeviceGetPowerManagementLimit, handle)
    major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
    return GpuInfo(
        index=index,
        nvml_index=index,
        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
        name=_text(nvml.nvmlDeviceGetName(handle)),
        pci_bus_id=_text(nvml.nvmlDeviceGetPciInfo(handle).busId),
        memory_total_bytes=total,
        memory_free_bytes=free,
        memory_used_bytes=used,
        memory_reserved_bytes=reserved,
        compute_capability=(int(major), int(minor)),
        power_limit_watts=power_mw / 1000 if power_mw is not None else None,
        temperature_c=optional(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU),
        utilization_gpu_pct=util.gpu if util is not None else None,
        utilization_memory_pct=util.memory if util is not None else None,
        mig_enabled=bool(mig[0]) if mig is not None else None,
        display_active=bool(display) if display is not None else None,
        pcie_generation=optional(nvml.nvmlDeviceGetCurrPcieLinkGeneration, handle),
        pcie_width=optional(nvml.nvmlDeviceGetCurrPcieLinkWidth, handle),
        processes=_read_processes(nvml, optional, handle),
    )


def _count_nvlinks(nvml: Any, optional: _Optional, handle: Any, peer_bus_id: str) -> int:
    """Active NVLinks from ``handle`` that end on the GPU at ``peer_bus_id`` (0 via an NVSwitch)."""
    count = 0
    for link in range(nvml.NVML_NVLINK_MAX_LINKS):
        try:
            if nvml.nvmlDeviceGetNvLinkState(handle, link) != nvml.NVML_FEATURE_ENABLED:
                continue
            remote = _text(nvml.nvmlDeviceGetNvLinkRemotePciInfo(handle, link).busId)
        except nvml.NVMLError:
            break  # NotSupported (no NVLink on this board) or past the last link
        count += remote.upper() == peer_bus_id.upper()
    return count


def _read_link(nvml: Any, optional: _Optional, ga: GpuInfo, ha: Any, gb: GpuInfo, hb: Any) -> GpuLink:
    ok = nvml.NVML_P2P_STATUS_OK
    p2p = optional(nvml.nvmlDeviceGetP2PStatus, ha, hb, nvml.NVML_P2P_CAPS_INDEX_READ) == ok
    nvlink_cap = optional(nvml.nvmlDeviceGetP2PStatus, ha, hb, nvml.NVML_P2P_CAPS_INDEX_NVLINK) == ok
    ancestor = optional(nvml.nvmlDeviceGetTopologyCommonAncestor, ha, hb)
    topology = next((name for const, name in _TOPOLOGY_NAMES.items()
                     if getattr(nvml, const) == ancestor), "unknown")
    count = _count_nvlinks(nvml, optional, ha, gb.pci_bus_id) if nvlink_cap else 0
    return GpuLink(a=ga.index, b=gb.index, p2p=p2p, nvlink=nvlink_cap, nvlink_count=count, topology=topology)


class NvmlSampler:
    """Live figures for the GPUs the agent serves on, with NVML kept open between samples.

    ``gpus`` are the detected devices (their ``nvml_index`` picks the handle). A sample that
    fails (driver gone, GPU fell off the bus) raises ``nvml.NVMLError``; the caller reports it.
    """

    def __init__(self, nvml: Any, gpus: tuple[GpuInfo, ...]) -> None:
        self._nvml = nvml
        self._gpus = gpus
        self._handles: list[Any] | None = None
        self._optional = _Optional(nvml) if gpus else None

    def sample(self) -> tuple[GpuSample, ...]:
        if not self._gpus:
            return ()
        nvml, optional = self._nvml, self._optional
        if self._handles is None:
            nvml.nvmlInit()
            self._handles = [nvml.nvmlDeviceGetHandleByIndex(g.nvml_index) for g in self._gpus]
        out = []
        for gpu, handle in zip(self._gpus, self._handles):
            total, free, used, _ = _read_memory(nvml, handle)
            util = optional(nvml.nvmlDeviceGetUtilizationRates, handle)
            power_mw = optional(nvml.nvmlDeviceGetPowerUsage, handle)
            out.append(GpuSample(
                index=gpu.index, uuid=gpu.uuid, name=gpu.name, memory_total_bytes=total,
                memory_used_bytes=total - free, memory_free_bytes=free,
                utilization_gpu_pct=util.gpu if util is not None else None,
                temperature_c=optional(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU),
                power_watts=power_mw / 1000 if power_mw is not None else None))
        return tuple(out)

    def close(self) -> None:
        if self._handles is not None:
            self._handles = None
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError:  # pragma: no cover - nothing to report at shutdown
                log.debug("nvmlShutdown failed", exc_info=True)
