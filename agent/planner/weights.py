"""Weight bytes from architecture numbers: parameters by role, and bytes per parameter under each
checkpoint format vLLM loads. docs/memory-model.md derives every term.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.catalog.types import ModelArch, WeightSource

# Bytes per parameter of the unquantized checkpoint dtypes.
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# AWQ/GPTQ 4-bit: per group of 128 weights one fp16 scale (2 bytes) and one 4-bit zero.
AWQ_GROUP = 128
AWQ_BYTES_PER_PARAM = 0.5 + (2 + 0.5) / AWQ_GROUP
# mxfp4 (gpt-oss): 4-bit e2m1 values and one e8m0 scale byte per block of 32 (OCP MX spec;
# vllm/model_executor/layers/quantization/mxfp4.py mxfp4_block = 32). Only the MoE experts.
MXFP4_BLOCK = 32
MXFP4_BYTES_PER_PARAM = 0.5 + 1 / MXFP4_BLOCK
# Formats vLLM is told by name (engine argument ``quantization``), best quality first.
VLLM_QUANTIZATIONS = ("none", "fp8", "compressed-tensors", "mxfp4", "awq", "gptq")


@dataclass(frozen=True)
class ParamCounts:
    """Parameters by role; the roles quantize differently. Totals over all layers."""

    embedding: int  # token embeddings (vocab x hidden)
    lm_head: int  # 0 when tied to the embeddings
    attention: int  # q/k/v/o, MLA projections, or linear-attention projections: all layers
    experts: int  # routed MoE experts: all layers (0 for dense)
    mlp: int  # dense MLPs, shared experts and routers: all layers
    other: int  # norms, biases, convolution and gate vectors: stay 16-bit
    final_norm: int
    layers: int
    vision: int = 0  # vision tower and projector of a multimodal checkpoint

    @property
    def linear(self) -> int:
        return self.attention + self.experts + self.mlp

    @property
    def per_layer_linear(self) -> int:
        """Average linear parameters of one decoder layer (what quantization shrinks)."""
        return self.linear // max(1, self.layers)

    @property
    def per_layer_other(self) -> int:
        return self.other // max(1, self.layers)

    @property
    def total(self) -> int:
        return self.embedding + self.lm_head + self.final_norm + self.linear + self.other + self.vision


def _attention_params(arch: ModelArch, kind: str) -> tuple[int, int]:
    """(linear, other) parameters of one layer's attention block."""
    h = arch.hidden_size
    if kind == "linear_attention":  # Gated DeltaNet (vllm/model_executor/models/qwen3_next.py)
        key = arch.linear_num_key_heads * arch.linear_key_head_dim
        value = arch.linear_num_value_heads * arch.linear_value_head_dim
        proj = h * (2 * key + 2 * value) + h * 2 * arch.linear_num_value_heads + value * h
        conv = (2 * key + value) * arch.linear_conv_kernel_dim
        return proj, conv + 2 * arch.linear_num_value_heads + arch.linear_value_head_dim
    a = arch.num_attention_heads
    if arch.is_mla:  # DeepSeek-V2/V3 (vllm/model_executor/models/deepseek_v2.py)
        qk = arch.qk_nope_head_dim + arch.qk_rope_head_dim
        q = (h * arch.q_lora_rank + arch.q_lora_rank * a * qk) if arch.q_lora_rank else h * a * qk
        kv = h * (arch.kv_lora_rank + arch.qk_rope_head_dim) + arch.kv_lora_rank * a * (
            arch.qk_nope_head_dim + arch.v_head_dim)
        return q + kv + a * arch.v_head_dim * h, arch.q_lora_rank + arch.kv_lora_rank
    q = a * arch.head_dim
    kv = arch.num_kv_heads * arch.head_dim
    biases = (q + 2 * kv) if arch.attention_bias else 0
    return h * (q + 2 * kv) + q * h, biases


def _mlp_params(arch: ModelArch, layer: int) -> tuple[int, int]:
    """(routed experts, dense MLP + shared expert + router) parameters of one layer."""
    h = arch.hidden_size
    if not arch.num_experts or layer < arch.first_dense_layers:
        width = arch.dense_intermediate_size if layer < arch.first_dense_layers else arch.intermediate_size
        return 0, 3 * h * width
    experts = arch.num_experts * 3 * h * arch.intermediate_size
    shared = 3 * h * arch.shared_expert_intermediate_size + (h if arch.shared_expert_intermediate_size else 0)
    return experts, shared + h * arch.num_experts


def param_counts(arch: ModelArch) -> ParamCounts:
    """Count parameters from the config: dense and MoE MLPs, GQA/MLA/linear attention, vision tower."""
    attention = experts = mlp = other = 0
    for i, kind in enumerate(arch.kinds()):
        lin, oth = _attention_params(arch, kind)
        ex, dense = _mlp_params(arch, i)
        attention += lin
        experts += ex
        mlp += dense
        other += oth + 2 * arch.hidden_size
    embedding = arch.vocab_size * arch.hidden_size
    return ParamCounts(
        embedding=embedding, lm_head=0 if arch.tie_word_embeddings else embedding, attention=attention,
        experts=experts, mlp=mlp, other=other, final_norm=arch.hidden_size, layers=arch.num_layers,
        vision=arch.vision_params,
    )


def linear_bytes_per_param(quantization: str, arch: ModelArch, source: WeightSource | None = None) -> float:
    """Bytes per quantized linear weight under a vLLM quantization, with its scales."""
    if quantization == "none" or quantization == "mxfp4":  # mxfp4: only experts, see expert_bytes
        return DTYPE_BYTES.get(arch.dtype, 2)
    if quantization == "fp8":
        block = source.weight_block if source and len(source.weight_block) == 2 else ()
        return 1.0 + (4 / (block[0] * block[1]) if block else 0.0)  # one fp32 scale per block
    if quantization in ("awq", "gptq"):
        bits = (source.bits if source and source.bits else 4)
        group = (source.group_size if source and source.group_size and source.group_size > 0 else AWQ_GROUP)
        return bits / 8 + (2 + bits / 8) / group
    if quantization == "compressed-tensors":
        bits = (source.bits if source and source.bits else 8)
        group = source.group_size if source and source.group_size and source.group_size > 0 else 0
        if not group or bits >= 8:
            return bits / 8
        # one 16-bit scale per group, and with asymmetric weights one int8 zero point (compressed-
        # tensors 0.19 writes zp_dtype int8; vLLM's CPU build keeps it so: measured, within 0.2 %)
        return bits / 8 + (2 + (1 if source and source.zero_points else 0)) / group
    raise ValueError(f"unknown quantization {quantization!r}")


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def expert_bytes(arch: ModelArch, quantization: str, tp: int, layers: int, source: WeightSource | None,
                 compute_capability: tuple[int, int], mxfp4_triton_on_hopper: bool) -> float:
    """Routed-expert bytes of ``layers`` MoE layers on one TP rank. mxfp4 pads the experts for its
    kernel (get_mxfp4_backend / create_weights in vllm/.../quantization/mxfp4.py): Marlin (GPUs
    without FP4, or Hopper without triton_kernels) pads the intermediate size to 128 and hidden to
    256, FlashInfer on Blackwell both to 256, Triton on Hopper the intermediate size to 64 and its
    swizzled value layout (triton_kernels HopperMXValueLayout._padded_shape, 64 x 256) the hidden
    size to 256."""
    if not arch.num_experts:
        return 0.0
    moe_layers = max(0, layers - min(layers, arch.first_dense_layers))
    h, inter = arch.hidden_size, arch.intermediate_size // tp
    if quantization != "mxfp4":
        per = arch.num_experts * 3 * h * inter * linear_bytes_per_param(quantization, arch, source)
        return per * moe_layers
    major = compute_capability[0]
    if major >= 10:
        inter, h = _round_up(inter, 256), _round_up(h, 256)
    elif major == 9 and mxfp4_triton_on_hopper:
        inter, h = _round_up(inter, 64), _round_up(h, 256)
    else:
        inter, h = _round_up(inter, 128), _round_up(h, 256)
    return arch.num_experts * 3 * h * inter * MXFP4_BYTES_PER_PARAM * moe_layers


def rope_cache_bytes(arch: ModelArch) -> int:
    """vLLM's RotaryEmbedding keeps a cos/sin cache of max_position x rotary_dim in the model dtype
    (vllm/model_executor/layers/rotary_embedding: cos_sin_cache buffer). MLA ropes qk_rope_head_dim."""
    if all(k == "linear_attention" for k in arch.kinds()):
        return 0
    dim = arch.qk_rope_head_dim if arch.is_mla else (arch.rotary_dim or arch.head_dim)
    return arch.max_position_embeddings * dim * DTYPE_BYTES.get(arch.dtype, 2)


def vllm_rank_weights(arch: ModelArch, quantization: str, tp: int, layers: int, first_stage: bool,
                      last_stage: bool, source: WeightSource | None = None,
                      compute_capability: tuple[int, int] = (9, 0), mxfp4_triton_on_hopper: bool = True) -> int:
    """What vLLM logs as "Model loading took" on one GPU: its stage's layers sharded over TP, the
    embeddings and vision tower on the first stage, the LM head (vocab-parallel) on the last, and
    the RoPE cache. 16-bit parts stay 16-bit."""
    p = param_counts(arch)
    half = DTYPE_BYTES.get(arch.dtype, 2)
    share = layers / max(1, arch.num_layers)
    non_expert = (p.attention + p.mlp) * share
    total = non_expert * linear_bytes_per_param(quantization, arch, source) / tp + p.other * share * half
    total += expert_bytes(arch, quantization, tp, layers, source, compute_capability, mxfp4_triton_on_hopper)
    if first_stage:
        total += (p.embedding + p.vision) * half / tp
    if last_stage:
        total += p.lm_head * half / tp + p.final_norm * half
    if layers:
        total += rope_cache_bytes(arch)
    return int(total)


def weights_total(arch: ModelArch, quantization: str, source: WeightSource | None = None) -> int:
    """All parameter bytes of the model under a quantization (one copy, no sharding, no buffers)."""
    return vllm_rank_weights(arch, quantization, 1, arch.num_layers, True, True, source) - rope_cache_bytes(arch)


