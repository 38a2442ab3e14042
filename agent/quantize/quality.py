"""The quality guard: the quantized model against the bf16 one on held-out calibration text.

The worker measures both models' perplexity on the same held-out samples (never used for
calibration) and how often their most likely next token agrees. A result whose perplexity rises
by more than ``quantize.max_perplexity_increase`` is kept but flagged ``degraded``: ``models``
and ``/v1/node`` say so, and the operator decides (another scheme, 8 bits, more calibration).
"""

from __future__ import annotations


def verdict(measured: dict | None, max_increase: float) -> dict:
    """The worker's numbers with the increase and the flag; ``checked: False`` when none ran."""
    if not measured or not measured.get("perplexity_bf16"):
        return {"checked": False, "degraded": False}
    increase = measured["perplexity"] / measured["perplexity_bf16"] - 1.0
    return {"checked": True, **{k: round(v, 4) if isinstance(v, float) else v for k, v in measured.items()},
            "perplexity_increase": round(increase, 4), "max_perplexity_increase": max_increase,
            "degraded": increase > max_increase}


def describe(q: dict | None) -> str:
    """One line for people: the numbers and the verdict."""
    if not q or not q.get("checked"):
        return "quality not checked"
    line = (f"held-out perplexity {q['perplexity']:.2f} vs {q['perplexity_bf16']:.2f} bf16 "
            f"({q['perplexity_increase']:+.1%}), next-token agreement {q['top1_agreement']:.0%}")
    if q["degraded"]:
        return (f"DEGRADED: {line}, beyond the {q['max_perplexity_increase']:.0%} allowed "
                "(quantize.max_perplexity_increase); kept, but try 8 bits, gptq-w4a16, or more calibration samples")
    return line
