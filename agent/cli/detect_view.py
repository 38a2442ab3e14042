"""How ``node-agent detect`` shows a host to people (rich tables)."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from agent.hardware.types import GIB, HostInfo


def _gib(n: int) -> str:
    return f"{n / GIB:.1f}"


def _opt(value: object, unit: str = "") -> str:
    return "n/a" if value is None else f"{value}{unit}"


def render_host(host: HostInfo, console: Console) -> None:
    """Host summary, one row per GPU, then the GPU pairs."""
    console.print(
        f"[bold]{host.hostname}[/]  {host.cpu_model}  "
        f"{host.cpu_physical_cores} cores / {host.cpu_logical_cores} threads  "
        f"RAM {_gib(host.ram_available_bytes)} of {_gib(host.ram_total_bytes)} GiB available"
        + (f"  [dim]({host.source})[/]" if host.source != "nvml" else "")
    )
    if not host.gpus:
        console.print(f"No GPUs: {escape(host.gpu_reason or '')}", highlight=False)
    else:
        console.print(f"Driver {_opt(host.driver_version)}, CUDA {_opt(host.cuda_driver_version)}")
        table = Table()
        for col in ("#", "GPU", "bus", "free/total GiB", "CC", "power", "temp", "util", "MIG", "display", "PCIe"):
            table.add_column(col)
        for g in host.gpus:
            table.add_row(
                str(g.index), g.name.removeprefix("NVIDIA "), g.pci_bus_id.removeprefix("00000000:"),
                f"{_gib(g.memory_free_bytes)}/{_gib(g.memory_total_bytes)}", "%d.%d" % g.compute_capability,
                _opt(g.power_limit_watts and round(g.power_limit_watts), "W"), _opt(g.temperature_c, "C"),
                _opt(g.utilization_gpu_pct, "%"),
                "n/a" if g.mig_enabled is None else ("on" if g.mig_enabled else "off"),
                "n/a" if g.display_active is None else ("yes" if g.display_active else "no"),
                "n/a" if g.pcie_generation is None else f"{g.pcie_generation}x{g.pcie_width}",
            )
        console.print(table)
        for g in host.gpus:
            for p in g.processes:
                console.print(f"  GPU {g.index}: {p.kind} process {p.name} (pid {p.pid}) holds {p.used_bytes >> 20} MiB")
    if host.links:
        pairs = Table(title="GPU pairs")
        for col in ("pair", "P2P", "NVLink", "topology"):
            pairs.add_column(col)
        for l in host.links:
            nv = f"yes ({l.nvlink_count} links)" if l.nvlink and l.nvlink_count else ("yes" if l.nvlink else "no")
            pairs.add_row(f"{l.a}-{l.b}", "yes" if l.p2p else "no", nv, l.topology)
        console.print(pairs)
    if host.hidden_gpus:
        console.print(f"{host.hidden_gpus} GPU(s) hidden by CUDA_VISIBLE_DEVICES")
    for note in host.notes:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
