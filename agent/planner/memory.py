"""The memory model: pure arithmetic on architecture numbers. docs/memory-model.md derives it.

Every constant names where it comes from; docs/calibration-notes.md holds the public vLLM and
llama.cpp start-up logs they were checked against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from agent.catalog.types import ModelArch, WeightSource

GIB = 1024**3
MIB = 1024**2

# vLLM's KV cache is allocated in blocks of 16 tokens (vllm/config/cache.py default block_size).
BLOCK_SIZE = 16
# Memory vLLM sees outside PyTorch's allocator (CUDA context growth, NCCL buffers). Public logs:
# 0.03-0.35 GiB at TP=1, 0.2-0.75 GiB at TP>=2 (docs/calibration-notes.md); we take the top.
NON_TORCH_TP1_BYTES = int(0.4 * GIB)
NON_TORCH_TPN_BYTES = int(0.8 * GIB)
# CUDA graphs: vLLM >= 0.21 subtracts its estimate from the KV budget (0.17-0.36 GiB logged);
# older releases take it from the (1 - utilization) share. Reserving it either way is safe.
CUDA_GRAPH_BYTES = int(0.5 * GIB)
# AWQ/GPTQ 4-bit: per group of 128 weights one fp16 scale (2 bytes) and one 4-bit zero.
AWQ_GROUP = 128
AWQ_BYTES_PER_PARAM = 0.5 + (2 + 0.5) / AWQ_GROUP
# Bytes per parameter of the unquantized checkpoint dtypes.
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# llama.cpp KV cache element sizes (ggml block sizes: q8_0 = 34 bytes / 32, q4_0 = 18 / 32).
GGML_KV_BYTES = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
# llama.cpp default micro-batch (n_ubatch) that sizes its compute buffer.
LLAMACPP_UBATCH = 512


@dataclass(frozen=True)
class ParamCounts:
    """Parameters by role; the roles quantize differently."""

    embedding: int  # token embeddings (vocab x hidden)
    lm_head: int  # 0 when tied to the embeddings
    per_layer_linear: int  # attention q/k/v/o + MLP or experts + router: what quantization shrinks
    per_layer_other: int  # norms and biases: stay 16-bit
    final_norm: int
    layers: int

    @property
    def total(self) -> int:
        return self.embedding + self.lm_head + self.final_norm + self.layers * (
            self.per_layer_linear + self.per_layer_other)


def param_counts(arch: ModelArch) -> ParamCounts:
    """Count parameters from the config (Llama/Mistral/Qwen2/Mixtral family)."""
    q = arch.num_attention_heads * arch.head_dim
    kv = arch.num_kv_heads * arch.head_dim
    attention = arch.hidden_size * (q + 2 * kv) + q * arch.hidden_size
    mlp = 3 * arch.hidden_size * arch.intermediate_size
    if arch.num_experts:
        mlp = arch.num_experts * mlp + arch.hidden_size * arch.num_experts  # experts + router
    biases = (q + 2 * kv) if arch.attention_bias else 0
    embedding = arch.vocab_size * arch.hidden_size
    return ParamCounts(
        embedding=embedding,
        lm_head=0 if arch.tie_word_embeddings else embedding,
        per_layer_linear=attention + mlp,
        per_layer_other=2 * arch.hidden_size + biases,
        final_norm=arch.hidden_size,
        layers=arch.num_layers,
    )


def linear_bytes_per_param(quantization: str, arch: ModelArch) -> float:
    """Bytes per linear-layer weight under a vLLM quantization ("none", "fp8", "awq", "gptq")."""
    if quantization == "none":
        return DTYPE_BYTES.get(arch.dtype, 2)
    if quantization == "fp8":
        return 1.0
    if quantization in ("awq", "gptq"):
        return AWQ_BYTES_PER_PARAM
    raise ValueError(f"unknown quantization {quantization!r}")


def vllm_rank_weights(arch: ModelArch, quantization: str, tp: int, layers: int,
                      first_stage: bool, last_stage: bool) -> int:
    """Weight bytes on one GPU: its stage's layers, sharded over TP; embeddings on the first
    stage and the LM head on the last (vocab-parallel, so also divided by TP). 16-bit stays 16-bit."""
    p = param_counts(arch)
    half = DTYPE_BYTES.get(arch.dtype, 2)
    linear = p.per_layer_linear * layers * linear_bytes_per_param(quantization, arch) / tp
    other = p.per_layer_other * layers * half
    total = linear + other
    if first_stage:
        total += p.embedding * half / tp
    if last_stage:
        total += (p.lm_head * half / tp) + p.final_norm * half
    return int(total)


def weights_total(arch: ModelArch, quantization: str) -> int:
    """All weight bytes of the model under a quantization (one copy, no sharding)."""
    return vllm_rank_weights(arch, quantization, 1, arch.num_layers, True, True)


def kv_heads_per_rank(arch: ModelArch, tp: int) -> int:
    """KV heads each TP rank stores: heads are split, or replicated when tp > kv_heads."""
    return max(1, arch.num_kv_heads // tp)


def kv_bytes_per_token(arch: ModelArch, layers: int, tp: int, dtype_bytes: float) -> int:
    """KV cache bytes one token costs on one rank: 2 (K and V) x layers x heads x head_dim x bytes."""
    return int(2 * layers * kv_heads_per_rank(arch, tp) * arch.head_dim * dtype_bytes)


def vllm_activation_bytes(arch: ModelArch, tp: int, max_num_batched_tokens: int, max_num_seqs: int) -> int:
    """Peak activation vLLM's profiling run sees: one step of max_num_batched_tokens through the
    widest layer (residual + norm + q/k/v/o in 16-bit, gate/up/act of the MLP, or of the routed
    experts), plus the sampler's fp32 logits for max_num_seqs. Checked against logs: Llama-3.1-8B
    logs 2.07 GiB at 20k batched tokens; this gives 2.38 (docs/memory-model.md, calibration)."""
    experts = max(1, arch.num_experts_per_tok)
    per_token = 2 * (4 * arch.hidden_size + 3 * arch.intermediate_size * experts // tp)
    sampler = max_num_seqs * arch.vocab_size * 4
    return max_num_batched_tokens * per_token + sampler


def non_torch_bytes(tp: int, pp: int) -> int:
    """CUDA context growth and NCCL buffers seen outside PyTorch (see constants above)."""
    return NON_TORCH_TP1_BYTES if tp * pp == 1 else NON_TORCH_TPN_BYTES


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
