"""Plans: what the engines will be started with, the memory behind it, and why.

Sizes in bytes. ``reasons`` are one line each with the numbers that drove the choice.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Pins:
    """Choices the operator fixed ("what if"); None = let the planner choose."""

    engine: str = "auto"  # auto | vllm | llamacpp
    tp: int | None = None
    pp: int | None = None
    quantization: str | None = None  # none | fp8 | awq | gguf:<TYPE>
    kv_cache_dtype: str | None = None  # auto | fp8
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    enable_chunked_prefill: bool | None = None  # False: vLLM profiles max_model_len tokens


@dataclass(frozen=True)
class GpuBudget:
    """One GPU's memory as a plan uses it."""

    index: int
    name: str
    total_bytes: int  # as CUDA reports it: NVML total minus the driver reserve
    free_bytes: int
    usable_bytes: int  # free minus margins minus the fallback's reserve
    requested_bytes: int = 0  # vLLM: total x gpu_memory_utilization
    weights_bytes: int = 0
    kv_bytes: int = 0
    activation_bytes: int = 0
    overhead_bytes: int = 0  # non-torch + CUDA graphs (vLLM) or compute buffer (llama.cpp)
    layers: int = 0  # decoder layers on this GPU


@dataclass(frozen=True)
class VllmPlan:
    """Arguments for vLLM's AsyncEngineArgs and the memory each GPU gives to them."""

    fits: bool
    tensor_parallel_size: int
    pipeline_parallel_size: int
    pp_layer_partition: tuple[int, ...] | None  # VLLM_PP_LAYER_PARTITION when uneven
    quantization: str  # none | fp8 | awq | gptq
    dtype: str
    kv_cache_dtype: str  # auto | fp8
    gpu_memory_utilization: float
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    kv_cache_tokens: int
    kv_bytes_per_token: int  # whole model, all layers, at this kv dtype
    weights_bytes: int  # whole model
    devices: tuple[int, ...]  # CUDA indices, rank order
    disable_p2p: bool  # no P2P between the devices: NCCL_P2P_DISABLE and no custom all-reduce
    per_gpu: tuple[GpuBudget, ...]
    reasons: tuple[str, ...] = ()
    refusal: str | None = None  # why it does not fit, with what would make it fit
    vllm_version: str = ""  # the release whose profiling rules the plan models
    chunked_prefill: bool = True
    measured_notes: tuple[str, ...] = ()  # set when the plan used this host's measured terms
    # The variant the agent must make on this node first (``model.quantize: auto``), e.g.
    # "awq-w4a16-g64"; None when the checkpoint exists (agent/planner/quantize_option.py).
    quantize: str | None = None
    # What is known of the checkpoint when `node-agent quantize` made it: variant, scheme, quality
    # check and verdict (set by ``serve``, reported in /v1/node); None for a published checkpoint.
    variant: dict | None = None

    engine = "vllm"

    @property
    def max_concurrency(self) -> float:
        """Sequences of max_model_len tokens the KV cache holds at once."""
        return self.kv_cache_tokens / self.max_model_len if self.max_model_len else 0.0


@dataclass(frozen=True)
class LlamaCppPlan:
    """Arguments for ``llama_cpp.Llama`` and where its memory goes."""

    fits: bool
    gguf_file: str | None
    gguf_repo: str | None
    quant_type: str | None
    n_gpu_layers: int  # -1 = everything, 0 = CPU only
    tensor_split: tuple[float, ...] | None
    main_gpu: int
    n_ctx: int
    n_threads: int
    n_batch: int
    flash_attn: bool
    type_k: str
    type_v: str
    instances: int
    layers_on_gpu: int
    total_layers: int
    weights_bytes: int
    kv_bytes: int
    ram_bytes: int  # host RAM it needs (weights and KV of CPU layers + compute buffer)
    per_gpu: tuple[GpuBudget, ...]
    reasons: tuple[str, ...] = ()
    refusal: str | None = None

    engine = "llamacpp"


@dataclass(frozen=True)
class NodePlan:
    """The whole decision: the primary engine's plan, the fallback's, and what was weighed."""

    model: str
    engine: str  # the primary: vllm | llamacpp
    primary: VllmPlan | LlamaCppPlan
    fallback: LlamaCppPlan | None
    alternatives: tuple[VllmPlan, ...] = ()
    reasons: tuple[str, ...] = ()
    refusals: tuple[str, ...] = field(default=())

    @property
    def fits(self) -> bool:
        return self.primary.fits
