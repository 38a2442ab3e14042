"""gateway tier (#15): real gateways in front of real `node-agent serve` processes on loopback —
LiteLLM's Router in-process (the code its proxy runs, /health included), vLLM's router (the Rust
binary of the vllm-router wheel) as a process. Each node's gateway block comes from
`node-agent gateway-config`, as an operator would paste it. The modules are marked `gateway`:
`scripts/test -m gateway` runs them alone. scripts/test installs the `gateway` extra."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families

# Without it litellm fetches its price list from the internet at import (and retries for seconds).
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from tests.e2e.conftest import Server, free_port, node_agent, start_server  # noqa: E402,F401 - the fixture

MODEL = "smollm2"
PARIS = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


def gateway_config(server: Server, flag: str) -> str:
    """`node-agent gateway-config <flag>` for the node, from its own config file."""
    out = subprocess.run([*node_agent(), "gateway-config", flag, "--config", str(server.log.parent / "config.yaml")],
                         capture_output=True, text=True, timeout=120, check=True)
    return out.stdout


def scrape(server: Server) -> dict[tuple, float]:
    """The node's /metrics through prometheus_client's parser: {(sample name, sorted labels): value}."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def gauge(samples: dict[tuple, float], name: str) -> float:
    """The one series of a Model Server Protocol gauge."""
    [value] = [v for (n, _), v in samples.items() if n == name]
    return value


def answered(server: Server, status: int = 200, endpoint: str = "/v1/chat/completions") -> float:
    """Requests the node answered with ``status`` on ``endpoint``, whatever engine served them."""
    return sum(v for (n, labels), v in scrape(server).items() if n == "node_agent_requests_total"
               and dict(labels)["status"] == str(status) and dict(labels)["endpoint"] == endpoint)


def wait_until(check: Callable[[], object], timeout: float, what: str, every: float = 0.2):
    """Poll ``check`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = check()
        except httpx.HTTPError:
            result = None
        if result:
            return result
        time.sleep(every)
    raise AssertionError(f"not within {timeout:g} s: {what}")
