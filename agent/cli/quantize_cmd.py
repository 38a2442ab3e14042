"""``node-agent quantize``: make a compressed-tensors checkpoint on this node (docs/models.md)."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from agent.cli import ConfigOpt, app, fail, load
from agent.errors import NodeAgentError, UsageError

SCHEMES = ("awq-w4a16", "gptq-w4a16", "fp8-dynamic")


@app.command()
def quantize(
    ref: Annotated[str, typer.Argument(help="An HF model directory (bf16), or a hub reference whose bf16 checkpoint was pulled.")],
    scheme: Annotated[Optional[str], typer.Option(help="awq-w4a16 (default), gptq-w4a16 or fp8-dynamic (quantize.scheme).")] = None,
    group_size: Annotated[Optional[int], typer.Option("--group-size", min=1, help="Columns per group; default: the largest of 128, 64, 32 dividing every layer.")] = None,
    bits: Annotated[int, typer.Option(min=2, max=8, help="Weight bits of the AWQ/GPTQ schemes (4; 8 keeps more quality).")] = 4,
    calibration: Annotated[Optional[str], typer.Option(help="'builtin' or a .jsonl/.txt file of calibration text (quantize.calibration).")] = None,
    samples: Annotated[Optional[int], typer.Option(min=4, help="Calibration samples (quantize.samples).")] = None,
    seq_len: Annotated[Optional[int], typer.Option("--seq-len", min=32, help="Longest calibration sample, tokens (quantize.seq_len).")] = None,
    seed: Annotated[Optional[int], typer.Option(min=0, help="Seed (quantize.seed): same seed, same checkpoint.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Write a standalone checkpoint directory here instead of registering it in the model cache.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="No bars: one JSON line per event.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Quantize a bf16 checkpoint with llm-compressor and register it as a local variant of its model.

    Checks RAM, GPU memory and disk before anything heavy starts; shows layers done and ETA; checks
    the result against the bf16 model on held-out text and flags a degraded one.
    """
    from agent.hardware import detect as detect_host
    from agent.quantize import job as qjob
    from agent.quantize.quality import describe
    from agent.quantize.runner import Progress

    overrides = {k: v for k, v in (("scheme", scheme), ("group_size", group_size), ("calibration", calibration),
                                   ("samples", samples), ("seq_len", seq_len), ("seed", seed)) if v is not None}
    settings = load(config, {"quantize": overrides} if overrides else None)
    out_console = Console(stderr=True) if as_json else Console()
    try:
        if scheme is not None and scheme not in SCHEMES:
            raise UsageError(f"--scheme {scheme}: choose {', '.join(SCHEMES)}")
        host = detect_host(settings.profile)
        src = qjob.find_source(ref, settings)
        prep = qjob.prepare(src, settings.quantize, host, settings, bits=bits,
                            out=out.expanduser().resolve() if out else None)
        if as_json:
            _emit({"event": "plan", "ref": src.ref, "source": str(src.hf_dir), "variant": prep.variant,
                   "group_size": prep.choice.group_size, "ignored": list(prep.choice.ignored),
                   "reasons": prep.reasons(), "estimate": {"seconds": round(prep.cost.seconds),
                                                           "ram_bytes": prep.cost.ram_bytes,
                                                           "gpu_bytes": prep.cost.gpu_bytes,
                                                           "output_bytes": prep.cost.output_bytes}})
        else:
            out_console.print(f"[bold]quantizing {escape(src.label)}[/] ({escape(str(src.hf_dir))}) to "
                              f"{escape(prep.variant)}", highlight=False)
            for line in prep.reasons():
                out_console.print(f"  - {escape(line)}", highlight=False)
        progress = Progress(src.label, src.spec.arch.num_layers, prep.cost.seconds)
        if as_json:
            result = qjob.execute(prep, settings, progress, say=lambda m: _emit({"event": "note", "message": m}),
                                  on_event=_emit)
        else:
            result = _with_bar(prep, settings, progress, out_console)
    except NodeAgentError as exc:
        fail(exc)
    q = result.quality
    if as_json:
        _emit({"event": "registered" if result.pull else "written", "path": str(result.path),
               "repo": result.pull.repo if result.pull else None, "variant": prep.variant, "quality": q,
               "reused": result.reused})
        return
    colour = "yellow" if q.get("degraded") else "green"
    took = "already made, nothing redone" if result.reused else f"in {result.worker.done.get('seconds', 0):.0f} s"
    out_console.print(f"[{colour}]{'quantized (degraded)' if q.get('degraded') else 'quantized'}[/] "
                      f"{escape(src.label)} → {escape(str(result.path))} {took}", highlight=False)
    out_console.print(f"  {escape(describe(q))}", highlight=False)
    how = f"node-agent serve --model {src.ref}" if result.pull else f"node-agent serve --model {result.path}"
    out_console.print(f"  serve it with: {escape(how)}" + (" (the plan picks it when bf16 does not fit)"
                                                             if result.pull else ""), highlight=False)


def _with_bar(prep, settings, progress, console: Console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bars, TextColumn, TimeRemainingColumn

    from agent.quantize import job as qjob

    bars = Bars(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("layers"),
                TextColumn("ETA {task.fields[eta]}"), console=console, transient=False)
    task = bars.add_task(f"{prep.source.label}: starting", total=prep.source.spec.arch.num_layers, eta="?")
    lock = threading.Lock()

    def on_event(event: dict) -> None:
        with lock:
            snap = progress.snapshot()
            eta = snap["eta_s"]
            bars.update(task, completed=snap["layers_done"], total=snap["layers_total"] or None,
                        description=f"{prep.source.label}: {snap['stage']}",
                        eta=f"{eta // 60:.0f} min {eta % 60:.0f} s" if eta is not None else "-")

    with bars:
        return qjob.execute(prep, settings, progress, say=lambda m: console.print(f"[dim]{escape(m)}[/]"),
                            on_event=on_event)


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()
