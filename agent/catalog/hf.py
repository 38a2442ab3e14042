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

_QUANT_FORMATS = ("awq", "gptq", "fp8", "compressed-tensors")
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
    experts = num("num_local_experts", 0, "num_experts")
    intermediate = num("moe_intermediate_size") if experts and "moe_intermediate_size" in keys else None
    model_type = str(keys.get("model_type", ""))
    return ModelArch(
        architecture=architecture,
        hidden_size=hidden,
        intermediate_size=intermediate or num("intermediate_size"),
        num_layers=num("num_hidden_layers"),
        num_attention_heads=heads,
        num_kv_heads=num("num_key_value_heads", heads),
        head_dim=num("head_dim", hidden // heads),
        vocab_size=num("vocab_size"),
        max_position_embeddings=num("max_position_embeddings"),
        tie_word_embeddings=bool(keys.get("tie_word_embeddings", False)),
        num_experts=experts,
        num_experts_per_tok=num("num_experts_per_tok", 0) if experts else 0,
        attention_bias=bool(keys.get("attention_bias", model_type in _BIASED_QKV_MODEL_TYPES)),
        dtype=str(keys.get("dtype") or keys.get("torch_dtype") or "bfloat16"),
    )


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
        return WeightSource(format="fp8", quant_type="fp8", bits=8, size_bytes=size)
    bits, group = _compressed_tensors_weights(quant)
    return WeightSource(format="compressed-tensors", bits=bits, group_size=group, size_bytes=size)


def _compressed_tensors_weights(quant: dict[str, Any]) -> tuple[int | None, int | None]:
    """(num_bits, group_size) of the first config group's weights, where stated."""
    groups = quant.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        return None, None
    first = next(iter(groups.values()))
    weights = first.get("weights") if isinstance(first, dict) else None
    if not isinstance(weights, dict):
        return None, None
    bits, group = weights.get("num_bits"), weights.get("group_size")
    return (bits if isinstance(bits, int) else None), (group if isinstance(group, int) else None)
