"""The acceptance checks of #12, as a user of the official ``openai`` client runs them; each e2e
module runs them against its real server (llama.cpp alone; vLLM with llama.cpp behind it)."""

from __future__ import annotations

import json

import jsonschema
import openai

CITY = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 24},
                                         "population": {"type": "integer", "minimum": 0, "maximum": 99999999}},
        "required": ["capital", "population"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)


def check_json_schema(c: openai.OpenAI, model: str) -> str:
    raw = c.chat.completions.with_raw_response.create(
        model=model, max_tokens=80, temperature=0.7, seed=1,
        messages=[{"role": "user", "content": "The capital of France and its population, as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}})
    r = raw.parse()
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), CITY)
    return raw.headers["x-node-agent-backend"]


def check_tool_choices(c: openai.OpenAI, model: str) -> None:
    for choice in ("required", NAMED):
        r = c.chat.completions.create(model=model, messages=ASK_WEATHER, tools=[WEATHER], tool_choice=choice,
                                      temperature=0, max_tokens=80)
        ch = r.choices[0]
        assert ch.finish_reason == "tool_calls", (choice, ch)
        (call,) = ch.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather" and call.id
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def check_tool_loop(c: openai.OpenAI, model: str) -> str:
    """call → tool result → final answer, the history passed back as the client returned it."""
    first = c.chat.completions.create(model=model, messages=ASK_WEATHER, tools=[WEATHER], tool_choice=NAMED,
                                      temperature=0, max_tokens=80)
    message = first.choices[0].message
    call = message.tool_calls[0]
    history = ASK_WEATHER + [message, {"role": "tool", "tool_call_id": call.id,
                                       "content": json.dumps({"temperature": 21, "unit": "celsius"})}]
    final = c.chat.completions.create(model=model, messages=history, tools=[WEATHER], tool_choice="none",
                                      temperature=0, max_tokens=40)
    assert final.choices[0].finish_reason in ("stop", "length") and final.choices[0].message.content
    assert not final.choices[0].message.tool_calls
    return final.choices[0].message.content


def reassemble(stream) -> tuple[str, list[tuple[str, str]], str | None]:
    content, calls, finish = "", {}, None
    for chunk in stream:
        for ch in chunk.choices:
            content += ch.delta.content or ""
            for tc in ch.delta.tool_calls or ():
                entry = calls.setdefault(tc.index, ["", ""])
                if tc.function and tc.function.name:
                    assert tc.id and tc.type == "function" and not entry[0]  # name once, with id and type
                    entry[0] = tc.function.name
                entry[1] += (tc.function.arguments or "") if tc.function else ""
            finish = ch.finish_reason or finish
    return content, [tuple(calls[i]) for i in sorted(calls)], finish


def check_streamed_tool_calls(c: openai.OpenAI, model: str) -> None:
    for choice in ("required", NAMED):
        kwargs = dict(model=model, messages=ASK_WEATHER, tools=[WEATHER], tool_choice=choice, temperature=0,
                      max_tokens=80)
        whole = c.chat.completions.create(**kwargs).choices[0]
        _, calls, finish = reassemble(c.chat.completions.create(stream=True, **kwargs))
        assert finish == whole.finish_reason == "tool_calls"
        assert calls == [(t.function.name, t.function.arguments) for t in whole.message.tool_calls]


def check_logprobs_and_n(c: openai.OpenAI, model: str) -> None:
    r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=6,
                                  logprobs=True, top_logprobs=3, n=2, seed=3)
    assert len(r.choices) == 2 and [ch.index for ch in r.choices] == [0, 1]
    for ch in r.choices:
        assert ch.logprobs.content and all(len(e.top_logprobs) == 3 for e in ch.logprobs.content)
        assert "".join(e.token for e in ch.logprobs.content) == ch.message.content
    # one entry per generated token but the one that ended the answer
    assert r.usage.completion_tokens == sum(len(ch.logprobs.content) + (ch.finish_reason == "stop") for ch in r.choices)
    t = c.completions.create(model=model, prompt="One, two, three,", max_tokens=4, temperature=0, logprobs=2)
    lp = t.choices[0].logprobs
    assert len(lp.tokens) == 4 and all(len(top) == 2 for top in lp.top_logprobs) and "".join(lp.tokens) == t.choices[0].text


def check_models(c: openai.OpenAI, model: str) -> None:
    m = c.models.retrieve(model)
    assert m.id == model and m.model_extra["max_model_len"] > 0
    assert [x.id for x in c.models.list()] == [model]
    try:
        c.models.retrieve("another-model")
        raise AssertionError("another model was found")
    except openai.NotFoundError:
        pass


def check_text_only(c: openai.OpenAI, model: str) -> None:
    try:
        c.chat.completions.create(model=model, max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "data:,"}}]}])
        raise AssertionError("an image part was accepted")
    except openai.BadRequestError as exc:
        assert "text-only" in str(exc)
