"""vLLM first, llama.cpp behind it, in the real server process; vLLM's EngineCore is SIGKILLed
while 8 clients are being served (#5)."""

from __future__ import annotations

import asyncio
import os
import signal

import httpx
import openai
import psutil
import pytest

from tests.e2e.conftest import vllm_first
from tests.support.engines import NEEDS_VLLM

pytestmark = NEEDS_VLLM
MODEL = "smollm2"
PARIS = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]


@pytest.fixture(scope="module")
def server(start_server, smollm2_hf_dir, smollm2_gguf_path):
    s = start_server(vllm_first(smollm2_hf_dir, smollm2_gguf_path, queue_timeout_s=300, model_name=MODEL))
    s.wait_ready(backend="vllm")
    return s


def engine_core_pid(server) -> int:
    procs = psutil.Process(server.proc.pid).children(recursive=True)
    return next(p.pid for p in procs if "EngineCore" in p.name())


def chat(server, **kwargs):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    return client.chat.completions.with_raw_response.create(model=MODEL, **kwargs)


def test_vllm_serves_first(server):
    raw = chat(server, messages=PARIS, temperature=0)
    assert raw.headers["x-node-agent-backend"] == "vllm"
    assert "Paris" in raw.parse().choices[0].message.content
    assert server.ready().json() == {"status": "ok", "backend": "vllm"}


def test_sigkill_under_load_fails_over_and_vllm_comes_back(server):
    pid = engine_core_pid(server)

    async def one_plain(client):
        raw = await client.chat.completions.with_raw_response.create(model=MODEL, messages=STORY, temperature=0,
                                                                     max_tokens=48)
        r = raw.parse()
        return raw.headers["x-node-agent-backend"], r.choices[0].finish_reason, r.choices[0].message.content

    async def one_stream(client):
        stream = await client.chat.completions.create(model=MODEL, messages=STORY, temperature=0, max_tokens=48,
                                                      stream=True)
        text, finish = "", None
        async for c in stream:
            if c.choices:
                text += c.choices[0].delta.content or ""
                finish = c.choices[0].finish_reason or finish
        return "stream", finish, text

    async def run():
        # 8 answers queue for llama.cpp's one instance while vLLM restarts on the same 2 cores: the
        # client waits as long as a patient one would; what is measured is that none fails.
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)
        tasks = [asyncio.create_task(one_plain(client)) for _ in range(4)]
        tasks += [asyncio.create_task(one_stream(client)) for _ in range(4)]
        await asyncio.sleep(1.0)  # every request is in flight
        os.kill(pid, signal.SIGKILL)
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=330)
        await client.close()
        return results

    results = asyncio.run(run())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors
    assert all(finish in ("stop", "length") and text for _, finish, text in results)
    # The agent stayed up and serves from the fallback until vLLM is back.
    assert httpx.get(f"{server.url}/health/live", timeout=5).status_code == 200
    assert chat(server, messages=PARIS, temperature=0, max_tokens=12).headers["x-node-agent-backend"] in (
        "llamacpp", "vllm")
    server.wait_ready(timeout=240, backend="vllm")
    raw = chat(server, messages=PARIS, temperature=0)
    assert raw.headers["x-node-agent-backend"] == "vllm" and "Paris" in raw.parse().choices[0].message.content
    assert engine_core_pid(server) != pid
    log = server.log.read_text()
    assert '"event": "fallback"' in log and '"from": "vllm"' in log
