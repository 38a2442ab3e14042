"""`node-agent quantize` for real on the tiny model (#17): llm-compressor in the quantizer's own
environment, seconds per run. Group size, layers left 16-bit, the registration that `models`,
`plan` and `rm` see, the quality number, and the refusal when RAM is short."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from agent.catalog.hf import load_hf_config

FAST = ["--samples", "8", "--seq-len", "64"]


def node_agent(*args: str, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    exe = shutil.which("node-agent", path=str(Path(sys.executable).parent)) or "node-agent"
    return subprocess.run([exe, *args], capture_output=True, text=True, env=env, timeout=timeout)


def events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


@pytest.fixture
def bare_env(tmp_path):
    """No quantizer environment yet (an empty env_dir): what the up-front refusals see."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("NODE_AGENT_")},
            "HF_HOME": str(tmp_path / "hf"), "NODE_AGENT_QUANTIZE__ENV_DIR": str(tmp_path / "quantizer"),
            "COLUMNS": "200"}


@pytest.fixture
def env(bare_env, quantizer_env_dir):
    return {**bare_env, "NODE_AGENT_QUANTIZE__ENV_DIR": str(quantizer_env_dir)}


def test_quantize_registers_a_local_variant_that_models_plan_and_rm_see(tiny_model, env):
    r = node_agent("quantize", str(tiny_model.hf_dir), *FAST, "--json", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    ev = events(r.stdout)
    plan = ev[0]
    assert plan["event"] == "plan" and plan["variant"] == "awq-w4a16-g128" and plan["group_size"] == 128
    layers = [e for e in ev if e["event"] == "layers"]
    assert [e["done"] for e in layers] == [1, 2] and layers[-1]["total"] == 2  # progress per decoder layer
    assert any(e.get("pin_memory_skipped") for e in ev if e["event"] == "stage")  # no CUDA here: pinning skipped
    done = ev[-1]
    assert done["event"] == "registered" and done["repo"].startswith("node-agent-quantized/")
    q = done["quality"]
    assert q["checked"] and q["perplexity"] > 1 and q["perplexity_bf16"] > 1 and 0 <= q["top1_agreement"] <= 1

    path = Path(done["path"])
    spec = load_hf_config(path)
    src = spec.sources[0]
    assert (src.format, src.bits, src.group_size, src.zero_points) == ("compressed-tensors", 4, 128, True)
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    assert config["ignore"] == ["lm_head"]
    assert (path / "tokenizer.json").exists()
    assert "<|im_start|>" in (path / "chat_template.jinja").read_text()  # the chat template travels along

    listed = json.loads(node_agent("models", "--json", env=env).stdout)["models"]
    [variant] = [m for m in listed if m["quantized"]]
    assert variant["ref"] == str(tiny_model.hf_dir.resolve()) and variant["format"] == "compressed-tensors"
    assert variant["quant"] == "awq-w4a16-g128" and variant["degraded"] is False
    assert variant["quantized"]["quality"]["perplexity"] == pytest.approx(q["perplexity"])

    # plan sees it: compressed-tensors is on offer for the directory only through the variant
    # (without it: "--quantization compressed-tensors is not available for hf; available: none, fp8")
    planned = node_agent("plan", "--model", str(tiny_model.hf_dir), "--profile", "rtx4090", "--engine", "vllm",
                         "--quantization", "compressed-tensors", "--json", env=env)
    assert planned.returncode == 0, planned.stderr[-2000:]
    assert json.loads(planned.stdout)["quantization"] == "compressed-tensors"

    again = node_agent("quantize", str(tiny_model.hf_dir), *FAST, "--json", env=env)  # same inputs: nothing redone
    assert again.returncode == 0, again.stderr[-3000:]
    ev2 = events(again.stdout)
    assert ev2[-1]["path"] == done["path"] and ev2[-1]["reused"] is True and done["reused"] is False
    assert not [e for e in ev2 if e["event"] in ("layers", "stage")]  # no worker ran
    assert ev2[-1]["quality"]["perplexity"] == pytest.approx(q["perplexity"])
    (path / "model.safetensors").resolve().write_bytes(b"damaged")  # a damaged variant is made again
    third = node_agent("quantize", str(tiny_model.hf_dir), *FAST, "--json", env=env)
    assert third.returncode == 0, third.stderr[-3000:]
    assert events(third.stdout)[-1]["reused"] is False and events(third.stdout)[-1]["path"] == done["path"]
    assert len([m for m in json.loads(node_agent("models", "--json", env=env).stdout)["models"] if m["quantized"]]) == 1

    gone = node_agent("rm", variant["repo"], env=env)
    assert gone.returncode == 0, gone.stderr
    assert not path.exists() and json.loads(node_agent("models", "--json", env=env).stdout)["models"] == []


def test_layers_the_group_size_does_not_divide_stay_16_bit(tiny_model, env, tmp_path):
    """A model whose MLP is 200 wide: no group of 128/64/32 divides down_proj's columns."""
    from transformers import AutoConfig, AutoModelForCausalLM

    odd = tmp_path / "odd"
    config = AutoConfig.from_pretrained(tiny_model.hf_dir)
    config.intermediate_size = 200
    AutoModelForCausalLM.from_config(config).save_pretrained(odd)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny_model.hf_dir / name, odd / name)
    r = node_agent("quantize", str(odd), *FAST, "--out", str(tmp_path / "out"), "--json", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    plan = events(r.stdout)[0]
    assert plan["group_size"] == 128 and any(i.startswith("down_proj (200 columns") for i in plan["ignored"])
    out = tmp_path / "out"
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    assert "lm_head" in ignore and any("down_proj" in i for i in ignore)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.mlp.down_proj.weight" in names  # kept 16-bit, as it was
    assert "model.layers.0.mlp.up_proj.weight_packed" in names  # quantized and packed
    # --out writes a standalone directory: nothing registered
    assert json.loads(node_agent("models", "--json", env=env).stdout)["models"] == []


def test_quantize_refuses_up_front_when_ram_is_short(tiny_model, bare_env):
    r = node_agent("quantize", str(tiny_model.hf_dir),
                   env={**bare_env, "NODE_AGENT_PLANNER__RAM_MARGIN_MIB": "1048576"})
    assert r.returncode == 2
    assert "GiB of RAM" in r.stderr and "nothing" not in r.stdout and "Traceback" not in r.stderr
    assert not any(Path(bare_env["HF_HOME"]).rglob("*.safetensors"))
    assert not Path(bare_env["NODE_AGENT_QUANTIZE__ENV_DIR"]).exists()  # refused before making the environment


def test_quantize_says_what_to_do_with_a_hub_reference_that_is_not_pulled(bare_env):
    r = node_agent("quantize", "qwen3-8b", env=bare_env)
    assert r.returncode == 2 and "node-agent pull qwen3-8b" in r.stderr
    assert not Path(bare_env["NODE_AGENT_QUANTIZE__ENV_DIR"]).exists()


def test_a_bf16_model_is_scored_in_float32_where_the_cpu_has_no_native_bf16(tiny_model, env, tmp_path):
    """The quality guard's two passes over held-out text are plain forward passes; on a CPU without
    AVX512-BF16/AMX torch's bf16 matmuls are about 10x slower than float32 (docs/benchmarks.md), so
    the worker scores there in float32 (exact for bf16 weights) and says so; elsewhere as loaded.
    The checkpoint it writes stays 16-bit either way."""
    import torch
    from transformers import AutoModelForCausalLM

    half = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_model.hf_dir, dtype=torch.bfloat16).save_pretrained(half)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny_model.hf_dir / name, half / name)
    r = node_agent("quantize", str(half), *FAST, "--out", str(tmp_path / "out"), "--json", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    ev = events(r.stdout)
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    native = " avx512_bf16" in flags or " amx_bf16" in flags
    [reference] = [e for e in ev if e.get("stage") == "reference"]
    assert reference["dtype"] == ("bfloat16" if native else "float32")
    [done] = [e for e in ev if e["event"] == "done"]
    assert done["scored_in"] == (None if native else "float32")
    q = done["quality"]
    assert q["perplexity"] > 1 and q["perplexity_bf16"] > 1 and 0 <= q["top1_agreement"] <= 1
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
