"""The KV cache as vLLM's V1 KV-cache manager lays it out: bytes per token and layer, fixed
linear-attention state, and how many tokens a budget holds (vllm/v1/core/kv_cache_utils.py,
vllm/v1/kv_cache_interface.py; docs/memory-model.md).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from agent.catalog.types import ModelArch

# vLLM's KV cache is allocated in blocks of 16 tokens (vllm/config/cache.py default block_size).
BLOCK_SIZE = 16
FULL, SLIDING, LINEAR = "full_attention", "sliding_attention", "linear_attention"
KNOWN_KINDS = (FULL, SLIDING, LINEAR)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def kv_heads_per_rank(arch: ModelArch, tp: int) -> int:
    """KV heads each TP rank stores: heads are split, or replicated when tp > kv_heads."""
    return max(1, arch.num_kv_heads // tp)


def layer_token_bytes(arch: ModelArch, tp: int, dtype_bytes: float) -> int:
    """KV bytes one token costs in one attention layer on one rank. MLA caches one latent of
    kv_lora_rank + qk_rope_head_dim per token, replicated on every TP rank (MLAAttentionSpec)."""
    if arch.is_mla:
        return int((arch.kv_lora_rank + arch.qk_rope_head_dim) * dtype_bytes)
    return int(2 * kv_heads_per_rank(arch, tp) * arch.head_dim * dtype_bytes)


def kv_bytes_per_token(arch: ModelArch, layers: int, tp: int, dtype_bytes: float) -> int:
    """KV bytes one token costs on one rank over ``layers`` attention layers (all charged in full)."""
    return layers * layer_token_bytes(arch, tp, dtype_bytes)


def linear_state_bytes(arch: ModelArch, tp: int, dtype_bytes: float) -> int:
    """State one sequence keeps in one Gated-DeltaNet layer on one rank: the causal-conv window
    (conv_dim x (kernel - 1)) and the recurrent state (value heads x key dim x value dim),
    vllm/model_executor/layers/mamba/mamba_utils.py gated_delta_net_state_shape."""
    key = arch.linear_num_key_heads * arch.linear_key_head_dim
    value = arch.linear_num_value_heads * arch.linear_value_head_dim
    conv = (2 * key + value) // tp * (arch.linear_conv_kernel_dim - 1)
    ssm = arch.linear_num_value_heads // tp * arch.linear_key_head_dim * arch.linear_value_head_dim
    return int((conv + ssm) * dtype_bytes)


@dataclass(frozen=True)
class KvFit:
    """What one rank's KV budget holds at a max_model_len."""

    tokens: int  # what vLLM logs as "GPU KV cache size": max concurrency x max_model_len
    blocks: int  # blocks of the shared pool
    fits_max_len: bool  # one request of max_model_len fits (vLLM's start check)
    needed_bytes: int  # what one max_model_len request needs (the start check's left side)


def kv_fit(arch: ModelArch, kinds: tuple[str, ...], tp: int, dtype_bytes: float, budget: int,
           max_len: int, batched_tokens: int, hybrid_manager: bool, tokens_by_concurrency: bool = True) -> KvFit:
    """Capacity of ``budget`` bytes on one rank holding layers of ``kinds``.

    vLLM groups layers by kind into groups of equal size g (the smallest kind's count), one pool
    of blocks, each block ``page x g`` bytes. A request of L tokens takes cdiv(L, bs) blocks per
    full-attention group, cdiv(min(window - 1 + batched tokens, L), bs) + 1 per sliding group
    (SlidingWindowSpec.max_memory_usage_bytes) and one per linear-attention group (its state; the
    attention block size grows until its page holds a state). The logged capacity of a hybrid
    model is num_blocks / blocks per request x L from 0.21 (get_kv_cache_capacity:
    max_concurrency x max_model_len); before, num_blocks // groups x block size
    (``tokens_by_concurrency`` False: vllm/v1/core/kv_cache_utils.py, 0.10-0.20)."""
    if not hybrid_manager:  # V0 / hybrid manager off: sliding layers charged like full ones
        kinds = tuple(FULL if k == SLIDING else k for k in kinds)
    counts = Counter(kinds)
    token = layer_token_bytes(arch, tp, dtype_bytes)
    bs = BLOCK_SIZE
    if counts.get(LINEAR):
        state = linear_state_bytes(arch, tp, dtype_bytes)
        if token and counts.get(FULL, 0) + counts.get(SLIDING, 0):
            bs = BLOCK_SIZE * _cdiv(state, BLOCK_SIZE * token)
        page = max(bs * token, state)
    else:
        page = bs * token
    g = min(counts.values())
    groups = {k: _cdiv(n, g) for k, n in counts.items()}
    window = arch.sliding_window or max_len
    per_request = {FULL: _cdiv(max_len, bs), SLIDING: _cdiv(min(window - 1 + batched_tokens, max_len), bs) + 1,
                   LINEAR: 1}
    blocks_per_request = sum(groups[k] * per_request[k] for k in groups)
    block_bytes = page * g
    blocks = max(0, budget // block_bytes) if block_bytes else 0
    if len(counts) == 1 and FULL in counts:
        tokens = blocks * bs
    elif not tokens_by_concurrency:
        tokens = blocks // sum(groups.values()) * bs
    else:
        tokens = blocks * max_len // blocks_per_request if blocks_per_request else 0
    needed = block_bytes * blocks_per_request
    return KvFit(tokens=tokens, blocks=blocks, fits_max_len=budget > 0 and needed <= budget, needed_bytes=needed)


def longest_fitting_len(arch: ModelArch, kinds: tuple[str, ...], tp: int, dtype_bytes: float, budget: int,
                        upper: int, batched_tokens: int, hybrid_manager: bool) -> int:
    """The longest max_model_len (<= upper, a multiple of the block size) whose one request fits."""
    lo, hi = 0, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if kv_fit(arch, kinds, tp, dtype_bytes, budget, mid, batched_tokens, hybrid_manager).fits_max_len:
            lo = mid
        else:
            hi = mid - 1
    return lo if lo == upper else lo // BLOCK_SIZE * BLOCK_SIZE
