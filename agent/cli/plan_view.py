"""How ``node-agent plan`` shows a plan to people."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from agent.hardware.types import GIB, HostInfo
from agent.planner.types import LlamaCppPlan, NodePlan, VllmPlan


def _gib(n: int) -> str:
    return f"{n / GIB:.1f}"


def _settings_table(p: VllmPlan | LlamaCppPlan) -> Table:
    t = Table(show_header=False, box=None, padding=(0, 2))
    if isinstance(p, VllmPlan):
        rows = [("tensor_parallel_size", p.tensor_parallel_size), ("pipeline_parallel_size", p.pipeline_parallel_size),
                ("VLLM_PP_LAYER_PARTITION", ",".join(map(str, p.pp_layer_partition)) if p.pp_layer_partition else "-"),
                ("quantization", p.quantization), ("kv_cache_dtype", p.kv_cache_dtype),
                ("gpu_memory_utilization", f"{p.gpu_memory_utilization:.2f}"), ("max_model_len", p.max_model_len),
                ("max_num_seqs", p.max_num_seqs), ("max_num_batched_tokens", p.max_num_batched_tokens),
                ("KV cache", f"{p.kv_cache_tokens:,} tokens ({p.max_concurrency:.1f} x {p.max_model_len})"),
                ("devices", ",".join(map(str, p.devices)))]
    else:
        rows = [("gguf", f"{p.gguf_repo or ''} {p.gguf_file or ''}".strip()), ("quant", p.quant_type),
                ("n_gpu_layers", p.n_gpu_layers), ("tensor_split", p.tensor_split or "-"), ("n_ctx", p.n_ctx),
                ("n_threads", p.n_threads), ("flash_attn", p.flash_attn), ("type_k / type_v", f"{p.type_k}/{p.type_v}"),
                ("host RAM", f"{_gib(p.ram_bytes)} GiB")]
    for k, v in rows:
        t.add_row(k, escape(str(v)))
    return t


def _why(console: Console, reasons, refusals) -> None:
    console.print("[bold]why[/]")
    for line in reasons:
        console.print(f"  - {escape(line)}", highlight=False)
    if refusals:
        console.print("[bold]refused[/]")
        for line in refusals:
            console.print(f"  - {escape(line)}", highlight=False)


def render_plan(plan: NodePlan, host: HostInfo, console: Console) -> None:
    """The decision, the per-GPU memory, the reasons and what was refused."""
    p = plan.primary
    verdict = "[green]fits[/]" if plan.fits else "[red]does not fit[/]"
    console.print(f"[bold]{escape(plan.model)}[/] on [bold]{escape(host.hostname)}[/] "
                  f"({len(host.gpus)} GPU(s)): {plan.engine} — {verdict}")
    if p.refusal:
        console.print(f"[red]refused:[/] {escape(p.refusal)}", highlight=False)
    if plan.fits:
        console.print(_settings_table(p))
    if p.per_gpu:
        t = Table(title="memory per GPU (GiB)")
        for col in ("GPU", "total", "free", "usable", "weights", "KV", "activation", "overhead", "layers"):
            t.add_column(col)
        for g in p.per_gpu:
            t.add_row(f"{g.index} {escape(g.name.removeprefix('NVIDIA '))}", _gib(g.total_bytes), _gib(g.free_bytes),
                      _gib(g.usable_bytes), _gib(g.weights_bytes), _gib(g.kv_bytes), _gib(g.activation_bytes),
                      _gib(g.overhead_bytes), str(g.layers))
        console.print(t)
    _why(console, (*plan.reasons, *p.reasons), plan.refusals)
    if plan.fallback is not None:
        f = plan.fallback
        state = (f"{f.quant_type} GGUF, n_gpu_layers {f.n_gpu_layers}, n_ctx {f.n_ctx}, {_gib(f.ram_bytes)} GiB RAM"
                 if f.fits else escape(f.refusal or "does not fit"))
        console.print(f"[bold]fallback[/] llama.cpp: {state}", highlight=False)


def render_cluster_plan(plan, console: Console) -> None:
    """A plan across hosts: the group's layout, each member's share of layers and memory, the reasons,
    what was refused and the head's fallback."""
    v = plan.vllm
    verdict = "[green]fits[/]" if plan.fits else "[red]does not fit[/]"
    hosts = len(plan.members) or "several"
    console.print(f"[bold]{escape(plan.model)}[/] across {hosts} hosts: vLLM multi-node — {verdict}")
    if plan.refusal:
        console.print(f"[red]refused:[/] {escape(plan.refusal)}", highlight=False)
    if plan.fits:
        console.print(_settings_table(v))
        t = Table(title="members (the head is rank 0)")
        for col in ("rank", "host", "GPU", "layers", "usable", "weights", "KV"):
            t.add_column(col)
        for m in plan.members:
            host = f"{escape(m.hostname)} ({m.layers} layers)"
            if not m.gpus:
                t.add_row(str(m.rank), host, "CPU", str(m.layers), "-", "-", "-")
            for i, g in enumerate(m.gpus):
                name = g.name.removeprefix("NVIDIA ").removeprefix("GeForce ")
                t.add_row(str(m.rank) if i == 0 else "", host if i == 0 else "", f"{g.index} {escape(name)}",
                          str(g.layers), _gib(g.usable_bytes), _gib(g.weights_bytes), _gib(g.kv_bytes))
        console.print(t)
        console.print(f"every host exports VLLM_PP_LAYER_PARTITION={','.join(map(str, plan.partition))}")
    _why(console, (*plan.reasons, *v.reasons), plan.refusals)
    f = plan.fallback
    if f is not None:
        state = (f"{f.quant_type} GGUF {f.gguf_file}, n_gpu_layers {f.n_gpu_layers}, n_ctx {f.n_ctx}, "
                 f"{_gib(f.ram_bytes)} GiB RAM" if f.fits else escape(f.refusal or "does not fit"))
        console.print(f"[bold]fallback on the head[/] llama.cpp: {escape(state)}", highlight=False)


def config_for_plan(result: NodePlan, host: HostInfo, model_ref: str) -> str:
    """A settings file (YAML) that serves ``model_ref`` as planned, with the plan as comments.

    Only settings that differ from the defaults are written; the plan itself is re-made at every
    start, so a changed host (a GPU added, memory taken) is planned afresh.
    """
    import yaml

    p = result.primary
    lines = [
        "# node-agent settings, written from `node-agent plan` for this host (install.sh).",
        "# Every setting and its default: docs/configuration.md, or `node-agent config --reference`.",
        "# Secrets (server.api_key, health.token) belong in the EnvironmentFile, not here.",
        "#",
        f"# Plan for {result.model} on {host.hostname} ({host.source}):",
    ]
    if isinstance(p, VllmPlan):
        lines.append(f"#   vLLM: TP={p.tensor_parallel_size} PP={p.pipeline_parallel_size} "
                     f"quantization={p.quantization} kv_cache_dtype={p.kv_cache_dtype} "
                     f"gpu_memory_utilization={p.gpu_memory_utilization:.2f} max_model_len={p.max_model_len} "
                     f"max_num_seqs={p.max_num_seqs}, llama.cpp behind it")
    else:
        lines.append(f"#   llama.cpp: {p.quant_type or 'GGUF'} n_gpu_layers={p.n_gpu_layers} n_ctx={p.n_ctx} "
                     f"threads={p.n_threads} instances={p.instances}")
    if not result.fits:
        lines.append(f"#   DOES NOT FIT: {p.refusal}")
    lines += [f"#   - {r}" for r in (*result.reasons, *p.reasons)]
    body = {"model": {"ref": model_ref}}
    if result.engine == "llamacpp":
        body["engines"] = {"chain": ["llamacpp"]}
    return "\n".join(lines) + "\n" + yaml.safe_dump(body, sort_keys=False)
