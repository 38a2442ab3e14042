"""A quantized checkpoint as a local variant of its model, in the hub cache #13 keeps.

The files go where huggingface_hub would put a repo's (blobs named by their sha256, a snapshot of
symlinks named by a commit id derived from the files) under a repo id that no hub has:
``node-agent-quantized/<model>-<variant>``. A pull record (agent/hub/store.py) with the original
reference, ``format: compressed-tensors`` and ``quantized`` (scheme, group size, layers left
16-bit, calibration, seed, the source checkpoint, the quality check) makes ``models``, ``rm``,
``plan`` and ``serve`` treat it like any other variant of that reference: ``serve`` verifies its
checksums, ``rm`` frees it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from agent.catalog.hf import load_hf_config
from agent.catalog.types import ModelSpec, WeightSource
from agent.hub.local import damaged_files
from agent.hub.select import LOCAL_VARIANT_OWNER as LOCAL_OWNER
from agent.hub.store import Pull, PulledFile, Store, stat_key

REVISION = "quantized"


def is_local_repo(repo: str | None) -> bool:
    return bool(repo) and repo.split("/", 1)[0] == LOCAL_OWNER  # type: ignore[union-attr]


def variant_repo(model_label: str, variant: str) -> str:
    safe = "".join(c if c.isalnum() or c in "._-" else "-" for c in model_label)[:80]
    return f"{LOCAL_OWNER}/{safe}-{variant}"


def variant_commit(inputs: dict) -> str:
    """The variant's commit id: a hash of everything that made it (source checkpoint, recipe,
    calibration, seed), so the same inputs land in the same snapshot and ``serve`` knows where a
    quantization will put its result before it runs."""
    return hashlib.sha1(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def register(store: Store, staging: Path, ref: str, repo: str, variant: str, meta: dict, commit: str) -> Pull:
    """Move the checkpoint in ``staging`` into the cache as ``repo`` at ``commit`` and record it
    under ``ref`` (replacing an earlier record of the same inputs)."""
    hub = store.hub
    blobs = hub.repo_dir(repo) / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    entries = []
    for path in sorted(p for p in staging.iterdir() if p.is_file()):
        sha = _sha256(path)
        blob = blobs / sha
        os.replace(path, blob)  # over an existing blob too: it may be the damaged copy being remade
        entries.append((path.name, sha, blob.stat().st_size))
    snapshot = hub.snapshot(repo, commit)
    if snapshot.exists():  # an earlier run of the same inputs: its files give way
        shutil.rmtree(snapshot)
    snapshot.mkdir(parents=True, exist_ok=True)
    files = []
    for name, sha, size in entries:
        link = snapshot / name
        link.unlink(missing_ok=True)
        link.symlink_to(Path("..") / ".." / "blobs" / sha)
        files.append(PulledFile(name, size, sha, sha, None, stat_key(blobs / sha)))
    refs = hub.repo_dir(repo) / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    (refs / REVISION).write_text(commit)
    pull = Pull(ref=ref, engine="vllm", format="compressed-tensors", quant=variant, repo=repo, revision=REVISION,
                commit=commit, file=None, files=tuple(files), pulled_at=time.time(), quantized=meta)
    store.save(pull)
    return pull


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def variants(store: Store, wanted: Callable[[Pull], bool]) -> list[Pull]:
    """Intact quantized variants whose pull ``wanted`` accepts, newest first."""
    return [p for p in store.all_pulls()
            if p.quantized is not None and p.complete and wanted(p) and damaged_files(store, p) is None]


def source_of(pull: Pull) -> WeightSource:
    """A variant as a weight source the planner can choose (its repo names it: nothing to fetch)."""
    q = pull.quantized or {}
    if q.get("method") == "fp8-dynamic":
        return WeightSource(format="compressed-tensors", repo=pull.repo, quant_type="w8a8-fp8", bits=8,
                            scheme="w8a8-fp8", size_bytes=pull.size)
    bits, group = q.get("bits"), q.get("group_size")
    scheme = f"w{bits}a16" if bits else None
    return WeightSource(format="compressed-tensors", repo=pull.repo, quant_type=scheme, bits=bits,
                        group_size=group or None, scheme=scheme, size_bytes=pull.size, zero_points=True)


def with_variants(spec: ModelSpec, store: Store, wanted: Callable[[Pull], bool]) -> ModelSpec:
    """``spec`` with every intact variant made here for it added to its sources (newest first)."""
    found = [source_of(p) for p in variants(store, wanted)]
    known = {s.repo for s in spec.sources}
    return replace(spec, sources=(*spec.sources, *(s for s in found if s.repo not in known))) if found else spec


def variant_spec(store: Store, pull: Pull, name: str) -> ModelSpec:
    return replace(load_hf_config(store.hub.snapshot(pull.repo, pull.commit)), name=name)


def describe_variant(pull: Pull) -> dict:
    """What /v1/node says about a variant made here."""
    q = pull.quantized or {}
    quality = q.get("quality") or {}
    return {"variant": pull.quant, "repo": pull.repo, "made_here": True, "scheme": q.get("scheme"),
            "group_size": q.get("group_size"), "degraded": bool(quality.get("degraded")),
            "quality": {k: quality.get(k) for k in ("checked", "perplexity", "perplexity_bf16", "perplexity_increase",
                                                     "top1_agreement", "max_perplexity_increase")}}
