"""An HF model directory (or its config.json) → ModelSpec.

Reads the keys transformers uses for Llama, Mistral, Qwen2, Mixtral and SmolLM
(LlamaForCausalLM) configs, with transformers' defaults where a key is optional. A
multimodal config's ``text_config`` is used when the top level has no layer count.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from agent.catalog.types import ModelArch, ModelSpec, WeightSource
from agent.errors import ModelError

_QUANT_FORMATS = ("awq", "gptq", "fp8", "compressed-tensors", "mxfp4")
_KNOWN_LAYER_TYPES = ("full_attention", "sliding_attention", "linear_attention")
# Families whose q/k/v projections always carry biases (no attention_bias key in their config).
_BIASED_QKV_MODEL_TYPES = ("qwen2", "qwen2_moe", "qwen2_vl", "qwen2_5_vl")


def load_hf_config(ref: str | Path) -> ModelSpec:
    """A ModelSpec from an HF model directory or a path to its config.json."""
    path = Path(ref).expanduser()
    if path.is_dir():
        model_dir, config_path = path, path / "config.json"
        if not config_path.is_file():
            raise ModelError(f"{path} has no config.json; pass an HF model directory (config.json + weights)")
    elif path.exists():
        model_dir, config_path = path.parent, path
    else:
        raise ModelError(f"{path} does not exist; pass an HF model directory, a config.json, or a .gguf file")
    cfg = _read_json(config_path)
    return ModelSpec(
        name=model_dir.resolve().name,
        arch=_arch(config_path, cfg),
        sources=(_source(config_path, cfg, model_dir),),
        local_path=str(model_dir),
        origin="hf-config",
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc.strerror}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path} is not valid JSON ({exc}); re-download the model's config.json") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{path} must hold a JSON object (an HF model config)")
    return data


def _arch(path: Path, cfg: dict[str, Any]) -> ModelArch:
    text = cfg.get("text_config") if "num_hidden_layers" not in cfg else None
    keys = {**cfg, **text} if isinstance(text, dict) else cfg
    architectures = cfg.get("architectures")
    if isinstance(architectures, list) and architectures and isinstance(architectures[0], str):
        architecture = architectures[0]
    elif isinstance(cfg.get("model_type"), str):
        architecture = cfg["model_type"]
    else:
        raise ModelError(f"{path}: key 'architectures' (or 'model_type') is missing; is this an HF model config?")

    def num(key: str, default: int | None = None, *alt: str) -> int:
        for k in (key, *alt):
            value = keys.get(k)
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ModelError(f"{path}: key {k!r} must be a non-negative integer, got {value!r}")
                return value
        if default is None:
            raise ModelError(f"{path}: required key {key!r} is missing; is this a decoder-only LLM config?")
        return default

    hidden = num("hidden_size")
    heads = num("num_attention_heads")
    if heads == 0:
        raise ModelError(f"{path}: key 'num_attention_heads' must be positive")
    experts = num("num_local_experts", 0, "num_experts", "n_routed_experts")
    intermediate = num("moe_intermediate_size") if experts and "moe_intermediate_size" in keys else None
    model_type = str(keys.get("model_type", ""))
    layers = num("num_hidden_layers")
    head_dim = num("head_dim", hidden // heads)
    kinds, window, unmodelled = _layer_kinds(keys, model_type, layers)
    shared = num("shared_expert_intermediate_size", 0)
    if experts and not shared and keys.get("n_shared_experts"):
        shared = num("n_shared_experts") * (intermediate or 0)
    first_dense = num("first_k_dense_replace", 0) if experts else 0
    factor = keys.get("partial_rotary_factor")
    rotary = int(head_dim * factor) if isinstance(factor, (int, float)) and 0 < factor < 1 else 0
    return ModelArch(
        architecture=architecture,
        hidden_size=hidden,
        intermediate_size=intermediate or num("intermediate_size"),
        num_layers=layers,
        num_attention_heads=heads,
        num_kv_heads=num("num_key_value_heads", heads),
        head_dim=head_dim,
        vocab_size=num("vocab_size"),
        max_position_embeddings=num("max_position_embeddings"),
        tie_word_embeddings=bool(keys.get("tie_word_embeddings", False)),
        num_experts=experts,
        num_experts_per_tok=num("num_experts_per_tok", 0) if experts else 0,
        attention_bias=bool(keys.get("attention_bias", model_type in _BIASED_QKV_MODEL_TYPES)),
        dtype=str(keys.get("dtype") or keys.get("torch_dtype") or "bfloat16"),
        layer_types=kinds,
        sliding_window=window,
        kv_lora_rank=num("kv_lora_rank", 0),
        q_lora_rank=num("q_lora_rank", 0),
        qk_rope_head_dim=num("qk_rope_head_dim", 0),
        qk_nope_head_dim=num("qk_nope_head_dim", 0),
        v_head_dim=num("v_head_dim", 0),
        shared_expert_intermediate_size=shared,
        first_dense_layers=first_dense,
        dense_intermediate_size=num("intermediate_size", 0) if first_dense else 0,
        linear_num_key_heads=num("linear_num_key_heads", 0),
        linear_num_value_heads=num("linear_num_value_heads", 0),
        linear_key_head_dim=num("linear_key_head_dim", 0),
        linear_value_head_dim=num("linear_value_head_dim", 0),
        linear_conv_kernel_dim=num("linear_conv_kernel_dim", 0),
        rotary_dim=rotary,
        vision_params=_vision_params(cfg.get("vision_config"), hidden),
        unmodelled=unmodelled,
    )


def _layer_kinds(keys: dict[str, Any], model_type: str, layers: int) -> tuple[tuple[str, ...], int, str | None]:
    """(attention kind per layer, sliding window, what cannot be modelled) as vLLM reads the config:
    an explicit ``layer_types`` (gpt-oss, Gemma 3, Qwen3-Next), Gemma 2's alternation, Gemma 3's
    ``sliding_window_pattern``, Qwen3-Next's ``full_attention_interval``, or a window on every
    layer (Mistral; Qwen2 only with use_sliding_window)."""
    window = keys.get("sliding_window") if isinstance(keys.get("sliding_window"), int) else 0
    given = keys.get("layer_types")
    if isinstance(given, list) and len(given) == layers and all(isinstance(k, str) for k in given):
        unknown = sorted({k for k in given if k not in _KNOWN_LAYER_TYPES})
        why = f"layer type(s) {', '.join(unknown)} (KV bytes per token unknown)" if unknown else None
        return tuple(given), window, why
    if isinstance(keys.get("full_attention_interval"), int) and keys["full_attention_interval"] > 0:
        n = keys["full_attention_interval"]
        return tuple("full_attention" if (i + 1) % n == 0 else "linear_attention" for i in range(layers)), 0, None
    if not window:
        return (), 0, None
    if model_type == "gemma2":
        return tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)), window, None
    pattern = keys.get("sliding_window_pattern")
    if isinstance(pattern, int) and pattern > 1:
        return tuple("full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                     for i in range(layers)), window, None
    if keys.get("use_sliding_window") is False:
        return (), 0, None
    return ("sliding_attention",) * layers, window, None


def _vision_params(vision: Any, text_hidden: int) -> int:
    """Parameters of a multimodal checkpoint's vision tower (a ViT: per block 4 h^2 attention and
    2 h i MLP, patch embedding) and its projector into the text model (estimated: h x text hidden,
    times the spatial merge when the config has one)."""
    if not isinstance(vision, dict):
        return 0

    def get(*names: str) -> int:
        for n in names:
            v = vision.get(n)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
        return 0

    h = get("hidden_size", "embed_dim", "width")
    depth = get("num_hidden_layers", "depth", "layers")
    if not h or not depth:
        return 0
    inter = get("intermediate_size", "mlp_dim") or 4 * h
    patch = get("patch_size") or 14
    channels = get("in_channels", "num_channels", "in_chans") or 3
    merge = get("spatial_merge_size") or 1
    tower = depth * (4 * h * h + 2 * h * inter + 9 * h) + patch * patch * channels * h * (get("temporal_patch_size") or 1)
    wide = h * merge * merge
    projector = wide * wide + wide * (get("out_hidden_size") or text_hidden)
    return tower + projector


def _source(path: Path, cfg: dict[str, Any], model_dir: Path) -> WeightSource:
    shards = sorted(model_dir.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in shards) or None
    quant = cfg.get("quantization_config")
    if quant is None:
        return WeightSource(format="hf", size_bytes=size)
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    if method not in _QUANT_FORMATS:
        raise ModelError(
            f"{path}: quantization_config.quant_method {method!r} is not supported; "
            f"supported: {', '.join(_QUANT_FORMATS)} (or an unquantized checkpoint)"
        )
    if method in ("awq", "gptq"):
        bits = quant.get("bits", quant.get("w_bit"))
        group = quant.get("group_size", quant.get("q_group_size"))
        if not isinstance(bits, int) or not isinstance(group, int):
            raise ModelError(f"{path}: quantization_config needs integer 'bits' and 'group_size' for {method}")
        return WeightSource(format=method, quant_type=f"w{bits}a16", bits=bits, group_size=group, size_bytes=size)
    if method == "fp8":
        block = quant.get("weight_block_size")
        block = tuple(block) if isinstance(block, list) and all(isinstance(b, int) and b > 0 for b in block) else ()
        return WeightSource(format="fp8", quant_type="fp8", bits=8, size_bytes=size, weight_block=block)
    if method == "mxfp4":
        return WeightSource(format="mxfp4", quant_type="mxfp4", bits=4, group_size=32, size_bytes=size)
    bits, group, scheme = _compressed_tensors_weights(quant)
    groups = quant.get("config_groups")
    first = next(iter(groups.values()), {}) if isinstance(groups, dict) and groups else {}
    weights = first.get("weights") if isinstance(first, dict) else None
    asymmetric = isinstance(weights, dict) and weights.get("symmetric") is False
    return WeightSource(format="compressed-tensors", quant_type=scheme, bits=bits, group_size=group, size_bytes=size,
                        scheme=scheme, zero_points=asymmetric)


def _compressed_tensors_weights(quant: dict[str, Any]) -> tuple[int | None, int | None, str | None]:
    """(num_bits, group_size, scheme) of the first config group's weights, where stated; scheme
    like "w8a8-fp8" (FP8-dynamic), "w8a8-int8", "w4a16" as compressed-tensors names them."""
    groups = quant.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        return None, None, None
    first = next(iter(groups.values()))
    weights = first.get("weights") if isinstance(first, dict) else None
    if not isinstance(weights, dict):
        return None, None, None
    bits, group = weights.get("num_bits"), weights.get("group_size")
    bits = bits if isinstance(bits, int) else None
    acts = first.get("input_activations")
    kind = "fp8" if weights.get("type") == "float" and bits == 8 else "int8"
    scheme = None
    if bits:
        a_bits = acts.get("num_bits") if isinstance(acts, dict) else None
        scheme = f"w{bits}a{a_bits}" + (f"-{kind}" if a_bits == 8 else "") if a_bits else f"w{bits}a16"
    return bits, (group if isinstance(group, int) else None), scheme
