"""The stable JSON form of a NodePlan (``node-agent plan --json``; docs/planner.md).

Add fields, never rename or repurpose them; bump SCHEMA_VERSION on a breaking change.
docs/schemas/plan.schema.json is the schema and the tests hold the output to it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from agent.planner.types import LlamaCppPlan, NodePlan, VllmPlan

SCHEMA_VERSION = 1
FLAT_VLLM_FIELDS = (
    "tensor_parallel_size", "pipeline_parallel_size", "pp_layer_partition", "quantization", "kv_cache_dtype",
    "gpu_memory_utilization", "max_model_len", "max_num_seqs", "max_num_batched_tokens", "kv_cache_tokens",
    "kv_bytes_per_token",
)


def _vllm(p: VllmPlan) -> dict[str, Any]:
    d = dataclasses.asdict(p)
    d["max_concurrency"] = round(p.max_concurrency, 2)
    return d


def _alternative(p: VllmPlan) -> dict[str, Any]:
    keys = ("fits", "tensor_parallel_size", "pipeline_parallel_size", "pp_layer_partition", "quantization",
            "kv_cache_dtype", "gpu_memory_utilization", "kv_cache_tokens", "devices", "refusal")
    return {k: getattr(p, k) for k in keys}


def plan_to_dict(plan: NodePlan) -> dict[str, Any]:
    """JSON-ready dict: the primary's vLLM fields flat at the top (null for llama.cpp), both plans nested."""
    vllm = plan.primary if isinstance(plan.primary, VllmPlan) else None
    llama = plan.primary if isinstance(plan.primary, LlamaCppPlan) else plan.fallback
    flat = {k: (getattr(vllm, k) if vllm else None) for k in FLAT_VLLM_FIELDS}
    data = {
        "schema_version": SCHEMA_VERSION,
        "model": plan.model,
        "engine": plan.engine,
        "fallback": "llamacpp" if plan.fallback is not None else None,
        "fits": plan.fits,
        **flat,
        "per_gpu": [dataclasses.asdict(g) for g in plan.primary.per_gpu],
        "reasons": list(plan.reasons) + list(plan.primary.reasons),
        "refusals": list(plan.refusals),
        "refusal": plan.primary.refusal,
        "alternatives": [_alternative(a) for a in plan.alternatives],
        "vllm": _vllm(vllm) if vllm else None,
        "llamacpp": dataclasses.asdict(llama) if llama else None,
    }
    return json.loads(json.dumps(data))  # tuples become lists: exactly what --json prints


def cluster_plan_to_dict(plan) -> dict[str, Any]:
    """JSON-ready dict of a ClusterPlan (``node-agent plan --profile A --profile B --json``;
    docs/schemas/cluster-plan.schema.json): the group's layout flat at the top, each member's share,
    the head's fallback, and the whole vLLM plan."""
    v = plan.vllm
    data = {
        "schema_version": SCHEMA_VERSION,
        "kind": "cluster",
        "model": plan.model,
        "fits": plan.fits,
        "refusal": plan.refusal,
        "hosts": len(plan.members) if plan.members else None,
        **{k: getattr(v, k) for k in FLAT_VLLM_FIELDS},
        "pp_layer_partition": list(plan.partition) or None,
        "members": [{"rank": m.rank, "hostname": m.hostname, "stages": list(m.stages), "layers": m.layers,
                     "gpus": [g.index for g in m.gpus], "per_gpu": [dataclasses.asdict(g) for g in m.gpus],
                     "gpu_memory_utilization": m.plan.gpu_memory_utilization} for m in plan.members],
        "reasons": list(plan.reasons) + list(v.reasons),
        "refusals": list(plan.refusals),
        "vllm": _vllm(v),
        "fallback": dataclasses.asdict(plan.fallback) if plan.fallback else None,
    }
    return json.loads(json.dumps(data))
