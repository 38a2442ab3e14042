"""The memory model's llama.cpp side, and one import point for the vLLM side (weights.py,
kvcache.py, profile.py). docs/memory-model.md derives every formula.

Every constant names where it comes from; docs/calibration-notes.md holds the public vLLM and
llama.cpp start-up logs they were checked against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from agent.catalog.types import ModelArch, WeightSource
from agent.planner.kvcache import BLOCK_SIZE, kv_bytes_per_token, kv_heads_per_rank
from agent.planner.profile import CUDA_GRAPH_BYTES, non_torch_bytes
from agent.planner.weights import (AWQ_BYTES_PER_PARAM, DTYPE_BYTES, ParamCounts, linear_bytes_per_param,
                                   param_counts, vllm_rank_weights, weights_total)

__all__ = ["AWQ_BYTES_PER_PARAM", "BLOCK_SIZE", "CUDA_GRAPH_BYTES", "DTYPE_BYTES", "GIB", "MIB", "GgufLayout",
           "ParamCounts", "gguf_layout", "kv_bytes_per_token", "kv_heads_per_rank", "linear_bytes_per_param",
           "llamacpp_compute_bytes", "llamacpp_kv_bytes_per_token_layer", "non_torch_bytes", "param_counts",
           "vllm_rank_weights", "weights_total"]

GIB = 1024**3
MIB = 1024**2
# llama.cpp KV cache element sizes (ggml block sizes: q8_0 = 34 bytes / 32, q4_0 = 18 / 32).
GGML_KV_BYTES = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
# llama.cpp default micro-batch (n_ubatch) that sizes its compute buffer.
LLAMACPP_UBATCH = 512


# ---------------------------------------------------------------------------------------------
# llama.cpp

@dataclass(frozen=True)
class GgufLayout:
    """Bytes of a GGUF file by placement unit: repeating layers, and the rest (embeddings, head)."""

    layer_bytes: tuple[int, ...]
    non_layer_bytes: int
    exact: bool  # True when read from the file's tensor table, False when derived from its size

    @property
    def total(self) -> int:
        return sum(self.layer_bytes) + self.non_layer_bytes


def gguf_layout(arch: ModelArch, source: WeightSource) -> GgufLayout:
    """Per-layer bytes of a GGUF: from its header when known, else its size split by parameters."""
    if source.tensor_bytes_per_layer and source.non_layer_bytes is not None:
        return GgufLayout(tuple(source.tensor_bytes_per_layer), source.non_layer_bytes, True)
    if not source.size_bytes:
        raise ValueError(f"GGUF source {source.file or source.repo} has neither a size nor a tensor table")
    p = param_counts(arch)
    per_param = source.size_bytes / p.total
    per_layer = int((p.per_layer_linear + p.per_layer_other) * per_param)
    non_layer = source.size_bytes - per_layer * arch.num_layers
    return GgufLayout((per_layer,) * arch.num_layers, non_layer, False)


def llamacpp_kv_bytes_per_token_layer(arch: ModelArch, kv_type: str) -> int:
    """llama.cpp KV bytes for one token in one layer (K and V, all KV heads)."""
    return math.ceil(2 * arch.num_kv_heads * arch.head_dim * GGML_KV_BYTES[kv_type])


def llamacpp_compute_bytes(arch: ModelArch, n_ctx: int, flash_attn: bool) -> int:
    """Compute buffer of one llama.cpp context: fp32 logits for a micro-batch, scratch for its
    hidden states, and without flash attention the fp32 attention scores (n_ubatch x n_ctx x heads).
    Logs: 164 MiB at n_ctx 2k and 2144 MiB at 32k without FA (docs/calibration-notes.md)."""
    u = LLAMACPP_UBATCH
    buf = u * arch.vocab_size * 4 + u * arch.hidden_size * 4 * 8
    if not flash_attn:
        buf += u * n_ctx * arch.num_attention_heads * 4
    return buf
