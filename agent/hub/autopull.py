"""``serve`` on a hub reference: the local files, or the download that will bring them.

``model.pull: never`` refuses when no engine's variant is on disk, naming the command and the
size. ``auto`` plans the pull and runs its checks (gated repo, disk) before the server starts,
so those fail at once with their message; the bytes then move in a worker thread while the
server answers ``/health/ready`` with the download's progress, and the engines start after it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from agent.catalog.hf import load_hf_config
from agent.errors import NodeAgentError
from agent.hardware.types import HostInfo
from agent.hub.errors import NotPulled, gb
from agent.hub.local import LocalModel, hub_for, resolve_local
from agent.hub.progress import QuietSink, Tracker
from agent.hub.pull import Prepared, fetch_all, plan_pull, prepare
from agent.hub.refs import parse_ref
from agent.hub.store import Store
from agent.planner import Pins
from agent.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Download:
    """A prepared pull that ``serve`` runs in a worker thread; ``progress`` is for /health/ready."""

    prepared: Prepared
    store: Store
    tracker: Tracker
    finished: bool = False

    def run(self) -> None:
        log.info("%s: downloading %s before the engines start", self.tracker.label, gb(self.prepared.missing_bytes))
        fetch_all(self.prepared, self.store.hub, self.store, QuietSink(self.tracker, log))
        self.finished = True
        log.info("%s: download complete (%s fetched)", self.tracker.label, gb(self.tracker.fetched))

    def progress(self) -> dict | None:
        """The download's numbers while it runs; None once it is done (the engines' turn)."""
        return None if self.finished else self.tracker.snapshot()

    @property
    def repos(self) -> set[str]:
        return {i.listing.repo for i in self.prepared.pull_plan.items}


def model_for_serve(settings: Settings, host: HostInfo, vllm_cpu: bool) -> tuple[LocalModel, Download | None]:
    """The files ``serve`` starts on, and the download to run first (``model.pull: auto``)."""
    local = resolve_local(settings)
    wanted = [e for e in local.missing if e in settings.engines.chain]
    ref = parse_ref(settings.model.ref)
    present = {"vllm": local.hf_dir is not None, "llamacpp": local.gguf is not None}
    have_some = any(present[e] for e in settings.engines.chain)
    if ref is None or not wanted or (settings.model.pull == "never" and have_some):
        for engine in wanted:
            log.warning("%s: the %s variant is not on disk (node-agent pull %s --engine %s)",
                        settings.model.ref, engine, settings.model.ref, engine)
        return local, None
    store = Store(hub_for(settings))
    if settings.model.pull == "never":
        what = (f"{', '.join(local.damaged[:3])} no longer match(es) the hub's checksum and will not be served"
                if local.damaged else "is not on disk")
        raise NotPulled(f"{settings.model.ref}: {what}; run `node-agent pull {settings.model.ref}`"
                        f"{_size_hint(ref, settings, host, vllm_cpu, store)}, or set model.pull: auto")
    pp = plan_pull(ref, settings, host, Pins(), store.hub, vllm_cpu=vllm_cpu)
    pp = replace(pp, items=tuple(i for i in pp.items if i.variant.engine in wanted))
    prepared = prepare(pp, store.hub)
    tracker = Tracker(pp.size, sum(len(i.files) for i in pp.items), ref.label)
    return _future(local, prepared, store), Download(prepared, store, tracker)


def _size_hint(ref, settings: Settings, host: HostInfo, vllm_cpu: bool, store: Store) -> str:
    try:
        return f" ({gb(plan_pull(ref, settings, host, Pins(), store.hub, vllm_cpu=vllm_cpu).size)})"
    except NodeAgentError as exc:
        log.info("could not size the pull of %s: %s", ref.text, exc)
        return ""


def _future(local: LocalModel, prepared: Prepared, store: Store) -> LocalModel:
    """The model as it will be once the download is done: snapshot paths, the checkpoint's real
    config (fetched now; it is small), and the GGUF planned from its metadata."""
    hub = store.hub
    for item in prepared.pull_plan.items:
        snapshot = hub.snapshot(item.listing.repo, item.listing.commit)
        if item.variant.engine == "vllm":
            hub.cached(item.listing.repo, item.listing.commit, "config.json")
            spec = replace(load_hf_config(snapshot), name=local.name)
            local = replace(local, vllm_spec=spec, hf_dir=snapshot)
        else:
            remote = prepared.pull_plan.remote.spec
            local = replace(local, gguf=snapshot / Path(item.variant.file or ""), gguf_spec=remote)
    return replace(local, missing=())
