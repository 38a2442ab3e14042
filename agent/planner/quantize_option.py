"""When the best plan needs a checkpoint nobody published: quantize it on the node.

Pure. A model with a bf16 checkpoint and no 4-bit one (no AWQ/GPTQ/compressed-tensors sibling) is
planned once more as if the variant ``node-agent quantize`` would make existed (a source whose repo
is ``quantize:<variant>``: weights made here, not fetched). When that plan fits where the
published ones do not, the plan says so with the quantization's own cost, and with
``model.quantize: auto`` it becomes the plan: ``pull`` fetches the bf16 weights and quantizes them,
``serve`` quantizes before the engines start.
"""

from __future__ import annotations

from dataclasses import replace

from agent.catalog.types import ModelSpec, WeightSource
from agent.hardware.types import GIB, MIB, HostInfo
from agent.quantize.schemes import Choice, Cost, choose, estimate
from agent.settings import Settings

QUANTIZE_PREFIX = "quantize:"
_FOUR_BIT = ("awq", "gptq", "compressed-tensors")
_NAMES = {"awq": "AWQ", "gptq": "GPTQ", "fp8-dynamic": "FP8"}


def made_here(source: WeightSource | None) -> bool:
    """The source is a variant the agent would make itself (not a repo to fetch)."""
    return bool(source and source.repo and source.repo.startswith(QUANTIZE_PREFIX))


def candidate(model: ModelSpec, settings: Settings) -> tuple[ModelSpec, Choice] | None:
    """The model with the variant ``node-agent quantize`` would make added, or None when it
    already has a low-bit checkpoint, has no bf16 one, or cannot be modelled."""
    if model.arch.unmodelled or any(s.format in _FOUR_BIT for s in model.sources):
        return None
    if model.source("hf") is None and not (model.origin == "card" and not model.sources):
        return None
    q = settings.quantize
    try:
        choice = choose(model.arch, q.scheme, q.group_size or None)
    except ValueError:
        return None
    made = replace(choice.source(), repo=f"{QUANTIZE_PREFIX}{choice.label}")
    return replace(model, sources=(*model.sources, made)), choice


def cost(model: ModelSpec, choice: Choice, settings: Settings, host: HostInfo) -> Cost:
    q = settings.quantize
    return estimate(model.arch, choice, q.samples, q.seq_len, gpus=len(host.gpus),
                    physical_cores=host.cpu_physical_cores)


def why_not_here(c: Cost, host: HostInfo, settings: Settings) -> str | None:
    """Why this host cannot quantize it itself (the same checks ``node-agent quantize`` makes)."""
    ram = host.ram_available_bytes - settings.planner.ram_margin_mib * MIB
    if c.ram_bytes > ram:
        return f"quantizing needs ~{c.ram_bytes / GIB:.1f} GiB of RAM, {max(0, ram) / GIB:.1f} GiB is available"
    if c.on_gpu:
        free = max(g.memory_free_bytes for g in host.gpus) - settings.planner.safety_margin_mib * MIB
        if c.gpu_bytes > free:
            return f"quantizing needs ~{c.gpu_bytes / GIB:.1f} GiB on one GPU, {max(0, free) / GIB:.1f} GiB is free"
    return None


def hint(choice: Choice, c: Cost, auto: bool, cluster: bool = False) -> str:
    """The line ``plan`` shows: "no AWQ checkpoint: `node-agent quantize` can make one (~N min, M GiB)".
    ``cluster``: this host is in a group, where model.quantize: auto does not apply."""
    name = _NAMES.get(choice.method, choice.method.upper())
    peak = (f"{c.gpu_bytes / GIB:.1f} GiB of GPU memory (one layer at a time) and {c.ram_bytes / GIB:.1f} GiB of RAM"
            if c.on_gpu else f"{c.ram_bytes / GIB:.1f} GiB of RAM")
    line = (f"no {name} checkpoint: `node-agent quantize` can make one (~{c.minutes} min, {c.peak_gib:.1f} GiB): "
            f"at the peak {peak}; it writes {choice.label}, {_size(c.output_bytes)}")
    if cluster:
        return line + ("; in a cluster every host loads the checkpoint model.ref names, so model.quantize: auto "
                       "does not apply: make it once with --out DIR, copy DIR to every host and set model.ref to it")
    return line + ("; model.quantize is auto, so pull and serve make it after downloading the bf16 weights"
                   if auto else "; or set model.quantize: auto to have pull and serve make it")


def _size(n: int) -> str:
    return f"~{n / 1e9:.1f} GB" if n >= 100e6 else f"~{max(1, round(n / 1e6))} MB"
