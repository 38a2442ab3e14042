"""What vLLM's start-up profile measures besides the weights: the activation peak of its dummy
forward and sampler runs, memory outside PyTorch, and CUDA graphs (docs/memory-model.md).

V1 (vllm/v1/worker/gpu_worker.py determine_available_memory): KV budget = total x utilization -
(weights + torch peak increase + non-torch increase) [- CUDA-graph estimate from 0.20]. The torch
peak comes from gpu_model_runner.profile_run: ``_dummy_run(max_num_tokens)`` and then, on the last
pipeline stage, ``_dummy_sampler_run`` over one row per dummy request.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.catalog.types import ModelArch
from agent.planner.versions import VllmRules

GIB = 1024**3
# vllm/config/scheduler.py DEFAULT_MAX_NUM_BATCHED_TOKENS: the floor when chunked prefill is off.
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048
# Live bytes per (dummy request x vocabulary entry) at the peak of the sampler warm-up, by the path
# the release takes (VllmRules.sampler; vllm/v1/sample/sampler.py, ops/topk_topp_sampler.py):
# - "sort" (apply_top_k_top_p_pytorch): the 16-bit logits compute_logits returns (2), their fp32
#   copy (4), logits.sort()'s values (4) and int64 indices (8), and the sort's own scratch (an int64
#   index input and key/value buffers: 8 + 4 + 8) = 38;
# - "triton" (apply_top_k_top_p_triton, in place on the fp32 logits) and "flashinfer"
#   (top_k_top_p_sampling_from_logits: masked logits, then softmax): 16-bit logits (2), fp32 copy
#   (4), then two fp32 tensors (softmax probabilities and random_sample's exponential draw, or
#   FlashInfer's masked logits and probabilities) = 14;
# - "v2" (the V2 model runner, vllm/v1/worker/gpu/model_runner.py _dummy_sampler_run): "the sampler
#   may skip top_k, top_p and logprobs" - apply_sampling_params returns the 16-bit logits as they
#   are for dummy requests and gumbel_sample reads them in place = 2.
SAMPLER_BYTES_PER_LOGIT = {"sort": 38, "triton": 14, "flashinfer": 14, "v2": 2}
# The Triton kernel keeps one fp32 row of the vocabulary per program, min(rows, SMs) programs
# (_TRITON_BUFFER_CACHE); GPUs have 80-170 SMs, the planner assumes 128.
TRITON_PROGRAMS = 128
# Memory outside PyTorch that grows during the profile run (cuBLAS workspaces; with TP > 1, NCCL's
# buffers, which NCCL allocates on the first collective - inside the profile run). Measured on vLLM
# 0.11 logs (docs/calibration-data.yaml, llm-d's H100 table): 0.13-0.14 GiB at TP=1, 0.54-0.55 GiB
# per rank at TP=2. No supported-release log gives TP >= 4 alone; the TP=2 figure is used there.
NON_TORCH_TP1_BYTES = int(0.13 * GIB)
NON_TORCH_MULTI_RANK_BYTES = int(0.55 * GIB)
# CUDA graphs of the default capture sizes: 0.23-0.50 GiB logged for dense models (0.17-0.84 in all).
CUDA_GRAPH_BYTES = int(0.5 * GIB)


@dataclass(frozen=True)
class Profile:
    """The non-weight terms of one rank, as vLLM's profile would measure them."""

    batched_tokens: int  # tokens of the dummy forward (max_num_batched_tokens in force)
    dummy_requests: int  # rows of the dummy sampler run
    forward_bytes: int
    sampler_bytes: int
    activation_bytes: int  # the torch peak increase: max(forward, sampler + kept hidden states)
    non_torch_bytes: int
    graph_bytes: int
    graphs_in_budget: bool  # subtracted from the KV budget (>= 0.20) or taken outside it

    @property
    def in_budget_bytes(self) -> int:
        """What the profile takes from the requested memory besides the weights."""
        return self.activation_bytes + self.non_torch_bytes + (self.graph_bytes if self.graphs_in_budget else 0)


def profiled_tokens(rules: VllmRules, max_num_batched_tokens: int, max_model_len: int,
                    chunked_prefill: bool | None = None) -> int:
    """Tokens of the dummy forward: max_num_batched_tokens with chunked prefill (always on in V1
    unless turned off), else max(max_model_len, 2048) (SchedulerConfig.__post_init__). V0 turned
    chunked prefill on by itself above 32k context with a 512-token budget. ``chunked_prefill``
    None: the release's default."""
    if rules.v1:
        if chunked_prefill is False:
            return max(max_model_len, DEFAULT_MAX_NUM_BATCHED_TOKENS)
        return max_num_batched_tokens
    if chunked_prefill or (chunked_prefill is None and max_model_len > 32768):
        return max_num_batched_tokens or 512
    return max(max_model_len, DEFAULT_MAX_NUM_BATCHED_TOKENS)


def forward_bytes_per_token(arch: ModelArch, tp: int) -> int:
    """Live 16-bit activations per token inside the widest layer of one rank: three hidden-size
    tensors (input, residual, output) and the MLP's gate/up output with its activation (3 x the
    width), for MoE the fused_moe caches of every routed expert. Checked against V0 logs of
    Llama-3.1-8B: 2.07 GiB at 20k and 2.99 GiB at 29k tokens (docs/calibration-data.yaml)."""
    h = arch.hidden_size
    if arch.num_experts:
        routed = arch.num_experts_per_tok * (3 * arch.intermediate_size // tp + h)
        widest = max(routed + 3 * arch.shared_expert_intermediate_size // tp,
                     3 * arch.dense_intermediate_size // tp if arch.first_dense_layers else 0)
    else:
        widest = 3 * arch.intermediate_size // tp
    return 2 * (3 * h + widest)


def non_torch_bytes(tp: int, pp: int) -> int:
    """Non-torch increase of one rank (see the constants)."""
    return NON_TORCH_TP1_BYTES if tp * pp == 1 else NON_TORCH_MULTI_RANK_BYTES


def sampler_bytes(sampler: str, rows: int, vocab: int) -> int:
    """The sampler warm-up's peak over ``rows`` dummy requests (see SAMPLER_BYTES_PER_LOGIT)."""
    buffer = min(rows, TRITON_PROGRAMS) * vocab * 4 if sampler == "triton" and rows >= 8 else 0
    path = "sort" if sampler == "triton" and rows < 8 else sampler  # the kernel serves >= 8 rows
    return rows * vocab * SAMPLER_BYTES_PER_LOGIT[path] + buffer


def profile(arch: ModelArch, rules: VllmRules, tp: int, pp: int, last_stage: bool, max_num_batched_tokens: int,
            max_num_seqs: int, max_model_len: int, chunked_prefill: bool | None = None, eager: bool = False,
            sampler: str | None = None) -> Profile:
    """The profile of one rank. The sampler runs on the last stage only, over
    min(max_num_seqs, tokens) rows and the whole vocabulary (logits are gathered over TP).
    ``sampler``: the warm-up's path (rules.sampler_for(...), "v2" on the V2 runner); None: the
    release's default on a GPU of compute capability 8.0+."""
    tokens = profiled_tokens(rules, max_num_batched_tokens, max_model_len, chunked_prefill)
    forward = tokens * forward_bytes_per_token(arch, tp)
    requests = min(max_num_seqs, tokens)
    if not last_stage:
        warm_up = 0
    elif rules.v1:
        warm_up = sampler_bytes(sampler or rules.sampler, requests, arch.vocab_size) + tokens * arch.hidden_size * 2
    else:  # V0 sampled in fp32 without the V1 warm-up of every dummy request
        warm_up = requests * arch.vocab_size * 6
    graphs = 0 if eager else CUDA_GRAPH_BYTES
    return Profile(batched_tokens=tokens, dummy_requests=requests, forward_bytes=forward, sampler_bytes=warm_up,
                   activation_bytes=max(forward, warm_up), non_torch_bytes=non_torch_bytes(tp, pp),
                   graph_bytes=graphs, graphs_in_budget=rules.graphs_in_kv_budget)
