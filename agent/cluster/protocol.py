"""What the agents of a group tell each other: a worker's heartbeat and the head's answer.

A worker agent POSTs a ``Heartbeat`` to the head agent every ``cluster.heartbeat_interval_s``
(and at once when its engine changes state); the head answers with a ``Reply``: who it is (a
restarted head has a new ``head_id``), the group's ``epoch`` and state, and for a group that is
forming or running the ``EngineSpec`` this worker's engine runs. Every field is bounded: a worker
runs only the engine arguments described here, on its own copy of the model (never a path from
the head).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from agent.planner.types import VllmPlan

EngineState = Literal["idle", "starting", "running"]
GroupState = Literal["idle", "forming", "running"]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EngineSpec(_Message):
    """One rank's vLLM arguments for one group (``epoch``); the same numbers on every host but the
    rank and the devices."""

    epoch: str = Field(min_length=1, max_length=64)
    nnodes: int = Field(ge=2, le=64)
    node_rank: int = Field(ge=0, le=63)
    master_addr: str = Field(min_length=1, max_length=255)
    master_port: int = Field(ge=1, le=65535)
    tensor_parallel_size: int = Field(ge=1, le=64)
    pipeline_parallel_size: int = Field(ge=1, le=1024)
    pp_layer_partition: tuple[int, ...] = Field(min_length=1, max_length=1024)
    dtype: Literal["bfloat16", "float16", "float32"]
    quantization: str = Field(pattern=r"^[a-z0-9_-]{1,32}$")
    kv_cache_dtype: Literal["auto", "fp8"]
    gpu_memory_utilization: float = Field(gt=0, le=1)
    max_model_len: int = Field(ge=1, le=10_000_000)
    max_num_seqs: int = Field(ge=1, le=65536)
    max_num_batched_tokens: int = Field(ge=1, le=10_000_000)
    chunked_prefill: bool
    devices: tuple[int, ...] = Field(max_length=64)  # this host's CUDA ordinals; empty on the CPU build
    disable_p2p: bool
    cpu_kvcache_gib: int = Field(ge=1, le=1024)

    @classmethod
    def for_rank(cls, plan: VllmPlan, epoch: str, nnodes: int, rank: int, master: tuple[str, int],
                 cpu_kvcache_gib: int) -> EngineSpec:
        """The spec of ``rank`` from its member plan (agent/planner/cluster.py MemberPlan.plan)."""
        return cls(epoch=epoch, nnodes=nnodes, node_rank=rank, master_addr=master[0], master_port=master[1],
                   tensor_parallel_size=plan.tensor_parallel_size, pipeline_parallel_size=plan.pipeline_parallel_size,
                   pp_layer_partition=plan.pp_layer_partition or (), dtype=plan.dtype, quantization=plan.quantization,
                   kv_cache_dtype=plan.kv_cache_dtype, gpu_memory_utilization=plan.gpu_memory_utilization,
                   max_model_len=plan.max_model_len, max_num_seqs=plan.max_num_seqs,
                   max_num_batched_tokens=plan.max_num_batched_tokens, chunked_prefill=plan.chunked_prefill,
                   devices=plan.devices, disable_p2p=plan.disable_p2p, cpu_kvcache_gib=cpu_kvcache_gib)

    def plan(self) -> VllmPlan:
        """These arguments as the plan agent/backends/vllm.py builds engine arguments from."""
        return VllmPlan(
            fits=True, tensor_parallel_size=self.tensor_parallel_size, pipeline_parallel_size=self.pipeline_parallel_size,
            pp_layer_partition=self.pp_layer_partition, quantization=self.quantization, dtype=self.dtype,
            kv_cache_dtype=self.kv_cache_dtype, gpu_memory_utilization=self.gpu_memory_utilization,
            max_model_len=self.max_model_len, max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens, kv_cache_tokens=0, kv_bytes_per_token=0,
            weights_bytes=0, devices=self.devices, disable_p2p=self.disable_p2p, per_gpu=(),
            chunked_prefill=self.chunked_prefill)

    def cluster_kwargs(self) -> dict:
        """The AsyncEngineArgs that make one host's engine a member of the group."""
        return {"nnodes": self.nnodes, "node_rank": self.node_rank, "master_addr": self.master_addr,
                "master_port": self.master_port, "distributed_executor_backend": "mp"}


class Heartbeat(_Message):
    """A worker agent's report: who it is, what it has, what its engine does."""

    rank: int = Field(ge=1, le=63)
    agent_id: str = Field(min_length=1, max_length=64)  # new for every agent process
    hostname: str = Field(max_length=255)
    host_ip: str = Field(min_length=1, max_length=64)  # its VLLM_HOST_IP
    host: dict  # its detection, agent/hardware/report.py host_to_dict
    model_name: str = Field(max_length=255)
    model_fingerprint: str = Field(max_length=128)  # agent/planner/learned.py model_fingerprint
    engine: EngineState
    engine_epoch: str | None = Field(None, max_length=64)
    engine_pid: int | None = None
    error: str | None = Field(None, max_length=4000)  # why its engine last stopped


class Reply(_Message):
    """The head agent's answer to a heartbeat."""

    head_id: str  # new for every head agent process: a worker that sees it change rejoins
    epoch: str | None  # the group being formed or running; None before the first
    group: GroupState
    spec: EngineSpec | None = None  # this worker's engine, while the group forms or runs
    refusal: str | None = None  # why this worker cannot be a member (another model, its rank is taken, ...)
    reason: str | None = None  # why the group is idle (the last loss), for the worker's health
    members: list[dict] = Field(default_factory=list)  # the group as the head sees it (coordinator.describe)
