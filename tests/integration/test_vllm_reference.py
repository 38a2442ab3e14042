"""vLLM's own code as the reference for the OpenAI surface (#12), without starting an engine:
its server's request fields all have a policy here, and its Hermes and Llama-3 JSON tool parsers
read the families' outputs as ours do. (Importing vLLM takes ~30 s, hence this tier.)"""

from __future__ import annotations

import json

import pytest

from agent.serving.fields import BY_ENDPOINT, CHAT, COMPLETIONS
from tests.support.engines import NEEDS_VLLM
from tests.unit.test_tool_parsers import REAL, calls

pytestmark = NEEDS_VLLM


def test_every_field_of_vllms_server_has_a_policy():
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    for endpoint, model in ((CHAT, ChatCompletionRequest), (COMPLETIONS, CompletionRequest)):
        missing = set(model.model_fields) - set(BY_ENDPOINT[endpoint])
        assert not missing, f"{endpoint}: vLLM's {sorted(missing)} have no policy"


class _Vocab:
    """What vLLM's parsers ask of a tokenizer: the marker tokens' ids."""

    def get_vocab(self) -> dict[str, int]:
        return {"<tool_call>": 1, "</tool_call>": 2, "<|python_tag|>": 3}


@pytest.mark.parametrize("name, text", [(p.name, t) for p, t, _, _ in REAL if p.name in ("hermes", "llama3_json")])
def test_our_parsers_agree_with_vllms_on_real_outputs(name, text):
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.tool_parsers.hermes_tool_parser import Hermes2ProToolParser
    from vllm.tool_parsers.llama_tool_parser import Llama3JsonToolParser

    from agent.tools.parsers import PARSERS

    theirs = {"hermes": Hermes2ProToolParser, "llama3_json": Llama3JsonToolParser}[name](_Vocab())
    request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}])
    info = theirs.extract_tool_calls(text, request)
    _, ours = PARSERS[name]().parse(text)
    assert calls(ours) == [(c.function.name, json.loads(c.function.arguments)) for c in info.tool_calls]
