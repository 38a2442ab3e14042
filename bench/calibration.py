"""Memory model vs real vLLM start-up logs (docs/calibration-data.yaml): prints the error table.

    .venv/bin/python -m bench.calibration

Each check compares one logged figure with what agent.planner.memory predicts from the model's
architecture and the logged settings. tests/unit/test_calibration.py holds the errors to bounds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from agent.catalog.types import ModelArch
from agent.planner import memory as mem

GIB = 1024**3
DATA = Path(__file__).resolve().parents[1] / "docs" / "calibration-data.yaml"

# Architecture numbers from each model's config.json (models not shipped as cards included).
ARCHS = {
    "meta-llama/Llama-3.1-8B-Instruct": ModelArch("LlamaForCausalLM", 4096, 14336, 32, 32, 8, 128, 128256, 131072),
    "meta-llama/Meta-Llama-3-8B": ModelArch("LlamaForCausalLM", 4096, 14336, 32, 32, 8, 128, 128256, 8192),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B": ModelArch(
        "Qwen2ForCausalLM", 5120, 13824, 48, 40, 8, 128, 152064, 131072, attention_bias=True),
    "Qwen/Qwen3-14B": ModelArch("Qwen3ForCausalLM", 5120, 17408, 40, 40, 8, 128, 151936, 40960),
    "meta-llama/Llama-2-7b-hf": ModelArch("LlamaForCausalLM", 4096, 11008, 32, 32, 32, 128, 32000, 4096),
    "meta-llama/Llama-2-70b-hf": ModelArch("LlamaForCausalLM", 8192, 28672, 80, 64, 8, 128, 32000, 4096),
}


@dataclass(frozen=True)
class Check:
    """One logged figure and its prediction."""

    entry: str
    what: str
    logged: float
    predicted: float
    note: str = ""

    @property
    def error(self) -> float:
        """Relative error of the prediction (+ = over-estimate)."""
        return (self.predicted - self.logged) / self.logged


def _entries() -> dict[str, dict]:
    return {e["id"]: e for e in yaml.safe_load(DATA.read_text())["vllm"]}


def checks() -> list[Check]:
    """Every comparison the data supports."""
    e = _entries()
    out: list[Check] = []
    a8 = ARCHS["meta-llama/Llama-3.1-8B-Instruct"]
    # Weights per rank (bf16): parameters x 2 / TP.
    for key, tp in (("v0-rtx3090-llama31-8b-len20k", 1), ("v0-h100-llama3-8b-tp1-pr10511", 1),
                    ("v0-h100-llama3-8b-tp2-pr10511", 2)):
        arch = ARCHS[e[key]["model"]]
        pred = mem.vllm_rank_weights(arch, "none", tp, arch.num_layers, True, True) / GIB
        out.append(Check(key, f"weights per rank (TP={tp})", e[key]["logged"]["weights_gib"], pred))
    q14 = ARCHS["deepseek-ai/DeepSeek-R1-Distill-Qwen-14B"]
    key = "v0-2x4090-r1-distill-qwen14b-tp2"
    out.append(Check(key, "weights per rank (TP=2)", e[key]["logged"]["weights_gib"],
                     mem.vllm_rank_weights(q14, "none", 2, 48, True, True) / GIB))
    # KV bytes per token: logged tokens x predicted bytes vs logged KV GiB.
    key = "v0-rtx3090-llama31-8b-len29k"
    out.append(Check(key, "KV GiB from logged tokens", e[key]["logged"]["kv_cache_gib"],
                     e[key]["logged"]["kv_tokens"] * mem.kv_bytes_per_token(a8, 32, 1, 2) / GIB))
    key = "v1-qwen3-14b-len32k-lmcache"
    out.append(Check(key, "KV GiB from logged tokens", e[key]["logged"]["kv_cache_gib"],
                     e[key]["logged"]["kv_tokens"] * mem.kv_bytes_per_token(ARCHS["Qwen/Qwen3-14B"], 40, 1, 2) / GIB))
    key = "v0-2x4090-r1-distill-qwen14b-tp2"
    out.append(Check(key, "KV GiB from logged tokens", e[key]["logged"]["kv_cache_gib"],
                     e[key]["logged"]["kv_tokens"] * mem.kv_bytes_per_token(q14, 48, 2, 2) / GIB,
                     "unexplained: maybe the smallest rank's figure; only one rank was quoted"))
    # Activation peak: v0 without chunked prefill profiles max_model_len tokens, 256 sequences.
    for key in ("v0-rtx3090-llama31-8b-len20k", "v0-rtx3090-llama31-8b-len29k"):
        log = e[key]["logged"]
        logged = log["peak_torch_incl_weights_gib"] - log["weights_gib"]
        pred = mem.vllm_activation_bytes(a8, 1, e[key]["max_model_len"], 256) / GIB
        out.append(Check(key, f"activation peak at {e[key]['max_model_len']} tokens", logged, pred))
    key = "v0-h100-llama3-8b-tp1-pr10511"
    out.append(Check(key, "activation peak at 8192 tokens", e[key]["logged"]["activation_peak_gib"],
                     mem.vllm_activation_bytes(ARCHS[e[key]["model"]], 1, 8192, 256) / GIB))
    # The whole KV budget: total x utilization - weights - activation - non-torch (v0: graphs outside).
    for key, tokens in (("v0-rtx3090-llama31-8b-len20k", 20000), ("v0-rtx3090-llama31-8b-len29k", 29000),
                        ("v0-h100-llama3-8b-tp1-pr10511", 8192)):
        x = e[key]
        arch = ARCHS[x["model"]]
        pred = (x["gpu_total_gib"] * x["gpu_memory_utilization"]
                - mem.vllm_rank_weights(arch, "none", 1, 32, True, True) / GIB
                - mem.vllm_activation_bytes(arch, 1, tokens, 256) / GIB - mem.NON_TORCH_TP1_BYTES / GIB)
        note = "this build logged 1.79 GiB non-torch (others: 0.03-0.35)" if "h100" in key else ""
        out.append(Check(key, "KV cache GiB (whole budget)", x["logged"]["kv_cache_gib"], pred, note))
    # Block counts from 2023 builds (A100-80GB: CUDA total 79.15 GiB), profile of 4096 tokens.
    for key, tp in (("v0-a100-80gb-llama2-7b-pr2031", 1), ("v0-4xa100-80gb-llama2-70b-tp4-pr2031", 4)):
        x = e[key]
        arch = ARCHS[x["model"]]
        kv = (79.15 * 0.9 * GIB - mem.vllm_rank_weights(arch, "none", tp, arch.num_layers, True, True)
              - mem.vllm_activation_bytes(arch, tp, 4096, 256) - mem.non_torch_bytes(tp, 1))
        blocks = kv / (mem.kv_bytes_per_token(arch, arch.num_layers, tp, 2) * mem.BLOCK_SIZE)
        note = "2023 build: unexplained, its profile peak is not in the log" if tp == 4 else ""
        out.append(Check(key, f"KV blocks (TP={tp})", x["logged"]["gpu_blocks"], blocks, note))
    return out


def main() -> None:
    rows = checks()
    print(f"{'entry':44} {'figure':32} {'logged':>9} {'predicted':>10} {'error':>7}  note")
    for c in rows:
        print(f"{c.entry:44} {c.what:32} {c.logged:9.2f} {c.predicted:10.2f} {c.error:+7.1%}  {c.note}")


if __name__ == "__main__":
    main()
