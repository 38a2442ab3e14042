"""llama.cpp backend on the real engine (#4): SmolLM2 for content, the tiny model for mechanics."""

from __future__ import annotations

import asyncio

import pytest

from agent.backends.base import BackendStartError, BackendState, GenerationRequest, PromptTooLong
from tests.integration.engine_support import CHAT_PARIS, llamacpp_backend

pytestmark = pytest.mark.engines


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def smol(loop, smollm2_gguf_path):
    backend = llamacpp_backend(smollm2_gguf_path)
    loop.run_until_complete(backend.start())
    yield backend
    loop.run_until_complete(backend.stop())


def collect(loop, backend, request):
    async def run():
        return [d async for d in backend.generate(request)]
    return loop.run_until_complete(run())


def text_of(deltas):
    return "".join(d.text for d in deltas)


def test_smollm2_answers_paris(loop, smol):
    deltas = collect(loop, smol, GenerationRequest("paris", 16, messages=CHAT_PARIS, temperature=0))
    assert "Paris" in text_of(deltas)
    last = deltas[-1]
    assert last.finish_reason == "stop" and last.prompt_tokens > 0 and 0 < last.completion_tokens <= 16


def test_stream_is_several_deltas_and_counts_match_the_prompt(loop, smol):
    req = GenerationRequest("count", 24, prompt="One, two, three,", temperature=0)
    deltas = collect(loop, smol, req)
    assert len(deltas) > 3  # streamed token by token, not one blob
    assert deltas[-1].prompt_tokens == loop.run_until_complete(smol.count_prompt_tokens(req))


def test_temperature_zero_is_deterministic(loop, smol):
    req = GenerationRequest("det", 32, prompt="The quick brown fox", temperature=0)
    assert text_of(collect(loop, smol, req)) == text_of(collect(loop, smol, req))


def test_max_tokens_ends_with_length(loop, smol):
    deltas = collect(loop, smol, GenerationRequest("len", 5, prompt="Once upon a time", temperature=0))
    assert deltas[-1].finish_reason == "length" and deltas[-1].completion_tokens == 5


def test_stop_sequence_ends_the_text_before_it(loop, smol):
    free = text_of(collect(loop, smol, GenerationRequest("free", 24, prompt="One, two, three, four,", temperature=0)))
    assert " six" in free  # the model counts on by itself...
    deltas = collect(loop, smol, GenerationRequest("stop", 24, prompt="One, two, three, four,", temperature=0,
                                                   stop=(" six",)))
    text = text_of(deltas)
    assert "six" not in text and free.startswith(text) and deltas[-1].finish_reason == "stop"


def test_cancel_mid_stream_frees_the_slot(loop, smol):
    async def run():
        gen = smol.generate(GenerationRequest("long", 400, prompt="Count: one, two, three,", temperature=0))
        got = 0
        async for _ in gen:
            got += 1
            if got == 3:
                break
        await gen.aclose()
        cap = smol.capacity()
        # The next request gets the one instance back and starts at once (bounded: a hang fails).
        nxt = smol.generate(GenerationRequest("next", 4, prompt="Hello", temperature=0))
        first = await asyncio.wait_for(nxt.__anext__(), timeout=10)
        await nxt.aclose()
        return got, cap, first
    got, cap, first = loop.run_until_complete(run())
    assert got == 3 and cap.slots_in_use == 0 and cap.kv_tokens_in_use == 0
    assert first.text or first.finish_reason


def test_capacity_is_what_the_engine_allocated(smol):
    cap = smol.capacity()
    engine_ctx = smol._all[0].n_ctx()
    assert cap.max_context == engine_ctx == 2048
    assert cap.kv_tokens_total == engine_ctx * cap.slots_total and cap.slots_total == 1


def test_prompt_longer_than_the_context_is_typed(loop, smol):
    with pytest.raises(PromptTooLong) as info:
        collect(loop, smol, GenerationRequest("big", 8, prompt="word " * 3000))
    assert info.value.max_context == 2048 and info.value.prompt_tokens > 2048


def test_assistant_prefix_continues_the_answer(loop, smol):
    # A failover hands over at a token boundary: the prefix is the first deltas of the answer.
    deltas = collect(loop, smol, GenerationRequest("a", 16, messages=CHAT_PARIS, temperature=0))
    full = text_of(deltas)
    prefix = text_of(deltas[:3])
    rest = text_of(collect(loop, smol, GenerationRequest("b", 16, messages=CHAT_PARIS, temperature=0,
                                                         assistant_prefix=prefix)))
    assert prefix and prefix + rest == full


def test_tiny_model_serves_and_chat_template_comes_from_the_gguf(loop, tiny_model):
    backend = llamacpp_backend(tiny_model.gguf_path, n_ctx=512)
    loop.run_until_complete(backend.start())
    try:
        deltas = collect(loop, backend, GenerationRequest("t", 8, messages=({"role": "user", "content": "hi"},),
                                                          temperature=0))
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
