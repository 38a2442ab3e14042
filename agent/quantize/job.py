"""``node-agent quantize``: find the bf16 checkpoint, decide, check the resources, run, register.

The order is the contract, as for ``pull``: everything that can refuse (the reference, a
checkpoint that is already quantized, too little RAM, GPU memory or disk) runs in ``prepare``,
before the quantizer environment is made or a weight is loaded. ``execute`` runs the worker into
a staging folder next to where the result goes, checks its quality, and only then registers it
(or moves it to ``--out``): an interrupted or failed run leaves nothing half-registered.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from agent.catalog.hf import load_hf_config
from agent.catalog.types import ModelSpec
from agent.errors import ModelError, UsageError
from agent.hardware.types import GIB, MIB, HostInfo
from agent.hub.errors import NotPulled, gb
from agent.hub.local import damaged_files, hub_for, matches
from agent.hub.refs import parse_ref
from agent.hub.store import Pull, Store
from agent.quantize import calibration, env, quality
from agent.quantize.register import register, variant_commit, variant_repo, variants
from agent.quantize.runner import Progress, WorkerResult, run_worker
from agent.quantize.schemes import Choice, Cost, choose, estimate
from agent.settings import QuantizeSettings, Settings

log = logging.getLogger(__name__)
DISK_HEADROOM_BYTES = 1 << 30


class NotEnoughResources(UsageError):
    """Quantizing would not fit in this host's RAM, GPU memory or disk; nothing was started."""


@dataclass(frozen=True)
class Source:
    """The bf16 checkpoint to quantize and the reference its variant is recorded under."""

    ref: str
    label: str
    hf_dir: Path
    spec: ModelSpec
    key: str  # what identifies these exact weights: the pull's commit, or the directory and its files



@dataclass(frozen=True)
class Prepared:
    """A quantization that passed its checks."""

    source: Source
    choice: Choice
    cost: Cost
    options: QuantizeSettings
    calib: calibration.CalibrationSet
    out: Path | None  # --out: a standalone directory instead of the cache

    @property
    def variant(self) -> str:
        return self.choice.label

    @property
    def repo(self) -> str:
        return variant_repo(self.source.label, self.variant)

    @property
    def commit(self) -> str:
        """Where the result will be (agent/quantize/register.py variant_commit)."""
        o = self.options
        return variant_commit({"source": self.source.key, "choice": [self.choice.method, self.choice.bits,
                                                                     self.choice.group_size, list(self.choice.ignore)],
                               "calibration": self.calib.digest, "samples": o.samples, "seq_len": o.seq_len,
                               "seed": o.seed, "awq_grid": o.awq_grid})

    def reasons(self) -> list[str]:
        c = self.cost
        where = (f"one decoder layer at a time on the GPU (~{c.gpu_bytes / GIB:.1f} GiB of GPU memory), the whole "
                 f"bf16 model in RAM" if c.on_gpu else "on the CPU, the whole bf16 model in RAM")
        return [*self.choice.reasons,
                f"calibration: {len(self.calib.calibration)} sample(s) available from {self.calib.name}, "
                f"{min(self.options.samples, len(self.calib.calibration))} used, up to {self.options.seq_len} tokens "
                f"each, seed {self.options.seed}; {len(self.calib.held_out)} held out for the quality check",
                f"cost: ~{c.minutes} min {where} (~{c.ram_bytes / GIB:.1f} GiB RAM at the peak); the checkpoint is "
                f"~{gb(c.output_bytes)}"]


@dataclass(frozen=True)
class Result:
    """What a quantization produced."""

    prepared: Prepared
    path: Path  # the checkpoint (a cache snapshot, or --out)
    pull: Pull | None  # the registration (None with --out)
    quality: dict
    worker: WorkerResult
    reused: bool = False  # registered earlier from the same inputs; nothing ran


def find_source(ref_text: str, settings: Settings) -> Source:
    """The bf16 checkpoint behind ``ref_text``: an HF directory, or a hub reference's bf16 pull."""
    ref = parse_ref(ref_text)
    if ref is None:
        path = Path(ref_text).expanduser()
        if not path.is_dir():
            raise ModelError(f"{ref_text}: pass an HF model directory (config.json + safetensors) or a hub reference "
                             "(a card, owner/name) whose bf16 checkpoint was pulled")
        path = path.resolve()
        stamp = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.glob("*.safetensors"))
        return _checked(Source(str(path), path.name, path, load_hf_config(path), f"{path}:{stamp}"))
    store = Store(hub_for(settings))
    for pull in store.all_pulls():  # newest first
        if (pull.engine == "vllm" and pull.format == "hf" and pull.complete and matches(pull, ref)
                and damaged_files(store, pull) is None):
            hf_dir = store.hub.snapshot(pull.repo, pull.commit)
            return _checked(Source(ref.text, ref.label, hf_dir, replace(load_hf_config(hf_dir), name=ref.label),
                                   f"{pull.repo}@{pull.commit}"))
    raise NotPulled(f"{ref.text}: its bf16 checkpoint is not on disk; run `node-agent pull {ref.text} --engine vllm "
                    f"--quantization none` first (or set model.quantize: auto, and pull or serve quantize it)")


def _checked(src: Source) -> Source:
    fmt = src.spec.sources[0].format if src.spec.sources else "hf"
    if fmt != "hf":
        raise ModelError(f"{src.hf_dir} is already quantized ({fmt}); quantize its bf16 checkpoint instead")
    if not list(src.hf_dir.glob("*.safetensors")):
        raise ModelError(f"{src.hf_dir} has no safetensors weights to quantize")
    return src


def prepare(src: Source, options: QuantizeSettings, host: HostInfo, settings: Settings, bits: int = 4,
            out: Path | None = None) -> Prepared:
    """Decide and check everything; raises before anything heavy happens."""
    try:
        choice = choose(src.spec.arch, options.scheme, options.group_size or None, bits)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    calib = calibration.load(options.calibration, options.seed)
    used = min(options.samples, len(calib.calibration))
    cost = estimate(src.spec.arch, choice, used, options.seq_len, gpus=len(host.gpus),
                    physical_cores=host.cpu_physical_cores)
    prep = Prepared(src, choice, cost, options, calib, out)
    check_resources(prep, host, settings)
    return prep


def check_resources(prep: Prepared, host: HostInfo, settings: Settings) -> None:
    """Refuse up front what cannot fit: RAM (the whole 16-bit model), GPU memory (one layer), disk."""
    c, name = prep.cost, prep.source.label
    ram = host.ram_available_bytes - settings.planner.ram_margin_mib * MIB
    if c.ram_bytes > ram:
        raise NotEnoughResources(
            f"quantizing {name} needs ~{c.ram_bytes / GIB:.1f} GiB of RAM (the whole 16-bit model is loaded, plus "
            f"calibration activations), {max(0, ram) / GIB:.1f} GiB is available after the "
            f"{settings.planner.ram_margin_mib} MiB margin; free RAM, lower quantize.samples or quantize.seq_len, or "
            "quantize on a bigger host and copy the result")
    if c.on_gpu:
        best = max(host.gpus, key=lambda g: g.memory_free_bytes)
        usable = best.memory_free_bytes - settings.planner.safety_margin_mib * MIB
        if c.gpu_bytes > usable:
            raise NotEnoughResources(
                f"quantizing {name} needs ~{c.gpu_bytes / GIB:.1f} GiB of GPU memory for one decoder layer and its "
                f"activations; GPU {best.index} has {max(0, usable) / GIB:.1f} GiB free after the margin; stop what "
                "holds it (a running serve), or lower quantize.seq_len")
    target = prep.out.parent if prep.out else hub_for(settings).cache_dir
    where = _existing(target)
    free = shutil.disk_usage(where).free
    if c.output_bytes + DISK_HEADROOM_BYTES > free:
        raise NotEnoughResources(f"the quantized checkpoint needs ~{gb(c.output_bytes + DISK_HEADROOM_BYTES)} in "
                                 f"{where} (with 1 GiB headroom), {gb(free)} is free; free space or pass --out DIR "
                                 "on a bigger disk")


def job_for(prep: Prepared, out_dir: Path, threads: int | None = None) -> dict:
    """The worker's job file (agent/quantize/worker.py reads it)."""
    o, c = prep.options, prep.choice
    return {"model_dir": str(prep.source.hf_dir), "out_dir": str(out_dir), "scheme": c.method, "bits": c.bits,
            "group_size": c.group_size, "symmetric": False, "ignore": list(c.ignore),
            "calibration": list(prep.calib.calibration), "held_out": list(prep.calib.held_out),
            "samples": o.samples, "seq_len": o.seq_len, "seed": o.seed, "awq_grid": o.awq_grid, "threads": threads}


def execute(prep: Prepared, settings: Settings, progress: Progress, say: Callable[[str], None] = log.info,
            on_event: Callable[[dict], None] | None = None) -> Result:
    """Make the environment if needed, run the quantizer, check quality, register (or move to --out).

    A variant already registered from the same inputs (weights, recipe, calibration, seed: its
    commit) and intact on disk is returned as it is: quantizing again would give the same files."""
    store = Store(hub_for(settings))
    if prep.out is None:
        made = next(iter(variants(store, lambda p: p.repo == prep.repo and p.commit == prep.commit)), None)
        if made is not None:
            path = store.hub.snapshot(made.repo, made.commit)
            say(f"{prep.repo} was already made from the same weights and settings; nothing to redo ({path})")
            verdict = (made.quantized or {}).get("quality") or {"checked": False, "degraded": False}
            return Result(prep, path, made, verdict, WorkerResult({"event": "done", "seconds": 0.0}, None, path),
                          reused=True)
    quantizer = env.ensure(settings.quantize.python, _env_dir(settings), say)
    parent = prep.out.parent if prep.out else store.hub.cache_dir
    parent.mkdir(parents=True, exist_ok=True)
    if prep.out and prep.out.exists() and any(prep.out.iterdir()):
        raise UsageError(f"--out {prep.out} exists and is not empty; pass a new directory")
    work = Path(tempfile.mkdtemp(prefix=".node-agent-quantize-", dir=parent))
    try:
        staging = work / "checkpoint"
        result = run_worker(quantizer, job_for(prep, staging), work / "job.json", work / "quantizer.log", progress,
                            on_event)
        verdict = quality.verdict(result.quality, prep.options.max_perplexity_increase)
        if prep.out:
            if prep.out.exists():
                prep.out.rmdir()
            staging.rename(prep.out)
            return Result(prep, prep.out, None, verdict, result)
        meta = metadata(prep, verdict, result)
        pull = register(store, staging, prep.source.ref, prep.repo, prep.variant, meta, prep.commit)
        return Result(prep, store.hub.snapshot(pull.repo, pull.commit), pull, verdict, result)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def metadata(prep: Prepared, verdict: dict, result: WorkerResult) -> dict:
    """What the pull record keeps about how the variant was made (``models --json`` shows it)."""
    o, c = prep.options, prep.choice
    d = result.done
    return {"scheme": c.scheme, "method": c.method, "bits": c.bits, "group_size": c.group_size,
            "ignored": list(c.ignored), "calibration": o.calibration, "samples": d.get("calibration_samples"),
            "tokens": d.get("calibration_tokens"), "seq_len": o.seq_len, "seed": o.seed, "awq_grid": o.awq_grid,
            "source": str(prep.source.hf_dir), "seconds": d.get("seconds"), "peak_rss_bytes": d.get("peak_rss_bytes"),
            "quality": verdict, "made_at": time.time()}


def _env_dir(settings: Settings) -> Path:
    return Path(settings.quantize.env_dir).expanduser() if settings.quantize.env_dir else env.default_env_dir()


def _existing(path: Path) -> Path:
    for p in (path, *path.parents):
        if p.exists():
            return p
    return Path("/")
