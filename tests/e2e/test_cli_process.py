"""The installed command as a separate process, as an operator runs it (#2)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def node_agent() -> list[str]:
    exe = shutil.which("node-agent", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "agent"]


def run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NODE_AGENT_")}
    return subprocess.run([*node_agent(), *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.skipif(Path("/dev/nvidiactl").exists(), reason="this host has an NVIDIA driver; the GPU-less path needs a host without one")
def test_detect_json_on_a_gpu_less_host_reports_the_reason():
    result = run("detect", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["gpus"] == [] and "NVML" in data["gpu_reason"]


def test_detect_profile_and_bad_input_exit_codes(tmp_path):
    ok = run("detect", "--profile", "a100-80gb-x4", "--json")
    assert ok.returncode == 0
    assert all(link["nvlink"] for link in json.loads(ok.stdout)["links"])
    bad = tmp_path / "c.yaml"
    bad.write_text("model: {ref: x, colour: red}\n")
    failed = run("detect", "--config", str(bad))
    assert failed.returncode == 2
    assert "model.colour: unknown key" in failed.stderr
    assert "Traceback" not in failed.stderr
