"""e2e tier: the real `node-agent serve` process on a free port, driven over HTTP."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_agent() -> list[str]:
    exe = shutil.which("node-agent", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "agent"]


def vllm_first(hf_dir: Path, gguf: Path, queue_timeout_s: float, model_name: str = "smollm2") -> dict:
    """Settings of a node serving SmolLM2 with vLLM first and llama.cpp behind it, for the tests
    that SIGKILL vLLM's EngineCore. After the kill every request in flight queues for llama.cpp's
    one instance while vLLM restarts on the same 2 cores, so the queue's deadline
    (``queue_timeout_s``) must not be what such a test measures."""
    return {
        "model": {"ref": str(hf_dir), "gguf": str(gguf)},
        "planner": {"target_context": 2048, "min_context": 512, "max_num_seqs": 8},
        "router": {"restart_backoff_s": 1.0},
        "admission": {"queue_timeout_s": queue_timeout_s},
        "server": {"model_name": model_name},
    }


@dataclass
class Server:
    """A running `node-agent serve` process."""

    proc: subprocess.Popen
    url: str
    log: Path

    def ready(self) -> httpx.Response:
        return httpx.get(f"{self.url}/health/ready", timeout=5)

    def wait_ready(self, timeout: float = 240, backend: str | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
            try:
                r = self.ready()
                if r.status_code == 200 and (backend is None or r.json()["backend"] == backend):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"server not ready after {timeout} s:\n{self.log.read_text()[-4000:]}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def start_server(tmp_path_factory):
    """Start a server with the given settings (a dict written as the config file); on a free port
    unless the settings name one (a node restarted where its gateway knows it)."""
    servers: list[Server] = []

    def start(config: dict, env: dict | None = None) -> Server:
        port = config.get("server", {}).get("port") or free_port()
        workdir = tmp_path_factory.mktemp("serve")
        cfg = workdir / "config.yaml"
        config = {**config, "server": {**config.get("server", {}), "port": port}}
        cfg.write_text(yaml.safe_dump(config))
        log = workdir / "serve.log"
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("NODE_AGENT_")}, **(env or {})}
        proc = subprocess.Popen([*node_agent(), "serve", "--config", str(cfg)], stdout=log.open("w"),
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
        server = Server(proc, f"http://127.0.0.1:{port}", log)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
