"""The ``node-agent`` command: thin wrappers that load settings, call the agent, print."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from agent import __version__
from agent.errors import NodeAgentError, UsageError

app = typer.Typer(
    name="node-agent",
    help="Self-hosted inference node agent: detect GPUs, plan, serve vLLM with a llama.cpp fallback.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"node-agent {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
) -> None:
    """node-agent."""


def fail(exc: NodeAgentError) -> None:
    """Print an agent error as one line on stderr and exit with its code (2 = bad input)."""
    Console(stderr=True).print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    raise typer.Exit(exc.exit_code)


QUANTIZATION_CHOICES = ("none", "fp8", "compressed-tensors", "mxfp4", "awq", "gptq")
ProfileOpt = Annotated[Optional[str], typer.Option(
    "--profile", help="A shipped profile name (see profiles/) or a path to a profile YAML, instead of this host.")]
ProfilesOpt = Annotated[Optional[list[str]], typer.Option(
    "--profile", help="A shipped profile name (see profiles/) or a path to a profile YAML, instead of this host. "
    "Repeat it to plan one model across hosts, the head first (docs/cluster.md).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print stable JSON (docs/detect.md) instead of tables.")]


ConfigOpt = Annotated[Optional[Path], typer.Option(
    "--config", help="Settings file (default: $NODE_AGENT_CONFIG, else ~/.config/node-agent/config.yaml if it exists, else /etc/node-agent/config.yaml).")]


def load(config: Path | None, overrides: dict | None = None):
    """Settings for a command; a bad file or variable ends the command with exit 2."""
    from agent.settings import load_settings

    try:
        return load_settings(config, overrides)
    except NodeAgentError as exc:
        fail(exc)


@app.command()
def detect(profile: ProfileOpt = None, as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """Show the GPUs and host the agent sees (NVML + psutil, or a profile)."""
    from agent.cli.detect_view import render_host
    from agent.hardware import detect as detect_host
    from agent.hardware.report import host_to_dict

    settings = load(config, {"profile": profile} if profile else None)
    try:
        host = detect_host(settings.profile)
    except NodeAgentError as exc:
        fail(exc)
    if as_json:
        sys.stdout.write(json.dumps(host_to_dict(host), indent=2) + "\n")
    else:
        render_host(host, Console())


@app.command()
def plan(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Card name, HF repo id (owner/name[@rev]), owner/name:file.gguf, HF model dir, config.json or .gguf (default: model.ref from settings).")] = None,
    profile: ProfilesOpt = None,
    engine: Annotated[str, typer.Option(help="auto, vllm or llamacpp.")] = "auto",
    tp: Annotated[Optional[int], typer.Option("--tp", min=1, help="Pin the tensor parallel size.")] = None,
    pp: Annotated[Optional[int], typer.Option("--pp", min=1, help="Pin the pipeline parallel size.")] = None,
    quantization: Annotated[Optional[str], typer.Option(help="none, fp8, compressed-tensors, mxfp4, awq, gptq or gguf:<TYPE>.")] = None,
    kv_cache_dtype: Annotated[Optional[str], typer.Option(help="auto or fp8.")] = None,
    gpu_memory_utilization: Annotated[Optional[float], typer.Option(min=0.05, max=0.99, help="Pin vLLM's fraction.")] = None,
    max_model_len: Annotated[Optional[int], typer.Option(min=128, help="Pin the context length.")] = None,
    max_num_seqs: Annotated[Optional[int], typer.Option(min=1, help="Pin vLLM's concurrent sequences.")] = None,
    vllm_version: Annotated[Optional[str], typer.Option("--vllm-version", help="Plan for this vLLM release (default: the installed one; planner.vllm_version).")] = None,
    as_json: JsonOpt = False,
    emit_config: Annotated[bool, typer.Option("--emit-config", help="Print a settings file (YAML) that serves this model as planned, the plan as comments.")] = False,
    offline: Annotated[bool, typer.Option("--offline", help="Plan a hub model from its card alone: nothing is fetched (also when HF_HUB_OFFLINE is set).")] = False,
    config: ConfigOpt = None,
) -> None:
    """Plan how to serve a model on this host (or a profile): engine, parallelism, memory, with reasons.

    A model on the hub (a card, owner/name, owner/name:file.gguf) is planned from its metadata
    (config, file list and sizes; never its weights), and the plan says what `pull` would fetch.
    Two or more --profile plan one model across those hosts (the first is the head): TP inside a
    host, PP across hosts with the layers split by each host's memory, the head's llama.cpp fallback.

    Exit 0 when it fits, 1 when it does not (the refusal says what would make it fit), 2 on bad input.
    """
    from agent.catalog.resolve import resolve_model
    from agent.cli.plan_view import config_for_plan, render_plan
    from agent.cli.pull_view import download_preview, render_download
    from agent.learned_store import plan_inputs
    from agent.hardware import detect as detect_host
    from agent.hub.refs import parse_ref
    from agent.planner import Pins
    from agent.planner import plan as make_plan
    from agent.planner.report import plan_to_dict

    profiles = profile or []
    if len(profiles) > 1:
        _plan_cluster(profiles, model, engine, tp, pp, quantization, kv_cache_dtype, max_model_len, max_num_seqs,
                      vllm_version, as_json, emit_config, config)
        return
    overrides: dict = {"profile": profiles[0]} if profiles else {}
    if vllm_version:
        overrides["planner"] = {"vllm_version": vllm_version}
    settings = load(config, overrides or None)
    if quantization is not None and quantization not in QUANTIZATION_CHOICES and not quantization.startswith("gguf:"):
        fail(UsageError(f"--quantization {quantization}: choose {', '.join(QUANTIZATION_CHOICES)} or gguf:<TYPE> "
                        f"(e.g. gguf:Q4_K_M)"))
    if kv_cache_dtype not in (None, "auto", "fp8"):
        fail(UsageError(f"--kv-cache-dtype {kv_cache_dtype}: choose auto or fp8"))
    pins = Pins(engine=engine, tp=tp, pp=pp, quantization=quantization, kv_cache_dtype=kv_cache_dtype,
                gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len, max_num_seqs=max_num_seqs)
    ref_text = model or settings.model.ref
    preview = None
    try:
        host = detect_host(settings.profile)
        ref = parse_ref(ref_text)
        if ref is None:
            result = make_plan(host, local_variants(resolve_model(ref_text), settings), settings, pins,
                               **plan_inputs(settings, profile=bool(settings.profile)))
        else:
            result, preview = download_preview(ref, settings, host, pins, offline)
    except NodeAgentError as exc:
        fail(exc)
    if emit_config:
        sys.stdout.write(config_for_plan(result, host, ref_text))
    elif as_json:
        body = plan_to_dict(result)
        if preview is not None:
            body["download"] = preview.to_dict()
        sys.stdout.write(json.dumps(body, indent=2) + "\n")
    else:
        render_plan(result, host, Console())
        if preview is not None:
            render_download(preview, Console())
    raise typer.Exit(0 if result.fits else 1)


def local_variants(spec, settings):
    """An HF directory's spec with the variants `node-agent quantize` made from it (on disk)."""
    from pathlib import Path

    from agent.hub.local import hub_for
    from agent.hub.store import Store
    from agent.quantize.register import with_variants

    if spec.origin != "hf-config" or not spec.local_path:
        return spec
    key = str(Path(spec.local_path).resolve())
    return with_variants(spec, Store(hub_for(settings)), lambda p: p.ref == key)


def _plan_cluster(profiles: list[str], model: str | None, engine: str, tp, pp, quantization, kv_cache_dtype,
                  max_model_len, max_num_seqs, vllm_version, as_json: bool, emit_config: bool, config) -> None:
    """``plan --profile A --profile B ...``: one model across those hosts (agent/planner/cluster.py)."""
    from agent.backends.vllm_measured import installed_vllm_version
    from agent.catalog.resolve import resolve_model
    from agent.cli.plan_view import render_cluster_plan
    from agent.hardware import detect as detect_host
    from agent.planner import Pins
    from agent.planner.cluster import plan_cluster
    from agent.planner.report import cluster_plan_to_dict

    settings = load(config, {"planner": {"vllm_version": vllm_version}} if vllm_version else None)
    if emit_config:
        fail(UsageError("--emit-config writes one host's settings; for a group set cluster.* on every host "
                        "(docs/cluster.md)"))
    if quantization is not None and quantization not in QUANTIZATION_CHOICES:
        fail(UsageError(f"--quantization {quantization}: a group runs vLLM; choose {', '.join(QUANTIZATION_CHOICES)}"))
    pins = Pins(engine=engine, tp=tp, pp=pp, quantization=quantization, kv_cache_dtype=kv_cache_dtype,
                max_model_len=max_model_len, max_num_seqs=max_num_seqs)
    ref_text = model or settings.model.ref
    try:
        spec = resolve_model(ref_text)  # a card, a repo a card names, or local files: nothing is fetched
        hosts = [detect_host(p) for p in profiles]
        result = plan_cluster(hosts, spec, settings, pins, vllm_cpu=not any(h.gpus for h in hosts),
                              vllm_version=installed_vllm_version())
    except NodeAgentError as exc:
        fail(exc)
    if as_json:
        sys.stdout.write(json.dumps(cluster_plan_to_dict(result), indent=2) + "\n")
    else:
        render_cluster_plan(result, Console())
    raise typer.Exit(0 if result.fits else 1)


@app.command()
def serve(
    config: ConfigOpt = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Overrides model.ref: a card, an HF repo id, owner/name:file.gguf, an HF model directory (vLLM), a .gguf, or 'default'.")] = None,
    pull_mode: Annotated[Optional[str], typer.Option("--pull", help="Overrides model.pull: auto (download a hub model that is missing) or never.")] = None,
    gguf: Annotated[Optional[str], typer.Option(help="Overrides model.gguf: the GGUF for the llama.cpp fallback.")] = None,
    host: Annotated[Optional[str], typer.Option(help="Overrides server.host (default 127.0.0.1).")] = None,
    port: Annotated[Optional[int], typer.Option(min=1, max=65535, help="Overrides server.port (default 8080).")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Allow a non-loopback bind without an API key.")] = False,
) -> None:
    """Serve the model on one OpenAI-compatible endpoint, vLLM first and llama.cpp behind it."""
    import logging

    from agent.hardware import detect as detect_host
    from agent.serving.run import serve as run_server

    overrides: dict = {}
    if model:
        overrides.setdefault("model", {})["ref"] = model
    if gguf:
        overrides.setdefault("model", {})["gguf"] = gguf
    if pull_mode:
        overrides.setdefault("model", {})["pull"] = pull_mode
    for key, value in (("host", host), ("port", port), ("insecure", insecure or None)):
        if value is not None:
            overrides.setdefault("server", {})[key] = value
    settings = load(config, overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        code = run_server(settings, detect_host(settings.profile))
    except NodeAgentError as exc:
        fail(exc)
    raise typer.Exit(code)


@app.command("gateway-config")
def gateway_config(
    litellm: Annotated[bool, typer.Option("--litellm", help="A LiteLLM model_list entry for this node.")] = False,
    vllm_router: Annotated[bool, typer.Option("--vllm-router", help="This node's URL for vllm-router's --worker-urls, with the flags that fit it.")] = False,
    url: Annotated[Optional[str], typer.Option("--url", help="Base URL the gateway reaches this node at (default: http://<server.host>:<server.port>; a wildcard bind: this host's name).")] = None,
    profile: ProfileOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Print the config block a gateway needs for this node, as it is planned (docs/gateway.md)."""
    from agent.cli import gateway_view as render
    from agent.hardware import detect as detect_host
    from agent.serving.node import default_node_id
    from agent.serving.run import assemble

    if litellm == vllm_router:
        fail(UsageError("choose one gateway: --litellm or --vllm-router"))
    settings = load(config, {"profile": profile} if profile else None)
    try:
        host = detect_host(settings.profile)
        parts = assemble(settings, host)
    except NodeAgentError as exc:
        fail(exc)
    node = render.NodeView(
        node_id=settings.health.node_id or default_node_id(), hostname=host.hostname, model_name=parts.model_name,
        url=(url or render.node_url(settings.server.host, settings.server.port)).rstrip("/"),
        chain=tuple(b.name for b in parts.backends),
        max_context=max(b.capacity().max_context for b in parts.backends),
        has_api_key=settings.server.api_key is not None, health_check_needs_token=settings.health.token is not None and not settings.health.open_health_check,
        answer_bound_s=settings.admission.queue_timeout_s + settings.router.first_token_timeout_s)
    err = Console(stderr=True)
    for note in parts.notes:
        err.print(f"note: {escape(note)}", highlight=False, soft_wrap=True)
    if vllm_router and node.health_check_needs_token:
        err.print("[yellow]warning:[/] health.open_health_check is off and health.token is set; vllm-router's health "
                  "checks send no credentials and would keep this node out (see the output)", highlight=False,
                  soft_wrap=True)
    sys.stdout.write(render.litellm(node) if litellm else render.vllm_router(node))


@app.command("config")
def show_config(
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    reference: Annotated[bool, typer.Option("--reference", help="Print every setting as Markdown (docs/configuration.md).")] = False,
) -> None:
    """Validate the settings (file + NODE_AGENT_* environment) and print the effective values."""
    import yaml

    if reference:
        from agent.cli.config_doc import reference as markdown

        sys.stdout.write(markdown())
        return
    settings = load(config)
    data = settings.model_dump(mode="json")  # secrets (SecretStr) dump as "**********"
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    else:
        sys.stdout.write(yaml.safe_dump(data, sort_keys=False))


def run() -> None:
    """Console-script entry point."""
    app()


from agent.cli import hub_cmds, quantize_cmd  # noqa: E402,F401  (register pull, models, rm, quantize on ``app``)
