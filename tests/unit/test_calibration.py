"""The memory model against real vLLM start-up logs (#3, #14): errors stay inside the bounds.

docs/memory-model.md quotes the table `python -m bench.calibration` prints. Supported releases
(>= 0.11) are held to the issue's acceptance bounds (KV tokens: median <= 5 %, p90 <= 10 %;
weights <= 2 %; every scored verdict right); V0-era logs (replayed with V0's rules) to looser
ones, since the planner refuses to plan for those releases.
"""

from __future__ import annotations

import pytest

from bench.calibration import SUPPORTED, checks, summary

CHECKS = checks()
ROWS = {(g, w): (n, med, p90) for g, w, n, med, p90 in summary(CHECKS)}


@pytest.mark.parametrize("check", [c for c in CHECKS if c.what == "weights"], ids=lambda c: f"{c.entry}:{c.what}")
def test_weights_within_two_percent(check):
    assert abs(check.error) <= 0.02, f"logged {check.logged:.2f} GiB, predicted {check.predicted:.2f}"


def test_every_scored_verdict_is_right():
    verdicts = [c for c in CHECKS if c.what == "verdict" and c.scored]
    assert len(verdicts) >= 20 and all(c.error == 0 for c in verdicts), [c.entry for c in verdicts if c.error]
    assert sum(c.logged == 0 for c in verdicts) >= 6  # the set holds refused starts, not only good ones


def test_supported_kv_tokens_within_acceptance():
    n, med, p90 = ROWS[(SUPPORTED, "KV tokens")]
    assert n >= 8 and med <= 0.05 and p90 <= 0.10, (n, med, p90)


def test_supported_kv_gib_median_within_five_percent():
    n, med, _ = ROWS[(SUPPORTED, "KV cache GiB")]
    assert n >= 20 and med <= 0.05, (n, med)


def test_supported_set_spans_releases_gpus_and_layouts():
    supported = {c.entry for c in CHECKS if c.supported}
    assert len(supported) >= 20
    assert len({c.version for c in CHECKS if c.supported}) >= 4


def test_v0_series_kv_within_ten_percent():
    # The 20k/29k context series of one RTX 3090 log (issue #10517), replayed with V0's rules.
    rows = [c for c in CHECKS if c.entry.startswith("v0-rtx3090-llama31-8b-len2") and c.what == "KV cache GiB"]
    assert len(rows) == 2 and all(abs(c.error) <= 0.10 for c in rows)
