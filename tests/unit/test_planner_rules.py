"""One test per memory rule of #14, asserted through the planner's public API where it can express
the case: agent.planner.plan, Pins, load_hf_config, detect(profile). The module imports only that
API, so it runs on the planner as it was before #14 (bea16c9) and fails there on the numbers.
Rules that need the vLLM release to plan for (plan(..., vllm_version=)) or the learned store
(plan(..., measured=)) cannot be expressed in that API; those tests say so.

Expected figures are vLLM's own start-up logs (docs/calibration-data.yaml, by entry id) or follow
from a model's config.json; architecture numbers are those of the models' config.json files,
written here as the HF configs the catalog reads (tmp_path).
"""

from __future__ import annotations

import json

import pytest

from agent.catalog.hf import load_hf_config
from agent.errors import PlanError
from agent.hardware import detect
from agent.planner import Pins, plan
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


LLAMA31_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
              "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
QWEN3_8B = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 4096,
            "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
            "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 40960, "torch_dtype": "bfloat16"}


def test_sampler_warm_up_follows_the_release(settings, tmp_path):
    # Needs plan(..., vllm_version=): not expressible before #14 (fails there at the call).
    # llm-d's vLLM 0.11.0 table (v1-0.11-h100-llama31-8b-llmd): 1024 dummy requests through the
    # PyTorch sort sampler peak at 4.76 GiB and leave 51.38 GiB of KV at 0.9 x an H100, 16000 tokens.
    model = _hf(tmp_path, "llama-3.1-8b", LLAMA31_8B)
    host = detect("h100-80gb", env={})
    pins = Pins(engine="vllm", tp=1, gpu_memory_utilization=0.9, max_model_len=16000, max_num_seqs=1024)
    kv = {v: plan(host, model, settings, pins, vllm_version=v).primary.per_gpu[0].kv_bytes / GIB
          for v in ("0.11.0", "0.17.1", "0.33.0")}
    assert kv["0.11.0"] == pytest.approx(51.38, rel=0.02)
    # 0.17-0.20 take the in-place Triton top-k/top-p kernel (14 bytes a logit instead of 38), the V2
    # model runner (0.29+) skips top-k/top-p in the warm-up: each frees memory for KV.
    assert kv["0.11.0"] + 2.5 < kv["0.17.1"] < kv["0.33.0"]


def test_chunked_prefill_off_profiles_the_whole_context(settings, tmp_path):
    # Needs Pins(enable_chunked_prefill=) and vllm_version=: not expressible before #14.
    # vllm/config/scheduler.py: without chunked prefill the profile forward runs
    # max(max_model_len, 2048) tokens, so the KV budget shrinks as the context grows (V0's 20k/29k
    # series in issue #10517 is the same rule: 3.81 GiB at 20k, 2.89 GiB at 29k on an RTX 3090).
    model = _hf(tmp_path, "llama-3.1-8b", LLAMA31_8B)
    host = detect("h100-80gb", env={})

    def kv(n, chunked):
        pins = Pins(engine="vllm", tp=1, gpu_memory_utilization=0.9, max_model_len=n, enable_chunked_prefill=chunked)
        return plan(host, model, settings, pins, vllm_version="0.20.0").primary.per_gpu[0].kv_bytes

    assert kv(20000, None) == kv(29000, None)  # chunked: the profile is sized by batched tokens
    assert kv(29000, False) < kv(20000, False) < kv(20000, None)


def test_pinned_utilization_above_free_memory_is_refused(settings, tmp_path):
    # rtx4090-shared: another process holds 6 GiB; a pinned 0.95 asks more than is free, and vLLM
    # refuses to start (gpu_worker.py init_device: free memory < utilization x total).
    model = _hf(tmp_path, "qwen3-8b", QWEN3_8B)
    p = plan(detect("rtx4090-shared", env={}), model, settings, Pins(engine="vllm", gpu_memory_utilization=0.95))
    assert not p.fits
    assert "vLLM refuses to start (free memory < utilization x total)" in p.primary.refusal


def test_fixed_overhead_is_what_vllm_logs(settings, tmp_path):
    # Logged at TP=1: non-torch 0.13-0.14 GiB (v1-0.11-h100-* entries), CUDA-graph estimate
    # 0.23 GiB (v1-0.31-a100-llama31-8b-defaults); the planner keeps non-torch + the 0.5 GiB graph
    # term it takes from the KV budget from 0.20 - under 0.7 GiB, not 0.4-0.8 + 0.5.
    model = _hf(tmp_path, "llama-3.1-8b", LLAMA31_8B)
    p = plan(detect("h100-80gb", env={}), model, settings, Pins(engine="vllm", tp=1)).primary
    assert p.fits and p.per_gpu[0].overhead_bytes < 0.7 * GIB


def test_graphs_outside_the_budget_before_0_20_and_inside_from_0_20(settings, tmp_path):
    # Needs vllm_version=: not expressible before #14. envs.py VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS
    # defaults to "1" from 0.20: graphs come out of the KV budget; before, they are captured after
    # the KV cache is sized, so the utilization must leave room for them.
    model = _hf(tmp_path, "qwen3-8b", QWEN3_8B)
    host = detect("rtx4090", env={})
    old = plan(host, model, settings, vllm_version="0.11.0").primary
    new = plan(host, model, settings, vllm_version="0.20.0").primary
    assert old.gpu_memory_utilization < new.gpu_memory_utilization
    assert old.per_gpu[0].overhead_bytes < new.per_gpu[0].overhead_bytes


def test_releases_older_than_0_11_are_refused_by_name(settings, tmp_path):
    # Needs vllm_version=: not expressible before #14.
    model = _hf(tmp_path, "qwen3-8b", QWEN3_8B)
    with pytest.raises(PlanError, match="vLLM 0.10.2 is older than 0.11"):
        plan(detect("h100-80gb", env={}), model, settings, vllm_version="0.10.2")


def test_hybrid_kv_tokens_are_counted_as_the_release_logs_them(settings, tmp_path):
    # Needs vllm_version=: not expressible before #14. gpt-oss-120b at TP=4 on A100s, vLLM 0.10.1
    # logged 2,640,144 tokens (v1-0.10-4xa100-gpt-oss-120b-*): blocks // groups x 16 (kv_cache_utils,
    # <= 0.20); from 0.21 the log is max concurrency x max_model_len, which charges the 64 sliding
    # layers only their window: far more tokens from the same blocks.
    model = _hf(tmp_path, "gpt-oss-120b", GPT_OSS_120B)
    host = detect("a100-80gb-x4", env={})
    pins = Pins(engine="vllm", tp=4, pp=1, gpu_memory_utilization=0.8, max_model_len=16384)
    blocks = plan(host, model, settings, pins, vllm_version="0.20.0").primary
    concurrency = plan(host, model, settings, pins, vllm_version="0.21.0").primary
    assert concurrency.kv_cache_tokens > 1.5 * blocks.kv_cache_tokens


GEMMA3_27B = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
              "text_config": {"model_type": "gemma3_text", "hidden_size": 5376, "intermediate_size": 21504,
                              "num_hidden_layers": 62, "num_attention_heads": 32, "num_key_value_heads": 16,
                              "head_dim": 128, "vocab_size": 262208, "max_position_embeddings": 131072,
                              "sliding_window": 1024, "sliding_window_pattern": 6},
              "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                                "patch_size": 14}, "torch_dtype": "bfloat16"}


def test_gemma3_sliding_layers_hold_only_their_window_and_the_vision_tower_is_weighed(settings, tmp_path):
    model = _hf(tmp_path, "gemma3", GEMMA3_27B)
    p = plan(detect("h100-80gb", env={}), model, settings, Pins(engine="vllm", max_model_len=131072)).primary
    assert p.fits
    full_layer_token = 2 * 16 * 128 * 2  # K and V of 16 heads x 128, 16-bit, one layer
    # 52 of 62 layers keep only their 1024-token window (+ one batch of tokens): at 131072 tokens a
    # request costs under a quarter of what 62 full layers would.
    assert p.kv_cache_tokens * 62 * full_layer_token > 3 * p.per_gpu[0].kv_bytes
    # 27B text + the SigLIP-So400m tower (~0.4B): over 54 GB in bf16.
    assert p.weights_bytes > 2 * 27_000_000_000


GPT_OSS_120B = {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": 2880,
                "intermediate_size": 2880, "num_hidden_layers": 36, "num_attention_heads": 64,
                "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 201088, "max_position_embeddings": 131072,
                "num_local_experts": 128, "num_experts_per_tok": 4, "sliding_window": 128,
                "layer_types": ["sliding_attention", "full_attention"] * 18, "attention_bias": True,
                "quantization_config": {"quant_method": "mxfp4"}, "torch_dtype": "bfloat16"}


def test_gpt_oss_mxfp4_plans_with_the_layout_vllm_loads(settings, tmp_path):
    # llm-d's vLLM 0.11 table on an H100 (Triton mxfp4 backend): "64.38" GiB of weights.
    model = _hf(tmp_path, "gpt-oss-120b", GPT_OSS_120B)
    p = plan(detect("h100-80gb", env={}), model, settings, Pins(engine="vllm")).primary
    assert p.fits and p.quantization == "mxfp4"
    assert p.per_gpu[0].weights_bytes / GIB == pytest.approx(64.38, rel=0.02)


QWEN3_NEXT = {"architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next", "hidden_size": 2048,
              "intermediate_size": 5120, "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512,
              "num_experts": 512, "num_experts_per_tok": 10, "num_hidden_layers": 48, "num_attention_heads": 16,
              "num_key_value_heads": 2, "head_dim": 256, "vocab_size": 151936, "max_position_embeddings": 262144,
              "full_attention_interval": 4, "linear_num_key_heads": 16, "linear_num_value_heads": 32,
              "linear_key_head_dim": 128, "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4,
              "partial_rotary_factor": 0.25, "torch_dtype": "bfloat16"}


def test_qwen3_next_linear_layers_keep_a_state_not_a_per_token_kv(settings, tmp_path):
    model = _hf(tmp_path, "qwen3-next", QWEN3_NEXT)
    p = plan(detect("a100-80gb-x4", env={}), model, settings, Pins(engine="vllm", tp=4, pp=1)).primary
    assert p.fits
    all_layers_token = 48 * 2 * max(1, 2 // 4) * 256 * 2  # every layer charged like full attention
    # 36 of 48 layers are Gated DeltaNet: one state per sequence, so 12 layers set the token cost.
    assert p.kv_cache_tokens * all_layers_token > 3 * p.per_gpu[0].kv_bytes
    assert 75e9 < p.weights_bytes / 2 < 85e9  # an 80B model in bf16


LLAMA33_70B_FP8_DYNAMIC = {**LLAMA31_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                           "num_attention_heads": 64,
                           "quantization_config": {"quant_method": "compressed-tensors", "config_groups": {
                               "group_0": {"weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
                                           "input_activations": {"num_bits": 8, "type": "float", "dynamic": True},
                                           "targets": ["Linear"]}}, "ignore": ["lm_head"]}}


def test_compressed_tensors_fp8_dynamic_70b_fits_two_80gb_gpus(settings, tmp_path):
    # llm-d's vLLM 0.11 table: RedHatAI/Llama-3.3-70B-Instruct-FP8-dynamic at TP=2 loads 33.88 GiB per GPU.
    model = _hf(tmp_path, "llama-3.3-70b-fp8-dynamic", LLAMA33_70B_FP8_DYNAMIC)
    p = plan(detect("a100-80gb-x4", env={}), model, settings, Pins(engine="vllm", tp=2, pp=1))
    assert p.fits and p.primary.quantization == "compressed-tensors"
    assert p.primary.per_gpu[0].weights_bytes / GIB == pytest.approx(33.88, rel=0.02)
    assert not any("AWQ not offered" in r for r in p.refusals)


DEEPSEEK_V2_LITE = {"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "hidden_size": 2048,
                    "intermediate_size": 10944, "moe_intermediate_size": 1408, "n_routed_experts": 64,
                    "n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1,
                    "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16,
                    "kv_lora_rank": 512, "q_lora_rank": None, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128,
                    "v_head_dim": 128, "vocab_size": 102400, "max_position_embeddings": 163840,
                    "torch_dtype": "bfloat16"}


def test_mla_kv_bytes_come_from_the_latent_and_the_rope_dimension(settings, tmp_path):
    # MLAAttentionSpec: one latent of kv_lora_rank + qk_rope_head_dim per token and layer.
    model = _hf(tmp_path, "deepseek-v2-lite", DEEPSEEK_V2_LITE)
    p = plan(detect("h100-80gb", env={}), model, settings, Pins(engine="vllm")).primary
    assert p.kv_bytes_per_token == 27 * (512 + 64) * 2
    assert 15.0e9 < p.weights_bytes / 2 < 16.5e9  # DeepSeek-V2-Lite: 15.7B


def test_rope_cache_is_part_of_the_weights_vllm_loads(settings, tmp_path):
    # "Model loading took 14.99 GiB" (0.17 and 0.11 logs) / "15.0 GiB" (0.31) for Llama-3.1-8B: the
    # parameters are 14.96 GiB; the cos/sin cache of 131072 x 128 bf16 (32 MiB) makes the rest.
    model = _hf(tmp_path, "llama-3.1-8b", LLAMA31_8B)
    p = plan(detect("h100-80gb", env={}), model, settings, Pins(engine="vllm", tp=1)).primary
    assert p.per_gpu[0].weights_bytes / GIB == pytest.approx(14.99, abs=0.005)


def test_an_unknown_layer_type_is_refused_naming_the_missing_term(settings, tmp_path):
    cfg = {**QWEN3_8B, "num_hidden_layers": 2, "layer_types": ["full_attention", "chunked_attention"]}
    model = _hf(tmp_path, "odd", cfg)
    with pytest.raises(PlanError, match="no formula for layer type"):
        plan(detect("h100-80gb", env={}), model, settings, Pins(engine="vllm"))


def test_a_measured_start_replaces_the_formula_and_says_so(settings, tmp_path):
    # Needs plan(..., measured=) and the learned store: not expressible before #14.
    from agent.planner.learned import Measured
    from agent.planner.vllm_cpu import cpu_key

    model = _hf(tmp_path, "qwen3-8b", QWEN3_8B)
    host = detect("cpu-only", env={})
    first = plan(host, model, settings, Pins(engine="vllm"), vllm_cpu=True, vllm_version="0.32.0").primary
    key = cpu_key(model, "0.32.0", 8192, 8192)
    space = settings.engines.vllm_cpu_kvcache_gib * GIB  # VLLM_CPU_KVCACHE_SPACE the start ran with
    seen = Measured(key=key, measured_at="2026-11-30", requested_bytes=space, kv_bytes=space, num_blocks=200,
                    block_size=128, kv_tokens=25600, predicted_kv_tokens=first.kv_cache_tokens)
    second = plan(host, model, settings, Pins(engine="vllm"), vllm_cpu=True, vllm_version="0.32.0",
                  measured={key.id(): seen}).primary
    assert second.kv_cache_tokens == 25600 != first.kv_cache_tokens
    assert any("measured on this host on 2026-11-30" in r for r in second.reasons)
