"""The OpenAI surface of the real server on llama.cpp alone (#12), SmolLM2-135M-Instruct: the
official ``openai`` client through the acceptance checks, and LangChain's ChatOpenAI, unchanged,
through a tool loop and structured output."""

from __future__ import annotations

import json

import pytest

from tests.e2e import openai_checks as checks

MODEL = "smollm2"


@pytest.fixture(scope="module")
def server(start_server, smollm2_gguf_path):
    s = start_server({"model": {"ref": str(smollm2_gguf_path)}, "engines": {"chain": ["llamacpp"]},
                      "planner": {"target_context": 2048, "min_context": 512}, "server": {"model_name": MODEL}})
    s.wait_ready(backend="llamacpp")
    return s


@pytest.fixture(scope="module")
def client(server):
    return checks.client(server.url)


def test_a_json_schema_answer_validates(client):
    assert checks.check_json_schema(client, MODEL) == "llamacpp"


def test_required_and_named_tools_give_valid_calls(client):
    checks.check_tool_choices(client, MODEL)


def test_a_tool_loop_completes(client):
    checks.check_tool_loop(client, MODEL)


def test_streamed_tool_calls_reassemble_to_the_whole_answer(client):
    checks.check_streamed_tool_calls(client, MODEL)


def test_logprobs_and_n(client):
    checks.check_logprobs_and_n(client, MODEL)


def test_models_and_text_only(client):
    checks.check_models(client, MODEL)
    checks.check_text_only(client, MODEL)


def test_langchain_drives_a_tool_loop_and_structured_output_unchanged(server):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    @tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        return json.dumps({"city": city, "temperature": 21, "unit": "celsius"})

    llm = ChatOpenAI(model=MODEL, base_url=f"{server.url}/v1", api_key="unused", temperature=0, max_tokens=80,
                     max_retries=0)
    history = [HumanMessage("What is the weather in Paris?")]
    ai = llm.bind_tools([get_weather], tool_choice="get_weather").invoke(history)
    (call,) = ai.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str)
    history += [ai, ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])]
    final = llm.bind_tools([get_weather], tool_choice="none").invoke(history)
    assert final.content and not final.tool_calls

    class City(BaseModel):
        """A city and how many people live there."""

        name: str = Field(max_length=24)
        population: int = Field(ge=0, le=99_999_999)

    city = llm.with_structured_output(City, method="json_schema").invoke("The capital of France, with its population.")
    assert isinstance(city, City) and city.name
