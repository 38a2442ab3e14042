"""`node-agent gateway-config` (#15): the block for each gateway, from the node as planned, with no
secret in it. The blocks are fed to real gateways in tests/gateway."""

from __future__ import annotations

import yaml
from typer.testing import CliRunner

from agent.cli import app
from agent.cli.gateway_view import node_url

KEY = "api-key-0123456789abcdef"
runner = CliRunner()


def invoke(tmp_path, config: dict, *args: str, env: dict | None = None):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return runner.invoke(app, ["gateway-config", "--config", str(path), *args],
                         env={"NODE_AGENT_CONFIG": "", "COLUMNS": "200", **(env or {})})


NODE = {"engines": {"chain": ["llamacpp"]}, "planner": {"target_context": 2048},
        "server": {"port": 8123}, "health": {"node_id": "node-a"},
        "admission": {"queue_timeout_s": 20}, "router": {"first_token_timeout_s": 40}}


def test_litellm_entry_is_the_node_as_planned(tmp_path):
    r = invoke(tmp_path, NODE, "--litellm")
    assert r.exit_code == 0, r.output
    doc = yaml.safe_load(r.stdout)
    [entry] = doc["model_list"]
    assert entry["model_name"] == "smollm2-135m-instruct"
    assert entry["litellm_params"] == {"model": "hosted_vllm/smollm2-135m-instruct",
                                       "api_base": "http://127.0.0.1:8123/v1", "api_key": "none"}
    assert entry["model_info"] == {"id": "node-a", "mode": "chat", "max_input_tokens": 2048,
                                   "health_check_timeout": 60, "health_check_max_tokens": 1}


def test_litellm_entry_refers_to_the_api_key_and_never_prints_it(tmp_path):
    r = invoke(tmp_path, NODE, "--litellm", "--url", "http://node-a.lan:8123/",
               env={"NODE_AGENT_SERVER__API_KEY": KEY})
    assert r.exit_code == 0, r.output
    assert KEY not in r.output
    params = yaml.safe_load(r.stdout)["model_list"][0]["litellm_params"]
    assert params["api_key"] == "os.environ/NODE_AGENT_API_KEY"
    assert params["api_base"] == "http://node-a.lan:8123/v1"


def test_vllm_router_gets_the_url_and_a_warning_when_a_health_token_would_lock_it_out(tmp_path):
    plain = invoke(tmp_path, NODE, "--vllm-router")
    assert plain.exit_code == 0
    urls = [line for line in plain.stdout.splitlines() if not line.startswith("#")]
    assert urls == ["http://127.0.0.1:8123"]
    assert "--health-check-endpoint /health" in plain.stdout and "WARNING" not in plain.stdout
    token = "health-token-0123456789"
    open_check = invoke(tmp_path, NODE, "--vllm-router", env={"NODE_AGENT_HEALTH__TOKEN": token})
    assert open_check.exit_code == 0 and "WARNING" not in open_check.output  # GET /health stays open
    locked = invoke(tmp_path, NODE, "--vllm-router", env={"NODE_AGENT_HEALTH__TOKEN": token,
                                                           "NODE_AGENT_HEALTH__OPEN_HEALTH_CHECK": "false"})
    assert locked.exit_code == 0 and "WARNING: this node requires health.token on GET /health" in locked.stdout
    assert token not in locked.output


def test_exactly_one_gateway_is_asked_for(tmp_path):
    for args in ((), ("--litellm", "--vllm-router")):
        r = invoke(tmp_path, NODE, *args)
        assert r.exit_code == 2 and "choose one gateway" in r.output


def test_a_wildcard_bind_is_reached_by_the_host_name_and_ipv6_in_brackets():
    import socket

    assert node_url("0.0.0.0", 80) == f"http://{socket.getfqdn()}:80"
    assert node_url("::1", 8080) == "http://[::1]:8080"
    assert node_url("10.1.2.3", 8080) == "http://10.1.2.3:8080"
