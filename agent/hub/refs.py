"""Model references that name something on the hub (docs/models.md, "References").

  llama-3.1-70b-instruct                 a card: its curated sources (HF, AWQ/FP8, GGUF)
  ./my-card.yaml                         a card file outside models/
  Qwen/Qwen2.5-7B-Instruct[@revision]    an HF repo id: the card that lists it, else its config.json
  owner/repo[@revision]:file.gguf        one GGUF in a repo (the first shard of a split GGUF)

Anything else (``default``, a directory, a .gguf or config.json on disk) is local and resolved
by ``agent.catalog.resolve_model`` without the network.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from agent.catalog.cards import available_cards
from agent.catalog.resolve import card_for_repo
from agent.errors import ModelError

_REPO = r"[A-Za-z0-9][\w.-]*/[\w.-]+"
_REF = re.compile(rf"^(?P<repo>{_REPO})(?:@(?P<rev>[^\s:@]+))?(?::(?P<file>[^\s:]+))?$")
_LOCAL_SUFFIXES = (".gguf", ".json", ".yaml", ".yml")


@dataclass(frozen=True)
class HubRef:
    """What a hub reference names. ``card`` is a card name or a card file path."""

    text: str
    card: str | None = None
    repo: str | None = None  # the repo the reference names (None for a bare card)
    revision: str | None = None
    file: str | None = None  # repo:file.gguf

    @property
    def label(self) -> str:
        """The name the model is served and listed under."""
        if self.card:
            return Path(self.card).stem if self.card.endswith((".yaml", ".yml")) else self.card
        if self.file:
            return Path(self.file).stem
        return self.repo.rsplit("/", 1)[-1]  # type: ignore[union-attr]


def parse_ref(text: str | None) -> HubRef | None:
    """The hub reference ``text`` is, or None when it is local (or the embedded default)."""
    if text is None or text == "default":
        return None
    if text in available_cards():
        return HubRef(text, card=text)
    path = Path(text).expanduser()
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return HubRef(text, card=str(path))
    if path.exists() or text.startswith(("./", "../", "~", "/")):
        return None
    m = _REF.match(text)
    if m is None or (m["file"] is None and path.suffix.lower() in _LOCAL_SUFFIXES):
        return None
    if m["file"] is not None and not m["file"].lower().endswith(".gguf"):
        raise ModelError(f"{text}: repo:file names a GGUF file (…:model-Q4_K_M.gguf); for a whole repo drop ':{m['file']}'")
    repo = m["repo"]
    card = card_for_repo(repo)
    return HubRef(text, card=card.name if card else None, repo=repo, revision=m["rev"], file=m["file"])
