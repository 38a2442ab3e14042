"""Pull records, serve locks, rm and progress numbers (#13), on a cache laid out by hand."""

from __future__ import annotations

import hashlib
import os
import time

import pytest

from agent.hub.client import Hub
from agent.hub.errors import InUse
from agent.hub.progress import Tracker
from agent.hub.remove import remove
from agent.hub.store import Pull, PulledFile, Store, stat_key

COMMIT = "c" * 40


def put(hub: Hub, repo: str, path: str, data: bytes, commit: str = COMMIT) -> PulledFile:
    """A blob and its snapshot symlink, as huggingface_hub lays them out."""
    etag = hashlib.sha256(data).hexdigest()
    blob = hub.repo_dir(repo) / "blobs" / etag
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = hub.snapshot(repo, commit) / path
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(os.path.relpath(blob, link.parent))
    return PulledFile(path, len(data), etag, etag, None, stat_key(blob))


def pull(ref: str, repo: str, files: list[PulledFile], engine: str = "llamacpp", file: str | None = None) -> Pull:
    return Pull(ref=ref, engine=engine, format="gguf", quant="Q4_K_M", repo=repo, revision="main", commit=COMMIT,
                file=file, files=tuple(files), pulled_at=time.time())


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(Hub(tmp_path / "hub"))


def test_records_round_trip_newest_first_and_replace_by_key(store):
    a = put(store.hub, "o/gguf", "a.gguf", b"a" * 10)
    first = pull("o/gguf:a.gguf", "o/gguf", [a], file="a.gguf")
    store.save(first)
    second = pull("other", "o/gguf", [a], file="a.gguf")
    store.save(second)
    store.save(first)  # same key: replaced, not added
    assert [p.ref for p in store.all_pulls()] == ["other", "o/gguf:a.gguf"]
    assert store.pulls("o/gguf")[0].files[0] == a


def test_rm_keeps_blobs_another_pull_uses_and_refuses_while_served(store):
    hub = store.hub
    shared = put(hub, "o/gguf", "a.gguf", b"shared")
    own = put(hub, "o/gguf", "b.gguf", b"only b")
    keep = pull("keep", "o/gguf", [shared], file="a.gguf")
    drop = pull("drop", "o/gguf", [shared, own], file="b.gguf")
    store.save(keep)
    store.save(drop)
    with store.serving({"o/gguf"}):
        assert store.in_use("o/gguf")
        with pytest.raises(InUse, match="running `node-agent serve` uses o/gguf"):
            remove(store, [drop])
        assert (hub.snapshot("o/gguf", COMMIT) / "b.gguf").exists()
    assert not store.in_use("o/gguf")
    freed = remove(store, [drop])
    assert freed == len(b"only b")
    assert (hub.snapshot("o/gguf", COMMIT) / "a.gguf").exists()
    assert not (hub.repo_dir("o/gguf") / "blobs" / own.etag).exists()
    assert [p.ref for p in store.all_pulls()] == ["keep"]
    assert remove(store, [keep]) == len(b"shared")
    assert not hub.repo_dir("o/gguf").exists() and store.all_pulls() == []


def test_tracker_reports_rate_eta_and_a_line_that_changes_per_percent():
    mb = 1_000_000
    t = Tracker(total=200 * mb, files=2, label="m")
    t.add(20 * mb, fetched=False)  # resumed bytes count as done, not toward the rate
    assert t.snapshot()["eta_s"] is None and t.snapshot()["bytes_done"] == 20 * mb
    t.add(40 * mb)
    time.sleep(0.05)
    t.add(40 * mb)
    s = t.snapshot()
    assert s["bytes_done"] == 100 * mb and s["percent"] == 50.0 and s["files_total"] == 2
    assert s["rate_bytes_per_s"] > 0 and s["eta_s"] == round(100 * mb / s["rate_bytes_per_s"])
    assert s["summary"] == "downloading m: 50% of 200.0 MB"
    t.add(mb // 10)
    assert t.snapshot()["summary"] == s["summary"]  # below a whole percent: the same line (systemd STATUS)
