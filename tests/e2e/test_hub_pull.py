"""Models from the hub (#13): `plan`, `pull`, `models`, `rm` and `serve` by reference, as real
processes against the loopback hub (tests/support/hub.py), with llama.cpp serving."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.e2e.hub_support import (GATED_REPO, GRANTED_TOKEN, HUGE_REPO, SMOL_GGUF_FILE, SMOL_GGUF_REF, SMOL_GGUF_REPO,
                                   TINY_REPO, Agent, json_events, standard_repos)
from tests.support.hub import HubServer, make_repo

pytestmark = pytest.mark.engines
SMOL_KEY = f"{SMOL_GGUF_REPO}:{SMOL_GGUF_FILE}"
TINY_GGUF_REPO = "test-org/tiny-llama-GGUF"
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module")
def hub(tiny_model, smollm2_gguf_path):
    with HubServer(standard_repos(tiny_model, smollm2_gguf_path)) as server:
        server.add(make_repo(TINY_GGUF_REPO, {"tiny-llama-f32.gguf": tiny_model.gguf_path}))
        yield server


@pytest.fixture
def agent(hub, tmp_path) -> Agent:
    """A fresh hub cache per test; faults left on the hub by a test are cleared."""
    yield Agent(hub, tmp_path / "hf")
    hub.rate = None
    hub.stall_after.clear()
    hub.corrupt_next.clear()
    hub.release.set()


@pytest.fixture
def tiny_card(tmp_path, tiny_model) -> Path:
    """A card for the tiny Llama whose sources are the loopback hub's repos."""
    cfg = json.loads((tiny_model.hf_dir / "config.json").read_text())
    card = tmp_path / "tiny-llama.yaml"
    card.write_text(json.dumps({
        "name": "tiny-llama", "display_name": "tiny Llama", "license": "apache-2.0",
        "arch": {"architecture": "LlamaForCausalLM", "hidden_size": cfg["hidden_size"],
                 "intermediate_size": cfg["intermediate_size"], "num_layers": cfg["num_hidden_layers"],
                 "num_attention_heads": cfg["num_attention_heads"], "num_kv_heads": cfg["num_key_value_heads"],
                 "head_dim": cfg["head_dim"], "vocab_size": cfg["vocab_size"],
                 "max_position_embeddings": cfg["max_position_embeddings"], "dtype": "float32"},
        "sources": [{"format": "hf", "repo": TINY_REPO},
                    {"format": "gguf", "repo": TINY_GGUF_REPO, "file": "tiny-llama-f32.gguf", "quant_type": "F32"}]}))
    return card


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def weight_transfers(hub: HubServer, since: int = 0) -> list:
    return [e for e in hub.log[since:] if e.file and e.file.endswith((".gguf", ".safetensors")) and e.sent]


def test_plan_on_a_hub_reference_fetches_metadata_and_no_weight_file(hub, agent, tiny_card):
    since = len(hub.log)
    r = agent.run("plan", "--model", str(tiny_card), "--profile", "rtx4090", "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["engine"] == "vllm" and plan["fits"]
    download = plan["download"]
    tiny_weights = hub.repos[TINY_REPO].files["model.safetensors"].size
    by_engine = {v["engine"]: v for v in download["variants"]}
    assert by_engine["vllm"]["repo"] == TINY_REPO and by_engine["vllm"]["bytes"] >= tiny_weights
    assert by_engine["vllm"]["commit"] == hub.repos[TINY_REPO].commit
    assert by_engine["llamacpp"]["file"] == "tiny-llama-f32.gguf"
    assert by_engine["llamacpp"]["bytes"] == hub.repos[TINY_GGUF_REPO].files["tiny-llama-f32.gguf"].size
    # A repo without a card: planned from its config.json (a small file) and the listing.
    r = agent.run("plan", "--model", TINY_REPO, "--profile", "rtx4090", "--json")
    assert r.returncode == 0, r.stderr
    assert any("no card lists" in n and "GGUF" in n for n in json.loads(r.stdout)["download"]["notes"])
    assert weight_transfers(hub, since) == [], "plan fetched weight bytes"
    assert not list(agent.cache.glob("models--*/blobs/*.incomplete"))


def test_plan_offline_uses_the_card_alone(hub, agent, tiny_card):
    since = len(hub.log)
    r = agent.run("plan", "--model", str(tiny_card), "--profile", "rtx4090", "--json", "--offline")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["download"]["offline"] is True
    assert hub.log[since:] == []


def test_pull_and_serve_llamacpp_by_reference_then_models_and_rm(hub, agent, start_server):
    r = agent.run("pull", SMOL_GGUF_REF, "--json")
    assert r.returncode == 0, r.stderr
    events = json_events(r.stdout)
    assert events[0]["event"] == "plan" and [v["engine"] for v in events[0]["variants"]] == ["llamacpp"]
    assert any(e["event"] == "progress" for e in events) and events[-1]["event"] == "done"
    size = hub.repos[SMOL_GGUF_REPO].files[SMOL_GGUF_FILE].size
    assert events[-1]["fetched"] == size
    blob = agent.blob(SMOL_GGUF_REPO, hub.repos[SMOL_GGUF_REPO].files[SMOL_GGUF_FILE].sha256)
    assert sha256(blob) == hub.repos[SMOL_GGUF_REPO].files[SMOL_GGUF_FILE].sha256

    # A second pull finds everything in place and moves no byte.
    since = len(hub.log)
    again = agent.run("pull", SMOL_GGUF_REF, "--json")
    assert again.returncode == 0 and json_events(again.stdout)[-1]["fetched"] == 0
    assert weight_transfers(hub, since) == []

    # serve by reference, offline: only the files pulled are used.
    server = start_server({"model": {"ref": SMOL_GGUF_REF}, "engines": {"chain": ["llamacpp"]}},
                          env={**agent.env, "HF_HUB_OFFLINE": "1"})
    server.wait_ready(timeout=120)
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    answer = client.chat.completions.create(model="SmolLM2-135M-Instruct.Q4_1", messages=QUESTION, temperature=0)
    assert "Paris" in answer.choices[0].message.content

    listed = agent.models()
    assert [(m["ref"], m["engine"], m["repo"], m["file"]) for m in listed] == [
        (SMOL_GGUF_REF, "llamacpp", SMOL_GGUF_REPO, SMOL_GGUF_FILE)]
    assert listed[0]["size_bytes"] == size and listed[0]["in_use"] and listed[0]["last_used"]
    assert listed[0]["commit"] == hub.repos[SMOL_GGUF_REPO].commit
    refused = agent.run("rm", SMOL_GGUF_REF)
    assert refused.returncode == 2 and "serve" in refused.stderr and blob.exists()

    assert server.stop() == 0
    removed = agent.run("rm", SMOL_GGUF_REF)
    assert removed.returncode == 0, removed.stderr
    assert "98.4 MB freed" in removed.stdout
    assert not blob.exists() and agent.models() == []


def test_an_interrupted_pull_resumes_without_fetching_bytes_again(hub, agent):
    f = hub.repos[SMOL_GGUF_REPO].files[SMOL_GGUF_FILE]
    hub.release.clear()
    hub.stall_after[SMOL_KEY] = 40 << 20
    start = len(hub.log)
    proc = agent.popen("pull", SMOL_GGUF_REF, "--json")
    partial = agent.blob(SMOL_GGUF_REPO, f.sha256).with_name(f.sha256 + ".incomplete")
    deadline = time.monotonic() + 60
    while not (partial.exists() and partial.stat().st_size >= 40 << 20):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # as a reboot or kill -9 would
    proc.wait()
    have = partial.stat().st_size
    hub.stall_after.clear()
    hub.release.set()
    while not any(e.file == SMOL_KEY and e.range is None for e in hub.log[start:]):  # the cut transfer is logged
        time.sleep(0.05)

    since = len(hub.log)
    r = agent.run("pull", SMOL_GGUF_REF, "--json")
    assert r.returncode == 0, r.stderr
    [resumed] = weight_transfers(hub, since)
    assert resumed.range == f"bytes={have}-" and resumed.status == 206
    assert resumed.sent == f.size - have, "bytes already on disk were fetched again"
    done = [e for e in json_events(r.stdout) if e["event"] == "file_done"]
    assert done[0]["status"] == "resumed" and done[0]["fetched"] == f.size - have
    assert sha256(agent.blob(SMOL_GGUF_REPO, f.sha256)) == f.sha256 and not partial.exists()


def test_a_corrupt_file_is_detected_refetched_and_never_served(hub, agent, tiny_card):
    gguf = hub.repos[TINY_GGUF_REPO].files["tiny-llama-f32.gguf"]
    key = f"{TINY_GGUF_REPO}:tiny-llama-f32.gguf"
    # Corrupted in transit: the checksum catches it and the file is fetched again.
    hub.corrupt_next.add(key)
    r = agent.run("pull", str(tiny_card), "--engine", "llamacpp", "--json")
    assert r.returncode == 0, r.stderr
    assert any(e["event"] == "note" and "checksum" in e["message"] for e in json_events(r.stdout))
    assert len(hub.transfers(key)) == 2
    blob = agent.blob(TINY_GGUF_REPO, gguf.sha256)
    assert sha256(blob) == gguf.sha256

    # Corrupted on disk: serve refuses it, pull finds it and fetches it again.
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    refused = agent.run("serve", "--model", str(tiny_card), timeout=60,
                        env={"NODE_AGENT_ENGINES__CHAIN": '["llamacpp"]'})
    assert refused.returncode == 2, refused.stderr
    assert "no longer match" in refused.stderr and "node-agent pull" in refused.stderr
    r = agent.run("pull", str(tiny_card), "--engine", "llamacpp", "--json")
    assert r.returncode == 0, r.stderr
    done = [e for e in json_events(r.stdout) if e["event"] == "file_done"]
    assert done[0]["status"] == "refetched"
    assert len(hub.transfers(key)) == 3 and sha256(blob) == gguf.sha256


def test_not_enough_disk_is_refused_before_any_byte(hub, agent):
    since = len(hub.log)
    r = agent.run("pull", HUGE_REPO, "--profile", "a100-80gb-x4")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "not enough disk space" in r.stderr and "missing" in r.stderr and "nothing was downloaded" in r.stderr
    assert weight_transfers(hub, since) == []
    assert not list(agent.cache.glob("models--*/blobs/*.incomplete"))


def test_a_gated_repo_says_where_to_accept_the_license_and_to_set_hf_token(hub, agent):
    r = agent.run("pull", GATED_REPO, "--profile", "rtx4090")
    assert r.returncode == 2
    assert GATED_REPO in r.stderr and f"{hub.url}/{GATED_REPO}" in r.stderr and "HF_TOKEN" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    denied = agent.run("pull", GATED_REPO, "--profile", "rtx4090", env={"HF_TOKEN": "hf_not_granted_000000000000"})
    assert denied.returncode == 2 and "not been granted" in denied.stderr
    assert "hf_not_granted" not in denied.stderr + denied.stdout
    granted = agent.run("pull", GATED_REPO, "--profile", "rtx4090", "--json", env={"HF_TOKEN": GRANTED_TOKEN})
    assert granted.returncode == 0, granted.stderr
    assert GRANTED_TOKEN not in granted.stdout + granted.stderr


def test_serve_with_pull_auto_reports_the_download_then_serves(hub, agent, start_server):
    size = hub.repos[SMOL_GGUF_REPO].files[SMOL_GGUF_FILE].size
    never = agent.run("serve", "--model", SMOL_GGUF_REF, timeout=60, env={"NODE_AGENT_ENGINES__CHAIN": '["llamacpp"]'})
    assert never.returncode == 2 and f"run `node-agent pull {SMOL_GGUF_REF}` (98.4 MB)" in never.stderr

    hub.rate = size / 6  # about six seconds of download to watch
    server = start_server({"model": {"ref": SMOL_GGUF_REF, "pull": "auto"}, "engines": {"chain": ["llamacpp"]}},
                          env=agent.env)
    seen: list[dict] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{server.url}/health/ready", timeout=5)
        except httpx.HTTPError:
            time.sleep(0.2)
            continue
        if r.status_code == 200:
            break
        body = r.json()
        if body["status"] == "loading" and "download" in body.get("progress", {}):
            assert r.headers["retry-after"]
            seen.append(body["progress"]["download"])
            assert "downloading" in body["reason"]
        time.sleep(0.5)
    assert len(seen) >= 3, seen
    assert all(s["bytes_total"] == size for s in seen)
    assert 0 < seen[-1]["bytes_done"] <= size and seen[-1]["bytes_done"] > seen[0]["bytes_done"]
    assert any(s["eta_s"] is not None and s["rate_bytes_per_s"] > 0 for s in seen)
    server.wait_ready(timeout=60)
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    answer = client.chat.completions.create(model="SmolLM2-135M-Instruct.Q4_1", messages=QUESTION, temperature=0)
    assert "Paris" in answer.choices[0].message.content
    assert [m["ref"] for m in agent.models()] == [SMOL_GGUF_REF]


def test_pull_with_quantize_auto_fetches_the_bf16_weights_and_makes_the_awq_variant(hub, agent, tiny_card,
                                                                                    quantizer_env_dir):
    """model.quantize: auto through `pull` (#17): AWQ is pinned and nobody published it, so the pull
    fetches the bf16 checkpoint, quantizes it here (llm-compressor, the quantizer's environment),
    and registers the variant; `models` and `plan` see it; a second pull moves and makes nothing."""
    env = {"NODE_AGENT_MODEL__QUANTIZE": "auto", "NODE_AGENT_QUANTIZE__ENV_DIR": str(quantizer_env_dir),
           "NODE_AGENT_QUANTIZE__SAMPLES": "8", "NODE_AGENT_QUANTIZE__SEQ_LEN": "64"}
    pin = ("--profile", "rtx4090", "--engine", "vllm", "--quantization", "awq")
    since = len(hub.log)
    refused = agent.run("pull", str(tiny_card), *pin, "--json")  # without auto: refused before any byte, saying how
    assert refused.returncode == 2 and "`node-agent quantize` can make one" in refused.stderr
    assert "model.quantize: auto" in refused.stderr and weight_transfers(hub, since) == []

    r = agent.run("pull", str(tiny_card), *pin, "--json", env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    ev = json_events(r.stdout)
    [variant] = ev[0]["variants"]
    assert (variant["engine"], variant["repo"], variant["format"]) == ("vllm", TINY_REPO, "hf")
    assert "quantized on this node" in variant["why"]
    kinds = [e["event"] for e in ev]
    assert kinds.index("quantize") > kinds.index("progress")  # after the bf16 download
    assert [e["done"] for e in ev if e["event"] == "layers"] == [1, 2]  # progress per decoder layer
    [done] = [e for e in ev if e["event"] == "registered"]
    assert kinds[-1] == "done" and done["repo"].startswith("node-agent-quantized/")
    assert done["quality"]["checked"] and done["quality"]["perplexity"] > 1
    config = json.loads((Path(done["path"]) / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized" and config["config_groups"]["group_0"]["weights"]["num_bits"] == 4

    listed = agent.models()
    [made] = [m for m in listed if m["quantized"]]
    assert made["quant"] == "awq-w4a16-g128" and made["format"] == "compressed-tensors" and not made["degraded"]
    planned = agent.run("plan", "--model", str(tiny_card), *pin[:-2], "--quantization", "compressed-tensors", "--json",
                        env=env)
    assert planned.returncode == 0, planned.stderr[-2000:]
    p = json.loads(planned.stdout)
    assert p["quantization"] == "compressed-tensors" and not p.get("quantize")  # it exists now: nothing to make

    since = len(hub.log)
    again = agent.run("pull", str(tiny_card), *pin, "--json", env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "quantize" not in [e["event"] for e in json_events(again.stdout)]
    assert weight_transfers(hub, since) == []
