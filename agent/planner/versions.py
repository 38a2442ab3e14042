"""What a vLLM version does at start-up, as far as memory goes: the profiling rules per release.

Each field names the vLLM source it comes from (docs/memory-model.md quotes the lines). The
planner models the version it plans for (the installed one, or ``--vllm-version``); releases
older than ``MIN_SUPPORTED`` keep their rules here so ``bench.calibration`` can replay old logs,
but ``rules_for(..., planning=True)`` refuses them.
"""

from __future__ import annotations

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
    # mxfp4 MoE on Hopper: Triton kernels from 0.11 (get_mxfp4_backend), Marlin before.
    mxfp4_triton_on_hopper: bool

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


def parse_version(text: str) -> tuple[int, ...]:
    """(major, minor, patch) from "0.11.0", "0.32.0+cpu", "0.10.1.1", "v0.21.0rc1"."""
    m = re.match(r"^v?(\d+)\.(\d+)(?:\.(\d+))?", text.strip())
    if not m:
        raise PlanError(f"vLLM version {text!r} is not a version like 0.11.0")
    return tuple(int(p) for p in m.groups(default="0"))


def rules_for(version: str | tuple[int, ...], planning: bool = True) -> VllmRules:
    """The rules of a release. ``planning``: refuse releases the agent does not support."""
    v = parse_version(version) if isinstance(version, str) else tuple(version)
    mm = v[:2]
    rules = VllmRules(
        version=v,
        v1=mm >= (0, 8),
        graphs_in_kv_budget=mm >= (0, 20),
        big_gpu_tier=mm >= (0, 28),
        hybrid_kv_manager=mm >= (0, 10),
        mxfp4_triton_on_hopper=False,  # public 0.10.1 and 0.11 logs on H100 show the Marlin backend
    )
    if planning and not rules.supported:
        raise PlanError(
            f"vLLM {rules.label} is older than {'.'.join(map(str, MIN_SUPPORTED))}, the oldest release the planner "
            f"models (node-agent needs vllm>=0.11); upgrade vLLM (pip install -U 'vllm>=0.11') or plan for a "
            f"newer one with --vllm-version")
    return rules
