"""The node as a gateway sees it: ``Node`` ties the router, the monitor and the telemetry
together, and ``Node.document()`` is the body of ``GET /v1/node``.

The document is versioned (``schema_version``) and described by docs/schemas/node.schema.json;
a test validates it against that schema. Add fields freely; renaming or removing one is a new
major ``schema_version``.
"""

from __future__ import annotations

import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from agent import __version__
from agent.serving.metrics import Telemetry
from agent.serving.monitor import NodeMonitor
from agent.serving.router import Router

SCHEMA_VERSION = 1
_NODE_NAMESPACE = uuid.UUID("5f0c7b1e-8a8e-4c57-9b52-6a1d3f0e9c41")


def default_node_id(machine_id_path: Path = Path("/etc/machine-id")) -> str:
    """A stable id: derived from the machine id (never the id itself, which systemd asks to keep
    private), else the hostname."""
    try:
        machine = machine_id_path.read_text().strip()
    except OSError:
        machine = ""
    return str(uuid.uuid5(_NODE_NAMESPACE, machine)) if machine else socket.gethostname()


@dataclass
class Node:
    """Everything the health endpoints read; nothing here calls an engine."""

    node_id: str
    hostname: str
    model_name: str
    router: Router
    monitor: NodeMonitor
    telemetry: Telemetry

    def plans(self) -> dict:
        """How each backend was planned (a vLLM group is planned when its members report: absent before)."""
        return {r.name: plan_summary(r.backend) for r in self.router.routes
                if getattr(r.backend, "plan", None) is not None}

    def document(self) -> dict:
        readiness = self.monitor.compute_readiness()
        now = time.time()
        return {
            "schema_version": SCHEMA_VERSION,
            "node_id": self.node_id,
            "hostname": self.hostname,
            "agent_version": __version__,
            "started_at": round(self.monitor.started_at, 3),
            "uptime_s": round(now - self.monitor.started_at, 3),
            "model": self.model_name,
            "status": {"status": readiness.status, "backend": readiness.backend, "reason": readiness.reason},
            "gpus": {
                "sampled_at": round(self.monitor.gpus_at, 3) if self.monitor.gpus_at else None,
                "error": self.monitor.gpu_error,
                "devices": [{
                    "index": g.index, "uuid": g.uuid, "name": g.name,
                    "memory_total_bytes": g.memory_total_bytes, "memory_used_bytes": g.memory_used_bytes,
                    "memory_free_bytes": g.memory_free_bytes, "utilization_pct": g.utilization_gpu_pct,
                    "temperature_c": g.temperature_c, "power_watts": g.power_watts,
                } for g in self.monitor.gpus],
            },
            "plan": self.plans(),
            "cluster": readiness.cluster,
            "backends": [self._backend(route) for route in self.router.routes],
            "requests": [{"endpoint": e, "backend": b, "status": s, "count": n}
                         for (e, b, s), n in sorted(self.telemetry.requests.items())],
            "fallback_switches": [{"from": f, "to": t, "reason": r, "count": n}
                                  for (f, t, r), n in sorted(self.router.counters.switches.items())],
            "fallback_events": list(self.router.counters.events),
        }

    def max_model_len(self) -> int:
        """The longest context this node takes: its largest engine's (with that engine down, a
        longer request gets a 503 and Retry-After, never a client error)."""
        return max(route.backend.capacity().max_context for route in self.router.routes)

    def _backend(self, route) -> dict:
        health = route.backend.health()
        cap = route.backend.capacity()
        adm = route.admission
        kv_budget, slots = adm.budget()
        return {
            "name": route.name,
            "engine": route.name,
            "model": self.model_name,
            "state": health.state.value,
            "since": round(health.since, 3),
            "restarts": route.restarts,
            "given_up": route.gave_up,
            "breaker": route.breaker.state,
            "breaker_detail": route.breaker.describe(),
            "last_error": health.last_error,
            "features": _features(route.backend.features()),
            "kv_tokens": {"planned": getattr(getattr(route.backend, "plan", None), "kv_cache_tokens", None),
                          "actual": cap.kv_tokens_total or None},
            "admission": {
                "kv_capacity_tokens": cap.kv_tokens_total,
                "kv_budget_tokens": kv_budget,
                "kv_reserved_tokens": adm.reserved,
                "kv_in_use_tokens": cap.kv_tokens_in_use,
                "max_context": cap.max_context,
                "slots_total": slots,
                "running": adm.active,
                "queue_depth": adm.queue_depth,
                "queue_limit": adm.max_queue,
                "rejections": adm.rejected,
                "vram_pressure": adm.pressure,
                "vram_pressure_reason": self.monitor.pressure.get(route.name),
            },
        }


def _features(f) -> dict:
    return {"constraints": f.constraints, "constraints_reason": f.constraints_reason or None,
            "continue_constrained": f.continue_constrained, "max_logprobs": f.max_logprobs,
            "vocabulary": f.vocab or None}


def plan_summary(backend) -> dict:
    """What /v1/node says about how a backend was planned (engine-neutral keys where possible)."""
    p = backend.plan
    common = {"engine": p.engine, "gpus": [g.index for g in p.per_gpu], "reasons": list(p.reasons)}
    if p.engine == "vllm":
        return {**common, "tensor_parallel_size": p.tensor_parallel_size,
                "pipeline_parallel_size": p.pipeline_parallel_size, "quantization": p.quantization,
                "kv_cache_dtype": p.kv_cache_dtype, "gpu_memory_utilization": p.gpu_memory_utilization,
                "max_model_len": p.max_model_len, "max_num_seqs": p.max_num_seqs,
                "kv_cache_tokens": p.kv_cache_tokens,
                **({"checkpoint": p.variant} if getattr(p, "variant", None) else {})}
    return {**common, "quantization": p.quant_type, "n_gpu_layers": p.n_gpu_layers, "n_ctx": p.n_ctx,
            "instances": p.instances, "n_threads": p.n_threads, "kv_cache_tokens": p.n_ctx * p.instances}


def build_node(settings, router: Router, model_name: str, sampler=None, notifier=None,
               hostname: str | None = None, progress_source=None) -> Node:
    """A Node with its monitor and telemetry wired to ``router``."""
    telemetry = Telemetry()
    router.observer = telemetry
    monitor = NodeMonitor(router, sampler, settings.planner.safety_margin_mib * 1024**2,
                          settings.health.gpu_poll_interval_s, notifier, progress_source)
    node = Node(settings.health.node_id or default_node_id(), hostname or socket.gethostname(), model_name,
                router, monitor, telemetry)
    telemetry.watch(node)
    return node
