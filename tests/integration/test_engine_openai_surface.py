"""What the OpenAI surface needs from each real engine (#12), on SmolLM2-135M-Instruct: output
constraints that validate, logprobs, seeds, token-id controls, tools in the prompt, and the
same vocabulary on both. Each engine starts once (module-scoped parameter, as the contract tests).
"""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest

from agent import constraints
from agent.backends.base import CannotServe, GenerationRequest
from tests.integration.engine_support import CHAT_PARIS, collect, smollm2_engines, started_smollm2, text_of

pytestmark = pytest.mark.engines
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                           "population": {"type": "integer", "minimum": 0, "maximum": 99999999}},
          "required": ["city", "population"], "additionalProperties": False}
ASK_JSON = ({"role": "user", "content": "Give the capital of France and its population as JSON."},)
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 24}}, "required": ["city"]}}}


@pytest.fixture(scope="module", params=smollm2_engines())
def backend(request, loop):
    yield from started_smollm2(request, loop)


def test_constrained_output_validates_at_any_temperature(loop, backend):
    c = constraints.json_schema(SCHEMA)
    for seed in (1, 2):
        deltas = collect(loop, backend, GenerationRequest(f"j{seed}", 80, messages=ASK_JSON, temperature=0.9,
                                                          seed=seed, constraint=c))
        assert deltas[-1].finish_reason == "stop"
        jsonschema.validate(json.loads(text_of(deltas)), SCHEMA)


def test_constrained_and_plain_requests_together_leave_the_engine_serving(loop, backend):
    # vLLM's CPU build crashed on mixed batches (vllm-project/vllm#37705, #51283): prove this one does not.
    c = constraints.json_schema(SCHEMA)

    async def both():
        async def one(rid, constraint):
            return [d async for d in backend.generate(GenerationRequest(rid, 80, messages=ASK_JSON, temperature=0,
                                                                        constraint=constraint))]
        return await asyncio.gather(one("mix-c", c), one("mix-p", None))
    constrained, plain = loop.run_until_complete(both())
    jsonschema.validate(json.loads(text_of(constrained)), SCHEMA)
    assert text_of(plain)
    assert backend.features().constraints and backend.state.value == "ready"


def test_logprobs_give_the_asked_alternatives_for_every_token(loop, backend):
    deltas = collect(loop, backend, GenerationRequest("lp", 6, messages=CHAT_PARIS, temperature=0, logprobs=3))
    entries = [e for d in deltas for e in d.logprobs]
    assert len(entries) == deltas[-1].completion_tokens - (deltas[-1].finish_reason == "stop")
    assert all(len(e.top) == 3 and e.logprob <= 0 for e in entries)
    assert "".join(e.token for e in entries) == text_of(deltas)
    assert all(e.top[0][2] >= e.logprob - 1e-3 for e in entries)  # greedy: the likeliest was taken


def test_the_same_seed_gives_the_same_sample(loop, backend):
    req = GenerationRequest("s", 16, prompt="Once upon a time", temperature=1.0, top_p=0.9, seed=42)
    assert text_of(collect(loop, backend, req)) == text_of(collect(loop, backend, req))


def test_token_id_controls(loop, backend):
    free = collect(loop, backend, GenerationRequest("f", 12, prompt="One, two, three,", temperature=0))
    assert text_of(free).startswith(" four")
    tokens = loop.run_until_complete(backend.prepare(GenerationRequest("t", 1, prompt=" four"))).token_ids
    four = tokens[-1]
    stopped = collect(loop, backend, GenerationRequest("st", 12, prompt="One, two, three,", temperature=0,
                                                       stop_token_ids=(four,)))
    assert text_of(stopped) == "" and stopped[-1].finish_reason == "stop"
    banned = collect(loop, backend, GenerationRequest("lb", 4, prompt="One, two, three,", temperature=0,
                                                      logit_bias=((four, -100.0),)))
    assert not text_of(banned).startswith(" four")
    late = collect(loop, backend, GenerationRequest("mt", 30, messages=CHAT_PARIS, temperature=0, min_tokens=20))
    assert late[-1].completion_tokens >= 20


def test_tools_reach_the_prompt(loop, backend):
    plain = loop.run_until_complete(backend.count_prompt_tokens(GenerationRequest("p", 1, messages=CHAT_PARIS)))
    with_tools = loop.run_until_complete(backend.count_prompt_tokens(
        GenerationRequest("t", 1, messages=CHAT_PARIS, tools=(TOOL,))))
    assert with_tools > plain + 20  # SmolLM2's template has no tools: the agent describes them


def test_a_required_tool_call_is_valid_even_from_a_small_model(loop, backend):
    c = constraints.tool_calls([TOOL], parallel=False)
    text = text_of(collect(loop, backend, GenerationRequest("rq", 60, messages=({"role": "user", "content":
                                                            "What is the weather in Paris?"},),
                                                            temperature=0, tools=(TOOL,), constraint=c)))
    (call,) = json.loads(text)
    assert call["name"] == "get_weather"
    jsonschema.validate(call["parameters"], TOOL["function"]["parameters"])


def test_a_constrained_answer_continues_after_a_prefix_where_the_engine_can(loop, backend):
    c = constraints.json_schema(SCHEMA)
    req = GenerationRequest("c", 60, messages=ASK_JSON, temperature=0.7, seed=3, constraint=c,
                            assistant_prefix='{"city":"Par')
    if not backend.features().continue_constrained:
        with pytest.raises(CannotServe):
            loop.run_until_complete(backend.prepare(req))
        return
    rest = text_of(collect(loop, backend, req))
    jsonschema.validate(json.loads('{"city":"Par' + rest), SCHEMA)
    with pytest.raises(CannotServe):  # text the grammar cannot have produced is refused, not continued
        collect(loop, backend, GenerationRequest("x", 8, messages=ASK_JSON, constraint=c, assistant_prefix="Sure!"))


def test_both_engines_number_the_vocabulary_the_same(backend, smollm2_gguf_path):
    # logit_bias and stop ids are honoured across the chain only when this holds (fields.check_chain).
    import llama_cpp

    from agent.backends.llamacpp_sampling import Vocab

    gguf = llama_cpp.Llama(model_path=str(smollm2_gguf_path), vocab_only=True, verbose=False)
    assert backend.features().vocab == Vocab.read(gguf._model.vocab).fingerprint
    assert backend.features().vocab_size == gguf.n_vocab()


def test_n_choices_are_what_vllms_own_n_samples(loop, backend):
    # jobs.py runs choice i of n as its own request with seed + i; vLLM's native n does the same
    # (vllm/v1/engine/parallel_sampling.py), so on vLLM the two give the same choices.
    if backend.name != "vllm":
        pytest.skip("vLLM's native n is the reference; llama.cpp has none")
    from vllm.sampling_params import RequestOutputKind

    from agent.backends.vllm import sampling_params

    req = GenerationRequest("n", 12, prompt="Once upon a time", temperature=1.0, seed=7)
    ids = loop.run_until_complete(backend.prepare(req)).token_ids
    params = sampling_params(req, 12)
    params.n, params.output_kind = 2, RequestOutputKind.FINAL_ONLY

    async def native():
        async for out in backend._engine.generate({"prompt_token_ids": list(ids)}, params, "native-n"):
            final = out
        return sorted((o.index, o.text) for o in final.outputs)
    ours = [text_of(collect(loop, backend, GenerationRequest(f"n{i}", 12, prompt="Once upon a time", temperature=1.0,
                                                             seed=7 + i))) for i in range(2)]
    assert [text for _, text in loop.run_until_complete(native())] == ours


def test_a_strict_tool_call_the_model_starts_is_valid(loop, backend):
    # tool_choice auto with strict tools: free text, but once the family's marker is written the
    # call follows the tool's schema. Started here by a prefix (SmolLM2 rarely calls on its own).
    from agent.tools.parsers import Hermes

    if not backend.features().continue_constrained:
        pytest.skip("needs an engine that resumes a constrained answer (vLLM's matcher starts with the answer)")
    strict = {"type": "function", "function": {**TOOL["function"], "strict": True}}
    trigger, begin, end = Hermes.strict_tags()
    c = constraints.strict_tool_calls([strict], trigger, begin, end, special=trigger in backend.features().special_tokens)
    ask = ({"role": "user", "content": "What is the weather in Paris? Call the tool."},)
    for seed in (1, 2):
        text = "<tool_call>" + text_of(collect(loop, backend, GenerationRequest(
            f"st{seed}", 60, messages=ask, tools=(strict,), temperature=0.9, seed=seed, constraint=c,
            assistant_prefix="<tool_call>")))
        _, (call, *_) = Hermes().parse(text)
        assert call.name == "get_weather"
        jsonschema.validate(json.loads(call.arguments), TOOL["function"]["parameters"])
