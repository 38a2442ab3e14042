"""Property-based fuzz of the real server on both engines (#5, #11), llama.cpp alone and vLLM in
front of it (each answer must come from the engine under test): bodies generated from what the
request models accept, and an oracle for each.

- A valid body (every field at a value the models accept, on both OpenAI endpoints) is a 200 from
  that engine with what was asked: n choices per prompt, each ended by a stop or its token budget,
  usage equal to the prompt's own token count (POST /tokenize) and the tokens delivered, a stream
  that ends in [DONE] with a usage chunk only when asked.
- The same body with one field broken (wrong type, out of range, a value no model takes) is a 4xx
  in the OpenAI envelope naming that field; a body that is not a JSON object is a 400.
- Bodies of every size up to ``server.max_request_bytes``: a prompt that cannot fit the context is
  a 400 ``context_length_exceeded`` naming it (by its size alone beyond the bound, tokenized below
  it); one byte over the limit is a 413 before the body is read.

(The #12 fields, one by one against their semantics, are tests/e2e/test_serve_fields_fuzz.py.)"""

from __future__ import annotations

import json
import random

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.engines import NEEDS_VLLM

MODEL = "smollm2"
LIMIT = 2 * 1024**2  # server.max_request_bytes of these servers
CONTEXT = 1024
PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module", params=["llamacpp", pytest.param("vllm", marks=NEEDS_VLLM)])
def server(request, start_server):
    """llama.cpp alone, or vLLM first (llama.cpp, the terminal fallback every chain ends with,
    behind it: the oracle checks that vLLM answered)."""
    engine, gguf = request.param, str(request.getfixturevalue("smollm2_gguf_path"))
    model = {"ref": gguf} if engine == "llamacpp" else {"ref": str(request.getfixturevalue("smollm2_hf_dir")),
                                                        "gguf": gguf}
    s = start_server({"model": model, "engines": {"chain": [engine] if engine == "llamacpp" else [engine, "llamacpp"]},
                      "planner": {"target_context": CONTEXT, "min_context": 512, "max_num_seqs": 4},
                      "server": {"model_name": MODEL, "max_request_bytes": LIMIT}})
    s.wait_ready(backend=engine)
    s.engine = engine
    return s


# --- valid bodies ------------------------------------------------------------------------------
text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]), min_size=1, max_size=40)
word = st.text(alphabet="abcdefghij ,.", min_size=1, max_size=5)
part = st.fixed_dictionaries({"type": st.just("text"), "text": text})
message = st.fixed_dictionaries({
    "role": st.sampled_from(["system", "developer", "user", "assistant"]),
    "content": st.one_of(text, st.lists(part, min_size=1, max_size=2)),
})
COMMON = {
    "max_tokens": st.integers(1, 4), "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1),
    "stop": st.one_of(st.none(), word, st.lists(word, max_size=4)), "seed": st.integers(0, 2**63 - 1),
    "n": st.integers(1, 2), "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
    "user": st.text(max_size=20),
}


@st.composite
def valid_body(draw, endpoint: str) -> dict:
    body = {"model": MODEL, "max_tokens": draw(COMMON["max_tokens"])}
    for name, strategy in COMMON.items():
        if name != "max_tokens" and draw(st.booleans()):
            body[name] = draw(strategy)
    if endpoint == "chat":
        body["messages"] = [*draw(st.lists(message, max_size=2)), {"role": "user", "content": draw(text)}]
        if draw(st.booleans()):
            body["response_format"] = {"type": "text"}
    else:
        body["prompt"] = draw(st.one_of(text, st.lists(text, min_size=1, max_size=2)))
    if draw(st.booleans()):
        body["stream"] = True
        if draw(st.booleans()):
            body["stream_options"] = {"include_usage": draw(st.booleans())}
    return body


def prompts(body: dict) -> list:
    if "messages" in body:
        return [body["messages"]]
    return body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]


def prompt_tokens(client: httpx.Client, body: dict) -> int:
    total = 0
    for p in prompts(body):
        key = "messages" if "messages" in body else "prompt"
        r = client.post("/tokenize", json={"model": MODEL, key: p})
        assert r.status_code == 200, r.text
        total += r.json()["count"]
    return total


def read(client: httpx.Client, endpoint: str, body, raw: bytes | None = None) -> tuple[httpx.Response, bytes]:
    content = raw if raw is not None else json.dumps(body).encode()
    with client.stream("POST", PATHS[endpoint], content=content, headers={"content-type": "application/json"}) as r:
        return r, r.read()


def answered(body: dict, payload: bytes) -> tuple[dict[int, str | None], dict | None]:
    """(finish reason per choice index, usage) of a whole or streamed answer."""
    if not body.get("stream"):
        doc = json.loads(payload)
        return {c["index"]: c["finish_reason"] for c in doc["choices"]}, doc["usage"]
    data = [line[6:] for line in payload.decode().splitlines() if line.startswith("data: ")]
    assert data and data[-1] == "[DONE]", payload[-300:]
    finish: dict[int, str | None] = {}
    usage = None
    for chunk in map(json.loads, data[:-1]):
        assert "error" not in chunk, chunk
        if chunk.get("usage"):
            assert chunk["choices"] == [] and usage is None, chunk  # one usage chunk, last, without choices
            usage = chunk["usage"]
        for choice in chunk["choices"]:
            assert usage is None, "a choice after the usage chunk"
            finish[choice["index"]] = choice["finish_reason"] or finish.get(choice["index"])
    return finish, usage


def check_valid(server, endpoint: str, body: dict) -> None:
    with httpx.Client(base_url=server.url, timeout=120) as client:
        expected_prompt = prompt_tokens(client, body)
        r, payload = read(client, endpoint, body)
        assert r.status_code == 200, (body, payload[:500])
        assert r.headers["x-node-agent-backend"] == server.engine
        finish, usage = answered(body, payload)
    n, budget = body.get("n", 1), body["max_tokens"]
    assert sorted(finish) == list(range(n * len(prompts(body)))), finish
    assert set(finish.values()) <= {"stop", "length"}, finish
    if body.get("stream") and not (body.get("stream_options") or {}).get("include_usage"):
        assert usage is None
        return
    assert usage["prompt_tokens"] == expected_prompt, (usage, expected_prompt)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["completion_tokens"] <= len(finish) * budget, (usage, finish)
    if all(f == "length" for f in finish.values()):
        assert usage["completion_tokens"] == len(finish) * budget, (usage, finish)


@settings(FUZZ, max_examples=40)
@given(body=valid_body("chat"))
def test_a_valid_chat_body_is_answered_as_asked(server, body):
    check_valid(server, "chat", body)


@settings(FUZZ, max_examples=40)
@given(body=valid_body("completions"))
def test_a_valid_completions_body_is_answered_as_asked(server, body):
    check_valid(server, "completions", body)


# --- one field broken ----------------------------------------------------------------------------
# Values no request model takes, per field (values pydantic coerces, as vLLM's server does too,
# such as "3" for an integer, are valid and not here).
BROKEN = {
    "model": [5, None, "", "not-this-model"],
    "max_tokens": [-1, 0, "x", 1.5, 10**7, [2]],
    "temperature": ["hot", -1, 2.5, [1], {}],
    "top_p": [0, -0.5, 1.5, "x"],
    "stop": [5, [""], ["a"] * 5, [5], {"a": 1}, ""],
    "seed": ["x", -1, 1.5, 2**70],
    "n": [0, -1, 17, "x", 1.5],
    "stream": [5, [], {}],
    "stream_options": [5, "x", {"include_usage": "x"}, {"bogus": 1}],
    "presence_penalty": [2.5, -3, "x"],
    "frequency_penalty": [2.5, -3, "x"],
    "user": [5, "u" * 300],
    "logprobs": ["x", [1]],
}
BROKEN_CHAT = {
    "messages": [[], "hi", None, 7, [{"role": "wizard", "content": "x"}], [{"content": "x"}],
                 [{"role": "user", "content": 5}], [{"role": "user", "content": [{"type": "video", "video": "x"}]}],
                 [{"role": "user"}]],
    "response_format": [5, "json", {"type": "xml"}, {"type": "json_schema"}],
    "top_logprobs": [21, -1, "x"],
}
BROKEN_COMPLETIONS = {"prompt": [5, [], None, {"a": 1}, "", [[1, 2]]], "echo": ["x", [1]]}


def broken(endpoint: str):
    table = {**BROKEN, **(BROKEN_CHAT if endpoint == "chat" else BROKEN_COMPLETIONS)}
    return st.sampled_from(sorted(table)).flatmap(lambda name: st.tuples(st.just(name), st.sampled_from(table[name])))


def check_broken(server, endpoint: str, body: dict, name: str, value) -> None:
    body = {**body, name: value}
    if name == "top_logprobs":
        body["logprobs"] = True
    with httpx.Client(base_url=server.url, timeout=120) as client:
        r, payload = read(client, endpoint, body)
    assert 400 <= r.status_code < 500, (body, r.status_code, payload[:300])
    error = json.loads(payload)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    param = error["param"] or ""
    assert param == name or param.startswith((name + ".", name + "[")), (name, value, error)
    assert r.status_code == (404 if value == "not-this-model" else 400), (name, value, error)


@settings(FUZZ, max_examples=100)
@given(body=valid_body("chat"), bad=broken("chat"))
def test_a_chat_body_with_one_broken_field_is_a_4xx_naming_it(server, body, bad):
    check_broken(server, "chat", body, *bad)


@settings(FUZZ, max_examples=60)
@given(body=valid_body("completions"), bad=broken("completions"))
def test_a_completions_body_with_one_broken_field_is_a_4xx_naming_it(server, body, bad):
    check_broken(server, "completions", body, *bad)


@settings(FUZZ, max_examples=40)
@given(raw=st.one_of(st.binary(max_size=40), st.sampled_from([b"", b"null", b"[]", b"1", b'"x"', b"{", b"{}"])),
       endpoint=st.sampled_from(sorted(PATHS)))
def test_a_body_that_is_not_a_request_object_is_a_400(server, raw, endpoint):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        r, payload = read(client, endpoint, None, raw)
    assert r.status_code == 400, (raw, r.status_code, payload[:300])
    assert json.loads(payload)["error"]["message"]


# --- sizes up to the limit -----------------------------------------------------------------------
WORDS = ["node", "agent", "serves", "models", "on", "both", "engines", "under", "faults", "with", "admission",
         "and", "health", "checks"]


def body_of_size(endpoint: str, size: int, seed: int, messages: int) -> bytes:
    """A request of exactly ``size`` bytes whose text is words (so it tokenizes like prose)."""
    rng = random.Random(seed)

    def render(fill: int) -> bytes:
        words = " ".join(rng.choice(WORDS) for _ in range(fill // 6 + 1))[:fill]
        if endpoint == "chat":
            per = [words[i::messages] for i in range(messages)]
            body = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": p} for p in per]}
        else:
            body = {"model": MODEL, "max_tokens": 2, "prompt": words}
        return json.dumps(body, separators=(",", ":")).encode()

    overhead = len(render(0))
    raw = render(size - overhead)
    assert len(raw) == size, (len(raw), size)
    return raw


@settings(FUZZ, max_examples=30)
@given(size=st.one_of(st.integers(32 * 1024, 256 * 1024), st.integers(32 * 1024, LIMIT), st.just(LIMIT)),
       seed=st.integers(0, 2**32),
       messages=st.integers(1, 64), endpoint=st.sampled_from(sorted(PATHS)))
def test_a_prompt_that_cannot_fit_is_a_400_at_every_size_up_to_the_limit(server, size, seed, messages, endpoint):
    raw = body_of_size(endpoint, size, seed, messages)
    with httpx.Client(base_url=server.url, timeout=120) as client:
        r, payload = read(client, endpoint, None, raw)
    assert r.status_code == 400, (size, r.status_code, payload[:300])
    error = json.loads(payload)["error"]
    assert error["code"] == "context_length_exceeded", error
    assert error["param"] == ("messages" if endpoint == "chat" else "prompt"), error
    assert f"{CONTEXT}" in error["message"], error  # says how large the context is


@settings(FUZZ, max_examples=10)
@given(over=st.integers(1, 64 * 1024), endpoint=st.sampled_from(sorted(PATHS)))
def test_a_body_over_the_limit_is_a_413(server, over, endpoint):
    raw = body_of_size(endpoint, LIMIT + over, over, 1)
    with httpx.Client(base_url=server.url, timeout=120) as client:
        r, payload = read(client, endpoint, None, raw)
    assert r.status_code == 413, (over, r.status_code, payload[:300])
    assert json.loads(payload)["error"]["code"] == "request_too_large"
