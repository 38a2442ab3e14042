"""A stand-in for the ``pynvml`` module that answers from a hardware profile.

It implements exactly the calls ``agent.hardware.nvml`` makes, returns objects shaped like
pynvml's, and raises pynvml's own error classes where real hardware does (NotSupported for
MIG on GeForce, LibraryNotFound on a host without the driver, ...). Error classes and
constants are pynvml's, so code written against the real module cannot tell the difference.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pynvml

from agent.hardware.profiles import Profile, ProfileGpu

_MIB = 1024**2
_TOPOLOGY = {
    "internal": pynvml.NVML_TOPOLOGY_INTERNAL,
    "single": pynvml.NVML_TOPOLOGY_SINGLE,
    "multiple": pynvml.NVML_TOPOLOGY_MULTIPLE,
    "hostbridge": pynvml.NVML_TOPOLOGY_HOSTBRIDGE,
    "node": pynvml.NVML_TOPOLOGY_NODE,
    "system": pynvml.NVML_TOPOLOGY_SYSTEM,
}


def _error(code: int) -> pynvml.NVMLError:
    return pynvml.NVMLError(code)  # pynvml maps the code to its subclass (NVMLError_NotSupported, ...)


class FakeNvml:
    """Module-like object: ``FakeNvml(profile).nvmlDeviceGetCount()`` and friends."""

    def __init__(self, profile: Profile) -> None:
        self._profile = profile
        self._initialized = False
        self._held: dict[int, int] = {}  # extra bytes "another process" took, per handle (hold())
        # Remote end of every NVLink, per GPU: links are handed out pair by pair.
        self._nvlink_peer: list[list[int]] = [[] for _ in profile.gpus]
        for link in profile.links:
            a, b = link.gpus
            for _ in range(link.nvlinks):
                self._nvlink_peer[a].append(b)
                self._nvlink_peer[b].append(a)

    def __getattr__(self, name: str) -> Any:
        # Error classes and constants come from the real module.
        if name.startswith(("NVML", "nvmlMemory")):
            return getattr(pynvml, name)
        raise AttributeError(f"FakeNvml does not implement {name}; add it from the profile")

    # --- library -------------------------------------------------------------------------
    def nvmlInit(self) -> None:
        if self._profile.nvml == "absent":
            raise _error(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
        if self._profile.nvml == "driver-not-loaded":
            raise _error(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
        self._initialized = True

    def nvmlShutdown(self) -> None:
        self._initialized = False

    def _check(self) -> None:
        if not self._initialized:
            raise _error(pynvml.NVML_ERROR_UNINITIALIZED)

    def nvmlSystemGetDriverVersion(self) -> str:
        self._check()
        return self._driver().version

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        self._check()
        major, minor = self._driver().cuda_version.split(".")
        return int(major) * 1000 + int(minor) * 10

    def nvmlSystemGetNVMLVersion(self) -> str:
        self._check()
        return self._driver().nvml_version

    def nvmlSystemGetProcessName(self, pid: int) -> str:
        for gpu in self._profile.gpus:
            for proc in gpu.processes:
                if proc.pid == pid:
                    return proc.name
        raise _error(pynvml.NVML_ERROR_NOT_FOUND)

    def _driver(self):
        if self._profile.driver is None:
            raise _error(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
        return self._profile.driver

    # --- devices -------------------------------------------------------------------------
    def nvmlDeviceGetCount(self) -> int:
        self._check()
        return len(self._profile.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        self._check()
        if not 0 <= index < len(self._profile.gpus):
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return index

    def _gpu(self, handle: int, feature: str | None = None) -> ProfileGpu:
        self._check()
        gpu = self._profile.gpus[handle]
        if feature is not None and feature in gpu.unsupported:
            raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return gpu

    def nvmlDeviceGetName(self, handle: int) -> str:
        return self._gpu(handle).name

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return self._gpu(handle).uuid

    def nvmlDeviceGetPciInfo(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(busId=self._gpu(handle).pci_bus_id)

    def hold(self, handle: int, used_bytes: int) -> None:
        """Fault injection: another process now holds ``used_bytes`` more on this GPU (0 frees it)."""
        self._held[handle] = used_bytes

    def nvmlDeviceGetMemoryInfo(self, handle: int, version: int | None = None) -> SimpleNamespace:
        gpu = self._gpu(handle)
        total, reserved = gpu.memory_total_mib * _MIB, gpu.memory_reserved_mib * _MIB
        used = min(total, gpu.memory_used_mib * _MIB + self._held.get(handle, 0))
        if version is None:
            return SimpleNamespace(total=total, free=total - used, used=used)
        if "memory_v2" in gpu.unsupported:
            raise _error(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        return SimpleNamespace(version=version, total=total, reserved=reserved,
                               free=total - used, used=used - reserved)

    def nvmlDeviceGetCudaComputeCapability(self, handle: int) -> tuple[int, int]:
        return tuple(self._gpu(handle).compute_capability)

    def nvmlDeviceGetPowerManagementLimit(self, handle: int) -> int:
        return int(self._gpu(handle, "power_limit").power_limit_w * 1000)

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        gpu = self._gpu(handle)
        if gpu.power_draw_w is None:
            raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return int(gpu.power_draw_w * 1000)

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        return self._gpu(handle, "temperature").temperature_c

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        gpu = self._gpu(handle, "utilization")
        return SimpleNamespace(gpu=gpu.utilization_gpu_pct, memory=gpu.utilization_memory_pct)

    def nvmlDeviceGetMigMode(self, handle: int) -> list[int]:
        mode = int(self._gpu(handle, "mig").mig_enabled)
        return [mode, mode]

    def nvmlDeviceGetDisplayActive(self, handle: int) -> int:
        return int(self._gpu(handle, "display").display_active)

    def nvmlDeviceGetCurrPcieLinkGeneration(self, handle: int) -> int:
        return self._gpu(handle, "pcie").pcie.generation

    def nvmlDeviceGetCurrPcieLinkWidth(self, handle: int) -> int:
        return self._gpu(handle, "pcie").pcie.width

    def _processes(self, handle: int, kind: str) -> list[SimpleNamespace]:
        gpu = self._gpu(handle, "processes")
        return [SimpleNamespace(pid=p.pid, usedGpuMemory=p.used_mib * _MIB)
                for p in gpu.processes if p.kind == kind]

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[SimpleNamespace]:
        return self._processes(handle, "compute")

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: int) -> list[SimpleNamespace]:
        return self._processes(handle, "graphics")

    # --- pairs ---------------------------------------------------------------------------
    def _link(self, h1: int, h2: int):
        self._check()
        pair = tuple(sorted((h1, h2)))
        return next(l for l in self._profile.links if tuple(sorted(l.gpus)) == pair)

    def nvmlDeviceGetP2PStatus(self, h1: int, h2: int, index: int) -> int:
        link = self._link(h1, h2)
        if index == pynvml.NVML_P2P_CAPS_INDEX_NVLINK:
            ok = link.nvlinks > 0
        else:
            ok = link.p2p
        return pynvml.NVML_P2P_STATUS_OK if ok else pynvml.NVML_P2P_STATUS_CHIPSET_NOT_SUPPORTED

    def nvmlDeviceGetTopologyCommonAncestor(self, h1: int, h2: int) -> int:
        return _TOPOLOGY[self._link(h1, h2).topology]

    def nvmlDeviceGetNvLinkState(self, handle: int, link: int) -> int:
        gpu = self._gpu(handle)
        if gpu.nvlink_count == 0:
            raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        if link >= pynvml.NVML_NVLINK_MAX_LINKS:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return pynvml.NVML_FEATURE_ENABLED if link < gpu.nvlink_count else pynvml.NVML_FEATURE_DISABLED

    def nvmlDeviceGetNvLinkRemotePciInfo(self, handle: int, link: int) -> SimpleNamespace:
        peers = self._nvlink_peer[handle]
        if link >= len(peers):
            # An active link that does not end on a GPU of this host ends on an NVSwitch.
            return SimpleNamespace(busId="00000000:FF:00.0")
        return SimpleNamespace(busId=self._profile.gpus[peers[link]].pci_bus_id)
