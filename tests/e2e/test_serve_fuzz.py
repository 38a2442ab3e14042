"""Property-based fuzz of the real server (#5): 500+ generated bodies, valid and broken, against
both OpenAI endpoints; none may produce a 5xx, and every error uses the OpenAI envelope."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

MODEL = "smollm2-135m-instruct"

junk = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=False),
                 st.text(max_size=20), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5),
                                                                                           st.integers(), max_size=2))
message = st.fixed_dictionaries({
    "role": st.one_of(st.sampled_from(["system", "user", "assistant", "developer"]), junk),
    "content": st.one_of(st.text(max_size=40), st.lists(st.fixed_dictionaries({"type": st.just("text"),
                                                                               "text": st.text(max_size=20)}),
                                                          max_size=2), junk),
})
common = {
    "model": st.one_of(st.just(MODEL), junk),
    "max_tokens": st.one_of(st.integers(-2, 4), st.integers(5, 10**7), junk),
    "temperature": st.one_of(st.floats(0, 2), st.floats(allow_nan=False), junk),
    "top_p": st.one_of(st.floats(0, 1), junk),
    "stop": st.one_of(st.none(), st.text(max_size=5), st.lists(st.text(max_size=5), max_size=6), junk),
    "stream": st.one_of(st.booleans(), junk),
    "seed": st.one_of(st.none(), st.integers(-5, 2**64), junk),
    "n": st.one_of(st.just(1), st.integers(-1, 3), junk),
    "stream_options": st.one_of(st.none(), st.fixed_dictionaries({"include_usage": st.booleans()}), junk),
}
chat_body = st.fixed_dictionaries({}, optional={
    **common, "messages": st.one_of(st.lists(message, max_size=3), junk),
    "response_format": st.one_of(st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])}), junk),
})
completion_body = st.fixed_dictionaries({}, optional={**common, "prompt": st.one_of(st.text(max_size=40),
                                                                                    st.lists(st.text(max_size=10),
                                                                                             max_size=3), junk)})


@pytest.fixture(scope="module")
def server(start_server):
    s = start_server({"engines": {"chain": ["llamacpp"]}, "planner": {"target_context": 1024, "min_context": 512}})
    s.wait_ready()
    return s


def check(client: httpx.Client, path: str, body) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    with client.stream("POST", path, content=content, headers={"content-type": "application/json"}) as r:
        payload = r.read()
    assert r.status_code < 500, (path, body, r.status_code, payload[:300])
    if r.status_code >= 400:
        err = json.loads(payload)["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(body=chat_body)
def test_chat_fuzz_never_5xx(server, body):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        check(client, "/v1/chat/completions", body)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(body=st.one_of(completion_body, st.binary(max_size=30)))
def test_completions_fuzz_never_5xx(server, body):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        check(client, "/v1/completions", body)
