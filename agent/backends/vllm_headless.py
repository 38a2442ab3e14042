"""vLLM across hosts, seen from a worker: this host's ranks of the group, run by vLLM's headless
executor in a process group of its own (agent/cluster/headless.py), started and watched here.

A backend like the others to the supervisor, so a worker's engine is restarted with the same
backoff and give-up rules; it serves no requests itself (the head's endpoint does) and answers
them with a 421 naming the head. States (base.py's machine):

- ``until_startable`` waits until the head forms a group with a spec for this rank;
- ``start`` runs the engine for that spec and is ``ready`` once the head says the group runs; it
  fails when the engine exits, the head gives the group up, or the head goes silent;
- while ready, it fails the same way: the engine exited (its whole process group is killed,
  since a vLLM worker outlives its executor), or the head is gone (silent for
  ``cluster.heartbeat_timeout_s``, or restarted with another ``head_id``) or ended the group. A
  worker whose head is gone stops its engine and waits; the supervisor starts it again for the
  next group of whichever head answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

from agent.backends.base import (
    BackendStartError,
    BackendState,
    Capacity,
    Delta,
    Features,
    GenerationRequest,
    Health,
    Prepared,
    StateOwner,
)
from agent.backends.vllm import _ErrorLog, engine_args, engine_environment
from agent.backends.vllm_cluster import EXTENSION
from agent.cluster.link import HeadLink
from agent.cluster.protocol import EngineSpec
from agent.serving.errors import ApiError

log = logging.getLogger(__name__)
POLL_S = 0.1
STOP_GRACE_S = 10.0  # a clean stop: vLLM's processes release their shared memory
FAIL_GRACE_S = 2.0  # the group is gone anyway: its processes may be stuck on a dead peer


class ServedByTheHead(ApiError):
    """A request sent to a worker of a group: the head's endpoint serves the model."""

    status = 421
    type = "invalid_request_error"
    code = "cluster_worker"


class HeadlessBackend:
    """This host's ranks of a vLLM group; see the module docstring."""

    name = "vllm"

    def __init__(self, link: HeadLink, model_dir: Path, model_name: str,
                 physical_gpus: Mapping[int, int] | None = None) -> None:
        self.link = link
        self.model_dir = Path(model_dir)
        self.model_name = model_name
        self.physical_gpus = dict(physical_gpus or {})
        self.plan = None  # the head plans the group; /v1/node shows it there
        self._state = StateOwner(self.name)
        self._proc: subprocess.Popen | None = None
        self._spec: EngineSpec | None = None
        self._done: str | None = None  # the last epoch this host ran (never rejoined)
        self._errors: _ErrorLog | None = None
        self._job: str | None = None
        self._monitor: asyncio.Task | None = None
        self._killing = threading.Lock()

    @property
    def state(self) -> BackendState:
        return self._state.state

    @property
    def engine_pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    # --- lifecycle -----------------------------------------------------------------------
    async def until_startable(self) -> None:
        """Return once the head forms a group with a spec for this host."""
        shown = None
        while (spec := self._offered()) is None:
            why = self._why_waiting()
            if why != shown:
                log.info("cluster: %s", why)
                self._state.move(self._state.state, error=why)
                shown = why
            await asyncio.sleep(POLL_S)
        self._spec = spec

    def _offered(self) -> EngineSpec | None:
        r = self.link.reply
        if not self.link.head_alive() or r is None or r.group != "forming" or r.spec is None or r.epoch == self._done:
            return None
        return r.spec

    def _why_waiting(self) -> str:
        r = self.link.reply
        if not self.link.head_alive():
            return (f"waiting for the head agent at {self.link.network.head_api}"
                    + (f" ({self.link.last_error})" if self.link.last_error else ""))
        if r.refusal:
            return f"the head refuses this host: {r.refusal}"
        return f"waiting for the head to form a group (it is {r.group}{': ' + r.reason if r.reason else ''})"

    async def start(self) -> None:
        self._state.move(BackendState.STARTING)
        spec = self._spec or self._offered()
        if spec is None:
            await self._fail_start("the head formed no group for this host")
        self._spec, self._done = spec, spec.epoch
        self._spawn(spec)
        # No deadline of its own: the group loads for as long as the head's build takes (hundreds of
        # GB of weights take minutes); the head ends the group if it fails, or goes silent.
        while (why := self._problem()) is None:
            r = self.link.reply
            if r.group == "running" and r.epoch == spec.epoch:
                break
            await asyncio.sleep(POLL_S)
        if why is not None:
            await self._fail_start(why)
        self._state.move(BackendState.READY)
        self.link.set_engine("running", spec.epoch, self.engine_pid)
        self._monitor = asyncio.create_task(self._watch(), name="vllm-headless-monitor")
        log.info("cluster: rank %d runs in group %s (pid %s), layers %s of %s", spec.node_rank, spec.epoch,
                 self.engine_pid, _layers(spec), ",".join(map(str, spec.pp_layer_partition)))

    def _spawn(self, spec: EngineSpec) -> None:
        plan = spec.plan()
        kwargs = {**engine_args(plan, self.model_dir), **spec.cluster_kwargs(), "worker_extension_cls": EXTENSION}
        self._errors = _ErrorLog()
        fd, self._job = tempfile.mkstemp(prefix="node-agent-headless-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump({"engine_args": kwargs, "logging_config": self._errors.config_path}, f)
        env = {**os.environ, **engine_environment(plan, spec.cpu_kvcache_gib, self.physical_gpus),
               **self.link.network.environment(), "VLLM_LOGGING_CONFIG_PATH": self._errors.config_path}
        self._proc = subprocess.Popen([sys.executable, "-m", "agent.cluster.headless", self._job], env=env,
                                      start_new_session=True)
        self.link.set_engine("starting", spec.epoch, self._proc.pid)
        log.info("cluster: started vLLM's headless engine for rank %d of group %s (pid %d)", spec.node_rank,
                 spec.epoch, self._proc.pid)

    def _problem(self) -> str | None:
        """Why this host's engine cannot (or can no longer) be in its group, or None."""
        code = self._proc.poll() if self._proc is not None else None
        if code is not None:
            why = self._errors.last_exception() if self._errors else None
            return f"vLLM's headless engine exited with status {code}" + (f": {why}" if why else "")
        if not self.link.head_alive():
            return f"the head agent at {self.link.network.head_api} is silent for {self.link.silent_for():.1f} s"
        r = self.link.reply
        if r.epoch != self._spec.epoch or r.group == "idle":
            return f"the head ended group {self._spec.epoch}" + (f": {r.reason}" if r.reason else "")
        return None

    async def _watch(self) -> None:
        while self._state.state in (BackendState.READY, BackendState.DEGRADED):
            why = self._problem()
            if why is not None:
                log.error("cluster: %s; stopping this host's engine", why)
                self._state.move(BackendState.FAILED, error=why)
                await asyncio.to_thread(self._kill, FAIL_GRACE_S)
                self.link.set_engine("idle", error=why)
                return
            await asyncio.sleep(POLL_S)

    async def _fail_start(self, why: str) -> None:
        log.error("cluster: %s", why)
        self._state.move(BackendState.FAILED, error=why)
        await asyncio.to_thread(self._kill, FAIL_GRACE_S)
        self.link.set_engine("idle", error=why)
        raise BackendStartError(self.name, why)

    def _kill(self, grace_s: float = STOP_GRACE_S) -> None:
        """End the engine's whole process group: SIGTERM, then SIGKILL after ``grace_s``. The
        group, because vLLM's worker processes outlive a killed executor and keep their rank.
        Runs in a thread, one at a time: a ``stop`` while the monitor's kill still runs waits for
        it, so no new engine is started beside a process group still in its grace period."""
        with self._killing:
            self._kill_locked(grace_s)

    def _kill_locked(self, grace_s: float) -> None:
        proc, errors, job = self._proc, self._errors, self._job
        self._proc = self._errors = self._job = None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s if proc.poll() is None else 0.1)
            except subprocess.TimeoutExpired:
                pass
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if errors is not None:
            errors.close()
        if job is not None:
            with contextlib.suppress(OSError):
                os.unlink(job)

    async def stop(self) -> None:
        if self._monitor is not None and self._monitor is not asyncio.current_task():
            self._monitor.cancel()
        self._monitor = None
        await asyncio.to_thread(self._kill)
        if self._state.state is not BackendState.STOPPED:
            self._state.move(BackendState.STOPPED)
        self.link.set_engine("idle")

    # --- requests: the head serves them ----------------------------------------------------
    def _refuse(self) -> ServedByTheHead:
        return ServedByTheHead(f"this agent is rank {self.link.settings.rank} of a vLLM group (it runs layers, not "
                               f"requests); send requests to the head's endpoint (the host of cluster.head "
                               f"{self.link.settings.head})")

    async def prepare(self, request: GenerationRequest) -> Prepared:
        raise self._refuse()

    async def count_prompt_tokens(self, request: GenerationRequest) -> int:
        raise self._refuse()

    async def generate(self, request: GenerationRequest, prepared: Prepared | None = None) -> AsyncIterator[Delta]:
        raise self._refuse()
        yield  # pragma: no cover - an async generator that refuses

    async def abort(self, request_id: str) -> None:
        return None

    async def detokenize(self, token_ids: list[int]) -> str:
        raise self._refuse()

    def features(self) -> Features:
        # Nothing refused here by what it asks for: ``prepare`` sends every request to the head.
        return Features()

    def capacity(self) -> Capacity:
        # No KV here to admit against; a context large enough that no request is refused by its size
        # before ``prepare`` says where to send it.
        return Capacity(0, 0, 1 << 20, 0, 0)

    def health(self) -> Health:
        return self._state.health({"model": self.model_name, "engine_pid": self.engine_pid,
                                   "cluster": self.link.describe()})


def _layers(spec: EngineSpec) -> str:
    per_host = spec.pipeline_parallel_size // spec.nnodes
    stages = range(spec.node_rank * per_host, (spec.node_rank + 1) * per_host)
    return "+".join(str(spec.pp_layer_partition[s]) for s in stages)
