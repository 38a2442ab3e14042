"""llama.cpp specifics on the real engine (#4); the shared contract is test_backend_contract.py."""

from __future__ import annotations

import pytest

from agent.backends.base import BackendStartError, BackendState, GenerationRequest
from tests.integration.engine_support import collect, llamacpp_backend

pytestmark = pytest.mark.engines


def test_tiny_model_serves_with_the_chat_template_from_the_gguf(loop, tiny_model):
    backend = llamacpp_backend(tiny_model.gguf_path, n_ctx=512)
    loop.run_until_complete(backend.start())
    try:
        deltas = collect(loop, backend, GenerationRequest("t", 8, messages=({"role": "user", "content": "hi"},),
                                                          temperature=0))
        # ChatML around "hi": more tokens than the word itself, so the template was applied.
        assert deltas[-1].finish_reason in ("stop", "length") and deltas[-1].prompt_tokens > 3
        assert backend.health().state is BackendState.READY
    finally:
        loop.run_until_complete(backend.stop())
    assert backend.state is BackendState.STOPPED


def test_start_errors_are_typed(loop, tmp_path, smollm2_gguf_path):
    backend = llamacpp_backend(smollm2_gguf_path)
    backend.model_path = tmp_path / "missing.gguf"
    with pytest.raises(BackendStartError, match="does not exist"):
        loop.run_until_complete(backend.start())
    assert backend.state is BackendState.FAILED and "does not exist" in backend.health().last_error
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + b"\0" * 64)
    backend = llamacpp_backend(smollm2_gguf_path)
    backend.model_path = garbage
    with pytest.raises(BackendStartError):
        loop.run_until_complete(backend.start())
    assert backend.state is BackendState.FAILED
