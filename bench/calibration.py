"""Memory model vs real vLLM start-up logs (docs/calibration-data.yaml): the error table.

    .venv/bin/python -m bench.calibration

Every entry is replayed with the rules of the vLLM release that wrote it (agent/planner/
versions.py; a log without a version is a V0-era log, replayed as 0.6.4) and the settings it
logged (vLLM's own defaults where it logged none). Each logged figure is compared with the
prediction: weights per rank, activation peak, KV GiB, KV tokens, and the start verdict. The
summary splits the errors by vLLM version; tests/unit/test_calibration.py holds them to bounds.
No entry has a term of its own: every prediction uses the same rules.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

import yaml

from agent.catalog.types import ModelArch
from agent.planner import kvcache, weights
from agent.planner.profile import profile
from agent.planner.versions import VllmRules, rules_for

GIB = 1024**3
DATA = Path(__file__).resolve().parents[1] / "docs" / "calibration-data.yaml"
V0_REPLAY = "0.6.4"  # V0-era logs ("Memory profiling results", worker.py) carry no version
_GPT_OSS_KINDS = lambda n: tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n))  # noqa: E731

# Architecture numbers from each model's config.json.
ARCHS = {
    "meta-llama/Llama-3.1-8B-Instruct": ModelArch("LlamaForCausalLM", 4096, 14336, 32, 32, 8, 128, 128256, 131072),
    "meta-llama/Meta-Llama-3-8B": ModelArch("LlamaForCausalLM", 4096, 14336, 32, 32, 8, 128, 128256, 8192),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B": ModelArch(
        "Qwen2ForCausalLM", 5120, 13824, 48, 40, 8, 128, 152064, 131072, attention_bias=True),
    "Qwen/Qwen3-14B": ModelArch("Qwen3ForCausalLM", 5120, 17408, 40, 40, 8, 128, 151936, 40960),
    "meta-llama/Llama-2-7b-hf": ModelArch("LlamaForCausalLM", 4096, 11008, 32, 32, 32, 128, 32000, 4096),
    "meta-llama/Llama-2-70b-hf": ModelArch("LlamaForCausalLM", 8192, 28672, 80, 64, 8, 128, 32000, 4096),
    "openai/gpt-oss-120b": ModelArch(
        "GptOssForCausalLM", 2880, 2880, 36, 64, 8, 64, 201088, 131072, num_experts=128, num_experts_per_tok=4,
        attention_bias=True, layer_types=_GPT_OSS_KINDS(36), sliding_window=128),
    "openai/gpt-oss-20b": ModelArch(
        "GptOssForCausalLM", 2880, 2880, 24, 64, 8, 64, 201088, 131072, num_experts=32, num_experts_per_tok=4,
        attention_bias=True, layer_types=_GPT_OSS_KINDS(24), sliding_window=128),
}


@dataclass(frozen=True)
class Check:
    """One logged figure and its prediction."""

    entry: str
    version: str  # the version group: "v0", "0.10", "0.11+"
    what: str
    logged: float
    predicted: float
    note: str = ""

    @property
    def error(self) -> float:
        """Relative error of the prediction (+ = over-estimate); verdicts: 0 right, 1 wrong."""
        if self.what == "verdict":
            return float(self.logged != self.predicted)
        return (self.predicted - self.logged) / abs(self.logged) if self.logged else 0.0


def _entries() -> list[dict]:
    return yaml.safe_load(DATA.read_text())["vllm"]


def _group(rules: VllmRules) -> str:
    if not rules.v1:
        return "v0"
    return "0.11+" if rules.supported else f"{rules.version[0]}.{rules.version[1]}"


def _predict(e: dict, arch: ModelArch, rules: VllmRules) -> dict[str, float]:
    """Every figure the model predicts for one logged start (GiB, tokens, verdict)."""
    tp = e.get("tensor_parallel_size") or 1
    q = {"mxfp4": "mxfp4", "fp8": "fp8", "awq": "awq", "gptq": "gptq"}.get(e.get("quantization") or "", "none")
    cc = tuple(e.get("compute_capability") or (9, 0))
    w = weights.vllm_rank_weights(arch, q, tp, arch.num_layers, True, True, None, cc, rules.mxfp4_triton_on_hopper)
    out = {"weights": w / GIB}
    total = (e.get("gpu_total_gib") or 0) * GIB
    max_len = e.get("max_model_len") or arch.max_position_embeddings
    mnbt, seqs = rules.batch_defaults(int(total), e.get("gpu") or "")
    mnbt = e.get("max_num_batched_tokens") or mnbt
    seqs = e.get("max_num_seqs") or seqs
    prof = profile(arch, rules, tp, 1, True, mnbt, seqs, max_len, eager=bool(e.get("enforce_eager")))
    out["activation"] = prof.activation_bytes / GIB
    if total and e.get("gpu_memory_utilization"):
        kv = int(total * e["gpu_memory_utilization"]) - w - prof.in_budget_bytes
        out["kv_gib"] = kv / GIB
        fit = kvcache.kv_fit(arch, arch.kinds(), tp, 2, kv, max_len, prof.batched_tokens, rules.hybrid_kv_manager)
        out["kv_tokens"] = fit.tokens
        out["verdict"] = 1.0 if fit.fits_max_len else 0.0
    return out


def checks() -> list[Check]:
    """Every comparison the data supports."""
    out: list[Check] = []
    for e in _entries():
        arch = ARCHS.get(e["model"] or "")
        if arch is None or e.get("quantization") not in (None, "mxfp4", "fp8"):
            continue
        rules = rules_for(e.get("vllm_version") or V0_REPLAY, planning=False)
        group, log, pred = _group(rules), e["logged"], _predict(e, arch, rules)
        key, tp = e["id"], e.get("tensor_parallel_size") or 1
        if log.get("weights_gib"):
            out.append(Check(key, group, f"weights per rank (TP={tp})", log["weights_gib"], pred["weights"]))
        activation = log.get("activation_peak_gib")
        if activation is None and log.get("peak_torch_incl_weights_gib") and log.get("weights_gib"):
            activation = log["peak_torch_incl_weights_gib"] - log["weights_gib"]
        if activation:
            out.append(Check(key, group, "activation peak", activation, pred["activation"]))
        if "kv_gib" in pred and log.get("kv_cache_gib") is not None:
            out.append(Check(key, group, "KV cache GiB", log["kv_cache_gib"], pred["kv_gib"]))
        tokens = log.get("kv_tokens") or (log["gpu_blocks"] * kvcache.BLOCK_SIZE if log.get("gpu_blocks") else None)
        if "kv_tokens" in pred and tokens:
            out.append(Check(key, group, "KV tokens", tokens, pred["kv_tokens"]))
        verdict = e.get("verdict") or ("failed" if log.get("kv_cache_gib") is not None and log["kv_cache_gib"] <= 0
                                       else None)
        if "verdict" in pred and verdict:
            out.append(Check(key, group, "verdict", 1.0 if verdict == "started" else 0.0, pred["verdict"]))
    return out


def summary(rows: list[Check]) -> list[tuple[str, str, int, float, float]]:
    """(version group, figure, entries, median |error|, p90 |error|); verdicts: share wrong."""
    out = []
    for group in sorted({c.version for c in rows}):
        for what in ("weights", "activation", "KV cache GiB", "KV tokens", "verdict"):
            errs = sorted(abs(c.error) for c in rows if c.version == group and c.what.startswith(what))
            if errs:
                p90 = errs[min(len(errs) - 1, int(round(0.9 * (len(errs) - 1))))]
                out.append((group, what, len(errs), statistics.median(errs), p90))
    return out


def main() -> None:
    rows = checks()
    print(f"{'entry':46} {'vLLM':6} {'figure':26} {'logged':>9} {'predicted':>10} {'error':>8}")
    for c in rows:
        err = ("right" if not c.error else "WRONG") if c.what == "verdict" else f"{c.error:+.1%}"
        print(f"{c.entry:46} {c.version:6} {c.what:26} {c.logged:9.2f} {c.predicted:10.2f} {err:>8}")
    print()
    print(f"{'vLLM':6} {'figure':14} {'n':>3} {'median |err|':>13} {'p90 |err|':>10}")
    for group, what, n, med, p90 in summary(rows):
        if what == "verdict":
            print(f"{group:6} {what:14} {n:3} {'wrong: ' + str(round(med * n)) if n else '':>13}")
        else:
            print(f"{group:6} {what:14} {n:3} {med:13.1%} {p90:10.1%}")


if __name__ == "__main__":
    main()
