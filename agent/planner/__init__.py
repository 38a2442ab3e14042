"""The planner: pure functions of (host, model, settings, pins) → NodePlan. No I/O, no clock."""

from __future__ import annotations

from dataclasses import replace

from agent.catalog.types import ModelSpec
from agent.errors import PlanError
from agent.hardware.types import HostInfo
from collections.abc import Mapping

from agent.planner import quantize_option
from agent.planner.learned import Measured
from agent.planner.llamacpp import plan_llamacpp
from agent.planner.types import LlamaCppPlan, NodePlan, Pins, VllmPlan
from agent.planner.versions import NEWEST_READ, rules_for
from agent.planner.vllm import QuantizationUnavailable, plan_vllm
from agent.planner.vllm_cpu import plan_vllm_cpu
from agent.settings import Settings

__all__ = ["LlamaCppPlan", "NodePlan", "Pins", "VllmPlan", "plan"]


def plan(host: HostInfo, model: ModelSpec, settings: Settings, pins: Pins = Pins(),
         vllm_cpu: bool = False, vllm_version: str | None = None,
         measured: Mapping[str, Measured] | None = None) -> NodePlan:
    """Choose the primary engine and its plan, and the llama.cpp fallback behind it.

    auto: vLLM when a vLLM plan fits on the GPUs (and vLLM is in the chain), else llama.cpp
    alone with all usable VRAM. A pinned engine is planned even when it does not fit: the
    refusal says why and what would make it fit. ``vllm_cpu``: the caller found vLLM's CPU build
    installed, so a GPU-less host can run vLLM too (small models; CI). ``vllm_version``: the
    installed release (planner.vllm_version overrides it; neither: the newest release modelled).
    ``measured``: what earlier starts on this host measured (agent/learned_store.py), by key.
    """
    s = settings.planner
    chain = settings.engines.chain
    if pins.engine not in ("auto", "vllm", "llamacpp"):
        raise PlanError(f"--engine {pins.engine}: choose auto, vllm or llamacpp")
    gguf_pinned = bool(pins.quantization and pins.quantization.startswith("gguf:"))
    if gguf_pinned and pins.engine == "vllm":
        raise PlanError("--quantization gguf:* is a llama.cpp format; use --engine llamacpp or auto")
    want_vllm = pins.engine == "vllm" or (pins.engine == "auto" and "vllm" in chain and not gguf_pinned)
    reasons: list[str] = []
    refusals: list[str] = []
    version = s.vllm_version or vllm_version
    rules = rules_for(version or NEWEST_READ) if want_vllm else None
    if want_vllm and not version:
        reasons.append(f"vLLM version unknown (not installed, planner.vllm_version unset): planned with the rules of "
                       f"{rules.label}, the newest release modelled")
    if want_vllm and not host.gpus and vllm_cpu:
        cpu = plan_vllm_cpu(host, model, s, settings.engines.vllm_cpu_kvcache_gib, pins, rules.label, measured)
        made = None if cpu.fits else _quantized_here(host, model, settings, pins, rules, measured, vllm_cpu, reasons)[0]
        if made is not None:
            cpu = made
        if cpu.fits or pins.engine == "vllm":
            fallback = plan_llamacpp(host, model, s, Pins(), role="fallback") if "llamacpp" in chain else None
            return NodePlan(model.name, "vllm", cpu, fallback, (),
                            (*reasons, "no GPU, but vLLM's CPU build is installed: it serves, llama.cpp stands "
                                       "behind it"))
        refusals = [cpu.refusal]
        reasons.append("vLLM's CPU build cannot serve it here, so llama.cpp serves alone: " + cpu.refusal)
    elif want_vllm:
        try:
            chosen, alternatives, _, refusals = plan_vllm(host, model, s, pins, reserve_fallback="llamacpp" in chain,
                                                          rules=rules, measured=measured)
        except QuantizationUnavailable as exc:
            # A pinned 4-bit method nobody published: the variant the agent would make is the answer
            # (model.quantize: auto), or the refusal says how to make it.
            if pins.quantization not in ("awq", "compressed-tensors"):
                raise
            chosen, said = _quantized_here(host, model, settings, pins, rules, measured, vllm_cpu, reasons)
            if chosen is None:
                raise PlanError("; ".join([str(exc), *([said] if said else [])])) from None
            alternatives, refusals = [], []
        if chosen is None:
            chosen = _quantized_here(host, model, settings, pins, rules, measured, vllm_cpu, reasons)[0]
        if chosen is not None:
            fallback = plan_llamacpp(host, model, s, Pins(), role="fallback") if "llamacpp" in chain else None
            return NodePlan(model.name, "vllm", chosen, fallback, tuple(alternatives),
                            (*reasons, "vLLM fits on the GPUs: it serves, llama.cpp stands behind it"), tuple(refusals))
        if pins.engine == "vllm":
            why = "; ".join(refusals) or "no layout fits"
            return NodePlan(model.name, "vllm", _vllm_refusal(model, host, refusals), None, (), (why, *reasons),
                            tuple(refusals))
        reasons.append("vLLM cannot serve it here, so llama.cpp serves alone: " + "; ".join(refusals[-2:]))
    elif pins.engine == "auto" and "vllm" not in chain:
        reasons.append("vLLM is not in engines.chain: llama.cpp serves alone")
    primary = plan_llamacpp(host, model, s, pins, role="primary")
    return NodePlan(model.name, "llamacpp", primary, None, (), tuple(reasons), tuple(refusals))


def _quantized_here(host: HostInfo, model: ModelSpec, settings: Settings, pins: Pins, rules, measured,
                    vllm_cpu: bool, reasons: list[str]) -> tuple[VllmPlan | None, str | None]:
    """When no published checkpoint fits: would one the agent quantizes here fit? Returns (the
    plan when ``model.quantize`` is auto and it fits, the line said about it): the hint "no AWQ
    checkpoint: `node-agent quantize` can make one", or why this host cannot; also in ``reasons``."""
    if pins.quantization not in (None, "awq", "compressed-tensors"):
        return None, None
    found = quantize_option.candidate(model, settings)
    if found is None:
        return None, None
    hyp, choice = found
    made = hyp.sources[-1]
    s = settings.planner
    if host.gpus:
        chosen, _, _, _ = plan_vllm(host, hyp, s, replace(pins, quantization="compressed-tensors"),
                                    reserve_fallback="llamacpp" in settings.engines.chain, rules=rules,
                                    measured=measured)
    elif vllm_cpu:
        chosen = plan_vllm_cpu(host, hyp, s, settings.engines.vllm_cpu_kvcache_gib, pins, rules.label, measured,
                               source=made)
    else:
        return None, None
    if chosen is None or not chosen.fits:
        return None, None
    c = quantize_option.cost(model, choice, settings, host)
    blocked = quantize_option.why_not_here(c, host, settings)
    # A group loads the checkpoint model.ref names on every host: auto does not apply there.
    auto = settings.model.quantize == "auto" and not settings.cluster.enabled
    said = (f"no {choice.method.upper()} checkpoint, and this host cannot make one: {blocked}" if blocked
            else quantize_option.hint(choice, c, auto, cluster=settings.cluster.enabled))
    reasons.append(said)
    if blocked or not auto:
        return None, said
    return replace(chosen, quantize=choice.label,
                   reasons=(*chosen.reasons, f"weights: {choice.label} quantized on this node from the bf16 "
                                             f"checkpoint (model.quantize: auto), ~{c.minutes} min")), said


def _vllm_refusal(model: ModelSpec, host: HostInfo, refusals: list[str]) -> VllmPlan:
    hint = ("try --quantization awq (with an AWQ checkpoint), a shorter --max-model-len, more or bigger GPUs, "
            "or --engine llamacpp with a GGUF for partial offload")
    return VllmPlan(
        fits=False, tensor_parallel_size=0, pipeline_parallel_size=0, pp_layer_partition=None, quantization="none",
        dtype=model.arch.dtype, kv_cache_dtype="auto", gpu_memory_utilization=0.0, max_model_len=0, max_num_seqs=0,
        max_num_batched_tokens=0, kv_cache_tokens=0, kv_bytes_per_token=0, weights_bytes=0, devices=(),
        disable_p2p=False, per_gpu=(), reasons=tuple(refusals),
        refusal=f"vLLM cannot serve {model.name} on this host: {'; '.join(refusals) or 'no GPU'}; {hint}")
