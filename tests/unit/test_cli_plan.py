"""`node-agent plan`: the JSON contract, exit codes, and bad input (#3)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from typer.testing import CliRunner

from agent.catalog.cards import available_cards
from agent.catalog.resolve import resolve_model
from agent.cli import app
from agent.hardware import detect
from agent.hardware.profiles import available_profiles
from agent.planner import plan
from agent.planner.report import plan_to_dict
from agent.settings import Settings

SCHEMA = json.loads((Path(__file__).parents[2] / "docs/schemas/plan.schema.json").read_text())
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), env={"NODE_AGENT_CONFIG": "", "COLUMNS": "200"})


def test_plan_json_for_the_homelab_70b_case():
    result = invoke("plan", "--model", "llama-3.1-70b-instruct", "--profile", "rtx5090-rtx4090", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    jsonschema.validate(data, SCHEMA)
    assert data["engine"] == "vllm" and data["quantization"] == "awq" and data["fits"] is True
    assert data["pipeline_parallel_size"] == 2 and sum(data["pp_layer_partition"]) == 80
    assert any(a["tensor_parallel_size"] == 2 for a in data["alternatives"])
    assert data["fallback"] == "llamacpp" and data["llamacpp"]["fits"] is True


def test_plan_table_shows_the_refusals_and_reasons():
    result = invoke("plan", "--model", "llama-3.1-70b-instruct", "--profile", "rtx5090-rtx4090")
    assert result.exit_code == 0
    out = result.stdout
    assert "bfloat16: weights 141.1 GB" in out and "fp8: weights 72.7 GB" in out
    assert "VLLM_PP_LAYER_PARTITION" in out and "memory per GPU" in out


def test_plan_that_does_not_fit_exits_1_with_what_would():
    result = invoke("plan", "--model", "llama-3.1-70b-instruct", "--profile", "rtx4090", "--engine", "vllm",
                    "--quantization", "none", "--json")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    jsonschema.validate(data, SCHEMA)
    assert data["fits"] is False and "try --quantization awq" in data["refusal"]


def test_tp_3_on_a_64_head_model_names_the_constraint():
    result = invoke("plan", "--model", "llama-3.1-70b-instruct", "--profile", "a100-80gb-x4", "--tp", "3")
    assert result.exit_code == 2
    assert "must divide the 64 attention heads" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--model", "llama-9b"], "unknown model"),
    (["--quantization", "int3"], "choose none, fp8, compressed-tensors, mxfp4, awq"),
    (["--kv-cache-dtype", "fp4"], "choose auto or fp8"),
    (["--engine", "tgi"], "choose auto, vllm or llamacpp"),
])
def test_bad_flags_exit_2(args, message):
    result = invoke("plan", "--profile", "rtx4090", *args)
    assert result.exit_code == 2
    assert message in result.stderr


@pytest.mark.parametrize("setup, message", [
    ("missing", "does not exist"),
    ("garbled-config", "config.json"),
    ("garbled-gguf", "GGUF"),
])
def test_bad_model_files_exit_2(tmp_path, setup, message):
    if setup == "missing":
        ref = tmp_path / "no-such-model"
    elif setup == "garbled-config":
        ref = tmp_path / "m"
        ref.mkdir()
        (ref / "config.json").write_text("{ not json")
    else:
        ref = tmp_path / "m.gguf"
        ref.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    result = invoke("plan", "--profile", "rtx4090", "--model", str(ref))
    assert result.exit_code == 2, result.output
    assert message.lower() in result.stderr.lower()
    assert "Traceback" not in result.output


@pytest.mark.parametrize("profile", available_profiles())
def test_every_card_on_every_profile_plans_to_valid_json(profile):
    host = detect(profile, env={})
    settings = Settings.model_validate({})
    for name in available_cards():
        data = plan_to_dict(plan(host, resolve_model(name), settings))
        jsonschema.validate(data, SCHEMA)
        assert data["fits"] == (data["refusal"] is None)
