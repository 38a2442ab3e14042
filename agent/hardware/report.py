"""The stable JSON form of a HostInfo (``node-agent detect --json``; docs/detect.md).

Field names and units are part of the contract: add fields, never rename or repurpose them;
bump ``SCHEMA_VERSION`` on a breaking change. docs/schemas/detect.schema.json is the schema.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from agent.hardware.types import HostInfo

SCHEMA_VERSION = 1


def host_to_dict(host: HostInfo) -> dict[str, Any]:
    """A JSON-ready dict: sizes in bytes, tuples as lists, ``None`` kept as ``null``."""
    data = dataclasses.asdict(host)
    for gpu in data["gpus"]:
        gpu["compute_capability"] = ".".join(str(n) for n in gpu["compute_capability"])
    return {"schema_version": SCHEMA_VERSION, **data}
