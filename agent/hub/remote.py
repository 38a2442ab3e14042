"""A model on the hub, described without its weights: what ``plan`` and ``pull`` plan from.

Only metadata moves: the repo listings (file names, sizes, checksums), ``config.json`` for a
repo without a card, and for a lone ``repo:file.gguf`` the first megabytes of the GGUF (its
header, read with HTTP Range requests).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

import httpx2
from huggingface_hub.utils import get_session, hf_raise_for_status

from agent.catalog.cards import PYPI_PREFIX, load_card
from agent.catalog.gguf_file import HeaderIncomplete, parse_header_prefix, read_gguf, spec_from_headers
from agent.catalog.hf import load_hf_config
from agent.catalog.types import ModelSpec, WeightSource
from agent.errors import ModelError
from agent.hub.client import Hub, Listing, translated
from agent.hub.errors import HubUnreachable, NoVariant, RepoNotFound
from agent.hub.refs import HubRef
from agent.hub.select import gguf_files, vllm_files
from agent.hub.transfer import blob_path

HEADER_FIRST_BYTES = 4 * 1024 * 1024
HEADER_MAX_BYTES = 256 * 1024 * 1024
_QUANT_IN_NAME = re.compile(r"(?<![A-Za-z0-9])(I?Q\d(?:_[A-Z0-9]+)*|BF16|F16|F32|MXFP4(?:_MOE)?)(?![A-Za-z0-9])",
                            re.IGNORECASE)


@dataclass(frozen=True)
class RemoteModel:
    """A model as the hub describes it: the spec to plan with and the listings behind it."""

    ref: HubRef
    spec: ModelSpec
    listings: dict[str, Listing]  # repo -> listing at the revision the reference asked for
    notes: tuple[str, ...]


def describe(ref: HubRef, hub: Hub | None) -> RemoteModel:
    """The spec for ``ref``; with ``hub`` None (``--offline``) from the card alone."""
    if ref.card:
        spec = load_card(ref.card)
        if ref.file:
            spec = _with_gguf_first(spec, ref)
        if hub is None:
            return _card_alone(ref, spec, "offline: sizes are the card's; nothing was fetched")
        try:
            return _card_online(ref, spec, hub)
        except HubUnreachable as exc:
            return _card_alone(ref, spec, f"{exc}; planned from the card alone")
    if hub is None:
        raise ModelError(f"{ref.text}: no card describes it, so it cannot be planned offline; drop --offline "
                         "(only its config and file list are fetched)")
    listing = hub.listing(ref.repo, ref.revision)  # type: ignore[arg-type]
    if ref.file:
        return RemoteModel(ref, _gguf_spec(hub, ref, listing), {listing.repo: listing},
                           (f"no card lists {ref.repo}: planned from the GGUF header (first bytes only)",))
    return _repo_spec(hub, ref, listing)


def _card_alone(ref: HubRef, spec: ModelSpec, why: str) -> RemoteModel:
    """The card as it is; a GGUF whose size it does not state cannot be planned, so it is left out."""
    unsized = [s for s in spec.sources if s.format == "gguf" and not s.size_bytes]
    notes = [why] + [f"{s.repo} {s.file}: the card states no size, so llama.cpp is planned without it "
                     "(the hub listing has it)" for s in unsized]
    return RemoteModel(ref, replace(spec, sources=tuple(s for s in spec.sources if s not in unsized)), {},
                       tuple(notes))


def _card_online(ref: HubRef, spec: ModelSpec, hub: Hub) -> RemoteModel:
    listings: dict[str, Listing] = {}
    sources: list[WeightSource] = []
    notes: list[str] = []
    for s in spec.sources:
        if not s.repo or s.repo.startswith(PYPI_PREFIX):
            sources.append(s)
            continue
        if s.repo not in listings:
            listings[s.repo] = hub.listing(s.repo, ref.revision if s.repo == ref.repo else None)
        listing = listings[s.repo]
        try:
            files = gguf_files(listing, s.file) if s.format == "gguf" else vllm_files(listing, None)
        except (RepoNotFound, NoVariant) as exc:
            notes.append(f"{s.repo}: {exc}; the source is left out")
            continue
        sources.append(replace(s, size_bytes=sum(f.size for f in files)))
    return RemoteModel(ref, replace(spec, sources=tuple(sources)), listings, tuple(notes))


def _with_gguf_first(spec: ModelSpec, ref: HubRef) -> ModelSpec:
    """The card with the GGUF ``ref`` names as its first (planned) GGUF."""
    named = [s for s in spec.sources if s.format == "gguf" and s.repo == ref.repo and s.file == ref.file]
    if not named:
        quant = _QUANT_IN_NAME.search(Path(ref.file).stem)  # type: ignore[arg-type]
        named = [WeightSource(format="gguf", repo=ref.repo, file=ref.file,
                              quant_type=quant.group(1).upper() if quant else "GGUF")]
    rest = [s for s in spec.sources if s not in named]
    return replace(spec, sources=tuple(named + rest))


def _repo_spec(hub: Hub, ref: HubRef, listing: Listing) -> RemoteModel:
    if "config.json" not in listing.files:
        ggufs = sorted(p for p in listing.files if p.endswith(".gguf"))
        hint = f"; it holds GGUF files: pass {ref.repo}:{ggufs[0]}" if ggufs else ""
        raise ModelError(f"{ref.repo} has no config.json, so it cannot be planned{hint}")
    config = hub.cached(listing.repo, listing.commit, "config.json")
    base = load_hf_config(config)
    size = sum(f.size for f in vllm_files(listing, None))
    source = replace(base.sources[0], repo=listing.repo, size_bytes=size)
    spec = replace(base, name=ref.label, sources=(source,), local_path=None, origin="hub")
    return RemoteModel(ref, spec, {listing.repo: listing},
                       (f"no card lists {ref.repo}: planned from its config.json; no GGUF sibling is known, so "
                        f"llama.cpp has nothing to run (add a card, docs/models.md, or name one: {ref.repo}:FILE.gguf)",))


def _gguf_spec(hub: Hub, ref: HubRef, listing: Listing) -> ModelSpec:
    shards = gguf_files(listing, ref.file)  # type: ignore[arg-type]
    first = shards[0]
    on_disk = hub.snapshot(listing.repo, listing.commit) / first.path
    if all((on_disk.parent / Path(s.path).name).exists() for s in shards):  # pulled already: its header
        spec = read_gguf(on_disk)
        source = replace(spec.sources[0], repo=listing.repo, file=first.path)
        return replace(spec, name=ref.label, sources=(source,), local_path=None, origin="hub")
    src = hub.source(listing.repo, listing.commit, first.path)
    # A pull that was interrupted has the header on disk already.
    partial = blob_path(hub, listing.repo, src.etag).with_name(f"{src.etag}.incomplete")
    want = HEADER_FIRST_BYTES
    while True:
        n = min(want, first.size)
        if partial.exists() and partial.stat().st_size >= n:
            with partial.open("rb") as f:
                prefix = f.read(n)
        else:
            prefix = _first_bytes(hub, listing.repo, src.url, src.same_host, n)
        try:
            head = parse_header_prefix(first.path, prefix, first.size)
            break
        except HeaderIncomplete:
            if want >= HEADER_MAX_BYTES:
                raise ModelError(f"{ref.text}: the GGUF header is larger than {HEADER_MAX_BYTES >> 20} MiB") from None
            want *= 4
    spec = spec_from_headers([head], total_size=sum(s.size for s in shards))
    source = replace(spec.sources[0], repo=listing.repo, file=first.path)
    return replace(spec, name=ref.label, sources=(source,), origin="hub")


def _first_bytes(hub: Hub, repo: str, url: str, same_host: bool, n: int) -> bytes:
    headers = {**hub.headers(same_host), "Range": f"bytes=0-{n - 1}", "Accept-Encoding": "identity"}
    with translated(repo):
        r = get_session().get(url, headers=headers, follow_redirects=True, timeout=httpx2.Timeout(30.0))
        hf_raise_for_status(r)
    return r.content[:n]


def index_of(hub: Hub, listing: Listing) -> dict | None:
    """The checkpoint's safetensors index (which shards hold the weights), when it has one."""
    from agent.hub.select import SAFETENSORS_INDEX

    if SAFETENSORS_INDEX not in listing.files:
        return None
    path = hub.cached(listing.repo, listing.commit, SAFETENSORS_INDEX)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RepoNotFound(f"{listing.repo}: {SAFETENSORS_INDEX} is not valid JSON ({exc})") from exc
