"""The model catalog: cards, HF configs and GGUF headers → ModelSpec (docs/models.md)."""

from agent.catalog.cards import available_cards, cards_dir, load_card
from agent.catalog.gguf_file import read_gguf
from agent.catalog.hf import load_hf_config
from agent.catalog.resolve import DEFAULT_CARD, default_gguf_path, default_model, resolve_model
from agent.catalog.types import ModelArch, ModelSpec, WeightSource

__all__ = [
    "DEFAULT_CARD",
    "ModelArch",
    "ModelSpec",
    "WeightSource",
    "available_cards",
    "cards_dir",
    "default_gguf_path",
    "default_model",
    "load_card",
    "load_hf_config",
    "read_gguf",
    "resolve_model",
]
