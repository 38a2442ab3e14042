"""What the planner needs to know about a model: its architecture numbers and its artifacts.

Built from a card (models/*.yaml), an HF config.json, or a GGUF header; the planner never
reads files itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelArch:
    """Architecture numbers, as in an HF config.json (names follow transformers)."""

    architecture: str  # e.g. "LlamaForCausalLM", "MixtralForCausalLM"
    hidden_size: int
    intermediate_size: int  # dense MLP width (per expert for MoE)
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    num_experts: int = 0  # 0 = dense
    num_experts_per_tok: int = 0
    attention_bias: bool = False  # q/k/v biases (Qwen2)
    dtype: str = "bfloat16"  # checkpoint dtype of the unquantized weights


@dataclass(frozen=True)
class WeightSource:
    """One concrete set of weights for the model.

    ``format``: "hf" (bf16/fp16 safetensors), "fp8", "awq", "gptq", "compressed-tensors", "gguf".
    For GGUF, ``tensor_bytes_per_layer``/``non_layer_bytes`` come from the file header when the
    file is at hand (the truth), else the planner derives them from ``size_bytes``.
    """

    format: str
    repo: str | None = None
    file: str | None = None  # GGUF file name inside the repo, or a local path
    quant_type: str | None = None  # GGUF: "Q4_K_M", "Q4_1"; AWQ/GPTQ: "w4a16"
    bits: int | None = None
    group_size: int | None = None
    size_bytes: int | None = None
    tensor_bytes_per_layer: tuple[int, ...] = ()
    non_layer_bytes: int | None = None  # token embeddings + output head + final norm


@dataclass(frozen=True)
class ModelSpec:
    """A model the agent can plan for and serve."""

    name: str  # card name or a name derived from the path
    arch: ModelArch
    sources: tuple[WeightSource, ...] = ()
    license: str | None = None
    local_path: str | None = None  # HF directory or .gguf file when the model is on disk
    origin: str = "card"  # "card", "hf-config", "gguf"; informative only
    notes: tuple[str, ...] = field(default=())

    def source(self, fmt: str) -> WeightSource | None:
        """The first source of the given format, or None."""
        return next((s for s in self.sources if s.format == fmt), None)
