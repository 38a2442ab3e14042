"""Tokens/s of both backends on SmolLM2-135M-Instruct, at concurrency 1 and 8, against the raw
engines driven directly in the same run (the anchor): the ratio is what the backend layer costs.

    .venv/bin/python -m bench.engines [--tokens 128] [--only llamacpp|vllm]

Results and the command: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time
from pathlib import Path

from tests.conftest import CACHE
from tests.integration.engine_support import llamacpp_backend, vllm_backend
from tests.support.models import make_smollm2_hf, smollm2_gguf

from agent.backends.base import GenerationRequest

PROMPT = ({"role": "user", "content": "Write a long story about a dragon who learns to cook."},)
CONCURRENCY = (1, 8)


async def run_backend(backend, concurrency: int, tokens: int) -> float:
    """Completion tokens per second for ``concurrency`` simultaneous chats."""
    async def one(i: int) -> int:
        last = None
        async for d in backend.generate(GenerationRequest(f"b{concurrency}-{i}", tokens, messages=PROMPT,
                                                          temperature=0)):
            last = d
        return last.completion_tokens
    t = time.perf_counter()
    done = await asyncio.gather(*(one(i) for i in range(concurrency)))
    return sum(done) / (time.perf_counter() - t)


def run_raw_llama(llm, concurrency: int, tokens: int) -> float:
    """Anchor: llama_cpp.Llama.create_chat_completion from threads, one at a time (one context)."""
    lock = threading.Lock()
    counts: list[int] = []

    def one() -> None:
        with lock:
            r = llm.create_chat_completion(messages=list(PROMPT), max_tokens=tokens, temperature=0, top_k=0,
                                           min_p=0.0)
        counts.append(r["usage"]["completion_tokens"])
    threads = [threading.Thread(target=one) for _ in range(concurrency)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return sum(counts) / (time.perf_counter() - t)


async def run_raw_vllm(engine, tokenizer, concurrency: int, tokens: int) -> float:
    """Anchor: AsyncLLM.generate driven directly."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    ids = tokenizer.apply_chat_template(list(PROMPT), add_generation_prompt=True, tokenize=False)
    ids = tokenizer.encode(ids, add_special_tokens=False)

    async def one(i: int) -> int:
        n = 0
        params = SamplingParams(max_tokens=tokens, temperature=0, output_kind=RequestOutputKind.DELTA)
        async for out in engine.generate({"prompt_token_ids": ids}, params, f"raw{concurrency}-{i}"):
            n += len(out.outputs[0].token_ids)
        return n
    t = time.perf_counter()
    done = await asyncio.gather(*(one(i) for i in range(concurrency)))
    return sum(done) / (time.perf_counter() - t)


def report(engine: str, rows: list[tuple[int, float, float]]) -> None:
    for c, ours, anchor in rows:
        print(f"{engine:9} concurrency {c}: backend {ours:7.1f} tok/s   raw engine {anchor:7.1f} tok/s   "
              f"ratio {ours / anchor:.3f}")


async def compare(name: str, backend, anchor, tokens: int, repeats: int) -> None:
    """Start ``backend``, then per concurrency run it and ``anchor(c, tokens)`` ``repeats`` times,
    alternating which goes first (the second run of a pair is warmer), and print the medians."""
    await backend.start()
    await run_backend(backend, 1, 16)  # warm-up
    rows = []
    for c in CONCURRENCY:
        ours, raw = [], []
        for r in range(repeats):
            if r % 2 == 0:
                ours.append(await run_backend(backend, c, tokens))
                raw.append(await anchor(backend, c, tokens))
            else:
                raw.append(await anchor(backend, c, tokens))
                ours.append(await run_backend(backend, c, tokens))
        rows.append((c, statistics.median(ours), statistics.median(raw)))
    await backend.stop()
    report(name, rows)


def bench_llamacpp(tokens: int, repeats: int) -> None:
    async def anchor(backend, c: int, n: int) -> float:
        # the same loaded model drives the anchor: identical weights and context
        return await asyncio.to_thread(run_raw_llama, backend._all[0], c, n)
    asyncio.run(compare("llama.cpp", llamacpp_backend(smollm2_gguf()), anchor, tokens, repeats))


def bench_vllm(tokens: int, repeats: int) -> None:
    async def anchor(backend, c: int, n: int) -> float:
        return await run_raw_vllm(backend._engine, backend._tokenizer, c, n)
    backend = vllm_backend(make_smollm2_hf(Path(CACHE) / "smollm2-hf"), max_model_len=2048, max_num_seqs=8)
    asyncio.run(compare("vLLM", backend, anchor, tokens, repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128, help="max tokens per request")
    parser.add_argument("--repeats", type=int, default=4, help="runs per point; the median is printed")
    parser.add_argument("--only", choices=("llamacpp", "vllm"))
    args = parser.parse_args()
    if args.only in (None, "llamacpp"):
        bench_llamacpp(args.tokens, args.repeats)
    if args.only in (None, "vllm"):
        bench_vllm(args.tokens, args.repeats)


if __name__ == "__main__":
    main()
