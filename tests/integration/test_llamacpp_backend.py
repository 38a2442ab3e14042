"""llama.cpp specifics on the real engine (#4); the shared contract is test_backend_contract.py."""

from __future__ import annotations

import pytest

import asyncio

from agent.backends.base import BackendStartError, BackendState, GenerationRequest, InvalidInput
from tests.integration.engine_support import collect, llamacpp_backend
from tests.support.models import ROLES_MUST_ALTERNATE

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


def test_a_template_error_is_typed_invalid_input_and_the_engine_keeps_serving(loop, tiny_model):
    """The tiny model's template refuses two user turns in a row (jinja raise_exception)."""
    backend = llamacpp_backend(tiny_model.gguf_path, n_ctx=512)
    loop.run_until_complete(backend.start())
    try:
        two_users = ({"role": "user", "content": "hi"}, {"role": "user", "content": "again"})
        with pytest.raises(InvalidInput, match="roles must alternate"):
            loop.run_until_complete(backend.prepare(GenerationRequest("bad", 4, messages=two_users)))
        assert ROLES_MUST_ALTERNATE.startswith("Conversation roles must alternate")
        ok = collect(loop, backend, GenerationRequest("ok", 4, messages=two_users[:1], temperature=0))
        assert ok[-1].finish_reason in ("stop", "length") and backend.state is BackendState.READY
    finally:
        loop.run_until_complete(backend.stop())


def test_stop_waits_for_the_generation_thread_before_closing_the_model(loop, smollm2_gguf_path):
    """stop() during a generation: the thread leaves create_completion before the Llama is
    closed (closing it under the thread is a use-after-free), and the stream ends."""
    backend = llamacpp_backend(smollm2_gguf_path, n_ctx=1024)
    loop.run_until_complete(backend.start())

    async def run():
        gen = backend.generate(GenerationRequest("long", 500, prompt="Count: one, two, three,", temperature=0))
        await gen.__anext__()
        worker = backend._running["long"].worker
        await backend.stop()
        done_at_stop = worker.done()
        rest = []
        try:
            async for d in gen:
                rest.append(d)
        except Exception as exc:  # noqa: BLE001 - the stream may end with a typed error
            rest.append(exc)
        return done_at_stop, rest
    done_at_stop, rest = loop.run_until_complete(asyncio.wait_for(run(), 60))
    assert done_at_stop and backend.state is BackendState.STOPPED
    assert len(rest) < 500  # the generation stopped instead of running to max_tokens
