"""All settings: one pydantic-settings tree, one YAML file, ``NODE_AGENT_*`` environment.

Precedence (highest first): values passed by the CLI, ``NODE_AGENT_<SECTION>__<FIELD>``
environment variables, the YAML file, defaults. The file is read in exactly one place:
``load_settings``. Every field has a default, bounds and a description (``node-agent config
--schema`` prints them; docs/configuration.md lists them).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict
from pydantic_settings.sources.utils import parse_env_vars

from agent.errors import ConfigError
from agent.files import read_mapping

DEFAULT_CONFIG_PATH = Path("/etc/node-agent/config.yaml")
ENV_PREFIX = "NODE_AGENT_"
# A terminal backend has nothing behind it: it must run everywhere (CPU), so it ends the chain.
TERMINAL_BACKENDS = ("llamacpp",)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class ModelSettings(_Section):
    """Which model to serve."""

    ref: str = Field(
        "default",
        description="Card name from models/, an HF repo id (owner/name, optionally @revision), "
        "owner/name:file.gguf, an HF model directory, a config.json, a .gguf file, or 'default' for the "
        "embedded SmolLM2-135M-Instruct. Hub references are served from what `node-agent pull` fetched.",
        min_length=1,
    )
    gguf: str | None = Field(
        None, description="GGUF file for the llama.cpp fallback when 'ref' is not a GGUF itself."
    )
    pull: Literal["auto", "never"] = Field(
        "never",
        description="When model.ref names a hub model that is not on disk: 'auto' downloads it at start "
        "(progress in /health/ready and systemd's STATUS); 'never' refuses, naming the `node-agent pull` "
        "command and the size.",
    )
    cache_dir: str | None = Field(
        None, min_length=1,
        description="Hub cache (huggingface_hub's layout) that pulled models go to and are served from; "
        "unset: huggingface_hub's own ($HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub).",
    )
    quantize: Literal["auto", "never"] = Field(
        "never",
        description="When the best plan needs a quantization no checkpoint provides (no AWQ sibling): 'auto' "
        "makes `pull` and `serve` quantize the bf16 weights on this node after downloading them (progress in "
        "/health/ready); 'never' plans without it and says what `node-agent quantize` would cost.",
    )


class QuantizeSettings(_Section):
    """How `node-agent quantize` (and model.quantize: auto) quantizes on this node (docs/models.md)."""

    scheme: Literal["awq-w4a16", "gptq-w4a16", "fp8-dynamic"] = Field(
        "awq-w4a16", description="Weight scheme llm-compressor applies; all write compressed-tensors checkpoints.")
    group_size: int = Field(
        0, ge=0, le=4096, description="Columns per quantization group (one scale and zero each); 0 = the largest of "
        "128, 64, 32 that divides every quantized layer's columns.")
    calibration: str = Field(
        "builtin", min_length=1, description="Calibration text: 'builtin' (shipped, license-clean, mixed chat and "
        "prose) or a .jsonl ({\"text\"} or {\"messages\"} per line) or .txt file.")
    samples: int = Field(128, ge=4, le=4096, description="Calibration samples used (at most what the set holds).")
    seq_len: int = Field(512, ge=32, le=16384, description="Longest calibration sample in tokens (longer are cut).")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed for the sample order and held-out split: the same "
                      "seed, model and settings give the same checkpoint.")
    awq_grid: int = Field(20, ge=3, le=100, description="Scale candidates AWQ tries per layer group (llm-compressor's "
                          "n_grid, which divides by n_grid - 2: at least 3); fewer is faster and slightly worse.")
    max_perplexity_increase: float = Field(
        0.25, gt=0, le=100, description="Quality guard: a result whose held-out perplexity exceeds the bf16 model's by "
        "more than this share is flagged degraded (kept, shown in `models` and /v1/node).")
    python: str | None = Field(
        None, min_length=1, description="Python interpreter that has llmcompressor; unset: the agent's own when it "
        "has it, else a virtual environment the agent makes in env_dir on first use.")
    env_dir: str | None = Field(
        None, min_length=1, description="Where the agent makes the quantizer's environment (~1.5 GB with CPU torch); "
        "unset: $CACHE_DIRECTORY, else $XDG_CACHE_HOME/node-agent, else ~/.cache/node-agent, then quantizer/.")


class PlannerSettings(_Section):
    """How the planner sizes the engines (docs/memory-model.md explains each number)."""

    target_context: int = Field(8192, ge=256, le=1_048_576, description="Context length to aim for (tokens).")
    min_context: int = Field(2048, ge=128, le=1_048_576, description="Shortest context worth serving (tokens).")
    safety_margin_mib: int = Field(
        1024, ge=0, le=65536, description="VRAM left free on every GPU for fragmentation and other users (MiB)."
    )
    display_margin_mib: int = Field(
        1536, ge=0, le=65536, description="Extra VRAM left free on a GPU that drives a display (MiB)."
    )
    ram_margin_mib: int = Field(
        2048, ge=0, le=1_048_576, description="RAM left for the OS and the agent when llama.cpp runs on CPU (MiB)."
    )
    max_num_seqs: int = Field(256, ge=1, le=4096, description="Upper bound on concurrent sequences for vLLM.")
    max_num_batched_tokens: int = Field(
        0, ge=0, le=262_144,
        description="vLLM scheduler token budget per step; drives the activation peak. 0 = vLLM's own server "
        "default for the GPUs (8192 on >= 70 GiB GPUs other than A100, else 2048).",
    )
    fallback_reserve_mib: int = Field(
        0, ge=0, le=262_144,
        description="VRAM the llama.cpp fallback may use on each GPU while vLLM runs (MiB); 0 keeps it on CPU.",
    )
    vllm_version: str | None = Field(
        None, pattern=r"^v?\d+\.\d+(\.\d+)?([.+-]?[0-9A-Za-z.]*)?$",
        description="vLLM release whose memory rules the planner models (e.g. 0.11.0) for dry runs; unset: the "
        "installed one, else the newest modelled. Releases older than 0.11 are refused.",
    )
    use_measured: bool = Field(
        True, description="Plan vLLM with what earlier starts on this host measured (state_dir/measured.json) "
        "when the model, layout, GPU, vLLM version and context match.",
    )

    @model_validator(mode="after")
    def _context_order(self) -> PlannerSettings:
        if self.min_context > self.target_context:
            raise ValueError(f"min_context ({self.min_context}) exceeds target_context ({self.target_context})")
        return self


class EngineSettings(_Section):
    """The engines and the order they are tried in."""

    chain: list[Literal["vllm", "llamacpp"]] = Field(
        ["vllm", "llamacpp"], min_length=1,
        description="Backends in the order requests try them; the last one is the terminal fallback.",
    )

    @field_validator("chain")
    @classmethod
    def _valid_chain(cls, chain: list[str]) -> list[str]:
        if len(set(chain)) != len(chain):
            raise ValueError(f"each backend may appear once in the chain, got {chain}")
        if chain[-1] not in TERMINAL_BACKENDS:
            raise ValueError(f"the chain must end with a terminal backend ({', '.join(TERMINAL_BACKENDS)}), got {chain}")
        return chain
    vllm_cpu_kvcache_gib: int = Field(
        1, ge=1, le=1024, description="KV cache size for vLLM's CPU build (VLLM_CPU_KVCACHE_SPACE, GiB)."
    )


class RouterSettings(_Section):
    """Failover between the engines of the chain."""

    first_token_timeout_s: float = Field(
        60.0, gt=0, le=3600, description="A backend that gives no first token within this time fails the request over."
    )
    breaker_failures: int = Field(3, ge=1, le=100, description="Consecutive failures that open a backend's breaker.")
    breaker_cooldown_s: float = Field(
        10.0, gt=0, le=3600, description="Seconds an open breaker waits before one probe request (half-open)."
    )
    restart_backoff_s: float = Field(2.0, gt=0, le=600, description="First wait before restarting a dead backend.")
    restart_backoff_max_s: float = Field(
        120.0, gt=0, le=3600, description="Longest wait between restarts (the wait doubles after each failure)."
    )
    max_restart_attempts: int = Field(
        5, ge=1, le=10_000, description="Failed starts in a row (the first start included) after which a backend is "
        "given up (a start raising an unexpected error, a bug, counts as one); when every backend of the chain is "
        "given up the agent exits with status 3, so systemd restarts it.",
    )
    continue_streams: bool = Field(
        True, description="A stream whose backend dies continues on the next one with the text so far as prefix; "
        "off: the stream ends with an error event.",
    )


class AdmissionSettings(_Section):
    """KV-token admission in front of each backend."""

    max_queue: int = Field(64, ge=0, le=100_000, description="Requests that may wait for KV capacity; more get 429.")
    queue_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="Longest wait in the queue before a 429 with Retry-After."
    )
    overflow: bool = Field(
        False, description="When the primary's queue is full, send the request to the next backend instead of 429."
    )
    default_max_tokens: int = Field(
        512, ge=1, le=1_048_576, description="max_tokens assumed for chat requests that do not set it."
    )


class ServerSettings(_Section):
    """Where the OpenAI-compatible endpoint listens."""

    host: str = Field("127.0.0.1", min_length=1, description="Bind address; a non-loopback one needs api_key and "
                      "health.token, or insecure.")
    port: int = Field(8080, ge=1, le=65535, description="TCP port.")
    api_key: SecretStr | None = Field(
        None, min_length=16, description="Bearer token required on the inference API: every path except /health*, "
        "/v1/node and /metrics (keep it in an EnvironmentFile; never printed).")
    insecure: bool = Field(False, description="Allow a non-loopback bind without an API key and a health token.")
    log_prompts: bool = Field(False, description="Log prompt and completion text as JSON lines on agent.requests (off: only sizes, at DEBUG).")
    drain_timeout_s: float = Field(
        30.0, ge=0, le=3600, description="On SIGTERM, how long running requests may finish before the engines stop."
    )
    model_name: str | None = Field(
        None, min_length=1, description="Name served on /v1/models and accepted as 'model' (default: the model's name)."
    )
    max_request_bytes: int = Field(
        8 * 1024**2, ge=1024, le=1024**3,
        description="Largest request body accepted; a larger one is refused with 413 before it is read (bytes).",
    )
    openapi: bool = Field(False, description="Serve the OpenAPI schema at /openapi.json (off: 404).")


class HealthSettings(_Section):
    """What the gateway and systemd see: /health/*, /v1/node, /metrics."""

    token: SecretStr | None = Field(
        None, min_length=16, description="Bearer token required on /health*, /v1/node and /metrics (separate from "
        "server.api_key; unset: they are open, as a gateway's probes expect; never printed).",
    )
    open_health_check: bool = Field(
        True, description="GET /health answers without health.token: it says only 200 (an engine serves) or 503, as "
        "vLLM's own server does, and vLLM's router and most gateways send no credentials on health checks.",
    )
    node_id: str | None = Field(
        None, min_length=1, max_length=128,
        description="This node's id in /v1/node (default: derived from /etc/machine-id, else the hostname).",
    )
    gpu_poll_interval_s: float = Field(
        2.0, ge=0.1, le=600, description="How often NVML is read for /v1/node, /metrics and VRAM pressure.",
    )


class ClusterSettings(_Section):
    """One model across hosts: vLLM's multi-node executor, planned and supervised by the agents
    (docs/cluster.md). ``nodes: 1`` (the default) is a single host: nothing below applies."""

    nodes: int = Field(1, ge=1, le=64, description="Hosts in the vLLM group; 1: this host serves alone.")
    rank: int = Field(
        0, ge=0, le=63, description="This host's rank in the group: 0 is the head (serves the API and runs the "
        "llama.cpp fallback), 1 to nodes-1 are workers (run vLLM's headless engine for their rank).")
    head: str | None = Field(
        None, pattern=r"^[A-Za-z0-9.-]+:\d{1,5}$",
        description="The head's rendezvous address as host:port (vLLM's master_addr and master_port); the same "
        "on every host. Required when nodes > 1.")
    head_api_port: int = Field(
        8080, ge=1, le=65535, description="The head agent's HTTP port (its server.port) at the host of "
        "cluster.head: workers send their heartbeats there.")
    interface: str | None = Field(
        None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:@-]+$",
        description="Network interface for vLLM's traffic, exported as NCCL_SOCKET_IFNAME and GLOO_SOCKET_IFNAME; "
        "its IPv4 address becomes VLLM_HOST_IP unless host_ip is set.")
    host_ip: str | None = Field(
        None, min_length=1, description="This host's address for vLLM's traffic (VLLM_HOST_IP), unique in the "
        "group; unset: the interface's IPv4 address.")
    allow_public: bool = Field(
        False, description="Allow a public (non-private) address for vLLM's cluster traffic, which is "
        "unauthenticated and can execute code (docs/cluster.md). Off: the agent refuses to start.")
    heartbeat_interval_s: float = Field(
        0.5, ge=0.05, le=10, description="How often a worker agent reports to the head agent (and learns the "
        "head is alive).")
    heartbeat_timeout_s: float = Field(
        5.0, ge=0.2, le=120, description="A worker (at the head) or the head (at a worker) silent this long is "
        "lost: the head fails vLLM over to llama.cpp, a worker stops its engine and waits.")
    stall_timeout_s: float = Field(
        60.0, ge=1, le=3600, description="Requests running on the group with no token from it for this long "
        "mean the group is dead (vLLM's own RPC timeout is 300 s): vLLM is failed and the group restarted.")
    join_timeout_s: float = Field(
        600.0, ge=5, le=7200, description="How long the head waits, at a group start, for every worker agent to "
        "start its engine; the load itself is bounded by vLLM (VLLM_ENGINE_READY_TIMEOUT_S).")

    @property
    def enabled(self) -> bool:
        return self.nodes > 1

    @property
    def is_head(self) -> bool:
        return self.enabled and self.rank == 0

    @model_validator(mode="after")
    def _consistent(self) -> ClusterSettings:
        if self.rank >= self.nodes:
            raise ValueError(f"rank {self.rank} must be below nodes ({self.nodes}); the head is rank 0")
        if self.enabled and self.head is None:
            raise ValueError("a group of several nodes needs head: host:port of the head's rendezvous "
                             "(the same on every host)")
        if self.heartbeat_timeout_s <= 2 * self.heartbeat_interval_s:
            raise ValueError(f"heartbeat_timeout_s ({self.heartbeat_timeout_s}) must exceed two heartbeats "
                             f"({2 * self.heartbeat_interval_s} s)")
        return self


class Settings(BaseSettings):
    """The whole configuration."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    model: ModelSettings = Field(default_factory=ModelSettings, description="Model to serve.")
    planner: PlannerSettings = Field(default_factory=PlannerSettings, description="Planner knobs.")
    engines: EngineSettings = Field(default_factory=EngineSettings, description="Engines and fallback chain.")
    router: RouterSettings = Field(default_factory=RouterSettings, description="Failover and restarts.")
    admission: AdmissionSettings = Field(default_factory=AdmissionSettings, description="KV-token admission.")
    server: ServerSettings = Field(default_factory=ServerSettings, description="HTTP endpoint.")
    health: HealthSettings = Field(default_factory=HealthSettings, description="Health, node report and metrics.")
    quantize: QuantizeSettings = Field(default_factory=QuantizeSettings, description="Quantizing on this node.")
    cluster: ClusterSettings = Field(default_factory=ClusterSettings, description="A model across hosts.")
    profile: str | None = Field(
        None, description="Plan for a hardware profile (profiles/NAME.yaml) instead of this host."
    )
    state_dir: str | None = Field(
        None, min_length=1, description="Where the agent keeps what it learns (measured engine starts). Unset: "
        "$STATE_DIRECTORY (systemd's StateDirectory, /var/lib/node-agent for the service), else "
        "$XDG_STATE_HOME/node-agent, else ~/.local/state/node-agent.",
    )


class _EnvSource(EnvSettingsSource):
    """pydantic-settings' environment source, reading a given mapping instead of os.environ."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._mapping = env
        super().__init__(Settings)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(self._mapping, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str)


def config_path(cli_path: Path | None, env: Mapping[str, str]) -> tuple[Path, bool]:
    """The file to read and whether it was asked for explicitly (then it must exist)."""
    if cli_path is not None:
        return cli_path, True
    if env.get(f"{ENV_PREFIX}CONFIG"):
        return Path(env[f"{ENV_PREFIX}CONFIG"]), True
    user = user_config_path(env)
    if user is not None and user.is_file():
        return user, False
    return DEFAULT_CONFIG_PATH, False


def user_config_path(env: Mapping[str, str]) -> Path | None:
    """Where ``install.sh --user`` writes the settings: $XDG_CONFIG_HOME (or ~/.config)/node-agent."""
    base = env.get("XDG_CONFIG_HOME") or (f"{env['HOME']}/.config" if env.get("HOME") else None)
    return Path(base) / "node-agent" / "config.yaml" if base else None


def _read_yaml(path: Path, required: bool) -> dict[str, Any]:
    if not path.exists():
        if required:
            raise ConfigError(f"config file {path} does not exist; create it or drop --config/NODE_AGENT_CONFIG")
        return {}
    return read_mapping(path, "config file", ConfigError, empty_ok=True)


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _in_file(data: Mapping[str, Any], loc: tuple[Any, ...]) -> bool:
    node: Any = data
    for part in loc:
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def _origin(loc: tuple[Any, ...], layers: list[tuple[str, Mapping[str, Any]]]) -> str:
    """Where a bad value came from: the highest layer that holds it."""
    return next((name for name, data in layers if _in_file(data, loc)), "defaults")


def is_secret(loc: tuple[Any, ...]) -> bool:
    """Whether the setting at ``loc`` (e.g. ("server", "api_key")) holds a secret."""
    model: Any = Settings
    for part in loc:
        info = getattr(model, "model_fields", {}).get(part)
        if info is None:
            return False
        model = info.annotation
    return "SecretStr" in str(model)


def _describe(exc: ValidationError, layers: list[tuple[str, Mapping[str, Any]]]) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        field = ".".join(str(p) for p in loc)
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; docs/configuration.md lists the keys)"
        elif is_secret(loc[:2]):  # never echo a secret, not even a wrong one
            msg = err["msg"].replace(" items", " characters") + " (value not shown)"
        else:
            value = err.get("input")
            got = "" if isinstance(value, (dict, list)) or value is None else f" (got {value!r})"
            msg = err["msg"] + got
        lines.append(f"{field}: {msg} [{_origin(loc, layers)}]")
    return "invalid configuration: " + "; ".join(lines)


def _unknown_env(env: Mapping[str, str]) -> list[str]:
    known = {f"{ENV_PREFIX}CONFIG"} | {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
    return sorted(k for k in env if k.upper().startswith(ENV_PREFIX)
                  and k.upper().split("__")[0] not in known)


def load_settings(
    cli_path: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """The one place the config file is read. Raises ConfigError (exit 2) on any bad value."""
    env = os.environ if env is None else env
    path, required = config_path(cli_path, env)
    file_data = _read_yaml(path, required)
    unknown = _unknown_env(env)
    if unknown:
        raise ConfigError(f"unknown environment variable(s) {', '.join(unknown)}; "
                          f"settings use {ENV_PREFIX}<SECTION>__<FIELD>, e.g. {ENV_PREFIX}SERVER__PORT")
    env_data = _EnvSource(env)()
    layers = [("from the command line", overrides or {}),
              (f"from the {ENV_PREFIX}* environment", env_data),
              (f"in {path}", file_data)]
    merged: dict[str, Any] = {}
    for _, data in reversed(layers):
        merged = _merge(merged, data)
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, layers)) from exc
