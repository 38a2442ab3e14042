"""What the hub e2e modules share: the loopback hub with the test repositories, and running the
real ``node-agent`` command against it with a hub cache of the test's own."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.e2e.conftest import node_agent
from tests.support.hub import HubServer, Repo, RepoFile, make_repo, repo_from_dir

SMOL_GGUF_REPO = "test-org/SmolLM2-135M-Instruct-GGUF"
SMOL_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_GGUF_REF = f"{SMOL_GGUF_REPO}:{SMOL_GGUF_FILE}"
SMOL_HF_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the repo the shipped card names
TINY_REPO = "test-org/tiny-llama"
GATED_REPO = "test-org/gated-llama"
GRANTED_TOKEN = "hf_test_granted_0123456789abcdef"
HUGE_REPO = "test-org/huge-llama"
HUGE_BYTES = 1 << 50  # 1 PiB: no test disk has that free


def standard_repos(tiny_model, smollm2_gguf_path: Path) -> list[Repo]:
    """The GGUF of SmolLM2, the tiny Llama, a gated copy of it and one too big for any disk."""
    tiny = repo_from_dir(TINY_REPO, tiny_model.hf_dir)
    gated = repo_from_dir(GATED_REPO, tiny_model.hf_dir, gated=True, granted_tokens=(GRANTED_TOKEN,))
    huge = make_repo(HUGE_REPO, {"config.json": tiny_model.hf_dir / "config.json"})
    # The listing claims a weight file larger than any disk; its bytes must never be asked for.
    huge.files["model.safetensors"] = RepoFile("model.safetensors", tiny_model.hf_dir / "model.safetensors",
                                               HUGE_BYTES, "0" * 40, "f" * 64)
    return [make_repo(SMOL_GGUF_REPO, {SMOL_GGUF_FILE: smollm2_gguf_path}), tiny, gated, huge]


@dataclass
class Agent:
    """``node-agent`` as a process against ``hub``, with its own hub cache (HF_HOME)."""

    hub: HubServer
    home: Path

    @property
    def env(self) -> dict[str, str]:
        keep = {k: v for k, v in os.environ.items() if not k.startswith(("NODE_AGENT_", "HF_"))}
        return {**keep, "HF_HOME": str(self.home), "HF_ENDPOINT": self.hub.url, "HF_HUB_OFFLINE": "0",
                "HF_HUB_DISABLE_TELEMETRY": "1", "COLUMNS": "200"}

    @property
    def cache(self) -> Path:
        return self.home / "hub"

    def config(self, body: dict | None = None) -> Path:
        path = self.home / "config.yaml"
        self.home.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(body or {}))
        return path

    def run(self, *args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([*node_agent(), *args, "--config", str(self.config())], capture_output=True,
                              text=True, env={**self.env, **(env or {})}, timeout=timeout)

    def popen(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen([*node_agent(), *args, "--config", str(self.config())], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=self.env, start_new_session=True)

    def models(self) -> list[dict]:
        r = self.run("models", "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["models"]

    def blob(self, repo: str, sha256: str) -> Path:
        return self.cache / f"models--{repo.replace('/', '--')}" / "blobs" / sha256


def json_events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
