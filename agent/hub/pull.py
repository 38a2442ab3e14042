"""``node-agent pull``: plan, choose the variants, check the disk, fetch, record.

Order matters and is the contract: everything that can refuse (the plan, a gated repo, the disk)
runs before the first weight byte moves. ``prepare`` does the metadata work and the checks;
``fetch_all`` moves bytes; both are used by ``pull`` and by ``serve`` with ``model.pull: auto``.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

from agent.catalog.types import ModelSpec
from agent.hardware.types import HostInfo
from agent.hub.client import FileSource, Hub, Listing, RemoteFile
from agent.hub.errors import NoVariant, NotEnoughDisk
from agent.hub.local import hub_for, matches
from agent.hub.refs import HubRef
from agent.hub.remote import RemoteModel, describe, index_of
from agent.hub.select import Variant, already_here, choose, files_for
from agent.hub.store import Pull, PulledFile, Store, stat_key
from agent.hub.transfer import Sink, blob_path, fetch
from agent.learned_store import plan_inputs
from agent.quantize.register import with_variants
from agent.planner import NodePlan, Pins, plan
from agent.settings import Settings

log = logging.getLogger(__name__)
# Left free on the cache's disk beyond the pull itself (logs, the OS, vLLM's compile cache).
DISK_HEADROOM_BYTES = 1 << 30


@dataclass(frozen=True)
class Item:
    """One variant resolved against the hub: its commit and exact files."""

    variant: Variant
    listing: Listing
    files: tuple[RemoteFile, ...]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class PullPlan:
    """What a pull will fetch, and the plan it was chosen from."""

    remote: RemoteModel
    plan: NodePlan
    items: tuple[Item, ...]
    notes: tuple[str, ...]

    @property
    def size(self) -> int:
        return sum(i.size for i in self.items)


@dataclass(frozen=True)
class Prepared:
    """A pull that passed its checks: where each file comes from and what is missing."""

    pull_plan: PullPlan
    sources: dict[tuple[str, str], FileSource]  # (repo, path) -> where its bytes are
    missing_bytes: int  # bytes still to download (partial files counted as what they lack)


def pin_gguf(spec: ModelSpec, quant: str) -> ModelSpec:
    """The model with the GGUF of quant type ``quant`` first, so both llama.cpp plans take it."""
    ggufs = [s for s in spec.sources if s.format == "gguf"]
    match = [s for s in ggufs if (s.quant_type or "").upper() == quant.upper()]
    if not match:
        known = ", ".join(s.quant_type or "?" for s in ggufs) or "none"
        raise NoVariant(f"--gguf-quant {quant}: no such GGUF for {spec.name}; known: {known}")
    return replace(spec, sources=tuple(match[:1] + [s for s in spec.sources if s is not match[0]]))


def make_plan(ref: HubRef, settings: Settings, host: HostInfo, pins: Pins, hub: Hub | None,
              gguf_quant: str | None = None, vllm_cpu: bool = False) -> tuple[RemoteModel, NodePlan]:
    """The remote model and the node plan for it (no files fetched but metadata)."""
    remote = describe(ref, hub)
    if gguf_quant:
        remote = replace(remote, spec=pin_gguf(remote.spec, gguf_quant))
    remote = replace(remote, spec=with_variants(remote.spec, Store(hub_for(settings)), lambda p: matches(p, ref)))
    return remote, plan(host, remote.spec, settings, pins, vllm_cpu=vllm_cpu,
                        **plan_inputs(settings, profile=bool(settings.profile)))


def plan_pull(ref: HubRef, settings: Settings, host: HostInfo, pins: Pins, hub: Hub,
              gguf_quant: str | None = None, vllm_cpu: bool = False) -> PullPlan:
    """The variants this host's plan needs, each with its exact files (configs and indexes
    are read; weights are not)."""
    remote, node = make_plan(ref, settings, host, pins, hub, gguf_quant, vllm_cpu)
    variants, notes = choose(node, remote.spec, ref.revision, ref.repo)
    if pins.engine != "auto":
        skipped = [v for v in variants if v.engine != pins.engine]
        variants = [v for v in variants if v.engine == pins.engine]
        notes += [f"{v.engine}: skipped (--engine {pins.engine})" for v in skipped]
    if not variants and not already_here(node, remote.spec, pins.engine):
        why = "; ".join(notes + list(node.refusals)) or "the plan chose nothing to fetch"
        raise NoVariant(f"nothing to pull for {ref.text}: {why}")
    items = []
    for v in variants:
        listing = remote.listings.get(v.repo)
        if listing is None or (v.revision and listing.revision != v.revision):
            listing = hub.listing(v.repo, v.revision)
        index = None if v.file else index_of(hub, listing)
        items.append(Item(v, listing, tuple(files_for(v, listing, index))))
    return PullPlan(remote, node, tuple(items), (*remote.notes, *notes))


def prepare(pp: PullPlan, hub: Hub) -> Prepared:
    """HEAD every file (a gated repo refuses here) and check the disk: nothing is written."""
    sources: dict[tuple[str, str], FileSource] = {}
    missing = 0
    for item in pp.items:
        for f in item.files:
            src = hub.source(item.listing.repo, item.listing.commit, f.path)
            sources[(item.listing.repo, f.path)] = src
            blob = blob_path(hub, item.listing.repo, src.etag)
            if blob.exists():
                continue
            partial = blob.with_name(blob.name + ".incomplete")
            missing += f.size - (min(partial.stat().st_size, f.size) if partial.exists() else 0)
    where = _existing_parent(hub.cache_dir)
    free = shutil.disk_usage(where).free
    if missing + DISK_HEADROOM_BYTES > free:
        raise NotEnoughDisk(str(hub.cache_dir), missing + DISK_HEADROOM_BYTES, free)
    return Prepared(pp, sources, missing)


def fetch_all(prep: Prepared, hub: Hub, store: Store, sink: Sink, verify_all: bool = False) -> list[Pull]:
    """Fetch (or verify) every file, link it into its snapshot, and record each variant."""
    pulls = []
    ref = prep.pull_plan.remote.ref
    for item in prep.pull_plan.items:
        repo, commit = item.listing.repo, item.listing.commit
        known = _verified_files(store, repo)
        done: list[PulledFile] = []
        for f in item.files:
            src = prep.sources[(repo, f.path)]
            blob = blob_path(hub, repo, src.etag)
            trusted = not verify_all and blob.exists() and known.get(src.etag) == stat_key(blob)
            blob, _ = fetch(hub, repo, commit, f, src, sink, trust_existing=trusted)
            hub.cached(repo, commit, f.path)
            done.append(PulledFile(f.path, f.size, src.etag, f.sha256, f.blob_id, stat_key(blob)))
        _write_ref(hub, repo, item.listing.revision, commit)
        v = item.variant
        pull = Pull(ref=ref.text, engine=v.engine, format=v.format, quant=v.quant, repo=repo,
                    revision=item.listing.revision, commit=commit, file=v.file, files=tuple(done),
                    pulled_at=time.time())
        store.save(pull)
        pulls.append(pull)
        log.info("pulled %s: %s@%s (%d files)", ref.text, repo, commit[:12], len(done))
    return pulls


def _write_ref(hub: Hub, repo: str, revision: str, commit: str) -> None:
    """``refs/<revision>`` as huggingface_hub keeps it, so ``owner/name`` resolves offline too
    (vLLM and transformers reading the cache by repo id)."""
    if revision == commit:
        return
    ref = hub.repo_dir(repo) / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    if not ref.exists() or ref.read_text() != commit:
        tmp = ref.with_name(f".{ref.name}.tmp")
        tmp.write_text(commit)
        os.replace(tmp, ref)


def _verified_files(store: Store, repo: str) -> dict[str, tuple[int, int, int]]:
    """Blob name -> the (size, mtime, inode) it had when a previous pull verified it."""
    return {f.etag: f.verified for p in store.pulls(repo) for f in p.files if f.verified}


def _existing_parent(path: Path) -> Path:
    for p in (path, *path.parents):
        if p.exists():
            return p
    return Path("/")
