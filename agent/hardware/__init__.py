"""Hardware detection: what GPUs and host the agent runs on (see ``detect``)."""

from agent.hardware.detect import detect
from agent.hardware.types import GpuInfo, GpuLink, GpuProcess, HostInfo

__all__ = ["GpuInfo", "GpuLink", "GpuProcess", "HostInfo", "detect"]
