"""Small model files for the catalog tests: HF config.json dicts and a tiny GGUF.

The GGUF is written with ``gguf.GGUFWriter`` so the reader under test meets the format as
llama.cpp's own tooling writes it. Sizes are tiny (a few KiB) and the expected byte counts are
computed here from the tensors actually written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LLAMA_31_8B_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}

QWEN25_7B_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"],
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "max_position_embeddings": 32768,
    "model_type": "qwen2",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 152064,
}

MIXTRAL_CONFIG: dict[str, Any] = {
    "architectures": ["MixtralForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mixtral",
    "num_attention_heads": 32,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "torch_dtype": "bfloat16",
    "vocab_size": 32000,
}


def write_hf_dir(root: Path, config: dict[str, Any], shards: dict[str, int] | None = None) -> Path:
    """An HF-style model directory: config.json plus zero-filled weight files of given sizes."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config), encoding="utf-8")
    for name, size in (shards or {}).items():
        (root / name).write_bytes(b"\0" * size)
    return root


@dataclass(frozen=True)
class TinyGguf:
    """A written GGUF and the byte counts its tensors must add up to."""

    path: Path
    layer_bytes: tuple[int, ...]
    non_layer_bytes: int


def write_tiny_gguf(path: Path, *, layers: int = 2, hidden: int = 16, ffn: int = 32, vocab: int = 24,
                    heads: int = 4, kv_heads: int = 2, tied: bool = False, experts: int = 0,
                    split_max_tensors: int = 0) -> TinyGguf:
    """A llama-architecture GGUF with f32 norms and f16 matrices; no tokenizer merges.

    ``experts`` only declares expert_count (2 used per token); the FFN tensors stay dense.
    ``split_max_tensors`` > 0 writes a split GGUF; ``path`` is then the first shard.
    """
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(path, "llama", split_max_tensors=split_max_tensors)
    writer.add_block_count(layers)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_token_list([f"t{i}" for i in range(vocab)])
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(2)
    head_dim = hidden // heads

    def tensor(name: str, shape: tuple[int, ...], dtype: type) -> int:
        data = np.zeros(shape, dtype=dtype)
        writer.add_tensor(name, data)
        return data.nbytes

    non_layer = tensor("token_embd.weight", (vocab, hidden), np.float16)
    non_layer += tensor("output_norm.weight", (hidden,), np.float32)
    if not tied:
        non_layer += tensor("output.weight", (vocab, hidden), np.float16)
    per_layer = []
    for i in range(layers):
        n = tensor(f"blk.{i}.attn_norm.weight", (hidden,), np.float32)
        n += tensor(f"blk.{i}.attn_q.weight", (hidden, hidden), np.float16)
        n += tensor(f"blk.{i}.attn_k.weight", (kv_heads * head_dim, hidden), np.float16)
        n += tensor(f"blk.{i}.attn_v.weight", (kv_heads * head_dim, hidden), np.float16)
        n += tensor(f"blk.{i}.attn_output.weight", (hidden, hidden), np.float16)
        n += tensor(f"blk.{i}.ffn_norm.weight", (hidden,), np.float32)
        n += tensor(f"blk.{i}.ffn_gate.weight", (ffn, hidden), np.float16)
        n += tensor(f"blk.{i}.ffn_up.weight", (ffn, hidden), np.float16)
        n += tensor(f"blk.{i}.ffn_down.weight", (hidden, ffn), np.float16)
        per_layer.append(n)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    first = writer.format_shard_names(path)[0]
    return TinyGguf(first, tuple(per_layer), non_layer)
