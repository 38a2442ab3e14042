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
    # Per-layer attention kind, HF's ``layer_types`` names: "full_attention", "sliding_attention"
    # (holds only ``sliding_window`` tokens under vLLM's hybrid KV manager), "linear_attention"
    # (Gated DeltaNet: a fixed state per sequence, no per-token KV). Empty = every layer full.
    layer_types: tuple[str, ...] = ()
    sliding_window: int = 0
    # MLA (DeepSeek-V2/V3): the cache holds kv_lora_rank + qk_rope_head_dim values per token and layer.
    kv_lora_rank: int = 0
    q_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    # MoE extras: a shared expert beside the routed ones, and leading dense layers (DeepSeek).
    shared_expert_intermediate_size: int = 0
    first_dense_layers: int = 0
    dense_intermediate_size: int = 0
    # Gated DeltaNet (Qwen3-Next, Qwen3.5) linear-attention layers.
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel_dim: int = 0
    rotary_dim: int = 0  # 0 = head_dim (partial rotary: head_dim x partial_rotary_factor)
    vision_params: int = 0  # vision tower + projector of a multimodal checkpoint (16-bit)
    # A part of the architecture the memory model has no formula for; the planner refuses to plan
    # it and names this (never plans it with a wrong formula).
    unmodelled: str | None = None

    def kinds(self) -> tuple[str, ...]:
        """The attention kind of every decoder layer."""
        return self.layer_types or ("full_attention",) * self.num_layers

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0


@dataclass(frozen=True)
class WeightSource:
    """One concrete set of weights for the model.

    ``format``: "hf" (bf16/fp16 safetensors), "fp8", "awq", "gptq", "compressed-tensors", "mxfp4",
    "gguf". ``scheme`` (compressed-tensors): "w8a8-fp8", "w8a8-int8", "w4a16", "w8a16";
    ``weight_block`` (fp8): the block of one scale, e.g. (128, 128).
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
    scheme: str | None = None
    weight_block: tuple[int, ...] = ()
    zero_points: bool = False  # compressed-tensors asymmetric weights: one int8 zero per group


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
