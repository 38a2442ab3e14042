"""Tool-call parsers and tool rendering (#12), on outputs of the families as their model cards and
docs show them. The same outputs are checked against vLLM's own parsers in
tests/integration/test_vllm_openai_surface.py (vLLM is too slow to import for this tier)."""

from __future__ import annotations

import json

import pytest

from agent.tools import render
from agent.tools.parsers import Hermes, Llama3Json, Mistral, ToolCall, for_template

# (parser, model output, expected content, expected [(name, arguments)])
REAL = [
    (Hermes, '<tool_call>\n{"name": "get_current_temperature", "arguments": {"location": "San Francisco, CA, USA"}}\n'
             '</tool_call>\n<tool_call>\n{"name": "get_temperature_date", "arguments": {"location": "San Francisco, '
             'CA, USA", "date": "2024-10-01"}}\n</tool_call>', None,
     [("get_current_temperature", {"location": "San Francisco, CA, USA"}),
      ("get_temperature_date", {"location": "San Francisco, CA, USA", "date": "2024-10-01"})]),  # Qwen2.5
    (Hermes, '<tool_call>\n{"arguments": {"symbol": "TSLA"}, "name": "get_stock_fundamentals"}\n</tool_call>', None,
     [("get_stock_fundamentals", {"symbol": "TSLA"})]),  # Hermes 2 Pro
    (Hermes, "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
     "Let me check.", [("get_weather", {"city": "Paris"})]),
    (Hermes, "The capital of France is Paris.", "The capital of France is Paris.", []),
    (Llama3Json, '{"name": "get_current_conditions", "parameters": {"location": "San Francisco, CA", "unit": '
                 '"Fahrenheit"}}', None, [("get_current_conditions", {"location": "San Francisco, CA",
                                                                       "unit": "Fahrenheit"})]),  # Llama 3.1
    (Llama3Json, '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", '
                 '"parameters": {"tz": "CET"}}', None, [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]),
    (Llama3Json, "Paris is the capital of France.", "Paris is the capital of France.", []),
    (Mistral, '[TOOL_CALLS] [{"name": "get_current_weather", "arguments": {"location": "Paris, France", "format": '
              '"celsius"}}]', None, [("get_current_weather", {"location": "Paris, France", "format": "celsius"})]),  # v0.3
    (Mistral, '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}', None,
     [("get_weather", {"city": "Paris"}), ("get_time", {})]),  # v11 tokenizers
    (Mistral, '[{"name": "get_weather", "arguments": {"city": "Paris"}}]', None,
     [("get_weather", {"city": "Paris"})]),  # the marker dropped as a special token
    (Mistral, "Bonjour! [1] is a footnote.", "Bonjour! [1] is a footnote.", []),
]


def calls(found: list[ToolCall]) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in found]


@pytest.mark.parametrize("parser, text, content, expected", REAL)
def test_whole_answers_parse_as_the_family_writes_them(parser, text, content, expected):
    got_content, found = parser().parse(text)
    assert calls(found) == expected and got_content == content


@pytest.mark.parametrize("parser, text, content, expected", REAL)
@pytest.mark.parametrize("size", [1, 3, 17])
def test_streaming_in_any_pieces_gives_the_whole_answer(parser, text, content, expected, size):
    stream = parser().stream()
    events = []
    for i in range(0, len(text), size):
        events += stream.feed(text[i:i + size])
    events += stream.close()
    found = [e for e in events if isinstance(e, ToolCall)]
    text_out = "".join(e for e in events if isinstance(e, str))
    assert calls(found) == expected
    assert (text_out.strip() or None) == content or (not expected and text_out == text)


def test_text_that_only_looks_like_a_call_is_never_lost():
    broken = '<tool_call>\n{"name": "f", "arguments": {"a": 1}\n'  # unterminated, invalid JSON
    content, found = Hermes().parse("Before " + broken)
    assert found == [] and content == "Before " + broken


def test_call_ids_are_unique_and_mistral_ones_fit_its_templates():
    _, found = Hermes().parse(REAL[0][1])
    assert len({c.id for c in found}) == 2 and all(c.id.startswith("call_") for c in found)
    _, found = Mistral().parse(REAL[8][1])
    assert all(len(c.id) == 9 and c.id.isalnum() for c in found)


def test_the_parser_follows_the_template_family():
    assert isinstance(for_template("{% for tool in tools %}<tool_call>{% endfor %}", True), Hermes)
    assert isinstance(for_template("{% if tools %}[AVAILABLE_TOOLS]{{ tools }}[TOOL_CALLS]{% endif %}", True), Mistral)
    assert isinstance(for_template('{{ tools }} "parameters": <|python_tag|>', True), Llama3Json)
    assert isinstance(for_template("{{ messages }}", False), Hermes)  # we render Hermes for it


TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
CONVERSATION = (
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    {"role": "tool", "tool_call_id": "call_2", "content": '{"wind": 3}'},
)


def test_a_template_that_knows_tools_gets_them_and_arguments_as_objects():
    messages, tools = render.for_template(CONVERSATION, (TOOL,), "{% if tools %}{{ tools }}{% endif %}")
    assert tools == [TOOL]
    assert messages[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert messages[2]["content"] == "" and messages[3]["role"] == "tool"


def test_a_template_without_tools_gets_the_hermes_format_spelled_out():
    messages, tools = render.for_template(CONVERSATION, (TOOL,), "{% for m in messages %}{{ m.content }}{% endfor %}")
    assert tools is None
    assert messages[0]["role"] == "system" and messages[0]["content"].startswith("Be brief.")
    assert '"name": "get_weather"' in messages[0]["content"] and "<tools>" in messages[0]["content"]
    assert messages[2] == {"role": "assistant", "content": render.hermes_call("get_weather", '{"city": "Paris"}')}
    assert messages[3]["role"] == "user" and messages[3]["content"].count("<tool_response>") == 2
    assert len(messages) == 4
    # What the model then writes in that format is read back by the Hermes parser.
    _, found = Hermes().parse(messages[2]["content"])
    assert calls(found) == [("get_weather", {"city": "Paris"})]
