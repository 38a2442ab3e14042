"""``node-agent rm``: free the files of pulls, keeping whatever another pull still needs."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from agent.hub.errors import InUse
from agent.hub.store import Pull, Store


def remove(store: Store, pulls: list[Pull]) -> int:
    """Delete ``pulls`` (their snapshot entries and the blobs nothing else uses); bytes freed.

    All or nothing against ``serve``: every repo is locked exclusively first, and when a running
    server holds one of them nothing is deleted.
    """
    repos = sorted({p.repo for p in pulls})
    freed = 0
    with contextlib.ExitStack() as stack:
        for repo in repos:
            if not stack.enter_context(store.exclusive(repo)):
                raise InUse(f"a running `node-agent serve` uses {repo}; stop it first "
                            "(systemctl stop node-agent), or serve another model")
        for pull in pulls:
            freed += _remove_one(store, pull)
        for repo in repos:
            _prune(store, repo)
    return freed


def _remove_one(store: Store, pull: Pull) -> int:
    hub = store.hub
    others = [p for p in store.pulls(pull.repo) if p.key != pull.key]
    keep_entries = {(p.commit, f.path) for p in others for f in p.files}
    snapshot = hub.snapshot(pull.repo, pull.commit)
    for f in pull.files:
        if (pull.commit, f.path) not in keep_entries:
            (snapshot / f.path).unlink(missing_ok=True)
    used = _blobs_in_use(store, pull.repo)
    freed = 0
    for f in pull.files:
        blob = hub.repo_dir(pull.repo) / "blobs" / f.etag
        if f.etag not in used and blob.exists():
            freed += blob.stat().st_size
            blob.unlink()
    store.remove(pull)
    return freed


def _blobs_in_use(store: Store, repo: str) -> set[str]:
    """Blob names some snapshot entry of ``repo`` still points at (other tools' downloads too)."""
    used = set()
    snapshots = store.hub.repo_dir(repo) / "snapshots"
    for entry in snapshots.rglob("*") if snapshots.is_dir() else ():
        if entry.is_symlink():
            used.add(Path(entry.readlink()).name)
    return used


def _prune(store: Store, repo: str) -> None:
    """Drop empty snapshot folders; the whole repo folder when nothing of it is left."""
    root = store.hub.repo_dir(repo)
    snapshots = root / "snapshots"
    for folder in sorted(snapshots.rglob("*"), key=lambda p: -len(p.parts)) if snapshots.is_dir() else ():
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    has_files = snapshots.is_dir() and any(p.is_file() or p.is_symlink() for p in snapshots.rglob("*"))
    if not has_files and not store.pulls(repo):
        shutil.rmtree(root, ignore_errors=True)
