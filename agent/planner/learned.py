"""What vLLM measured at a real start, as the planner uses it next time. Pure: the store that
reads and writes these records lives in agent/learned_store.py; the planner gets them passed in.

A record is keyed by everything that changes vLLM's measurement: the model (a fingerprint of its
architecture and weights source), quantization, TP x PP, GPU model, vLLM version, max_model_len
and max_num_batched_tokens. The one term that decides the KV cache is what the profile took from
the requested memory besides the KV cache (weights + activation peak + non-torch [+ CUDA graphs]);
it is stored per rank, with the breakdown where the engine exposed one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields

from agent.catalog.types import ModelSpec


@dataclass(frozen=True)
class MeasuredKey:
    """Everything a measurement depends on."""

    model: str  # fingerprint (model_fingerprint)
    quantization: str
    tp: int
    pp: int
    gpu: str  # GPU model name, or "cpu" for vLLM's CPU build
    vllm_version: str
    max_model_len: int
    max_num_batched_tokens: int

    def id(self) -> str:
        return "|".join(str(getattr(self, f.name)) for f in fields(self))


@dataclass(frozen=True)
class Measured:
    """One start's measurements (bytes; per rank, the tightest rank where they differ)."""

    key: MeasuredKey
    measured_at: str  # ISO date of the start, given by the caller (the planner has no clock)
    requested_bytes: int  # total x gpu_memory_utilization (CPU build: the KV space)
    kv_bytes: int  # what vLLM gave the KV cache
    num_blocks: int
    block_size: int
    kv_tokens: int  # the capacity vLLM reported
    predicted_kv_tokens: int = 0  # what the plan said before the start
    weights_bytes: int | None = None
    activation_bytes: int | None = None
    non_torch_bytes: int | None = None
    graph_bytes: int | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def non_kv_bytes(self) -> int:
        """What the profile took from the requested memory besides the KV cache."""
        return self.requested_bytes - self.kv_bytes

    @property
    def prediction_error(self) -> float | None:
        """Relative error of the plan's KV tokens against the measured ones (+ = over)."""
        if not self.kv_tokens or not self.predicted_kv_tokens:
            return None
        return (self.predicted_kv_tokens - self.kv_tokens) / self.kv_tokens

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Measured:
        key = MeasuredKey(**data["key"])
        rest = {k: v for k, v in data.items() if k != "key" and k in {f.name for f in fields(cls)}}
        rest["notes"] = tuple(rest.get("notes", ()))
        return cls(key=key, **rest)


def model_fingerprint(model: ModelSpec) -> str:
    """A short stable hash of what makes two models the same to vLLM's memory: the architecture
    numbers and the weight sources (format, repo, file, sizes)."""
    arch = asdict(model.arch)
    sources = [asdict(s) for s in model.sources]
    blob = json.dumps({"arch": arch, "sources": sources}, sort_keys=True, default=str)
    return f"{model.name}:{hashlib.sha256(blob.encode()).hexdigest()[:12]}"
