"""What an output constraint costs on llama.cpp (#12), SmolLM2-135M-Instruct, one request at a time:
tokens/s and time to the first token of the backend's llguidance logits processor, against the
same backend unconstrained and against llama.cpp's own GBNF grammar (llama-cpp-python's
JSON-schema → GBNF converter, ``create_chat_completion(grammar=...)``) measured in the same run.

    .venv/bin/python -m bench.constraints [--tokens 96] [--runs 3]

Results and the command: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

from tests.integration.engine_support import llamacpp_backend
from tests.support.models import smollm2_gguf

from agent import constraints
from agent.backends.base import GenerationRequest

SCHEMA = {"type": "object", "properties": {
    "cities": {"type": "array", "minItems": 10, "maxItems": 10,
               "items": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                                          "population": {"type": "integer", "minimum": 0,
                                                                         "maximum": 99999999}},
                         "required": ["name", "population"], "additionalProperties": False}}},
    "required": ["cities"], "additionalProperties": False}
PROMPT = ({"role": "user", "content": "List ten European cities with their populations as JSON."},)


async def backend_run(backend, constraint, tokens: int, temperature: float) -> tuple[float, float, str]:
    started, first, last, text = time.perf_counter(), None, None, ""
    async for d in backend.generate(GenerationRequest(f"b{time.monotonic_ns()}", tokens, messages=PROMPT,
                                                      temperature=temperature, seed=1, constraint=constraint)):
        first = first or time.perf_counter()
        last, text = d, text + d.text
    return last.completion_tokens / (time.perf_counter() - started), first - started, text


def gbnf_run(llm, grammar, tokens: int, temperature: float) -> tuple[float, float, str]:
    started, first, text, n = time.perf_counter(), None, "", 0
    for chunk in llm.create_chat_completion(messages=list(PROMPT), max_tokens=tokens, temperature=temperature,
                                            top_k=0, min_p=0.0, seed=1, grammar=grammar, stream=True):
        piece = chunk["choices"][0]["delta"].get("content") or ""
        if piece:
            first = first or time.perf_counter()
            text += piece
            n += 1  # (one chunk per token here: no stop strings)
    return n / (time.perf_counter() - started), first - started, text


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    import llama_cpp

    backend = llamacpp_backend(smollm2_gguf())
    loop = asyncio.new_event_loop()
    loop.run_until_complete(backend.start())
    compiled = constraints.json_schema(SCHEMA)
    t = time.perf_counter()
    loop.run_until_complete(backend_run(backend, compiled, 4, 0))  # builds llguidance's tokenizer once
    print(f"first constrained request (llguidance tokenizer built): {time.perf_counter() - t:.2f} s")
    llm = llama_cpp.Llama(model_path=str(smollm2_gguf()), n_ctx=2048, n_threads=backend.plan.n_threads, verbose=False)
    t = time.perf_counter()
    gbnf = llama_cpp.LlamaGrammar.from_json_schema(json.dumps(SCHEMA), verbose=False)
    print(f"GBNF from the schema: {time.perf_counter() - t:.3f} s; llguidance grammar check: see above")
    rows = {}
    for temperature in (0.0, 0.7):
        for name, run in (("backend, no constraint", lambda: loop.run_until_complete(
                              backend_run(backend, None, args.tokens, temperature))),
                          ("backend, llguidance constraint", lambda: loop.run_until_complete(
                              backend_run(backend, compiled, args.tokens, temperature))),
                          ("llama-cpp-python, its GBNF grammar", lambda: gbnf_run(llm, gbnf, args.tokens, temperature))):
            results = [run() for _ in range(args.runs)]
            rows[(temperature, name)] = (statistics.median(r[0] for r in results),
                                         statistics.median(r[1] for r in results))
    loop.run_until_complete(backend.stop())
    for temperature in (0.0, 0.7):
        anchor = rows[(temperature, "backend, no constraint")][0]
        print(f"\ntemperature {temperature}: tokens/s (median of {args.runs}), ratio to unconstrained, first token")
        for (temp, name), (tps, ttft) in rows.items():
            if temp == temperature:
                print(f"  {name:<38} {tps:7.1f}  x{tps / anchor:5.2f}  {ttft * 1000:7.0f} ms")


if __name__ == "__main__":
    main()
