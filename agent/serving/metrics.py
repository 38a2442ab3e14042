"""Prometheus metrics through prometheus-client, one registry per app (no global state).

Events (requests, first tokens, tokens) are counted as they happen; everything that is a state
(backends, admission, KV, fallback switches, GPUs) is read at scrape time by ``_LiveCollector``,
so /metrics and /v1/node always agree with the router. docs/health.md lists every metric.

Besides the ``node_agent_*`` metrics, the node speaks the Model Server Protocol of the Gateway
API Inference Extension (docs/gateway.md): the ``vllm:*`` gauges an endpoint picker reads by
default, one series each, for the node as a whole. They are the node's and nobody else's: the
embedded vLLM runs with ``disable_log_stats`` (it registers no metrics of its own), and a picker
reads the first series of a family, so per-engine series would have it read an arbitrary engine.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from agent import __version__
from agent.backends.base import BackendState
from agent.serving.router import Router

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Endpoints counted in node_agent_requests_total; anything else (health, unknown paths) is not.
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models")
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Telemetry:
    """Event metrics, plus the plain counts /v1/node reports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._requests = Counter("node_agent_requests", "Inference requests answered, by endpoint, serving "
                                 "backend (none: refused before one was chosen) and HTTP status.",
                                 ["endpoint", "backend", "status"], registry=r)
        self._latency = Histogram("node_agent_request_duration_seconds", "Time from request to the last byte "
                                  "of the answer.", ["endpoint", "backend"], buckets=LATENCY_BUCKETS, registry=r)
        self._ttft = Histogram("node_agent_time_to_first_token_seconds", "Time from admission start to the "
                               "first generated text, by the backend that produced it.", ["backend"],
                               buckets=TTFT_BUCKETS, registry=r)
        self._tokens = Counter("node_agent_tokens", "Tokens processed, by backend and kind (prompt, completion).",
                               ["backend", "kind"], registry=r)
        self.requests: collections.Counter = collections.Counter()  # (endpoint, backend, status) for /v1/node

    # --- router observer -----------------------------------------------------------------
    def first_token(self, backend: str, seconds: float) -> None:
        self._ttft.labels(backend).observe(seconds)

    def finished(self, backend: str, prompt_tokens: int, completion_tokens: int) -> None:
        self._tokens.labels(backend, "prompt").inc(prompt_tokens)
        self._tokens.labels(backend, "completion").inc(completion_tokens)

    # --- HTTP ----------------------------------------------------------------------------
    def request_done(self, endpoint: str, backend: str | None, status: int, seconds: float) -> None:
        backend = backend or "none"
        self._requests.labels(endpoint, backend, str(status)).inc()
        self._latency.labels(endpoint, backend).observe(seconds)
        self.requests[(endpoint, backend, status)] += 1

    def watch(self, node) -> None:
        """Add the scrape-time view of ``node`` (an ``agent.serving.node.Node``)."""
        self.registry.register(_LiveCollector(node))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _LiveCollector(Collector):
    """Gauges and counters read from the router, admission and GPU samples at scrape time."""

    def __init__(self, node) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        node = self.node
        router: Router = node.router
        info = InfoMetricFamily("node_agent", "This agent: version, node id, served model.")
        info.add_metric([], {"version": __version__, "node_id": node.node_id, "model": node.model_name})
        yield info
        yield GaugeMetricFamily("node_agent_start_time_seconds", "Unix time the agent started.",
                                value=node.monitor.started_at)
        readiness = node.monitor.compute_readiness()
        ready = GaugeMetricFamily("node_agent_ready", "1 for the node's current readiness "
                                  "(ok, degraded, loading, unavailable), 0 for the others.", labels=["status"])
        for status in ("ok", "degraded", "loading", "unavailable"):
            ready.add_metric([status], 1.0 if readiness.status == status else 0.0)
        yield ready

        state = GaugeMetricFamily("node_agent_backend_state", "1 for each backend's current state, 0 for the "
                                  "others.", labels=["backend", "state"])
        restarts = CounterMetricFamily("node_agent_backend_restarts", "Successful restarts of a backend.",
                                       labels=["backend"])
        kv_cap = GaugeMetricFamily("node_agent_kv_capacity_tokens", "KV-cache tokens the engine holds, as it "
                                   "reported after start-up.", labels=["backend"])
        kv_budget = GaugeMetricFamily("node_agent_kv_budget_tokens", "KV tokens admission may reserve now "
                                      "(capacity cut by VRAM pressure).", labels=["backend"])
        kv_reserved = GaugeMetricFamily("node_agent_kv_reserved_tokens", "KV tokens reserved by admitted "
                                        "requests.", labels=["backend"])
        kv_used = GaugeMetricFamily("node_agent_kv_in_use_tokens", "KV tokens the engine's running sequences "
                                    "hold.", labels=["backend"])
        running = GaugeMetricFamily("node_agent_requests_running", "Requests admitted and generating.",
                                    labels=["backend"])
        queue = GaugeMetricFamily("node_agent_admission_queue_depth", "Requests waiting for KV capacity.",
                                  labels=["backend"])
        rejected = CounterMetricFamily("node_agent_admission_rejections", "Requests refused with 429 "
                                       "(queue full or deadline passed).", labels=["backend"])
        pressure = GaugeMetricFamily("node_agent_vram_pressure_ratio", "Share of the KV budget usable under "
                                     "VRAM pressure (1: none).", labels=["backend"])
        for route in router.routes:
            name, backend, adm = route.name, route.backend, route.admission
            for s in BackendState:
                state.add_metric([name, s.value], 1.0 if backend.state is s else 0.0)
            restarts.add_metric([name], route.restarts)
            cap = backend.capacity()
            kv_cap.add_metric([name], cap.kv_tokens_total)
            kv_budget.add_metric([name], adm.budget()[0])
            kv_reserved.add_metric([name], adm.reserved)
            kv_used.add_metric([name], cap.kv_tokens_in_use)
            running.add_metric([name], adm.active)
            queue.add_metric([name], adm.queue_depth)
            rejected.add_metric([name], adm.rejected)
            pressure.add_metric([name], adm.pressure)
        yield from (state, restarts, kv_cap, kv_budget, kv_reserved, kv_used, running, queue, rejected, pressure)
        yield from model_server_protocol(node, readiness.backend)

        switches = CounterMetricFamily("node_agent_fallback_switches", "Requests moved from one backend to the "
                                       "next (to=none: nothing was left), by reason.", labels=["from", "to", "reason"])
        for (frm, to, reason), n in sorted(router.counters.switches.items()):
            switches.add_metric([frm, to, reason], n)
        yield switches

        labels = ["gpu", "uuid", "name"]
        total = GaugeMetricFamily("node_agent_gpu_memory_total_bytes", "GPU memory, total.", labels=labels)
        used = GaugeMetricFamily("node_agent_gpu_memory_used_bytes", "GPU memory in use (all processes).",
                                 labels=labels)
        free = GaugeMetricFamily("node_agent_gpu_memory_free_bytes", "GPU memory free.", labels=labels)
        util = GaugeMetricFamily("node_agent_gpu_utilization_ratio", "Share of the last sample period a kernel "
                                 "ran (0-1).", labels=labels)
        temp = GaugeMetricFamily("node_agent_gpu_temperature_celsius", "GPU core temperature.", labels=labels)
        power = GaugeMetricFamily("node_agent_gpu_power_watts", "GPU power draw.", labels=labels)
        for g in node.monitor.gpus:
            key = [str(g.index), g.uuid, g.name]
            total.add_metric(key, g.memory_total_bytes)
            used.add_metric(key, g.memory_used_bytes)
            free.add_metric(key, g.memory_free_bytes)
            if g.utilization_gpu_pct is not None:
                util.add_metric(key, g.utilization_gpu_pct / 100)
            if g.temperature_c is not None:
                temp.add_metric(key, g.temperature_c)
            if g.power_watts is not None:
                power.add_metric(key, g.power_watts)
        yield from (total, used, free, util, temp, power)
        age = GaugeMetricFamily("node_agent_gpu_sample_age_seconds", "Seconds since the GPUs were last read "
                                "(absent: never read, e.g. no GPU).")
        if node.monitor.gpus_at is not None:
            age.add_metric([], max(0.0, time.time() - node.monitor.gpus_at))
        yield age


def model_server_protocol(node, serving: str | None) -> Iterator[Metric]:
    """The Model Server Protocol's gauges under the names vLLM gives them, for the whole node:
    requests waiting in admission, requests running, and the KV tokens reserved on the engine that
    takes new requests (``serving``) over its budget — 1 when none serves or it has no budget
    left, so a picker steers away."""
    routes = node.router.routes
    labels, values = ["model_name"], [node.model_name]
    waiting = GaugeMetricFamily("vllm:num_requests_waiting", "Requests waiting for KV capacity in the node's "
                                "admission queues.", labels=labels)
    waiting.add_metric(values, sum(r.admission.queue_depth for r in routes))
    running = GaugeMetricFamily("vllm:num_requests_running", "Requests admitted and generating on any engine of "
                                "the node.", labels=labels)
    running.add_metric(values, sum(r.admission.active for r in routes))
    route = next((r for r in routes if r.name == serving), None)
    budget = route.admission.budget()[0] if route is not None else 0
    usage = min(1.0, route.admission.reserved / budget) if budget > 0 else 1.0
    kv = GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV tokens reserved on the serving engine over its budget "
                           "(1 = full; 1 also when no engine serves).", labels=labels)
    kv.add_metric(values, usage)
    old_kv = GaugeMetricFamily("vllm:gpu_cache_usage_perc", "The same as vllm:kv_cache_usage_perc, under its "
                               "older name (production-stack reads it).", labels=labels)
    old_kv.add_metric(values, usage)
    described = route or routes[0]  # when none serves: the primary's cache
    cap = described.backend.capacity()
    cache = GaugeMetricFamily("vllm:cache_config_info", "The serving engine's KV cache: tokens per block and "
                              "blocks (llama.cpp: one token per block).",
                              labels=["block_size", "num_gpu_blocks", "backend"])
    cache.add_metric([str(cap.kv_block_size), str(cap.kv_tokens_total // max(1, cap.kv_block_size)),
                      described.name], 1.0)
    lora = GaugeMetricFamily("vllm:lora_requests_info", "LoRA adapters: none are served (max_lora 0); the value is "
                             "when that was last true (the agent's start).",
                             labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
    lora.add_metric(["0", "", ""], node.monitor.started_at)
    yield from (waiting, running, kv, old_kv, cache, lora)
