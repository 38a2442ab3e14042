"""Memory model vs real vLLM start-up logs (docs/calibration-data.yaml): the error table.

    .venv/bin/python -m bench.calibration

Every entry is replayed with the rules of the vLLM release that wrote it (agent/planner/
versions.py; a log without a version is a V0-era log, replayed as 0.6.4) and the settings it
logged (vLLM's own defaults where it logged none). Model architectures come from each model's
config.json (docs/calibration-models.yaml), read by the catalog's own parser. Each logged figure is
compared with the prediction: weights per rank, activation peak, non-torch memory, KV GiB, KV
tokens, and the start verdict. The summary splits the errors by vLLM release series;
tests/unit/test_calibration.py holds them to bounds. No entry has a term of its own: every
prediction uses the same rules.
"""

from __future__ import annotations

import functools
import json
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from agent.catalog.hf import load_hf_config
from agent.catalog.types import ModelArch, WeightSource
from agent.planner import kvcache, weights
from agent.planner.profile import profile
from agent.planner.versions import VllmRules, rules_for

GIB = 1024**3
DOCS = Path(__file__).resolve().parents[1] / "docs"
DATA = DOCS / "calibration-data.yaml"
MODELS = DOCS / "calibration-models.yaml"
V0_REPLAY = "0.6.4"  # V0-era logs ("Memory profiling results", worker.py) carry no version
SUPPORTED = "0.11+"  # the summary row the acceptance bounds apply to
FIGURES = ("weights", "activation", "non-torch", "KV cache GiB", "KV tokens", "verdict")


@dataclass(frozen=True)
class Check:
    """One logged figure and its prediction."""

    entry: str
    version: str  # the release series: "v0", "0.10", "0.11", "0.17", ...
    what: str
    logged: float
    predicted: float
    scored: bool = True  # shown but not scored: verdicts inside run-to-run noise, inconsistent source rows

    @property
    def error(self) -> float:
        """Relative error of the prediction (+ = over-estimate); verdicts: 0 right, 1 wrong."""
        if self.what == "verdict":
            return float(self.logged != self.predicted)
        return (self.predicted - self.logged) / abs(self.logged) if self.logged else 0.0

    @property
    def supported(self) -> bool:
        return self.version not in ("v0", "0.10")


def _entries() -> list[dict]:
    return yaml.safe_load(DATA.read_text())["vllm"]


@functools.cache
def models() -> dict[str, tuple[ModelArch, WeightSource]]:
    """Architecture and checkpoint format of every calibration model, parsed from its config.json."""
    out = {}
    for name, cfg in yaml.safe_load(MODELS.read_text()).items():
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "config.json").write_text(json.dumps(cfg))
            spec = load_hf_config(d)
        out[name] = (spec.arch, spec.sources[0])
    return out


def _series(rules: VllmRules) -> str:
    return f"{rules.version[0]}.{rules.version[1]}" if rules.v1 else "v0"


# The planner's name of each checkpoint format (catalog WeightSource.format) and entry quantization.
_QUANT = {"mxfp4": "mxfp4", "fp8": "fp8", "compressed-tensors": "compressed-tensors", "awq": "awq", "gptq": "gptq"}


def _predict(e: dict, arch: ModelArch, source: WeightSource, rules: VllmRules) -> dict[str, float]:
    """Every figure the model predicts for one logged start (GiB, tokens, verdict)."""
    tp = e.get("tensor_parallel_size") or 1
    q = _QUANT.get(e.get("quantization") or source.format, "none")
    src = source if q != "none" else None
    cc = tuple(e.get("compute_capability") or (9, 0))
    w = weights.vllm_rank_weights(arch, q, tp, arch.num_layers, True, True, src, cc, rules.mxfp4_triton_on_hopper)
    total = (e.get("gpu_total_gib") or 0) * GIB
    max_len = e.get("max_model_len") or arch.max_position_embeddings
    mnbt, seqs = rules.batch_defaults(int(total), e.get("gpu") or "", server=e.get("usage", "server") == "server")
    mnbt = e.get("max_num_batched_tokens") or mnbt
    seqs = e.get("max_num_seqs") or seqs
    sampler = "v2" if rules.v2_runner(arch.architecture, q != "none", bool(arch.num_experts)) else rules.sampler_for(cc)
    prof = profile(arch, rules, tp, 1, True, mnbt, seqs, max_len, eager=bool(e.get("enforce_eager")), sampler=sampler)
    out = {"weights": w / GIB, "activation": prof.activation_bytes / GIB, "non-torch": prof.non_torch_bytes / GIB}
    util = e.get("gpu_memory_utilization") or (rules.default_utilization if rules.v1 and rules.supported else None)
    if total and util:
        kv = int(total * util) - w - prof.in_budget_bytes
        kv_bytes = 1 if (e.get("kv_cache_dtype") or "auto").startswith("fp8") else 2
        fit = kvcache.kv_fit(arch, arch.kinds(), tp, kv_bytes, kv, max_len, prof.batched_tokens, rules.hybrid_kv_manager,
                             rules.kv_tokens_by_concurrency)
        out.update({"KV cache GiB": kv / GIB, "KV tokens": fit.tokens, "verdict": 1.0 if fit.fits_max_len else 0.0})
    return out


def _logged(e: dict, rules: VllmRules) -> dict[str, float]:
    """The entry's logged figures under the names _predict uses. From 0.27 vLLM's accounting line
    reports "consumed memory (weights + non-torch)" and a peak activation that includes the applied
    CUDA-graph estimate (gpu_worker.py determine_available_memory); both are taken apart here."""
    log = e["logged"]
    out: dict[str, float] = {}
    if log.get("weights_gib"):
        out["weights"] = log["weights_gib"]
    activation = log.get("activation_peak_gib")
    if activation is None and log.get("peak_torch_incl_weights_gib") and log.get("weights_gib"):
        activation = log["peak_torch_incl_weights_gib"] - log["weights_gib"]
    if activation and log.get("cuda_graph_estimate_gib") and rules.version[:2] >= (0, 27):
        activation -= log["cuda_graph_estimate_gib"]
    if activation:
        out["activation"] = activation
    non_torch = log.get("non_torch_gib")
    if non_torch is None and log.get("consumed_gib") and log.get("weights_gib"):
        non_torch = log["consumed_gib"] - log["weights_gib"]
    if non_torch and rules.v1:
        out["non-torch"] = non_torch
    if log.get("kv_cache_gib") is not None:
        out["KV cache GiB"] = log["kv_cache_gib"]
    tokens = log.get("kv_tokens") or (log["gpu_blocks"] * kvcache.BLOCK_SIZE if log.get("gpu_blocks") else None)
    if tokens:
        out["KV tokens"] = tokens
    verdict = e.get("verdict") or ("failed" if log.get("kv_cache_gib") is not None and log["kv_cache_gib"] <= 0
                                   else None)
    if verdict:
        out["verdict"] = 1.0 if verdict == "started" else 0.0
    return out


def checks() -> list[Check]:
    """Every comparison the data supports."""
    out: list[Check] = []
    for e in _entries():
        known = models().get(e["model"] or "")
        if known is None or e.get("quantization") in ("bitsandbytes",):
            continue
        rules = rules_for(e.get("vllm_version") or V0_REPLAY, planning=False,
                          flashinfer_sampler=e.get("sampler") == "flashinfer",
                          triton_kernels=e.get("mxfp4_backend") == "triton")
        pred, log = _predict(e, *known, rules), _logged(e, rules)
        for what in FIGURES:
            if what in pred and what in log and (what == "verdict" or log[what] != 0):
                noise = what == "verdict" and not e.get("verdict_scored", True)
                out.append(Check(e["id"], _series(rules), what, log[what], pred[what],
                                 scored=not noise and what not in e.get("unscored", ())))
    return out


def _p90(errs: list[float]) -> float:
    return errs[min(len(errs) - 1, int(round(0.9 * (len(errs) - 1))))]


def summary(rows: list[Check]) -> list[tuple[str, str, int, float, float]]:
    """(release series, figure, entries, median |error|, p90 |error|); verdicts: share wrong.
    The SUPPORTED row pools every supported release; verdicts inside run-to-run noise are left out."""
    out = []
    groups = sorted({c.version for c in rows}, key=lambda g: (g != "v0", tuple(map(int, g.split("."))) if g != "v0"
                                                             else ()))
    for group in [*groups, SUPPORTED]:
        for what in FIGURES:
            errs = sorted(abs(c.error) for c in rows if c.what == what and c.scored
                          and (c.version == group or group == SUPPORTED and c.supported))
            if errs and what == "verdict":
                out.append((group, what, len(errs), sum(errs) / len(errs), max(errs)))
            elif errs:
                out.append((group, what, len(errs), statistics.median(errs), _p90(errs)))
    return out


def main() -> None:
    rows = checks()
    print(f"{'entry':56} {'vLLM':5} {'figure':13} {'logged':>10} {'predicted':>10} {'error':>8}")
    for c in rows:
        if not c.scored:
            err = "unscored"
        elif c.what == "verdict":
            err = "right" if not c.error else "WRONG"
        else:
            err = f"{c.error:+.1%}"
        print(f"{c.entry:56} {c.version:5} {c.what:13} {c.logged:10.2f} {c.predicted:10.2f} {err:>8}")
    print()
    print(f"{'vLLM':6} {'figure':13} {'n':>3} {'median |err|':>13} {'p90 |err|':>10}")
    for group, what, n, med, p90 in summary(rows):
        if what == "verdict":
            print(f"{group:6} {what:13} {n:3} {'wrong: ' + str(round(med * n)) if n else '':>13}")
        else:
            print(f"{group:6} {what:13} {n:3} {med:13.1%} {p90:10.1%}")


if __name__ == "__main__":
    main()
