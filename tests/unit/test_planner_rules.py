"""One test per memory rule of #14; each fails on the planner as it was before (bea16c9).

Architecture numbers are those of the models' config.json files, written here as the HF configs
the catalog reads (tmp_path), so the catalog's parsing is exercised too.
"""

from __future__ import annotations

import json

import pytest

from agent.catalog.hf import load_hf_config
from agent.errors import PlanError
from agent.hardware import detect
from agent.planner import Pins, plan
from agent.planner import kvcache, weights
from agent.planner.learned import Measured
from agent.planner.profile import profile
from agent.planner.versions import rules_for
from agent.planner.vllm_cpu import cpu_key, plan_vllm_cpu
from agent.settings import Settings

GIB = 1024**3


@pytest.fixture(scope="module")
def settings():
    return Settings.model_validate({})


def _hf(tmp_path, name, cfg):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    return load_hf_config(d)


QWEN3_32B = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 5120,
             "intermediate_size": 25600, "num_hidden_layers": 64, "num_attention_heads": 64,
             "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 40960,
             "torch_dtype": "bfloat16"}


def test_sampler_warm_up_dominates_on_an_h100_with_1024_sequences():
    # vLLM >= 0.11 on an H100 defaults to 1024 sequences: the sampler warm-up of 1024 rows x the
    # 151,936-token vocabulary peaks near 5.6 GiB (logs: 4.8-5.6 GiB for dense 8B-32B models).
    arch = load_arch(QWEN3_32B)
    rules = rules_for("0.20.0")
    mnbt, seqs = rules.batch_defaults(int(79.19 * GIB), "NVIDIA H100 80GB HBM3")
    assert (mnbt, seqs) == (8192, 1024)
    p = profile(arch, rules, 1, 1, True, mnbt, seqs, 16384)
    assert 5.0 * GIB < p.activation_bytes < 6.0 * GIB
    # TP does not shrink it: logits are gathered over the whole vocabulary on every rank.
    assert profile(arch, rules, 4, 1, True, mnbt, seqs, 16384).activation_bytes > 5.0 * GIB


def load_arch(cfg):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(cfg))
        return load_hf_config(Path(d)).arch


def test_chunked_prefill_off_profiles_the_whole_context_the_20k_29k_35k_series():
    # V0 (0.6.x) profiled max_model_len tokens up to 32k and switched chunked prefill on above:
    # issue #10517 logged 3.81 GiB of KV at 20k, 2.89 GiB at 29k (start refused) and more at 35k.
    arch = load_arch({**QWEN3_32B, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                      "num_attention_heads": 32, "vocab_size": 128256, "max_position_embeddings": 131072})
    v0 = rules_for("0.6.4", planning=False)
    kv = {n: 23.58 * 0.9 * GIB - 14.99 * GIB - 0.35 * GIB - profile(arch, v0, 1, 1, True, 0, 256, n).activation_bytes
          for n in (20000, 29000, 35000)}
    assert kv[29000] < kv[20000] < kv[35000]
    assert kv[20000] / GIB == pytest.approx(3.81, rel=0.08) and kv[29000] / GIB == pytest.approx(2.89, rel=0.08)
    # On a supported release the same happens when chunked prefill is pinned off.
    v1 = rules_for("0.11.0")
    on = profile(arch, v1, 1, 1, True, 2048, 256, 29000)
    off = profile(arch, v1, 1, 1, True, 2048, 256, 29000, chunked_prefill=False)
    assert off.batched_tokens == 29000 and off.activation_bytes > on.activation_bytes


def test_pinned_utilization_above_free_memory_is_refused(settings, tmp_path):
    # rtx4090-shared: another process holds 6 GiB; a pinned 0.95 asks more than is free.
    model = _hf(tmp_path, "qwen3-8b", {**QWEN3_32B, "hidden_size": 4096, "intermediate_size": 12288,
                                       "num_hidden_layers": 36, "num_attention_heads": 32})
    p = plan(detect("rtx4090-shared", env={}), model, settings, Pins(engine="vllm", gpu_memory_utilization=0.95))
    assert not p.fits
    assert "vLLM refuses to start (free memory < utilization x total)" in p.primary.refusal


def test_graphs_outside_the_budget_before_0_20_and_inside_from_0_20(settings, tmp_path):
    model = _hf(tmp_path, "qwen3-8b", {**QWEN3_32B, "hidden_size": 4096, "intermediate_size": 12288,
                                       "num_hidden_layers": 36, "num_attention_heads": 32})
    host = detect("rtx4090", env={})
    old = plan(host, model, settings, vllm_version="0.11.0").primary
    new = plan(host, model, settings, vllm_version="0.20.0").primary
    # 0.11 keeps the graphs' 0.5 GiB free beside the requested memory: a lower utilization.
    assert old.gpu_memory_utilization < new.gpu_memory_utilization
    assert old.per_gpu[0].overhead_bytes < new.per_gpu[0].overhead_bytes


def test_releases_older_than_0_11_are_refused_by_name(settings, tmp_path):
    model = _hf(tmp_path, "qwen3-32b", QWEN3_32B)
    with pytest.raises(PlanError, match="vLLM 0.10.2 is older than 0.11"):
        plan(detect("h100-80gb", env={}), model, settings, vllm_version="0.10.2")


GEMMA3_27B = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
              "text_config": {"model_type": "gemma3_text", "hidden_size": 5376, "intermediate_size": 21504,
                              "num_hidden_layers": 62, "num_attention_heads": 32, "num_key_value_heads": 16,
                              "head_dim": 128, "vocab_size": 262208, "max_position_embeddings": 131072,
                              "sliding_window": 1024, "sliding_window_pattern": 6},
              "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                                "patch_size": 14}, "torch_dtype": "bfloat16"}


def test_gemma3_sliding_layers_hold_only_their_window_and_the_vision_tower_is_weighed(tmp_path):
    arch = _hf(tmp_path, "gemma3", GEMMA3_27B).arch
    kinds = arch.kinds()
    assert kinds.count("full_attention") == 10 and kinds.count("sliding_attention") == 52
    assert arch.vision_params > 400_000_000  # SigLIP-So400m tower
    budget = 20 * GIB
    hybrid = kvcache.kv_fit(arch, kinds, 1, 2, budget, 32768, 2048, hybrid_manager=True)
    flat = kvcache.kv_fit(arch, kinds, 1, 2, budget, 32768, 2048, hybrid_manager=False)
    assert hybrid.tokens > 3 * flat.tokens
    assert weights.weights_total(arch, "none") > 2 * (arch.vision_params + 26_000_000_000)


GPT_OSS_120B = {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": 2880,
                "intermediate_size": 2880, "num_hidden_layers": 36, "num_attention_heads": 64,
                "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 201088, "max_position_embeddings": 131072,
                "num_local_experts": 128, "num_experts_per_tok": 4, "sliding_window": 128,
                "layer_types": ["sliding_attention", "full_attention"] * 18, "attention_bias": True,
                "quantization_config": {"quant_method": "mxfp4"}, "torch_dtype": "bfloat16"}


def test_gpt_oss_mxfp4_plans_with_marlin_padded_experts(settings, tmp_path):
    model = _hf(tmp_path, "gpt-oss-120b", GPT_OSS_120B)
    assert model.sources[0].format == "mxfp4"
    # Logged on an H100: "Model loading took 65.9651 GiB" (vLLM issue #23278).
    w = weights.vllm_rank_weights(model.arch, "mxfp4", 1, 36, True, True, None, (9, 0), False)
    assert w / GIB == pytest.approx(65.97, rel=0.02)
    p = plan(detect("h100-80gb", env={}), model, settings, Pins(engine="vllm"))
    assert p.fits and p.primary.quantization == "mxfp4"


QWEN3_NEXT = {"architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next", "hidden_size": 2048,
              "intermediate_size": 5120, "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512,
              "num_experts": 512, "num_experts_per_tok": 10, "num_hidden_layers": 48, "num_attention_heads": 16,
              "num_key_value_heads": 2, "head_dim": 256, "vocab_size": 151936, "max_position_embeddings": 262144,
              "full_attention_interval": 4, "linear_num_key_heads": 16, "linear_num_value_heads": 32,
              "linear_key_head_dim": 128, "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4,
              "partial_rotary_factor": 0.25, "torch_dtype": "bfloat16"}


def test_qwen3_next_linear_layers_keep_a_state_not_a_per_token_kv(tmp_path):
    arch = _hf(tmp_path, "qwen3-next", QWEN3_NEXT).arch
    kinds = arch.kinds()
    assert kinds.count("linear_attention") == 36 and kinds.count("full_attention") == 12
    budget = 10 * GIB
    fit = kvcache.kv_fit(arch, kinds, 1, 2, budget, 32768, 8192, hybrid_manager=True)
    as_if_full = budget // kvcache.kv_bytes_per_token(arch, 48, 1, 2)
    assert fit.tokens > 3 * as_if_full
    assert 75e9 < weights.param_counts(arch).total < 85e9  # an 80B model


LLAMA33_70B_FP8_DYNAMIC = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
                           "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
                           "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
                           "max_position_embeddings": 131072, "torch_dtype": "bfloat16",
                           "quantization_config": {"quant_method": "compressed-tensors", "config_groups": {
                               "group_0": {"weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
                                           "input_activations": {"num_bits": 8, "type": "float", "dynamic": True},
                                           "targets": ["Linear"]}}, "ignore": ["lm_head"]}}


def test_compressed_tensors_fp8_dynamic_70b_fits_two_h100s(settings, tmp_path):
    model = _hf(tmp_path, "llama-3.3-70b-fp8-dynamic", LLAMA33_70B_FP8_DYNAMIC)
    assert model.sources[0].scheme == "w8a8-fp8"
    host = detect("a100-80gb-x4", env={})
    p = plan(host, model, settings, Pins(engine="vllm", tp=2))
    assert p.fits and p.primary.quantization == "compressed-tensors"
    assert not any("AWQ not offered" in r for r in p.refusals)


DEEPSEEK_V2_LITE = {"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "hidden_size": 2048,
                    "intermediate_size": 10944, "moe_intermediate_size": 1408, "n_routed_experts": 64,
                    "n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1,
                    "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16,
                    "kv_lora_rank": 512, "q_lora_rank": None, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128,
                    "v_head_dim": 128, "vocab_size": 102400, "max_position_embeddings": 163840,
                    "torch_dtype": "bfloat16"}


def test_mla_kv_bytes_come_from_the_latent_and_the_rope_dimension(tmp_path):
    arch = _hf(tmp_path, "deepseek-v2-lite", DEEPSEEK_V2_LITE).arch
    assert arch.is_mla
    # (512 + 64) x 2 bytes per layer, replicated on every TP rank.
    assert kvcache.kv_bytes_per_token(arch, 27, 1, 2) == 27 * 576 * 2
    assert kvcache.kv_bytes_per_token(arch, 27, 4, 2) == 27 * 576 * 2
    assert 15.0e9 < weights.param_counts(arch).total < 16.5e9  # DeepSeek-V2-Lite: 15.7B


def test_rope_cache_is_part_of_the_weights_vllm_loads(tmp_path):
    arch = load_arch({**QWEN3_32B, "max_position_embeddings": 131072})
    assert weights.rope_cache_bytes(arch) == 131072 * 128 * 2  # 32 MiB
    assert (weights.vllm_rank_weights(arch, "none", 1, 64, True, True)
            - weights.weights_total(arch, "none")) == 131072 * 128 * 2


def test_an_unknown_layer_type_is_refused_naming_the_missing_term(settings, tmp_path):
    cfg = {**QWEN3_32B, "num_hidden_layers": 2, "layer_types": ["full_attention", "chunked_attention"]}
    model = _hf(tmp_path, "odd", cfg)
    with pytest.raises(PlanError, match="no formula for layer type"):
        plan(detect("h100-80gb", env={}), model, settings, Pins(engine="vllm"))


def test_a_measured_start_replaces_the_formula_and_says_so(settings, tmp_path):
    model = _hf(tmp_path, "qwen3-8b", {**QWEN3_32B, "hidden_size": 4096, "intermediate_size": 12288,
                                       "num_hidden_layers": 36, "num_attention_heads": 32})
    host = detect("cpu-only", env={})
    first = plan_vllm_cpu(host, model, settings.planner, 4, Pins(), "0.32.0")
    key = cpu_key(model, "0.32.0", 8192, 8192)
    seen = Measured(key=key, measured_at="2026-11-30", requested_bytes=4 * GIB, kv_bytes=4 * GIB, num_blocks=200,
                    block_size=128, kv_tokens=25600, predicted_kv_tokens=first.kv_cache_tokens)
    second = plan_vllm_cpu(host, model, settings.planner, 4, Pins(), "0.32.0", {key.id(): seen})
    assert second.kv_cache_tokens == 25600 != first.kv_cache_tokens
    assert any("measured on this host on 2026-11-30" in r for r in second.reasons)
