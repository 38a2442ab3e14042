"""The stable JSON form of a HostInfo (``node-agent detect --json``; docs/detect.md).

Field names and units are part of the contract: add fields, never rename or repurpose them;
bump ``SCHEMA_VERSION`` on a breaking change. docs/schemas/detect.schema.json is the schema.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from agent.hardware.types import GpuInfo, GpuLink, GpuProcess, HostInfo

SCHEMA_VERSION = 1


def host_to_dict(host: HostInfo) -> dict[str, Any]:
    """A JSON-ready dict: sizes in bytes, tuples as lists, ``None`` kept as ``null``."""
    data = dataclasses.asdict(host)
    for gpu in data["gpus"]:
        gpu["compute_capability"] = ".".join(str(n) for n in gpu["compute_capability"])
    return {"schema_version": SCHEMA_VERSION, **data}


def host_from_dict(data: dict[str, Any]) -> HostInfo:
    """The inverse of ``host_to_dict`` (a worker agent reports its detection to the head this way).
    Raises ValueError on a document of another schema version or with missing fields."""
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"host report schema_version {data.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    body = {k: v for k, v in data.items() if k != "schema_version"}
    try:
        gpus = tuple(GpuInfo(**{**g, "compute_capability": _capability(g["compute_capability"]),
                                "processes": tuple(GpuProcess(**p) for p in g.get("processes", ()))})
                     for g in body.pop("gpus", ()))
        links = tuple(GpuLink(**link) for link in body.pop("links", ()))
        return HostInfo(**{**body, "gpus": gpus, "links": links, "notes": tuple(body.get("notes", ()))})
    except (KeyError, TypeError) as exc:
        raise ValueError(f"host report is not a detection document: {exc}") from exc


def _capability(text: str) -> tuple[int, int]:
    major, minor = str(text).split(".")
    return int(major), int(minor)
