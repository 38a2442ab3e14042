"""``model.quantize: auto``: ``pull`` and ``serve`` make the checkpoint the plan needs.

When the plan for a hub model runs a variant nobody published (``VllmPlan.quantize``, see
agent/planner/quantize_option.py), ``pull`` fetches the bf16 weights and then quantizes them, and
``serve`` does the same before its engines start, reporting the quantization's progress in
``/health/ready`` (``progress.quantize``: stage, layers done, ETA). Every check (RAM, GPU memory,
disk, the calibration file) runs before the first byte moves, as for ``node-agent quantize``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from agent.catalog.types import ModelSpec
from agent.hardware.types import HostInfo
from agent.planner import Pins, plan
from agent.planner.types import VllmPlan
from agent.quantize.job import Prepared, Result, Source, execute, prepare
from agent.quantize.runner import Progress
from agent.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Quantization:
    """A prepared quantization that ``serve`` runs in a worker thread after its download."""

    prepared: Prepared
    settings: Settings
    progress_: Progress = field(init=False)
    result: Result | None = None

    def __post_init__(self) -> None:
        src = self.prepared.source
        self.progress_ = Progress(src.label, src.spec.arch.num_layers, self.prepared.cost.seconds)

    def run(self) -> None:
        log.info("%s: quantizing to %s before the engines start (~%d min)", self.prepared.source.label,
                 self.prepared.variant, self.prepared.cost.minutes)
        self.result = execute(self.prepared, self.settings, self.progress_)
        log.info("%s: quantized to %s in %.0f s; %s", self.prepared.source.label, self.prepared.variant,
                 self.result.worker.done.get("seconds", 0), self.result.quality)

    def progress(self) -> dict | None:
        if self.result is not None:
            return None
        return {"kind": "quantize", **self.progress_.snapshot()}


def needed(spec: ModelSpec, settings: Settings, host: HostInfo, vllm_cpu: bool) -> VllmPlan | None:
    """The vLLM plan when it runs a variant the agent must make from ``spec`` (the bf16 checkpoint)."""
    if settings.model.quantize != "auto" or "vllm" not in settings.engines.chain:
        return None
    node = plan(host, spec, settings, Pins(engine="vllm"), vllm_cpu=vllm_cpu)
    p = node.primary
    return p if isinstance(p, VllmPlan) and p.fits and p.quantize else None


def prepare_for(ref: str, label: str, hf_dir: Path, spec: ModelSpec, key: str, settings: Settings,
                host: HostInfo) -> Prepared:
    """The quantization of a bf16 checkpoint that is (or, after the download, will be) at ``hf_dir``."""
    return prepare(Source(ref, label, hf_dir, spec, key), settings.quantize, host, settings)


def future_spec(prep: Prepared) -> ModelSpec:
    """What the planner sees of the variant before it exists: the bf16 arch with its new weights."""
    spec = prep.source.spec
    return replace(spec, sources=(prep.choice.source(),), origin="hf-config")


def for_serve(local, download, settings: Settings, host: HostInfo, vllm_cpu: bool):
    """(the model as ``serve`` will find it, the quantization to run first or None).

    Only hub models: the variant is recorded under the reference, from the bf16 pull (on disk or
    being downloaded). It is planned as if it existed, so the backends are built before it runs.
    Never in a cluster (said in the log when model.quantize is auto)."""
    from agent.hub.local import hub_for
    from agent.hub.refs import parse_ref
    from agent.hub.store import Store

    if settings.cluster.enabled:
        # Every host of a group loads the one checkpoint model.ref names; a variant made on one
        # host is not on the others, so the group would serve the bf16 weights after the wait.
        if settings.model.quantize == "auto":
            log.warning("model.quantize: auto does not apply to a cluster (every host loads the checkpoint "
                        "model.ref names): to serve a 4-bit one, make it once with `node-agent quantize %s --out DIR`, "
                        "copy DIR to the same path on every host and set model.ref to it", settings.model.ref)
        return local, None
    spec = local.vllm_spec
    ref = parse_ref(settings.model.ref)
    if ref is None or spec is None or local.hf_dir is None or (spec.sources and spec.sources[0].format != "hf"):
        return local, None
    if needed(spec, settings, host, vllm_cpu) is None:
        return local, None
    pull = next((p for p in local.pulls if p.engine == "vllm" and p.quantized is None
                 and p.commit == local.hf_dir.name), None)
    item = next((i for i in download.prepared.pull_plan.items if i.variant.engine == "vllm"), None) if download else None
    if pull is not None:
        key = f"{pull.repo}@{pull.commit}"
    elif item is not None:
        key = f"{item.listing.repo}@{item.listing.commit}"
    else:
        return local, None
    prep = prepare_for(ref.text, local.name, local.hf_dir, spec, key, settings, host)
    variant_dir = Store(hub_for(settings)).hub.snapshot(prep.repo, prep.commit)
    if any(path == variant_dir for _, path, _ in local.alternates):  # made by an earlier start
        return local, None
    return replace(local, alternates=((future_spec(prep), variant_dir, None), *local.alternates)), \
        Quantization(prep, settings)
