"""The CLI's contract: exit codes, stable JSON that matches its published schema (#2)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from typer.testing import CliRunner

from agent import __version__
from agent.cli import app
from agent.hardware.profiles import available_profiles

SCHEMA = json.loads((Path(__file__).parents[2] / "docs/schemas/detect.schema.json").read_text())
runner = CliRunner()


def invoke(*args: str, env: dict | None = None):
    return runner.invoke(app, list(args), env={"NODE_AGENT_CONFIG": "", **(env or {})})


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"node-agent {__version__}"


@pytest.mark.parametrize("name", available_profiles())
def test_detect_json_matches_the_published_schema(name):
    result = invoke("detect", "--profile", name, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    jsonschema.validate(data, SCHEMA)
    assert data["source"] == f"profile:{name}"


def test_detect_json_on_this_machine_matches_the_schema():
    result = invoke("detect", "--json")
    assert result.exit_code == 0
    jsonschema.validate(json.loads(result.stdout), SCHEMA)


def test_detect_table_names_the_gpus_and_the_pair():
    result = invoke("detect", "--profile", "rtx5090-rtx4090", env={"COLUMNS": "160"})
    assert result.exit_code == 0
    assert "RTX 5090" in result.stdout and "RTX 4090" in result.stdout
    assert "0-1" in result.stdout and "hostbridge" in result.stdout


def test_unknown_profile_exits_2_with_the_list():
    result = invoke("detect", "--profile", "nope")
    assert result.exit_code == 2
    assert "unknown profile 'nope'" in result.stderr and "rtx4090" in result.stderr


def test_bad_config_exits_2_naming_field_and_file(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("server:\n  port: 99999\n")
    result = invoke("detect", "--config", str(cfg))
    assert result.exit_code == 2
    assert "server.port" in result.stderr and str(cfg) in result.stderr.replace("\n", "")
    result = invoke("config", "--config", str(cfg))
    assert result.exit_code == 2


def test_config_prints_effective_settings_and_never_a_secret(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("server:\n  api_key: 0123456789abcdef0123\nhealth:\n  token: health-secret-4567890\n")
    for fmt in ([], ["--json"]):
        result = invoke("config", "--config", str(cfg), *fmt, env={"NODE_AGENT_SERVER__PORT": "9100"})
        assert result.exit_code == 0
        assert "0123456789abcdef0123" not in result.stdout and "health-secret-4567890" not in result.stdout
    data = json.loads(result.stdout)
    assert data["server"]["port"] == 9100
    assert data["server"]["api_key"] == data["health"]["token"] == "**********"


def test_a_rejected_secret_is_never_echoed(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("health:\n  token: tooshort-secret\n")
    result = invoke("config", "--config", str(cfg), env={"NODE_AGENT_SERVER__API_KEY": "also-short"})
    assert result.exit_code == 2
    assert "health.token" in result.stderr and "server.api_key" in result.stderr
    assert "tooshort-secret" not in result.stderr and "also-short" not in result.stderr
    assert "at least 16 characters" in result.stderr


def test_configuration_doc_matches_the_code():
    doc = (Path(__file__).parents[2] / "docs/configuration.md").read_text()
    result = invoke("config", "--reference")
    assert result.exit_code == 0
    assert doc == result.stdout, "docs/configuration.md is stale: node-agent config --reference > docs/configuration.md"
