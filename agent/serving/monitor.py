"""Watches the node while it serves: readiness for /health/ready and systemd, live GPU figures
from NVML, and VRAM pressure that shrinks the admission budget.

One ``NodeMonitor`` per server. Its loop ticks every ``TICK_S`` (readiness, cheap) and reads NVML
every ``health.gpu_poll_interval_s`` in a worker thread (an NVML call can take milliseconds and
must never stall the event loop that answers /health). The systemd watchdog is fed by its own
task on the same loop (``Notifier.watchdog_loop``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from agent.backends.base import BackendState
from agent.hardware.nvml import NvmlSampler
from agent.hardware.types import MIB, GpuSample
from agent.planner.types import GpuBudget
from agent.serving.router import Route, Router, describe_states
from agent.systemd import Notifier

log = logging.getLogger(__name__)
TICK_S = 0.1


@dataclass(frozen=True)
class Readiness:
    """What /health/ready answers: ``status`` is ok | degraded | loading | unavailable."""

    status: str
    backend: str | None
    reason: str | None = None
    progress: dict | None = None
    cluster: dict | None = None  # the group a backend serves in (agent/cluster), when it is one

    @property
    def serving(self) -> bool:
        return self.status in ("ok", "degraded")


def vram_pressure(gpus: tuple[GpuBudget, ...], samples: dict[int, GpuSample], margin_bytes: int
                  ) -> tuple[float, str | None]:
    """Share of a backend's KV budget usable now, and why it is below 1.

    The plan leaves ``margin_bytes`` free on each GPU it uses. When free memory drops below that,
    another process took it: the budget shrinks by the deficit's share of the KV memory planned on
    that GPU (fewer running sequences, smaller activation peaks), down to zero.
    """
    share, reason = 1.0, None
    for g in gpus:
        s = samples.get(g.index)
        if s is None or g.kv_bytes <= 0:
            continue
        deficit = margin_bytes - s.memory_free_bytes
        if deficit <= 0:
            continue
        gpu_share = max(0.0, 1.0 - deficit / g.kv_bytes)
        if gpu_share < share:
            share = gpu_share
            reason = (f"GPU {g.index}: {s.memory_free_bytes // MIB} MiB free, below the {margin_bytes // MIB} MiB "
                      f"margin (another process took memory); KV budget cut to {gpu_share:.0%}")
    return share, reason


class NodeMonitor:
    """Readiness, GPU samples and VRAM pressure; notifies systemd of what changes."""

    def __init__(self, router: Router, sampler: NvmlSampler | None, margin_bytes: int, poll_s: float,
                 notifier: Notifier | None = None, progress_source: Callable[[], dict | None] | None = None) -> None:
        self.router = router
        # Work that must finish before the engines start (serve's model download): while it
        # returns a dict and nothing serves yet, readiness is "loading" with it as progress.
        self.progress_source = progress_source
        self.sampler = sampler
        self.margin_bytes = margin_bytes
        self.poll_s = poll_s
        self.notifier = notifier or Notifier({})
        self.started_at = time.time()
        self.gpus: tuple[GpuSample, ...] = ()
        self.gpus_at: float | None = None
        self.gpu_error: str | None = None
        self.pressure: dict[str, str] = {}  # backend -> why its budget is cut
        self.ever_ready = False
        self.readiness = self.compute_readiness()

    # --- readiness -----------------------------------------------------------------------
    def compute_readiness(self) -> Readiness:
        """ok: the chain's first backend serves with its breaker closed; degraded: a later one
        serves, the first one's breaker is not closed, or VRAM pressure; loading: nothing serves
        yet and something is starting; unavailable: nothing serves."""
        router = self.router
        serving = router.serving()
        cluster = cluster_of(router.routes)
        if serving:
            route, first = serving[0], router.routes[0]
            why = []
            if route is not first:
                why.append(f"serving from the fallback {route.name}; {_why_not_serving(first)}")
            elif first.breaker.state != "closed":
                why.append(f"{first.name}: {_breaker_line(first)}")
            why += [f"{name}: {text}" for name, text in self.pressure.items()]
            if cluster and (cluster["missing"] or cluster["group"] != "running"):
                why.append(_cluster_line(cluster))
            return Readiness("degraded" if why else "ok", route.name, "; ".join(why) or None, cluster=cluster)
        states = describe_states(router.routes)
        before = self.progress_source() if self.progress_source is not None else None
        if before is not None and not self.ever_ready:
            kind = before.get("kind", "download")  # download (model.pull: auto) | quantize (model.quantize: auto)
            return Readiness("loading", None, before.get("summary") or "preparing the model", {kind: before})
        starting = [r for r in router.routes if r.backend.state is BackendState.STARTING]
        waiting = [r for r in router.routes
                   if r.backend.state in (BackendState.STOPPED, BackendState.FAILED) and not r.gave_up]
        if starting or (waiting and not self.ever_ready):
            now = time.time()
            progress = {
                "backends_ready": 0,
                "backends_total": len(router.routes),
                "backends": [{"name": r.name, "state": r.backend.state.value,
                              "for_s": round(now - r.backend.health().since, 1)} for r in router.routes],
            }
            return Readiness("loading", None, f"loading the model ({states})", progress, cluster=cluster)
        extra = f"; {_cluster_line(cluster)}" if cluster else ""
        return Readiness("unavailable", None, f"no backend can serve ({states}){extra}", cluster=cluster)

    def _update_readiness(self) -> None:
        new = self.compute_readiness()
        old, self.readiness = self.readiness, new
        if new.serving and not self.ever_ready:
            self.ever_ready = True
            self.notifier.ready(_status_line(new))
            log.info("ready: serving from %s", new.backend)
        elif (new.status, new.backend, new.reason) != (old.status, old.backend, old.reason):
            self.notifier.status(_status_line(new))
            level = logging.INFO if new.status == "ok" else logging.WARNING
            log.log(level, "health: %s%s", new.status, f" ({new.reason})" if new.reason else "")

    # --- GPUs ----------------------------------------------------------------------------
    def _apply_samples(self, samples: tuple[GpuSample, ...]) -> None:
        self.gpus, self.gpus_at, self.gpu_error = samples, time.time(), None
        by_index = {s.index: s for s in samples}
        for route in self.router.routes:
            plan_gpus = getattr(getattr(route.backend, "plan", None), "per_gpu", ())
            share, reason = vram_pressure(plan_gpus, by_index, self.margin_bytes)
            if share != route.admission.pressure:
                route.admission.set_pressure(share)
            if reason:
                self.pressure[route.name] = reason
            else:
                self.pressure.pop(route.name, None)

    async def poll_gpus(self) -> None:
        """Read NVML once (in a worker thread) and apply VRAM pressure."""
        if self.sampler is None:
            return
        try:
            samples = await asyncio.to_thread(self.sampler.sample)
        except Exception as exc:  # noqa: BLE001 - any NVML failure is reported, never fatal
            if self.gpu_error is None:
                log.warning("reading the GPUs failed: %s", exc)
            self.gpu_error = str(exc) or type(exc).__name__
            return
        self._apply_samples(samples)

    # --- loop ----------------------------------------------------------------------------
    async def run(self) -> None:
        next_sample = 0.0
        try:
            while True:
                now = time.monotonic()
                if now >= next_sample:
                    next_sample = now + self.poll_s
                    await self.poll_gpus()
                self._update_readiness()
                await asyncio.sleep(TICK_S)
        finally:
            if self.sampler is not None:
                self.sampler.close()


def cluster_of(routes: list[Route]) -> dict | None:
    """The group the first clustered backend reports in its health (``detail["cluster"]``)."""
    for route in routes:
        cluster = route.backend.health().detail.get("cluster")
        if cluster is not None:
            return cluster
    return None


def _cluster_line(cluster: dict) -> str:
    """'cluster: group idle (rank 1 (gpu-b) lost: ...); missing rank 1 (gpu-b): ...'."""
    line = f"cluster: group {cluster['group']}"
    if cluster.get("reason"):
        line += f" ({cluster['reason']})"
    for m in cluster["missing"]:
        name = f"rank {m['rank']}" + (f" ({m['hostname']})" if m.get("hostname") else "")
        line += f"; missing {name}" + (f": {m['reason']}" if m.get("reason") and m["reason"] != cluster.get("reason")
                                       else "")
    return line


def _breaker_line(route: Route) -> str:
    b = route.breaker.describe()
    line = f"breaker {b['state']} after {b['failures']} failure(s)"
    if b["last_failure"]:
        line += f" (last: {b['last_failure']})"
    if b["probe_in_s"] is not None:
        line += f"; one probe request in {b['probe_in_s']:g} s"
    elif b["state"] == "half_open":
        line += "; the next request probes it"
    return line


def _why_not_serving(route: Route) -> str:
    state = route.backend.state
    if state is BackendState.STARTING:
        return f"{route.name} is starting"
    if state in (BackendState.READY, BackendState.DEGRADED):
        return f"{route.name} {_breaker_line(route)}"
    return f"{route.name} is {state.value}"


def _status_line(r: Readiness) -> str:
    if r.status == "ok":
        return f"serving from {r.backend}"
    if r.status == "degraded":
        return f"degraded: {r.reason}"
    return r.reason or r.status
