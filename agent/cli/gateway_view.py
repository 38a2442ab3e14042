"""``node-agent gateway-config``: the block an operator pastes into a gateway's configuration, one
per node, from the node as it is planned (docs/gateway.md says what each gateway reads).

Pure rendering: ``NodeView`` is what the command learned from the settings and the plan; the
functions here only format it. Secrets are never printed: an API key becomes a reference to an
environment variable the gateway resolves itself.
"""

from __future__ import annotations

import math
import socket
from dataclasses import dataclass

import yaml

API_KEY_VARIABLE = "NODE_AGENT_API_KEY"
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


@dataclass(frozen=True)
class NodeView:
    """One node as a gateway needs to know it."""

    node_id: str
    hostname: str
    model_name: str
    url: str  # the node's base URL, without /v1
    chain: tuple[str, ...]  # the engines that will serve, in order
    max_context: int  # the longest context of the chain (what /v1/models says as max_model_len)
    has_api_key: bool
    health_check_needs_token: bool  # health.token set and health.open_health_check off
    answer_bound_s: float  # the longest a request waits for its first token: queue wait + first-token timeout


def node_url(host: str, port: int) -> str:
    """http://host:port; a wildcard bind is reached by this host's name, an IPv6 literal in brackets."""
    if host in WILDCARD_HOSTS:
        host = socket.getfqdn()
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _header(node: NodeView, flag: str) -> str:
    return (f"# node-agent gateway-config {flag}: node {node.node_id} ({node.hostname}), serving "
            f"{node.model_name} with {' -> '.join(node.chain)}\n")


def litellm(node: NodeView) -> str:
    """A LiteLLM ``model_list`` entry for this node (the proxy's config.yaml, or Router(model_list=...))."""
    params = {"model": f"hosted_vllm/{node.model_name}", "api_base": f"{node.url}/v1",
              "api_key": f"os.environ/{API_KEY_VARIABLE}" if node.has_api_key else "none"}
    info = {
        "id": node.node_id,  # the deployment's id: cooldowns and health results name this node
        "mode": "chat",
        "max_input_tokens": node.max_context,
        # A health check waits like any request: up to the queue's deadline, then the first token.
        # A shorter timeout would report a busy but working node as dead.
        "health_check_timeout": math.ceil(node.answer_bound_s),
        "health_check_max_tokens": 1,
    }
    entry = yaml.safe_dump({"model_list": [{"model_name": node.model_name, "litellm_params": params,
                                            "model_info": info}]}, sort_keys=False)
    notes = [
        "# One entry per node under model_list; entries with the same model_name are one model group.",
    ]
    if node.has_api_key:
        notes.append(f"# api_key: export this node's server.api_key as {API_KEY_VARIABLE} where LiteLLM runs "
                     "(a variable per node when their keys differ).")
    notes += [
        "# Once per LiteLLM config (not per node), settings that fit node-agent nodes:",
        "# router_settings:",
        "#   num_retries: 2               # a node's 429/503 moves the request to another node",
        "#   enable_pre_call_checks: true # skip a node whose max_input_tokens cannot hold the prompt",
        "# general_settings:",
        "#   background_health_checks: true",
        "#   health_check_interval: 30",
    ]
    return _header(node, "--litellm") + entry + "\n".join(notes) + "\n"


def vllm_router(node: NodeView) -> str:
    """This node's entry of vllm-router's --worker-urls, and the flags that fit it."""
    lines = [
        "# vllm-router takes one URL per node in --worker-urls; this node's:",
        node.url,
        "# It polls GET /health (200 while an engine serves, 503 otherwise) and forwards the client's",
        "# Authorization header to the node. Flags that fit node-agent nodes:",
        f"#   vllm-router --worker-urls {node.url} <the other nodes> --health-check-endpoint /health \\",
        "#     --health-check-interval-secs 10 --health-failure-threshold 3 --health-success-threshold 2",
    ]
    if node.health_check_needs_token:
        lines.append("# WARNING: this node requires health.token on GET /health (health.open_health_check is off), "
                     "and vllm-router sends no credentials on its health checks: it would see 401 and keep this "
                     "node out. Turn health.open_health_check back on (GET /health then says only 200 or 503).")
    return _header(node, "--vllm-router") + "\n".join(lines) + "\n"
