"""Runs agent/quantize/worker.py in the quantizer's environment and follows its events.

The worker's stdout carries one JSON event per line (its docstring lists them); its stderr (the
libraries' logs and bars) goes to a log file next to the output, whose tail is quoted when the
worker fails. ``Progress`` turns the events into layers done, stage and ETA for the CLI and for
``/health/ready``; it is written by the thread that reads the worker and read by the event loop,
under a lock.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.errors import NodeAgentError
from agent.quantize.env import Quantizer

log = logging.getLogger(__name__)
WORKER = Path(__file__).with_name("worker.py")
LOG_TAIL = 3000


class QuantizeFailed(NodeAgentError):
    """The quantizer process failed; nothing was registered and the bf16 weights are untouched."""

    exit_code = 1


class Progress:
    """Stage, layers done and ETA of one quantization (the numbers /health/ready reports)."""

    def __init__(self, label: str, layers: int, estimate_s: float) -> None:
        self.label, self.layers, self.estimate_s = label, layers, estimate_s
        self.stage = "starting"
        self.done = 0
        self.started = time.monotonic()
        self.calibration_started: float | None = None
        self._lock = threading.Lock()

    def apply(self, event: dict) -> None:
        with self._lock:
            kind = event.get("event")
            if kind == "stage":
                self.stage = str(event.get("stage"))
                if self.stage == "calibrating":
                    self.calibration_started = time.monotonic()
                    self.layers = int(event.get("layers") or self.layers)
            elif kind == "layers":
                self.done = int(event["done"])
                self.layers = int(event.get("total") or self.layers)

    def eta_s(self) -> float | None:
        """From the layers done so far; before the first one, the planner's estimate."""
        now = time.monotonic()
        if self.calibration_started is not None and self.done:
            per = (now - self.calibration_started) / self.done
            return max(0.0, per * (self.layers - self.done))
        if self.stage in ("saving", "checking"):
            return None
        return max(0.0, self.estimate_s - (now - self.started))

    def snapshot(self) -> dict:
        with self._lock:
            eta = self.eta_s()
            pct = int(100 * self.done / self.layers) if self.layers else 0
            return {"model": self.label, "stage": self.stage, "layers_done": self.done, "layers_total": self.layers,
                    "percent": pct, "elapsed_s": round(time.monotonic() - self.started, 1),
                    "eta_s": round(eta) if eta is not None else None,
                    "summary": f"quantizing {self.label}: {self.stage}, {self.done}/{self.layers} layers"}


@dataclass(frozen=True)
class WorkerResult:
    done: dict  # the worker's "done" event
    quality: dict | None
    log: Path


def run_worker(quantizer: Quantizer, job: dict, job_path: Path, log_path: Path, progress: Progress,
               on_event: Callable[[dict], None] | None = None) -> WorkerResult:
    """Run the worker on ``job`` to its end; QuantizeFailed (with the log's tail) on failure."""
    job_path.write_text(json.dumps(job), encoding="utf-8")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    env.pop("PYTHONPATH", None)  # the worker imports nothing of the agent's
    done: dict | None = None
    error: dict | None = None
    quality = None
    with log_path.open("w", encoding="utf-8") as errors:
        proc = subprocess.Popen([str(quantizer.python), str(WORKER), str(job_path)], stdout=subprocess.PIPE,
                                stderr=errors, text=True, env=env, start_new_session=True)
        try:
            for line in proc.stdout:  # type: ignore[union-attr]
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                progress.apply(event)
                if on_event is not None:
                    on_event(event)
                kind = event.get("event")
                if kind == "done":
                    done = event
                elif kind == "error":
                    error = event
                elif kind == "quality":
                    quality = {k: v for k, v in event.items() if k not in ("event", "at_s")}
            code = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    if code == 0 and done is not None:
        return WorkerResult(done, quality, log_path)
    tail = _tail(log_path)
    if error is not None and error.get("kind") == "memory" or code in (-9, 137):
        raise QuantizeFailed(f"the quantizer ran out of memory (exit {code}); lower quantize.samples or "
                             f"quantize.seq_len, or quantize on a host with more RAM; log: {log_path}")
    what = error["message"] if error else f"exit status {code}"
    raise QuantizeFailed(f"the quantizer failed: {what}\n--- last lines of {log_path} ---\n{tail}")


def _tail(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").replace("\r", "\n")
    except OSError:
        return ""
    lines = [l for l in text.splitlines() if l.strip() and "it/s]" not in l and "s/it]" not in l]
    return "\n".join(lines)[-LOG_TAIL:]
