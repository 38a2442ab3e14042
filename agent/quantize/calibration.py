"""Calibration text: the built-in set shipped in the package, or the operator's file.

The built-in set (``data/calibration.jsonl``) was written for this project and is licensed with
it (Apache-2.0): a few hundred short samples, about half chat exchanges (rendered with the
model's own chat template by the worker) and half prose on everyday, technical and scientific
topics, with some code, numbers and a few other languages. No text was copied from elsewhere.

An operator's file is JSON lines (``{"text": ...}`` or ``{"messages": [{"role", "content"}, ...]}``
per line) or plain text (samples separated by blank lines). A fixed share of the samples, picked
with the seed, is held out of calibration for the quality check (agent/quantize/quality.py).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from agent.errors import UsageError

BUILTIN = "builtin"
HELD_OUT_SHARE = 8  # one sample in 8 is held out ...
HELD_OUT_MAX = 24  # ... up to this many (the check runs the model on each once, twice over)
MIN_SAMPLES = 4


@dataclass(frozen=True)
class CalibrationSet:
    """Samples for calibration and for the quality check; never the same sample in both."""

    name: str  # "builtin" or the file's path
    calibration: tuple[dict, ...]
    held_out: tuple[dict, ...]

    @property
    def digest(self) -> str:
        """A hash of the text and the split (part of a variant's identity)."""
        body = json.dumps([self.calibration, self.held_out], sort_keys=True).encode()
        return hashlib.sha256(body).hexdigest()[:16]


def builtin_samples() -> list[dict]:
    text = resources.files("agent.quantize").joinpath("data/calibration.jsonl").read_text(encoding="utf-8")
    return _jsonl(text, "the built-in calibration set")


def _jsonl(text: str, where: str) -> list[dict]:
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as exc:
            raise UsageError(f"{where}, line {n}: not JSON ({exc}); one JSON object per line") from exc
        out.append(_sample(item, f"{where}, line {n}"))
    return out


def _sample(item: object, where: str) -> dict:
    if isinstance(item, dict) and isinstance(item.get("text"), str) and item["text"].strip():
        return {"text": item["text"]}
    msgs = item.get("messages") if isinstance(item, dict) else None
    if (isinstance(msgs, list) and msgs and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                 and isinstance(m.get("content"), str) for m in msgs)):
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in msgs]}
    raise UsageError(f"{where}: a sample is {{\"text\": \"...\"}} or {{\"messages\": [{{\"role\": ..., "
                     f"\"content\": ...}}, ...]}}")


def file_samples(path: Path) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"--calibration {path}: cannot read it ({exc.strerror}); pass a .jsonl or .txt file, "
                         "or 'builtin'") from exc
    except UnicodeDecodeError as exc:
        raise UsageError(f"--calibration {path}: not UTF-8 text") from exc
    if path.suffix.lower() in (".jsonl", ".json"):
        return _jsonl(text, str(path))
    return [{"text": p.strip()} for p in text.split("\n\n") if p.strip()]


def load(calibration: str, seed: int) -> CalibrationSet:
    """The samples, shuffled with ``seed``, split into calibration and held-out text."""
    samples = builtin_samples() if calibration == BUILTIN else file_samples(Path(calibration).expanduser())
    if len(samples) < MIN_SAMPLES:
        raise UsageError(f"--calibration {calibration}: {len(samples)} sample(s); at least {MIN_SAMPLES} are needed "
                         "(some are held out for the quality check)")
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    held = min(HELD_OUT_MAX, max(1, len(samples) // HELD_OUT_SHARE))
    return CalibrationSet(calibration, tuple(samples[i] for i in order[held:]), tuple(samples[i] for i in order[:held]))
