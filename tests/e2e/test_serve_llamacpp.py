"""The real server process on the embedded default (llama.cpp), driven by the official openai
client and plain HTTP (#5)."""

from __future__ import annotations

import asyncio
import os

import httpx
import openai
import pytest

from tests.support.models import swapped_embedding

PARIS = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def server(start_server):
    s = start_server({"engines": {"chain": ["llamacpp"]}, "planner": {"target_context": 2048}})
    s.wait_ready()
    return s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list()] == [MODEL]


def test_chat_answers_paris_and_names_the_backend(client):
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=PARIS, temperature=0)
    assert raw.headers["x-node-agent-backend"] == "llamacpp"
    r = raw.parse()
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_with_usage_in_the_final_chunk(client):
    stream = client.chat.completions.create(model=MODEL, messages=PARIS, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_completions_stream_and_not(client):
    r = client.completions.create(model=MODEL, prompt="One, two, three,", max_tokens=8, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="One, two, three,", max_tokens=8, temperature=0, stream=True) if c.choices)
    assert streamed == r.choices[0].text


def test_async_client_concurrent_requests(server):
    async def run():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        rs = await asyncio.gather(*(client.chat.completions.create(model=MODEL, messages=PARIS, temperature=0,
                                                                    max_tokens=12) for _ in range(3)))
        await client.close()
        return rs
    assert all("Paris" in r.choices[0].message.content for r in asyncio.run(run()))


def test_sse_ends_with_done(server):
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60,
                      json={"model": MODEL, "prompt": "Hi", "max_tokens": 3, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


@pytest.mark.parametrize("body, status, code, param", [
    ("{not json", 400, "invalid_value", None),
    ({"model": MODEL, "messages": "hi"}, 400, "invalid_value", "messages"),
    ({"model": MODEL, "messages": []}, 400, "invalid_value", "messages"),
    ({"model": MODEL, "messages": PARIS, "max_tokens": -1}, 400, "invalid_value", "max_tokens"),
    ({"model": MODEL, "messages": PARIS, "max_tokens": 10**9}, 400, "invalid_value", "max_tokens"),
    ({"model": MODEL, "messages": PARIS, "temperature": "hot"}, 400, "invalid_value", "temperature"),
    ({"model": "gpt-17", "messages": PARIS}, 404, "model_not_found", "model"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "word " * 5000}]}, 400, "context_length_exceeded",
     "messages"),
])
def test_bad_input_is_4xx_with_the_openai_envelope(server, body, status, code, param):
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, str) \
        else {"json": body}
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["param"] == param and err["message"]
    assert set(err) == {"message", "type", "param", "code"}


def test_client_that_leaves_mid_stream_frees_the_engine(server, client):
    # Regression: Starlette cancels the response task through anyio when a client disconnects;
    # unshielded clean-up never aborted the generation and llama.cpp's only instance stayed taken.
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60,
                      json={"model": MODEL, "prompt": "Count: one, two, three,", "max_tokens": 1000,
                            "stream": True}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i == 6:
                break
    quick = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=20)
    r = quick.chat.completions.create(model=MODEL, messages=PARIS, temperature=0, max_tokens=12)
    assert "Paris" in r.choices[0].message.content


def test_nothing_can_serve_exits_3_after_the_retries(start_server, smollm2_gguf_path, tmp_path):
    """llama.cpp fails every start on a GGUF it cannot load, the router gives it up, and the
    process exits 3 so systemd's Restart=on-failure fires (a peer's server has exited 0 when its
    engine died, and was never restarted)."""
    broken = swapped_embedding(smollm2_gguf_path, tmp_path / "wrong-shape.gguf")
    s = start_server({"engines": {"chain": ["llamacpp"]}, "model": {"ref": str(broken)},
                      "planner": {"target_context": 2048},
                      "router": {"restart_backoff_s": 0.2, "max_restart_attempts": 2}})
    assert s.proc.wait(timeout=120) == 3
    log = s.log.read_text()
    assert "llamacpp is given up after 2 failed starts in a row" in log
    assert "exiting with status 3: no backend can serve" in log


def test_a_background_task_that_raises_ends_the_agent_with_status_1_and_its_traceback(start_server,
                                                                                       smollm2_gguf_path, tmp_path):
    """The readiness monitor (like the cluster heartbeat or the watchdog) raising is a bug; the
    agent must not stay up answering from stale health: it logs the traceback and exits 1 for
    systemd to restart it. The fault is injected into the real process by a sitecustomize."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import asyncio\nimport agent.serving.monitor as m\n\n"
        "async def run(self):\n    await asyncio.sleep(1.0)\n    raise RuntimeError('injected: the monitor broke')\n\n"
        "m.NodeMonitor.run = run\n")
    python_path = os.pathsep.join(p for p in (str(inject), os.environ.get("PYTHONPATH")) if p)
    s = start_server({"engines": {"chain": ["llamacpp"]}, "model": {"ref": str(smollm2_gguf_path)},
                      "planner": {"target_context": 2048}}, env={"PYTHONPATH": python_path})
    assert s.proc.wait(timeout=120) == 1
    log = s.log.read_text()
    assert "the agent's monitor task failed; exiting" in log
    assert "RuntimeError: injected: the monitor broke" in log and "Traceback" in log
    assert "exiting with status 1 (the reason is logged above)" in log
