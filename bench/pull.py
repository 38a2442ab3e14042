"""Pull rate: `node-agent pull`'s transfer against plain `huggingface_hub.snapshot_download`.

    .venv/bin/python -m bench.pull [--rounds 3]

Serves SmolLM2-135M-Instruct as an HF checkpoint (the bf16 directory the tests build, ~270 MB)
from the loopback hub (tests/support/hub.py) in its own process, then downloads the same repo
``--rounds`` times each way into fresh cache directories, alternating which goes first:

- agent: ``plan_pull`` + ``prepare`` + ``fetch_all`` (listing, HEADs, disk check, the transfer
  with its sha256 and git-oid checks, snapshot links, the pull record);
- anchor: ``snapshot_download(repo, allow_patterns=<the same files>)``, which checks nothing.

Both rates are bytes of the pulled files over wall time, metadata calls included. Target (#13):
ratio (agent / anchor, medians) >= 0.95.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.conftest import CACHE
from tests.support.models import make_smollm2_hf

REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"


def start_hub(folder: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "tests.support.hub", "--repo", f"{REPO}={folder}"],
                            stdout=subprocess.PIPE, text=True)
    url = proc.stdout.readline().strip()
    if not url.startswith("http://"):
        raise SystemExit(f"the loopback hub did not start: {url!r}")
    return proc, url


def agent_pull(cache: Path) -> tuple[int, float]:
    from agent.hardware import detect
    from agent.hub.client import Hub
    from agent.hub.progress import QuietSink, Tracker
    from agent.hub.pull import fetch_all, plan_pull, prepare
    from agent.hub.refs import parse_ref
    from agent.hub.store import Store
    from agent.planner import Pins
    from agent.settings import Settings

    import logging

    t0 = time.perf_counter()
    hub = Hub(cache)
    pp = plan_pull(parse_ref(REPO), Settings(), detect("cpu-only"), Pins(engine="vllm"), hub, vllm_cpu=True)
    prep = prepare(pp, hub)
    tracker = Tracker(pp.size, sum(len(i.files) for i in pp.items), REPO)
    fetch_all(prep, hub, Store(hub), QuietSink(tracker, logging.getLogger("bench")))
    return pp.size, time.perf_counter() - t0


def anchor_pull(cache: Path, files: list[str]) -> tuple[int, float]:
    from huggingface_hub import snapshot_download

    t0 = time.perf_counter()
    path = Path(snapshot_download(REPO, cache_dir=cache, allow_patterns=files))
    elapsed = time.perf_counter() - t0
    return sum((path / f).stat().st_size for f in files), elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    folder = make_smollm2_hf(CACHE / "smollm2-hf")
    proc, url = start_hub(folder)
    os.environ.update(HF_ENDPOINT=url, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_PROGRESS_BARS="1",
                      HF_HOME=tempfile.mkdtemp(prefix="bench-pull-hf-"))
    os.environ.pop("HF_TOKEN", None)
    from agent.hub.select import vllm_files  # noqa: F401  (imports huggingface_hub after HF_* are set)

    work = Path(tempfile.mkdtemp(prefix="bench-pull-"))
    try:
        size, _ = agent_pull(work / "warm")  # warms the server's page cache and both import paths
        files = sorted(p.name for p in (work / "warm").glob("models--*/snapshots/*/*"))
        rates: dict[str, list[float]] = {"agent": [], "anchor": []}
        for i in range(args.rounds):
            order = ("agent", "anchor") if i % 2 == 0 else ("anchor", "agent")
            for who in order:
                cache = work / f"{who}-{i}"
                n, seconds = agent_pull(cache) if who == "agent" else anchor_pull(cache, files)
                rates[who].append(n / seconds)
                print(f"round {i + 1} {who:6s} {n / 1e6:7.1f} MB in {seconds:5.2f} s = {n / seconds / 1e6:7.1f} MB/s",
                      flush=True)
                shutil.rmtree(cache)
        a, b = statistics.median(rates["agent"]), statistics.median(rates["anchor"])
        print(f"\n{len(files)} files, {size / 1e6:.1f} MB; median agent {a / 1e6:.1f} MB/s, "
              f"snapshot_download {b / 1e6:.1f} MB/s, ratio {a / b:.3f} (target >= 0.95)")
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
