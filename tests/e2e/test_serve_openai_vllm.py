"""The OpenAI surface of the real server with vLLM first and llama.cpp behind it (#12): the
acceptance checks answered by vLLM, and constrained answers that survive a SIGKILL of vLLM's
EngineCore mid-way (the stream continues on llama.cpp under the same grammar)."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import httpx
import jsonschema
import openai
import pytest

from tests.e2e import openai_checks as checks
from tests.e2e.conftest import vllm_first
from tests.e2e.test_serve_failover import engine_core_pid
from tests.support.engines import NEEDS_VLLM

pytestmark = NEEDS_VLLM
MODEL = "smollm2"
CITIES = {"type": "object", "properties": {"cities": {"type": "array", "minItems": 8, "maxItems": 8,
                                                      "items": {"type": "string", "maxLength": 16}}},
          "required": ["cities"], "additionalProperties": False}
ASK_CITIES = [{"role": "user", "content": "List eight European cities as JSON."}]


@pytest.fixture(scope="module")
def server(start_server, smollm2_hf_dir, smollm2_gguf_path):
    s = start_server(vllm_first(smollm2_hf_dir, smollm2_gguf_path, queue_timeout_s=240, model_name=MODEL))
    s.wait_ready(backend="vllm")
    return s


@pytest.fixture(scope="module")
def client(server):
    return checks.client(server.url)


def test_vllm_on_this_build_applies_constraints_and_says_how_each_engine_fails_over(server):
    backends = {b["name"]: b["features"] for b in httpx.get(f"{server.url}/v1/node", timeout=10).json()["backends"]}
    assert backends["vllm"]["constraints"] is True and backends["vllm"]["continue_constrained"] is False
    assert backends["llamacpp"]["constraints"] is True and backends["llamacpp"]["continue_constrained"] is True
    assert backends["vllm"]["vocabulary"] == backends["llamacpp"]["vocabulary"]


def test_the_acceptance_checks_are_answered_by_vllm(client):
    assert checks.check_json_schema(client, MODEL) == "vllm"
    checks.check_tool_choices(client, MODEL)
    checks.check_tool_loop(client, MODEL)
    checks.check_streamed_tool_calls(client, MODEL)
    checks.check_logprobs_and_n(client, MODEL)
    checks.check_models(client, MODEL)
    checks.check_text_only(client, MODEL)


def test_constrained_answers_killed_mid_way_still_validate(server):
    pid = engine_core_pid(server)
    fmt = {"type": "json_schema", "json_schema": {"name": "cities", "schema": CITIES, "strict": True}}

    async def run():
        c = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)
        whole = asyncio.create_task(c.chat.completions.with_raw_response.create(
            model=MODEL, messages=ASK_CITIES, response_format=fmt, max_tokens=200, temperature=0))
        raw = await c.chat.completions.with_raw_response.create(
            model=MODEL, messages=ASK_CITIES, response_format=fmt, max_tokens=200, temperature=0, stream=True)
        stream = raw.parse()
        text, chunks, finish = "", 0, None
        async for chunk in stream:
            for ch in chunk.choices:
                text += ch.delta.content or ""
                finish = ch.finish_reason or finish
            chunks += 1
            if chunks == 8:
                os.kill(pid, signal.SIGKILL)
                sent_before_kill = text
        plain = (await whole).parse()
        await c.close()
        return raw.headers["x-node-agent-backend"], sent_before_kill, text, finish, plain
    began, before, text, finish, plain = asyncio.run(asyncio.wait_for(run(), 300))
    assert began == "vllm" and before and text.startswith(before) and len(text) > len(before)
    assert finish == "stop"
    jsonschema.validate(json.loads(text), CITIES)  # one stream, two engines, one valid answer
    jsonschema.validate(json.loads(plain.choices[0].message.content), CITIES)
    log = server.log.read_text()
    assert '"event": "fallback"' in log and '"from": "vllm"' in log
