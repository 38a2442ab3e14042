"""What a vLLM version does at start-up, as far as memory goes: the profiling rules per release.

Each field names the vLLM source it comes from (docs/memory-model.md quotes the lines). The
planner models the version it plans for (the installed one, or ``--vllm-version``); releases
older than ``MIN_SUPPORTED`` keep their rules here so ``bench.calibration`` can replay old logs,
but ``rules_for(..., planning=True)`` refuses them.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from agent.errors import PlanError

GIB = 1024**3
MIN_SUPPORTED = (0, 11)  # pyproject: vllm>=0.11
# The newest release whose source these rules were read from; newer ones are planned with its rules.
NEWEST_READ = (0, 33)


@dataclass(frozen=True)
class VllmRules:
    """How one vLLM release sizes its KV cache."""

    version: tuple[int, ...]
    # V1 engine (>= 0.8 by default, the only engine from 0.11): chunked prefill is always on for
    # generative models (vllm/engine/arg_utils.py _set_default_args: "V1 always uses chunked
    # prefills"). V0 turned it on by itself only above 32k context (use_long_context).
    v1: bool
    # CUDA-graph memory: captured after the KV cache is sized, outside the requested budget
    # (< 0.20), or estimated before and subtracted from the KV budget (>= 0.20:
    # VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS defaults to "1" in vllm/envs.py; 0.18/0.19: "0").
    graphs_in_kv_budget: bool
    # get_batch_defaults (vllm/engine/arg_utils.py): >= 0.28 gives GPUs of >= 160 GiB the
    # largest defaults (16384 batched tokens for the server too).
    big_gpu_tier: bool
    # Sliding-window layers hold only their window (V1 hybrid KV-cache manager,
    # vllm/v1/core/kv_cache_utils.py); V0 charged every layer the full context.
    hybrid_kv_manager: bool
    # mxfp4 MoE on Hopper: the Triton kernels when triton_kernels imports (get_mxfp4_backend in
    # vllm/model_executor/layers/quantization/mxfp4.py), else Marlin. 0.11 needs the package
    # installed beside it; from 0.12 vLLM falls back to its vendored vllm.third_party.triton_kernels
    # (vllm/utils/import_utils.py has_triton_kernels).
    mxfp4_triton_on_hopper: bool
    # How the V1 runner's sampler warm-up (_dummy_sampler_run) applies top-k/top-p to its dummy
    # requests (vllm/v1/sample/ops/topk_topp_sampler.py): "sort" = PyTorch sort (0.10-0.16; 0.10/0.11
    # use FlashInfer only when it is installed, a pip extra in 0.11), "triton" = the in-place Triton
    # kernel for >= 8 rows (0.17-0.20), "flashinfer" = FlashInfer's sampler, on by default from 0.21
    # (VLLM_USE_FLASHINFER_SAMPLER defaults to True) on compute capability 8.0+.
    sampler: str
    # What "GPU KV cache size: N tokens" counts for a hybrid model: max concurrency x max_model_len
    # from 0.21 (kv_cache_utils.get_kv_cache_capacity), num_blocks // groups x block size before.
    kv_tokens_by_concurrency: bool
    # gpu_memory_utilization when none is given (vllm/config/cache.py): 0.92 from 0.20, 0.9 before.
    default_utilization: float

    @property
    def supported(self) -> bool:
        return self.version[:2] >= MIN_SUPPORTED

    @property
    def label(self) -> str:
        return ".".join(map(str, self.version))

    def batch_defaults(self, device_total_bytes: int, device_name: str, server: bool = True) -> tuple[int, int]:
        """(max_num_batched_tokens, max_num_seqs) vLLM picks when neither is set: get_batch_defaults
        in vllm/engine/arg_utils.py (usage context OPENAI_API_SERVER for ``vllm serve``, LLM_CLASS
        for ``LLM(...)``). The agent always passes both, so this matters for replaying logs."""
        if not self.v1:
            return 0, 256  # V0: max(max_model_len, 2048) tokens (or 512 with chunked prefill), 256 seqs
        if self.big_gpu_tier and device_total_bytes >= 160 * GIB:
            return 16384, 1024
        if device_total_bytes >= 70 * GIB and "a100" not in device_name.lower():
            return (8192 if server else 16384), 1024
        return (2048 if server else 8192), 256


    def sampler_for(self, compute_capability: tuple[int, int]) -> str:
        """The sampler path on a GPU: FlashInfer's needs SM 8.0+ (FlashInferBackend
        .supports_compute_capability); below it the Triton kernel serves."""
        if self.sampler == "flashinfer" and compute_capability < (8, 0):
            return "triton"
        return self.sampler

    def v2_runner(self, architecture: str, quantized: bool, moe: bool) -> bool:
        """Whether the release runs the model on its V2 model runner by default
        (vllm/config/vllm.py use_v2_model_runner / DEFAULT_V2_MODEL_RUNNER_ARCHITECTURES): 0.22-0.23
        unquantized dense Qwen3, 0.24 also Llama and Mistral, 0.25-0.28 a few MoE families only,
        every model from 0.29."""
        mm = self.version[:2]
        if mm >= (0, 29):
            return True
        if mm >= (0, 25):
            return architecture in ("DeepseekV2ForCausalLM", "Qwen2MoeForCausalLM", "GraniteMoeForCausalLM")
        if mm >= (0, 24):
            return architecture in ("Qwen3ForCausalLM", "DeepseekV2ForCausalLM", "Qwen2MoeForCausalLM",
                                    "GraniteMoeForCausalLM", "LlamaForCausalLM", "MistralForCausalLM")
        if mm >= (0, 22):
            return architecture == "Qwen3ForCausalLM" and not quantized and not moe
        return False


def parse_version(text: str) -> tuple[int, ...]:
    """(major, minor, patch) from "0.11.0", "0.32.0+cpu", "0.10.1.1", "v0.21.0rc1"."""
    m = re.match(r"^v?(\d+)\.(\d+)(?:\.(\d+))?", text.strip())
    if not m:
        raise PlanError(f"vLLM version {text!r} is not a version like 0.11.0")
    return tuple(int(p) for p in m.groups(default="0"))


def rules_for(version: str | tuple[int, ...], planning: bool = True, flashinfer_sampler: bool = False,
              triton_kernels: bool = False) -> VllmRules:
    """The rules of a release. ``planning``: refuse releases the agent does not support.
    ``flashinfer_sampler``: FlashInfer is installed beside a 0.10/0.11 release, whose V1 sampler then
    uses it (the log says "Using FlashInfer for top-p & top-k sampling."). ``triton_kernels``: the
    triton_kernels package is installed beside a 0.11 release (mxfp4 on Hopper then uses Triton)."""
    v = parse_version(version) if isinstance(version, str) else tuple(version)
    mm = v[:2]
    rules = VllmRules(
        version=v,
        v1=mm >= (0, 8),
        graphs_in_kv_budget=mm >= (0, 20),
        big_gpu_tier=mm >= (0, 28),
        hybrid_kv_manager=mm >= (0, 10),
        mxfp4_triton_on_hopper=mm >= (0, 12) or (mm >= (0, 11) and triton_kernels),
        sampler="sort" if mm < (0, 17) else "triton" if mm < (0, 21) else "flashinfer",
        kv_tokens_by_concurrency=mm >= (0, 21),
        default_utilization=0.92 if mm >= (0, 20) else 0.9,
    )
    if flashinfer_sampler and mm < (0, 12):
        rules = dataclasses.replace(rules, sampler="flashinfer")
    if planning and not rules.supported:
        raise PlanError(
            f"vLLM {rules.label} is older than {'.'.join(map(str, MIN_SUPPORTED))}, the oldest release the planner "
            f"models (node-agent needs vllm>=0.11); upgrade vLLM (pip install -U 'vllm>=0.11') or plan for a "
            f"newer one with --vllm-version")
    return rules
