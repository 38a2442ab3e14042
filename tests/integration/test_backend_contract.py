"""The Backend contract, proven on both real engines with SmolLM2-135M-Instruct (#4).

Every test runs once per engine; pytest groups the module-scoped parameter, so each engine is
started once (vLLM ~20-30 s here) and stopped before the other starts.
"""

from __future__ import annotations

import asyncio

import pytest

from agent.backends.base import BackendState, GenerationRequest, PromptTooLong
from tests.integration.engine_support import CHAT_PARIS, collect, smollm2_engines, started_smollm2, text_of

pytestmark = pytest.mark.engines


@pytest.fixture(scope="module", params=smollm2_engines())
def backend(request, loop):
    for b in started_smollm2(request, loop):
        yield b
    assert b.state is BackendState.STOPPED


def test_smollm2_answers_paris(loop, backend):
    deltas = collect(loop, backend, GenerationRequest("paris", 16, messages=CHAT_PARIS, temperature=0))
    assert "Paris" in text_of(deltas)
    last = deltas[-1]
    assert last.finish_reason == "stop" and last.prompt_tokens > 0 and 0 < last.completion_tokens <= 16


def test_streams_token_by_token_and_counts_the_prompt_like_the_engine(loop, backend):
    req = GenerationRequest("count", 24, prompt="One, two, three,", temperature=0)
    deltas = collect(loop, backend, req)
    assert len(deltas) > 3  # streamed, not one blob
    assert deltas[-1].prompt_tokens == loop.run_until_complete(backend.count_prompt_tokens(req))


def test_temperature_zero_is_deterministic(loop, backend):
    req = GenerationRequest("det", 32, prompt="The quick brown fox", temperature=0)
    assert text_of(collect(loop, backend, req)) == text_of(collect(loop, backend, req))


def test_max_tokens_ends_with_length(loop, backend):
    deltas = collect(loop, backend, GenerationRequest("len", 5, prompt="Once upon a time", temperature=0))
    assert deltas[-1].finish_reason == "length" and deltas[-1].completion_tokens == 5


def test_stop_sequence_ends_the_text_before_it(loop, backend):
    free = text_of(collect(loop, backend, GenerationRequest("free", 24, prompt="One, two, three, four,",
                                                            temperature=0)))
    assert " six" in free  # the model counts on by itself...
    deltas = collect(loop, backend, GenerationRequest("stop", 24, prompt="One, two, three, four,", temperature=0,
                                                      stop=(" six",)))
    text = text_of(deltas)
    assert "six" not in text and free.startswith(text) and deltas[-1].finish_reason == "stop"


def test_cancel_mid_stream_frees_the_slot(loop, backend):
    async def run():
        gen = backend.generate(GenerationRequest("long", 400, prompt="Count: one, two, three,", temperature=0))
        got = 0
        async for _ in gen:
            got += 1
            if got == 3:
                break
        await gen.aclose()
        cap = backend.capacity()
        # The next request starts at once (bounded: a hang fails the test instead of blocking it).
        nxt = backend.generate(GenerationRequest("next", 4, prompt="Hello", temperature=0))
        first = await asyncio.wait_for(nxt.__anext__(), timeout=10)
        await nxt.aclose()
        return got, cap, first
    got, cap, first = loop.run_until_complete(run())
    assert got == 3 and cap.slots_in_use == 0 and cap.kv_tokens_in_use == 0
    assert first.text or first.finish_reason


def test_prompt_longer_than_the_context_is_typed(loop, backend):
    with pytest.raises(PromptTooLong) as info:
        collect(loop, backend, GenerationRequest("big", 8, prompt="word " * 3000))
    assert info.value.max_context == 2048 and info.value.prompt_tokens > 2048
    assert backend.state is BackendState.READY


def test_assistant_prefix_continues_the_answer(loop, backend):
    # A failover hands over at a token boundary: the prefix is the first deltas of the answer.
    deltas = collect(loop, backend, GenerationRequest("a", 16, messages=CHAT_PARIS, temperature=0))
    prefix = text_of(deltas[:3])
    rest = text_of(collect(loop, backend, GenerationRequest("b", 16, messages=CHAT_PARIS, temperature=0,
                                                            assistant_prefix=prefix)))
    assert prefix and prefix + rest == text_of(deltas)


def test_capacity_is_what_the_engine_reported(backend):
    cap = backend.capacity()
    assert cap.max_context == 2048
    if backend.name == "llamacpp":
        assert cap.max_context == backend._all[0].n_ctx()  # llama.cpp's own figure
        assert cap.kv_tokens_total == cap.max_context * cap.slots_total and cap.slots_total == 1
    else:
        cache = backend._engine.vllm_config.cache_config
        assert cap.kv_tokens_total == cache.num_gpu_blocks * cache.block_size
        # SmolLM2: 2 x 30 layers x 3 KV heads x 64 x 2 bytes = 23,040 B per token; 1 GiB -> ~46.6k tokens.
        assert 40_000 < cap.kv_tokens_total < 50_000
        assert cap.max_context == backend._engine.vllm_config.model_config.max_model_len
        assert cap.slots_total == 4


def test_every_delta_carries_the_prompt_count_and_the_cumulative_completion_count(loop, backend):
    req = GenerationRequest("counts", 12, prompt="Monday, Tuesday, Wednesday,", temperature=0)
    deltas = collect(loop, backend, req)
    prompt = loop.run_until_complete(backend.count_prompt_tokens(req))
    counts = [d.completion_tokens for d in deltas]
    assert all(d.prompt_tokens == prompt for d in deltas)
    assert counts[0] >= 1 and counts == sorted(counts)  # cumulative, never reset
    assert deltas[-1].finish_reason == "length" and counts[-1] == 12
