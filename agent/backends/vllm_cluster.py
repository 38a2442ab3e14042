"""vLLM across hosts, seen from the head: the in-process AsyncLLM of rank 0 of a multi-node group
(vLLM's multiprocessing executor, ``nnodes``/``node_rank``/``master_addr``/``master_port``), whose
health is the whole group's.

The same backend as one host's vLLM (agent/backends/vllm.py) to the router and the supervisor;
what differs is when it may start and when it is dead:

- ``until_startable`` (the supervisor awaits it, outside its start lock, before every start) returns
  once every worker agent reports, usable and with its engine stopped;
- ``start`` plans the group from the members' live detection (agent/planner/cluster.py), forms a
  new group (each worker learns its engine spec from the answer to its heartbeat), waits until
  every worker's engine runs, then builds rank 0's engine;
- while it starts or serves, a guard task fails it as soon as a member is lost (heartbeat silent
  for ``cluster.heartbeat_timeout_s``, or its engine stopped), or when requests get no token for
  ``cluster.stall_timeout_s``: the backend moves to failed, running streams end with
  ``BackendDied`` (the router continues them on llama.cpp), vLLM's processes here are killed, and
  the group is dissolved so the workers stop theirs. vLLM on its own would wait 300 s for a dead
  rank while its /health says 200.

The supervisor then restarts it like any failed backend: after the backoff, once every member is
back, the whole group starts again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from agent.backends.base import (
    BackendDied,
    BackendStartError,
    BackendState,
    Capacity,
    Delta,
    GenerationRequest,
    Health,
    Prepared,
)
from agent.backends.vllm import VllmBackend, _reap_orphans
from agent.catalog.types import ModelSpec
from agent.cluster.coordinator import Coordinator
from agent.cluster.network import Network
from agent.cluster.protocol import EngineSpec
from agent.errors import PlanError
from agent.planner.cluster import ClusterPlan, plan_cluster
from agent.settings import Settings

log = logging.getLogger(__name__)
GUARD_S = 0.1
EXTENSION = "agent.cluster.vllm_ext.PipelineBuffers"


class ClusterVllmBackend(VllmBackend):
    """Rank 0 of a vLLM group; see the module docstring."""

    def __init__(self, coordinator: Coordinator, network: Network, model: ModelSpec, settings: Settings,
                 model_dir: Path, model_name: str, vllm_cpu: bool, vllm_version: str | None,
                 physical_gpus: Mapping[int, int] | None = None) -> None:
        super().__init__(None, model_dir, model_name, settings.engines.vllm_cpu_kvcache_gib, physical_gpus)
        self.coordinator = coordinator
        self.network = network
        self.model = model
        self.settings = settings
        self.vllm_cpu = vllm_cpu
        self.vllm_version = vllm_version
        self.cluster_plan: ClusterPlan | None = None
        self._guard: asyncio.Task | None = None
        self._lost: asyncio.Event = asyncio.Event()
        self._lost_reason: str | None = None
        self._progress = time.monotonic()  # the last token (or request start) from the group

    # --- lifecycle -----------------------------------------------------------------------
    async def until_startable(self) -> None:
        """Return once every worker reports, usable, with its engine stopped."""
        shown = None
        while absent := self.coordinator.absent():
            line = "waiting for the group: " + "; ".join(absent.values())
            if line != shown:
                log.info("cluster: %s", line)
                self._state.move(self._state.state, error=line)
                shown = line
            await asyncio.sleep(GUARD_S)

    async def start(self) -> None:
        self._state.move(BackendState.STARTING)
        self._lost, self._lost_reason = asyncio.Event(), None
        try:
            self._form()
            self._guard = asyncio.create_task(self._watch_group(), name="vllm-cluster-guard")
            await self._wait_joined()
        except PlanError as exc:
            self._fail_start(f"the group cannot be planned: {exc}")
        except BackendStartError as exc:
            self._fail_start(exc.reason)
        try:
            await self._launch()
        except BackendStartError as exc:
            self._fail_start(self._lost_reason or exc.reason)
        if self._lost.is_set():  # lost while the engine was read back: ready for an instant, failed now
            self._fail_start(self._lost_reason)
        self.coordinator.running()
        log.info("cluster: group %s runs on %d hosts, layers per host %s", self.coordinator.epoch,
                 self.settings.cluster.nodes, "/".join(str(m.layers) for m in self.cluster_plan.members))

    def _form(self) -> None:
        hosts = self.coordinator.hosts()
        # the fallback is its own backend, planned for this host from the GGUF on disk
        plan = plan_cluster(hosts, self.model, self.settings, vllm_cpu=self.vllm_cpu, vllm_version=self.vllm_version,
                            fallback=False)
        if not plan.fits:
            raise BackendStartError(self.name, f"the group cannot serve {self.model.name}: {plan.refusal}")
        self.cluster_plan = plan
        # rank 0's engine arguments; its reasons are the group's (/v1/node "plan")
        self.plan = dataclasses.replace(plan.members[0].plan, reasons=(*plan.reasons, *plan.vllm.reasons))
        master = (self.network.head_host, self.network.head_port)
        n = self.settings.cluster.nodes
        gib = self.settings.engines.vllm_cpu_kvcache_gib
        self.coordinator.form(lambda rank, epoch: EngineSpec.for_rank(plan.members[rank].plan, epoch, n, rank, master, gib),
                              {m.rank: (m.stages, m.layers) for m in plan.members})

    async def _wait_joined(self) -> None:
        deadline = time.monotonic() + self.settings.cluster.join_timeout_s
        while waiting := self.coordinator.waiting_for():
            if self._lost.is_set():
                raise BackendStartError(self.name, self._lost_reason)
            if time.monotonic() > deadline:
                raise BackendStartError(self.name, f"{', '.join(waiting)} did not start its engine within "
                                                   f"{self.settings.cluster.join_timeout_s:g} s ("
                                                   f"{self.coordinator.not_joined()}; its agent's log says why)")
            await asyncio.sleep(GUARD_S)

    def _fail_start(self, reason: str) -> None:
        self.coordinator.dissolve(reason)
        self._state.move(BackendState.FAILED, error=reason)
        self._cancel_guard()
        _reap_orphans()
        raise BackendStartError(self.name, reason)

    def _environment(self) -> dict[str, str]:
        return {**super()._environment(), **self.network.environment()}

    def _engine_kwargs(self) -> dict[str, Any]:
        spec = EngineSpec.for_rank(self.plan, self.coordinator.epoch, self.settings.cluster.nodes, 0,
                                   (self.network.head_host, self.network.head_port),
                                   self.settings.engines.vllm_cpu_kvcache_gib)
        return {**super()._engine_kwargs(), **spec.cluster_kwargs(), "worker_extension_cls": EXTENSION}

    async def _engine_built(self, engine: Any) -> None:
        if self._lost.is_set():
            raise BackendStartError(self.name, self._lost_reason)
        if self.plan.pipeline_parallel_size > 1:
            allocated = await engine.collective_rpc("node_agent_pp_buffers")
            log.debug("cluster: pipeline buffers allocated on ranks %s", [i for i, a in enumerate(allocated) if a])

    async def stop(self) -> None:
        self.coordinator.dissolve("the head is stopping")
        self._cancel_guard()
        await super().stop()

    def _cancel_guard(self) -> None:
        if self._guard is not None and self._guard is not asyncio.current_task():
            self._guard.cancel()
        self._guard = None

    # --- losing a member -----------------------------------------------------------------
    async def _watch_group(self) -> None:
        """Fail the group at the first loss, while it starts or serves."""
        stall = self.settings.cluster.stall_timeout_s
        while self._state.state in (BackendState.STARTING, BackendState.READY, BackendState.DEGRADED):
            if self._lost.is_set():  # lost while starting: end what the start spawns until it gives up
                _reap_orphans()
                await asyncio.sleep(5 * GUARD_S)
                continue
            lost = self.coordinator.loss()
            idle = time.monotonic() - self._progress
            if lost is None and self._active and idle > stall:
                lost = None, (f"generation stalled: no token from the group for {idle:.0f} s with "
                              f"{len(self._active)} request(s) running")
            if lost is not None:
                self._member_lost(*lost)
            await asyncio.sleep(GUARD_S)
        if self._state.state is BackendState.FAILED and not self._lost.is_set():  # vLLM's engine died by itself
            self.coordinator.dissolve(self._state.last_error or "vLLM's engine died")

    def _member_lost(self, rank: int | None, reason: str) -> None:
        log.error("cluster: %s; vLLM is failed and the group dissolved", reason)
        self._lost_reason = reason
        self._lost.set()
        self.coordinator.dissolve(reason, rank)
        if self._state.state in (BackendState.READY, BackendState.DEGRADED):
            self._state.move(BackendState.FAILED, error=reason)
        # while starting, ``start`` fails itself (it owns that transition) as soon as it sees the loss
        # rank 0's processes wait on a dead peer (up to VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS): end them
        # now, so the fallback gets the CPU and a start in progress fails at once.
        _reap_orphans()

    # --- requests ------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest, prepared: Prepared | None = None) -> AsyncIterator[Delta]:
        """The engine's stream, ended with BackendDied the moment the group is lost."""
        if self._lost.is_set():
            raise BackendDied(f"vLLM group lost: {self._lost_reason}")
        self._progress = time.monotonic()
        gen = super().generate(request, prepared)
        lost = asyncio.ensure_future(self._lost.wait())
        try:
            while True:
                step = asyncio.ensure_future(anext(gen))
                done, _ = await asyncio.wait({step, lost}, return_when=asyncio.FIRST_COMPLETED)
                if step not in done:
                    step.cancel()
                    await asyncio.gather(step, return_exceptions=True)
                    raise BackendDied(f"vLLM group lost: {self._lost_reason}")
                try:
                    delta = step.result()
                except StopAsyncIteration:
                    return
                self._progress = time.monotonic()
                yield delta
        finally:
            lost.cancel()
            await gen.aclose()

    def capacity(self) -> Capacity:
        if self.plan is None:  # never planned: no member reported yet
            return Capacity(0, 0, self.settings.planner.target_context, 0, 0)
        return super().capacity()

    def health(self) -> Health:
        h = super().health()
        return Health(h.state, h.since, h.last_error, h.restarts, {**h.detail, "cluster": self.coordinator.describe()})
