"""Reading the agent's own YAML files: shipped data folders and one mapping-per-file reader."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from agent.errors import UsageError


def shipped_dir(name: str) -> Path:
    """A data folder the agent ships (``models``, ``profiles``): the checkout's top-level folder,
    or ``agent/_data/<name>`` inside an installed wheel."""
    packaged = resources.files("agent") / "_data" / name
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[1] / name


def shipped_names(name: str) -> list[str]:
    """Stems of the ``*.yaml`` files in a shipped folder, sorted."""
    d = shipped_dir(name)
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def read_mapping(path: Path, what: str, error: type[UsageError], empty_ok: bool = False) -> dict[str, Any]:
    """Parse a YAML file that must hold a mapping; every failure is ``error`` naming ``what`` and
    the file (with line and column for a syntax error)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise error(f"{what} {path} cannot be read: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise error(f"{what} {path} is not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from exc
    if data is None and empty_ok:
        return {}
    if not isinstance(data, dict):
        raise error(f"{what} {path} must be a mapping of keys, not {type(data).__name__}")
    return data
