"""What the agent pulled and where it is: a small record next to each repo in the hub cache.

``<cache>/models--owner--name/node-agent.json`` lists the pulls that used that repo: the
reference, the engine and variant, the revision asked for and the commit it resolved to, and
every file with its size, blob name and checksum, plus when each file was last verified (size,
mtime and inode, so ``serve`` re-hashes only a file that changed). huggingface_hub's cache tools
ignore the extra file, and deleting the repo folder deletes the record with it.

While ``serve`` runs it holds a shared ``flock`` on ``.locks/models--owner--name/node-agent-serve.lock``
for each repo it serves from; ``rm`` takes the lock exclusively and refuses when it cannot. A lock
dies with its process, so a crashed server never leaves a stale one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from agent.hub.client import Hub, RemoteFile

log = logging.getLogger(__name__)
RECORD = "node-agent.json"
SERVE_LOCK = "node-agent-serve.lock"
RECORD_VERSION = 1


@dataclass(frozen=True)
class PulledFile:
    """One file of a pull, and the state of the blob when it was last verified."""

    path: str
    size: int
    etag: str  # the blob's name in the cache
    sha256: str | None  # LFS files
    blob_id: str | None  # the git object id
    verified: tuple[int, int, int] | None = None  # (size, mtime_ns, inode) when last checked

    def remote(self) -> RemoteFile:
        """The file as the hub listed it (what it is checked against)."""
        return RemoteFile(self.path, self.size, self.sha256, self.blob_id)


@dataclass(frozen=True)
class Pull:
    """One variant of one reference, pulled at one commit."""

    ref: str  # the reference as pulled (card name, repo id, repo:file)
    engine: str  # vllm | llamacpp
    format: str  # hf | fp8 | awq | gptq | gguf
    quant: str | None
    repo: str
    revision: str
    commit: str
    file: str | None  # GGUF: the (first) file; None: a checkpoint snapshot
    files: tuple[PulledFile, ...]
    pulled_at: float
    last_used: float | None = None
    complete: bool = True
    # A variant made on this node by ``node-agent quantize`` (agent/quantize/register.py): the
    # scheme, group size, layers left 16-bit, calibration, seed, the bf16 checkpoint it came from,
    # and the quality check's numbers and verdict. None for a pull from the hub.
    quantized: dict | None = None

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def key(self) -> tuple:
        return (self.ref, self.engine, self.repo, self.commit, self.file)


def stat_key(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return (st.st_size, st.st_mtime_ns, st.st_ino)


@dataclass
class Store:
    """Pull records and serve locks in one hub cache."""

    hub: Hub

    # --- records --------------------------------------------------------------------------
    def pulls(self, repo: str) -> list[Pull]:
        path = self.hub.repo_dir(repo) / RECORD
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable %s (%s); `node-agent pull` rewrites it", path, exc)
            return []
        return [_pull_from(d) for d in data.get("pulls", []) if isinstance(d, dict)]

    def all_pulls(self) -> list[Pull]:
        """Every pull recorded in this cache, newest first."""
        out: list[Pull] = []
        if self.hub.cache_dir.is_dir():
            for record in sorted(self.hub.cache_dir.glob(f"models--*/{RECORD}")):
                repo = record.parent.name.removeprefix("models--").replace("--", "/", 1)
                out += self.pulls(repo)
        return sorted(out, key=lambda p: -p.pulled_at)

    def save(self, pull: Pull) -> None:
        """Add or replace ``pull`` (same reference, engine, repo, commit and file)."""
        self._write(pull.repo, [p for p in self.pulls(pull.repo) if p.key != pull.key] + [pull])

    def remove(self, pull: Pull) -> None:
        self._write(pull.repo, [p for p in self.pulls(pull.repo) if p.key != pull.key])

    def touch(self, pulls: list[Pull]) -> None:
        """Record that ``serve`` started on these pulls (best effort: the cache may be read-only)."""
        now = time.time()
        for pull in pulls:
            try:
                self._write(pull.repo, [replace(p, last_used=now) if p.key == pull.key else p
                                        for p in self.pulls(pull.repo)])
            except OSError as exc:
                log.info("could not record last use of %s: %s", pull.repo, exc)

    def _write(self, repo: str, pulls: list[Pull]) -> None:
        path = self.hub.repo_dir(repo) / RECORD
        if not pulls:
            path.unlink(missing_ok=True)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        body = {"version": RECORD_VERSION, "pulls": [asdict(p) for p in pulls]}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(body, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    # --- serve locks ----------------------------------------------------------------------
    def _lock_path(self, repo: str) -> Path:
        return self.hub.lock_dir(repo) / SERVE_LOCK

    @contextlib.contextmanager
    def serving(self, repos: set[str]) -> Iterator[None]:
        """Hold shared locks on ``repos`` for as long as the block runs (``serve``)."""
        files = []
        try:
            for repo in sorted(repos):
                path = self._lock_path(repo)
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    f = path.open("a")
                except OSError as exc:  # a read-only cache: rm cannot run there either
                    log.info("no serve lock for %s: %s", repo, exc)
                    continue
                fcntl.flock(f, fcntl.LOCK_SH)
                files.append(f)
            yield
        finally:
            for f in files:
                f.close()

    def in_use(self, repo: str) -> bool:
        """A running ``serve`` holds this repo."""
        path = self._lock_path(repo)
        if not path.exists():
            return False
        with path.open("a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
        return False

    @contextlib.contextmanager
    def exclusive(self, repo: str) -> Iterator[bool]:
        """Hold the repo against a ``serve`` starting; yields False when one already serves it."""
        path = self._lock_path(repo)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def _pull_from(d: dict) -> Pull:
    files = tuple(PulledFile(f["path"], f["size"], f["etag"], f.get("sha256"), f.get("blob_id"),
                             tuple(f["verified"]) if f.get("verified") else None) for f in d.get("files", ()))
    keys = {k: d.get(k) for k in ("ref", "engine", "format", "quant", "repo", "revision", "commit", "file",
                                  "pulled_at", "last_used")}
    quantized = d.get("quantized") if isinstance(d.get("quantized"), dict) else None
    return Pull(files=files, complete=d.get("complete", True), quantized=quantized, **keys)
