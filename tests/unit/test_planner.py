"""Planner acceptance (#3): the expected numbers are derived by hand in the comments.

Parameter counts (from the cards' config numbers; 16-bit = 2 bytes):
  Llama-3.1-70B: embed = lm_head = 128256 x 8192 = 1,050,673,152
    per layer linear = q 8192x8192 + k,v 2x8192x1024 + o 8192x8192 + MLP 3x8192x28672 = 855,638,016
    x 80 layers = 68,451,041,280; norms 80 x 2 x 8192 + 8192 = 1,318,912
    bf16 = 2 x 70,553,706,496 = 141.1 GB (131.4 GiB)
    fp8  = 68,451,041,280 x 1 + 16-bit rest 2 x 2,102,665,216 = 72.7 GB (67.7 GiB)
    AWQ  = 68,451,041,280 x (0.5 + 2.5/128) + 4,205,330,432 = 39.8 GB (37.0 GiB)
  Llama-3.1-8B: per layer 4096x(4096+2048) + 4096x4096 + 3x4096x14336 = 218,103,808; x 32 = 6,979,321,856
    + 2 x 525,336,576 embed/head + norms = 8,030,261,248 params -> bf16 16.06 GB = 14.96 GiB
  KV per token, whole model: 2 x layers x kv_heads x head_dim x 2 bytes
    70B: 2 x 80 x 8 x 128 x 2 = 327,680 B (320 KiB); 8B: 2 x 32 x 8 x 128 x 2 = 131,072 B (128 KiB)
"""

from __future__ import annotations

import builtins
import pathlib

import pytest

from agent.catalog.resolve import resolve_model
from agent.errors import PlanError
from agent.hardware import detect
from agent.planner import Pins, plan
from agent.planner import memory as mem
from agent.planner.types import LlamaCppPlan, VllmPlan
from agent.settings import Settings

GIB = 1024**3


@pytest.fixture(scope="module")
def settings():
    return Settings.model_validate({})  # defaults, untouched by this machine's files or environment


@pytest.fixture(scope="module")
def llama70():
    return resolve_model("llama-3.1-70b-instruct")


@pytest.fixture(scope="module")
def llama8():
    return resolve_model("llama-3.1-8b-instruct")


def test_weight_and_kv_arithmetic(llama70, llama8):
    assert mem.param_counts(llama70.arch).total == 70_553_706_496
    assert mem.weights_total(llama70.arch, "none") == 141_107_412_992
    assert round(mem.weights_total(llama70.arch, "fp8") / 1e9, 1) == 72.7
    assert round(mem.weights_total(llama70.arch, "awq") / 1e9, 1) == 39.8
    assert mem.param_counts(llama8.arch).total == 8_030_261_248
    assert mem.kv_bytes_per_token(llama70.arch, 80, 1, 2) == 327_680
    assert mem.kv_bytes_per_token(llama8.arch, 32, 1, 2) == 131_072
    # TP=16 > 8 KV heads: heads replicate, each rank keeps one.
    assert mem.kv_heads_per_rank(llama70.arch, 16) == 1


def test_70b_on_the_homelab_box_refuses_bf16_and_fp8_and_fits_awq(settings, llama70):
    host = detect("rtx5090-rtx4090", env={})
    p = plan(host, llama70, settings)
    refusals = " | ".join(p.refusals)
    # VRAM: 32607 + 24564 MiB = 55.8 GiB total (CUDA sees 55.0 after the reserves).
    assert "bfloat16: weights 141.1 GB (131.4 GiB) exceed" in refusals
    assert "fp8: weights 72.7 GB (67.7 GiB) exceed" in refusals
    assert p.engine == "vllm" and p.fits
    chosen = p.primary
    assert isinstance(chosen, VllmPlan) and chosen.quantization == "awq"
    # PP=2 on an uneven split: the 5090 (28.5 GiB usable) takes more of the 80 layers than the 4090.
    assert (chosen.tensor_parallel_size, chosen.pipeline_parallel_size) == (1, 2)
    assert sum(chosen.pp_layer_partition) == 80 and chosen.pp_layer_partition[0] > chosen.pp_layer_partition[1]
    # TP=2 gives each rank 18.5 GiB of weights; the 4090 bounds both ranks, so it holds less KV.
    tp2 = next(a for a in p.alternatives if (a.tensor_parallel_size, a.pipeline_parallel_size) == (2, 1))
    assert tp2.kv_cache_tokens < chosen.kv_cache_tokens
    text = "\n".join(chosen.reasons)
    assert f"KV cache {chosen.kv_cache_tokens:,} tokens" in text
    assert f"vs TP=2 PP=1 on 2 GPU(s): {tp2.kv_cache_tokens:,} KV tokens" in text
    assert "picked TP=1 PP=2" in text and "smallest GPU (GPU 1" in text
    assert chosen.disable_p2p  # GeForce pair without P2P


def test_70b_bf16_on_four_a100_80gb_uses_tp4(settings, llama70):
    p = plan(detect("a100-80gb-x4", env={}), llama70, settings)
    c = p.primary
    assert c.fits and c.quantization == "none" and c.tensor_parallel_size == 4 and c.pipeline_parallel_size == 1
    # Per rank: 131.4/4 = 32.9 GiB weights; CUDA total 80 - 0.75 reserve = 79.25 GiB x 0.97 = 76.9 GiB,
    # minus 32.9 weights, ~0.3 activations, 1.3 overhead -> ~42.4 GiB of KV at 80 KiB per token per rank
    # (2 KV heads per rank) -> ~556k tokens.
    assert 520_000 < c.kv_cache_tokens < 590_000
    assert c.kv_cache_tokens % mem.BLOCK_SIZE == 0
    assert not c.disable_p2p


def test_70b_on_two_a100_40gb_refuses_bf16_and_offers_awq(settings, llama70):
    p = plan(detect("a100-40gb-x2", env={}), llama70, settings)
    assert any(r.startswith("bfloat16: weights 141.1 GB") for r in p.refusals)
    assert p.primary.quantization == "awq" and p.fits
    # A100 is compute capability 8.0: fp8 would be weight-only, so it is not offered unpinned.
    assert any("fp8 skipped: compute capability 8.0" in r for r in p.refusals)


def test_8b_on_a_4090_is_bf16_tp1(settings, llama8):
    p = plan(detect("rtx4090", env={}), llama8, settings)
    c = p.primary
    assert c.quantization == "none" and c.tensor_parallel_size == 1 and c.pipeline_parallel_size == 1
    # CUDA total 24564 - 354 reserve = 24210 MiB; usable = free (24564 - used) - 1024 margin.
    # KV = 0.94 x 23.64 GiB - 14.96 weights - activations - 0.9 overhead ~ 6 GiB / 128 KiB ~ 45-50k tokens.
    assert 35_000 < c.kv_cache_tokens < 60_000
    assert c.max_model_len == 8192
    assert isinstance(p.fallback, LlamaCppPlan) and p.fallback.n_gpu_layers == 0  # no VRAM reserved: CPU


def test_8b_on_cpu_only_is_a_llamacpp_cpu_plan(settings, llama8):
    p = plan(detect("cpu-only", env={}), llama8, settings)
    c = p.primary
    assert p.engine == "llamacpp" and isinstance(c, LlamaCppPlan) and c.fits
    assert c.n_gpu_layers == 0 and c.quant_type == "Q4_K_M" and c.n_threads == 16
    # Q4_K_M ~4.9 GB weights + 8192 x 32 layers x 2 x 8 x 128 x 2 B = 1 GiB KV: a few GiB of the 62 available.
    assert 4 * GIB < c.ram_bytes < 8 * GIB
    assert any("vLLM needs a GPU" in r for r in p.refusals)


def test_memory_held_by_another_process_lowers_utilization(settings, llama8):
    clean = plan(detect("rtx4090", env={}), llama8, settings, Pins(quantization="fp8")).primary
    shared = plan(detect("rtx4090-shared", env={}), llama8, settings, Pins(quantization="fp8")).primary
    # 6144 MiB held of 24210 MiB CUDA total = 0.254 less utilization (floored to hundredths).
    assert clean.gpu_memory_utilization - shared.gpu_memory_utilization == pytest.approx(0.25, abs=0.011)
    assert shared.kv_cache_tokens < clean.kv_cache_tokens
    assert any("other processes hold 6.0 GiB" in r for r in shared.reasons)


def test_display_gpu_keeps_a_larger_margin(settings, llama8):
    host = detect("rtx3090", env={})
    p = plan(host, llama8, settings).primary
    g = p.per_gpu[0]
    assert g.free_bytes - g.usable_bytes == (1024 + 1536) * 1024**2
    assert any("drives a display" in r for r in p.reasons)


def test_tp_that_does_not_divide_the_heads_is_refused_by_name(settings, llama70):
    with pytest.raises(PlanError, match="must divide the 64 attention heads"):
        plan(detect("a100-80gb-x4", env={}), llama70, settings, Pins(tp=3))


def test_tp_larger_than_the_gpu_count_is_refused(settings, llama8):
    with pytest.raises(PlanError, match="needs 2 GPUs; this host has 1"):
        plan(detect("rtx4090", env={}), llama8, settings, Pins(tp=2))


def test_pins_are_honoured(settings, llama70):
    p = plan(detect("a100-80gb-x4", env={}), llama70, settings,
             Pins(tp=2, pp=2, gpu_memory_utilization=0.8, max_model_len=4096))
    c = p.primary
    assert (c.tensor_parallel_size, c.pipeline_parallel_size, c.gpu_memory_utilization, c.max_model_len) == (2, 2, 0.8, 4096)


def test_pinned_context_longer_than_the_kv_cache_is_refused(settings, llama8):
    # bf16 pinned: 131072 tokens x 128 KiB = 16 GiB of KV does not fit beside 15 GiB of weights.
    p = plan(detect("rtx4090", env={}), llama8, settings, Pins(engine="vllm", quantization="none", max_model_len=131072))
    assert not p.fits
    assert "--max-model-len 131072 needs 16.0 GiB of KV cache per GPU for one request" in p.primary.refusal


def test_pinned_vllm_that_cannot_fit_says_what_would(settings, llama70):
    p = plan(detect("rtx4090", env={}), llama70, settings, Pins(engine="vllm", quantization="none"))
    assert not p.fits and "try --quantization awq" in p.primary.refusal


def test_llamacpp_offloads_what_fits_and_splits_by_free_vram(settings, llama70):
    homelab = plan(detect("rtx5090-rtx4090", env={}), llama70, settings, Pins(engine="llamacpp")).primary
    # Q4_K_M 42.5 GB = 39.6 GiB + 80 x 32 MiB KV at 8k fits in 28.5 + 22.6 GiB usable: everything on GPU.
    assert homelab.n_gpu_layers == -1 and len(homelab.tensor_split) == 2
    assert homelab.tensor_split[0] > homelab.tensor_split[1]
    single = plan(detect("rtx4090", env={}), llama70, settings, Pins(engine="llamacpp")).primary
    # 22.6 GiB usable / (0.5 GiB + 32 MiB per layer) ~ 40 of 80 layers.
    assert 30 < single.n_gpu_layers < 50 and single.tensor_split is None


def test_unknown_gguf_type_is_a_plan_error(settings, llama8):
    with pytest.raises(PlanError, match="no such GGUF"):
        plan(detect("cpu-only", env={}), llama8, settings, Pins(quantization="gguf:Q2_K"))


def test_the_planner_does_no_io(settings, llama70, monkeypatch):
    host = detect("rtx5090-rtx4090", env={})

    def forbidden(*args, **kwargs):
        raise AssertionError("the planner touched the file system")

    monkeypatch.setattr(builtins, "open", forbidden)
    monkeypatch.setattr(pathlib.Path, "read_text", forbidden)
    monkeypatch.setattr(pathlib.Path, "exists", forbidden)
    assert plan(host, llama70, settings).fits
