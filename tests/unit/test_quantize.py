"""Quantizing on the node (#17), the pure parts: group size and layers left 16-bit, calibration
split, quality verdict, cost and refusals, and what the planner says when no 4-bit checkpoint
exists. The real quantizer runs in tests/integration/test_quantize.py."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from agent.catalog import resolve_model
from agent.catalog.types import ModelArch, ModelSpec, WeightSource
from agent.errors import PlanError, UsageError
from agent.hardware import detect
from agent.hub.select import choose as choose_variants
from agent.planner import Pins, plan
from agent.planner.vllm_cpu import plan_vllm_cpu
from agent.quantize import calibration, quality
from agent.quantize.job import NotEnoughResources, Prepared, Source, check_resources
from agent.quantize.schemes import choose, estimate
from agent.settings import Settings

SMOLLM2 = ModelArch("LlamaForCausalLM", 576, 1536, 30, 9, 3, 64, 49152, 8192, tie_word_embeddings=True)
TINY = ModelArch("LlamaForCausalLM", 128, 256, 2, 2, 1, 64, 512, 2048)
HINT = re.compile(r"no AWQ checkpoint: `node-agent quantize` can make one \(~\d+ min, \d+\.\d GiB\)")


def test_group_size_is_the_largest_that_divides_every_layer():
    smol = choose(SMOLLM2)
    assert smol.group_size == 64 and smol.label == "awq-w4a16-g64"
    assert any("128 does not divide" in r and "q_proj (576)" in r for r in smol.reasons)
    assert smol.ignore == ("lm_head",)  # 64 divides 576 and 1536: only the head stays 16-bit
    tiny = choose(TINY)
    assert tiny.group_size == 128 and any("divides the columns of every quantized layer" in r for r in tiny.reasons)


def test_layers_the_group_does_not_divide_stay_16_bit_and_are_named():
    odd = dataclasses.replace(TINY, intermediate_size=200)  # down_proj: 200 columns, no 128/64/32 divides it
    c = choose(odd)
    assert c.group_size == 128
    assert "re:.*down_proj$" in c.ignore and "lm_head" in c.ignore
    assert any(l.startswith("down_proj (200 columns") for l in c.ignored)
    assert any("down_proj stays 16-bit" in r for r in c.reasons)
    pinned = choose(SMOLLM2, group_size=128)  # a pinned group: the 576-wide layers stay 16-bit
    assert pinned.group_size == 128 and "re:.*q_proj$" in pinned.ignore and "re:.*down_proj$" not in pinned.ignore


def test_fp8_dynamic_needs_no_group_and_moe_routers_stay_16_bit():
    fp8 = choose(SMOLLM2, "fp8-dynamic")
    assert fp8.group_size == 0 and fp8.label == "fp8-dynamic" and fp8.quant_type == "w8a8-fp8"
    moe = resolve_model("qwen3-30b-a3b").arch
    assert "re:.*mlp\\.gate$" in choose(moe).ignore
    with pytest.raises(ValueError, match="unknown scheme"):
        choose(SMOLLM2, "int3")


def test_builtin_calibration_is_mixed_and_the_held_out_split_is_disjoint_and_seeded():
    samples = calibration.builtin_samples()
    chats = [s for s in samples if "messages" in s]
    assert len(samples) >= 200 and 0.3 < len(chats) / len(samples) < 0.7
    a, b = calibration.load("builtin", 0), calibration.load("builtin", 0)
    assert a == b and a.digest == b.digest
    held = {json.dumps(s, sort_keys=True) for s in a.held_out}
    assert held and not held & {json.dumps(s, sort_keys=True) for s in a.calibration}
    assert calibration.load("builtin", 1).held_out != a.held_out


def test_operator_calibration_files(tmp_path):
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps(x) for x in [{"text": "one"}, {"messages": [{"role": "user", "content": "hi"}]},
                                                      {"text": "three"}, {"text": "four"}, {"text": "five"}]))
    assert len(calibration.load(str(jsonl), 0).calibration) == 4
    txt = tmp_path / "c.txt"
    txt.write_text("first paragraph\n\nsecond\n\nthird\n\nfourth\n")
    assert {s["text"] for s in calibration.file_samples(txt)} == {"first paragraph", "second", "third", "fourth"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(UsageError, match="line 1"):
        calibration.load(str(bad), 0)
    few = tmp_path / "few.txt"
    few.write_text("a\n\nb")
    with pytest.raises(UsageError, match="at least 4"):
        calibration.load(str(few), 0)


def test_quality_verdict_flags_what_degrades_beyond_the_threshold():
    good = quality.verdict({"perplexity_bf16": 10.0, "perplexity": 11.0, "top1_agreement": 0.9}, 0.25)
    assert good["checked"] and not good["degraded"] and good["perplexity_increase"] == pytest.approx(0.1)
    bad = quality.verdict({"perplexity_bf16": 10.0, "perplexity": 40.0, "top1_agreement": 0.3}, 0.25)
    assert bad["degraded"] and "DEGRADED" in quality.describe(bad) and "+300.0%" in quality.describe(bad)
    assert quality.verdict(None, 0.25) == {"checked": False, "degraded": False}


def _prepared(arch: ModelArch, tmp_path, gpus: int = 0) -> Prepared:
    spec = ModelSpec("m", arch, (WeightSource("hf"),), origin="hf-config", local_path=str(tmp_path))
    s = Settings()
    c = choose(arch)
    return Prepared(Source(str(tmp_path), "m", tmp_path, spec, "k"), c, estimate(arch, c, 128, 512, gpus=gpus),
                    s.quantize, calibration.load("builtin", 0), None)


def test_quantizing_is_refused_up_front_when_ram_or_gpu_memory_is_short(tmp_path):
    prep = _prepared(resolve_model("deepseek-r1-distill-qwen-32b").arch, tmp_path)
    host = detect("rtx4090")  # 56 GiB of RAM free; a 32B bf16 model alone is 61 GiB
    with pytest.raises(NotEnoughResources, match=r"needs ~\d+\.\d GiB of RAM \(the whole 16-bit model"):
        check_resources(prep, host, Settings())
    small = _prepared(resolve_model("llama-3.1-8b-instruct").arch, tmp_path, gpus=1)
    busy = dataclasses.replace(host, gpus=tuple(dataclasses.replace(g, memory_free_bytes=1 << 30) for g in host.gpus))
    with pytest.raises(NotEnoughResources, match="GiB of GPU memory for one decoder layer"):
        check_resources(small, busy, Settings())
    check_resources(small, host, Settings())  # an 8B model quantizes on a 24 GB card


def test_estimate_scales_with_the_model_and_runs_one_layer_at_a_time_on_a_gpu():
    c = choose(SMOLLM2)
    cpu = estimate(SMOLLM2, c, 128, 512, physical_cores=2)
    gpu = estimate(SMOLLM2, c, 128, 512, gpus=1)
    assert cpu.on_gpu is False and gpu.on_gpu and gpu.seconds < cpu.seconds
    big = resolve_model("llama-3.1-70b-instruct").arch
    b = estimate(big, choose(big), 128, 512, gpus=1)
    assert b.ram_bytes > 140e9 and b.gpu_bytes < 10 * 2**30  # the model in RAM, one layer on the GPU
    assert 35e9 < b.output_bytes < 45e9


def test_plan_says_node_agent_quantize_can_make_the_missing_awq_checkpoint():
    host = detect("rtx3090")  # 24 GB, no FP8: a 14B model fits only at 4 bits, and its card has no AWQ
    model = resolve_model("deepseek-r1-distill-qwen-14b")
    never = plan(host, model, Settings(profile="rtx3090"))
    assert never.engine == "llamacpp" and any(HINT.search(r) for r in never.reasons)
    auto = plan(host, model, Settings(profile="rtx3090", model={"quantize": "auto"}))
    assert auto.engine == "vllm" and auto.fits and auto.primary.quantization == "compressed-tensors"
    assert auto.primary.quantize == "awq-w4a16-g128"
    assert any("quantized on this node" in r for r in auto.primary.reasons)
    [variant], _ = choose_variants(auto, model)  # pull fetches the bf16 weights to quantize them
    assert variant.format == "hf" and variant.repo == model.source("hf").repo and "quantized on this node" in variant.why


def test_a_pinned_awq_nobody_published_is_made_here_with_auto_and_explained_without():
    """`pull --quantization awq` (or `plan`) on a model with only bf16 weights: with model.quantize
    auto the plan is the variant the agent makes; without, the refusal says how to make it."""
    host = detect("rtx4090")
    model = resolve_model("deepseek-r1-distill-qwen-14b")  # its card has bf16 weights only: no AWQ
    pins = Pins(engine="vllm", quantization="awq")
    with pytest.raises(PlanError) as refused:
        plan(host, model, Settings(profile="rtx4090"), pins)
    assert "--quantization awq is not available" in str(refused.value) and HINT.search(str(refused.value))
    assert "set model.quantize: auto" in str(refused.value)
    auto = plan(host, model, Settings(profile="rtx4090", model={"quantize": "auto"}), pins)
    assert auto.engine == "vllm" and auto.primary.fits and auto.primary.quantization == "compressed-tensors"
    assert auto.primary.quantize == "awq-w4a16-g128"
    # gptq is not what `node-agent quantize` makes by default: refused as before, no hint
    with pytest.raises(PlanError, match="--quantization gptq is not available") as gptq:
        plan(host, model, Settings(profile="rtx4090", model={"quantize": "auto"}), Pins(engine="vllm", quantization="gptq"))
    assert "node-agent quantize" not in str(gptq.value)


def test_once_the_variant_exists_a_pinned_awq_runs_it_and_a_pull_has_nothing_to_fetch():
    from agent.hub.select import already_here

    host = detect("rtx4090")
    model = resolve_model("deepseek-r1-distill-qwen-14b")
    made = WeightSource(format="compressed-tensors", repo="node-agent-quantized/r1-14b-awq-w4a16-g128",
                        quant_type="w4a16", bits=4, group_size=128, scheme="w4a16", size_bytes=9_400_000_000,
                        zero_points=True)
    with_made = dataclasses.replace(model, sources=(made, *model.sources))
    for pinned in ("awq", "gptq", "compressed-tensors"):
        p = plan(host, with_made, Settings(profile="rtx4090"), Pins(engine="vllm", quantization=pinned))
        assert p.primary.fits and p.primary.quantization == "compressed-tensors" and p.primary.quantize is None
    variants, notes = choose_variants(p, with_made)
    assert variants == [] and any("is on disk" in n for n in notes)
    assert already_here(p, with_made, "vllm")  # `pull` has nothing to fetch, and that is no error
    gguf = WeightSource(format="gguf", repo="test-org/r1-14b-GGUF", file="r1-14b.Q4_K_M.gguf", quant_type="Q4_K_M",
                        size_bytes=9_000_000_000)
    both = dataclasses.replace(with_made, sources=(*with_made.sources, gguf))
    p = plan(host, both, Settings(profile="rtx4090"), Pins(engine="vllm", quantization="awq"))
    assert already_here(p, both, "vllm") and not already_here(p, both, "auto")  # the GGUF behind it must come
    assert [v.engine for v in choose_variants(p, both)[0]] == ["llamacpp"]
    # an FP8 checkpoint is not a 4-bit one: a pinned awq is not served from it
    fp8 = dataclasses.replace(made, quant_type="w8a8-fp8", bits=8, scheme="w8a8-fp8")
    with pytest.raises(PlanError, match="--quantization awq is not available"):
        plan(host, dataclasses.replace(model, sources=(fp8, *model.sources)), Settings(profile="rtx4090"),
             Pins(engine="vllm", quantization="awq"))


def test_no_hint_where_a_4bit_checkpoint_exists_or_the_host_cannot_quantize():
    host = detect("rtx3090")
    with_awq = plan(host, resolve_model("qwen2.5-14b-instruct"), Settings(profile="rtx3090"))
    assert not any(HINT.search(r) for r in with_awq.reasons)
    big = plan(detect("rtx4090"), resolve_model("deepseek-r1-distill-qwen-32b"), Settings(profile="rtx4090"))
    assert any("this host cannot make one: quantizing needs" in r for r in big.reasons)


def test_on_a_gpu_less_host_auto_quantizes_only_when_the_kv_space_is_raised_past_the_quantizers_own_needs():
    """docs/models.md: the quantizer's RAM (the bf16 model, its output, ~1.2 GiB of torch) exceeds
    what vLLM's CPU build needs to serve the bf16 checkpoint with the default 1 GiB of KV cache, so
    on a host just too small for that, auto cannot quantize either; with 16 GiB of KV it can."""
    from agent.hardware.types import GIB, MIB

    model = resolve_model("deepseek-r1-distill-qwen-14b")  # bf16 weights only, ~29.5 GB
    cpu = dataclasses.replace(detect("cpu-only"), cpu_avx512=True)  # a W4A16 checkpoint would load
    for kv_gib, quantizes in ((1, False), (16, True)):
        s = Settings(profile="cpu-only", model={"quantize": "auto"}, engines={"vllm_cpu_kvcache_gib": kv_gib})
        bf16 = plan_vllm_cpu(cpu, model, s.planner, kv_gib, Pins()).weights_bytes
        host = dataclasses.replace(cpu, ram_available_bytes=bf16 + kv_gib * GIB + s.planner.ram_margin_mib * MIB - 1)
        assert not plan_vllm_cpu(host, model, s.planner, kv_gib, Pins()).fits  # bf16: one byte short
        p = plan(host, model, s, vllm_cpu=True)
        if quantizes:
            assert p.engine == "vllm" and p.primary.fits and p.primary.quantize == "awq-w4a16-g128"
        else:
            assert p.engine == "llamacpp"
            assert any("this host cannot make one: quantizing needs" in r for r in p.reasons)


def test_vllm_cpu_plans_a_w4a16_checkpoint_with_its_zero_points_and_needs_avx512():
    src = WeightSource("compressed-tensors", quant_type="w4a16", bits=4, group_size=64, scheme="w4a16",
                       zero_points=True)
    spec = ModelSpec("smol-awq", SMOLLM2, (src,), origin="hf-config")
    host = detect("cpu-only")
    s = Settings().planner
    ok = plan_vllm_cpu(dataclasses.replace(host, cpu_avx512=True), spec, s, 1, Pins())
    assert ok.fits and ok.quantization == "compressed-tensors"
    linear = 30 * (576 * (576 + 192 + 192) + 576 * 576 + 3 * 576 * 1536)
    per_param = 0.5 + (2 + 1) / 64  # 4 bits, a bf16 scale and an int8 zero per 64
    assert ok.weights_bytes == pytest.approx(linear * per_param + 49152 * 576 * 2, rel=0.001)
    no = plan_vllm_cpu(dataclasses.replace(host, cpu_avx512=False), spec, s, 1, Pins())
    assert not no.fits and "only for AVX-512 CPUs" in no.refusal and "cpu_gemm_wna16" in no.refusal


def test_health_ready_shows_the_quantization_serve_runs_before_its_engines(tmp_path):
    """model.quantize: auto — /health/ready is 503 loading with progress.quantize (layers done,
    ETA) fed by the worker's events, then the engines' own loading progress once it is done."""
    import asyncio

    import httpx

    from agent.quantize.auto import Quantization
    from agent.serving.app import create_app
    from agent.serving.node import build_node
    from agent.serving.router import Router
    from tests.unit.fake_backend import FakeBackend

    s = Settings()
    q = Quantization(_prepared(SMOLLM2, tmp_path), s)
    node = build_node(s, Router([FakeBackend("vllm")], s.router, s.admission), "m", hostname="box",
                      progress_source=q.progress)
    app = create_app(s, node)

    async def ready() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.get("/health/ready")

    for event in ({"event": "stage", "stage": "loading"}, {"event": "stage", "stage": "calibrating", "layers": 30},
                  {"event": "layers", "done": 12, "total": 30}):
        q.progress_.apply(event)
    r = asyncio.run(ready())
    assert r.status_code == 503 and r.headers["retry-after"]
    body = r.json()
    assert body["status"] == "loading" and body["reason"] == "quantizing m: calibrating, 12/30 layers"
    p = body["progress"]["quantize"]
    assert (p["stage"], p["layers_done"], p["layers_total"], p["percent"]) == ("calibrating", 12, 30, 40)
    assert p["eta_s"] is not None and p["eta_s"] >= 0 and p["kind"] == "quantize"
    q.result = object()  # done: the engines start next
    body = asyncio.run(ready()).json()
    assert body["status"] == "loading" and "quantize" not in body["progress"] and body["progress"]["backends_total"] == 1


def test_v1_node_flags_a_degraded_checkpoint_made_here():
    """serve runs a variant `node-agent quantize` made (agent/serving/run.py pick_checkpoint):
    /v1/node names it with its quality check, and a degraded one says so, within the schema."""
    import asyncio
    import json
    from pathlib import Path

    import httpx
    import jsonschema

    from agent.hub.store import Pull
    from agent.quantize.register import describe_variant
    from agent.serving.app import create_app
    from agent.serving.node import build_node
    from agent.serving.router import Router
    from tests.unit.fake_backend import FakeBackend

    verdict = quality.verdict({"perplexity": 40.0, "perplexity_bf16": 10.0, "top1_agreement": 0.31}, 0.25)
    pull = Pull("my-model", "vllm", "compressed-tensors", "awq-w2a16-g64", "node-agent-quantized/m-awq-w2a16-g64",
                "quantized", "c" * 40, None, (), 0.0, quantized={"scheme": "awq-w2a16", "group_size": 64,
                                                                  "quality": verdict})
    s = Settings(profile="rtx3090", model={"quantize": "auto"})
    primary = plan(detect("rtx3090"), resolve_model("deepseek-r1-distill-qwen-14b"), s).primary
    backend = FakeBackend("vllm")
    backend.plan = dataclasses.replace(primary, variant=describe_variant(pull))
    app = create_app(s, build_node(s, Router([backend], s.router, s.admission), "m", hostname="box"))

    async def node() -> dict:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return (await c.get("/v1/node")).json()

    body = asyncio.run(node())
    schema = json.loads((Path(__file__).resolve().parents[2] / "docs/schemas/node.schema.json").read_text())
    jsonschema.validate(body, schema)
    [cp] = [v["checkpoint"] for v in _walk(body) if isinstance(v, dict) and "checkpoint" in v]
    assert cp["made_here"] and cp["degraded"] is True and cp["variant"] == "awq-w2a16-g64"
    assert cp["quality"]["perplexity_increase"] == pytest.approx(3.0) and cp["quality"]["checked"]


def _walk(x):
    yield x
    for v in (x.values() if isinstance(x, dict) else x if isinstance(x, list) else ()):
        yield from _walk(v)


def test_a_cluster_never_quantizes_before_serving_and_says_how_to_serve_a_4bit_checkpoint(caplog):
    """Every host of a group loads the checkpoint model.ref names: a variant made on one host would
    keep the group waiting for a checkpoint it then does not serve."""
    from agent.quantize.auto import for_serve

    group = {"model": {"ref": "deepseek-r1-distill-qwen-14b", "quantize": "auto"},
             "cluster": {"nodes": 2, "head": "127.0.0.1:29501", "host_ip": "127.0.0.1"}}
    s = Settings.model_validate(group)
    local = object()  # what serve found on disk; a cluster leaves it as it is
    assert for_serve(local, None, s, detect("rtx3090"), vllm_cpu=False) == (local, None)
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "does not apply to a cluster" in warning
    assert "`node-agent quantize deepseek-r1-distill-qwen-14b --out DIR`" in warning
    # nor does `pull` (it quantizes what the plan says): the plan offers the variant as a hint only
    planned = plan(detect("rtx3090"), resolve_model("deepseek-r1-distill-qwen-14b"),
                   Settings.model_validate({**group, "profile": "rtx3090"}))
    assert planned.engine == "llamacpp"
    [said] = [r for r in planned.reasons if HINT.search(r)]
    assert "in a cluster" in said and "--out DIR, copy DIR to every host" in said
