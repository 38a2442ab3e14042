"""Moving one file's bytes into the cache: resumable, verified, reported.

Why not ``hf_hub_download`` for the bytes: since huggingface_hub 1.18 it writes each download to
a process-unique temporary file and deletes it when the download fails (PR #4306), so a pull
killed at 39 of 40 GB starts again at 0. Here the partial file keeps a stable name,
``blobs/<etag>.incomplete`` (the name huggingface_hub itself used before 1.18, and the one
``hf cache`` reports as incomplete), under huggingface_hub's own per-blob lock; a restarted pull
hashes what is there and asks only for the rest (HTTP Range). Every file is checked against the
hub's checksum (LFS: sha256; other files: the git object id) before it is moved into place, so a
file that does not match is never served. The snapshot pointer is then made by
``hf_hub_download`` itself (see ``Hub.cached``), so the cache layout stays exactly its own.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Protocol

import httpx2
from huggingface_hub.utils import WeakFileLock, get_session, hf_raise_for_status

from agent.hub.client import FileSource, Hub, RemoteFile, translated
from agent.hub.errors import CorruptDownload, HubUnreachable, gb

log = logging.getLogger(__name__)
CHUNK = 4 * 1024 * 1024
RETRIES = 5  # network drops in a row (no byte received in between) before giving up
READ_TIMEOUT_S = 60.0


class Sink(Protocol):
    """Where progress goes (agent.hub.progress): bytes as they land, and files as they finish."""

    def file_start(self, path: str, size: int, have: int) -> None:
        """A file begins; ``have`` bytes of it are already on disk (resumed or complete)."""

    def advance(self, path: str, n: int) -> None:
        """``n`` more bytes of ``path`` were written."""

    def file_done(self, path: str, fetched: int, status: str) -> None:
        """``path`` is in place: ``status`` is fetched | resumed | present | refetched."""

    def note(self, message: str) -> None:
        """Something the operator should know (a corrupt file found, a retry)."""


def hasher(remote: RemoteFile):
    """The checksum the hub publishes for this file, primed as git primes a blob's object id."""
    if remote.lfs:
        return hashlib.sha256()
    h = hashlib.sha1()
    h.update(f"blob {remote.size}\0".encode())
    return h


def expected_digest(remote: RemoteFile) -> str | None:
    return remote.sha256 if remote.lfs else remote.blob_id


def file_digest(path: Path, remote: RemoteFile, upto: int | None = None) -> tuple[str, object]:
    """(hex digest, hash object) of the first ``upto`` bytes (all when None) of ``path``."""
    h = hasher(remote)
    left = upto
    with path.open("rb") as f:
        while left is None or left > 0:
            block = f.read(CHUNK if left is None else min(CHUNK, left))
            if not block:
                break
            h.update(block)
            if left is not None:
                left -= len(block)
    return h.hexdigest(), h


def verify(path: Path, remote: RemoteFile) -> bool:
    """The file on disk has the hub's size and checksum."""
    want = expected_digest(remote)
    if path.stat().st_size != remote.size:
        return False
    return want is None or file_digest(path, remote)[0] == want


def blob_path(hub: Hub, repo: str, etag: str) -> Path:
    return hub.repo_dir(repo) / "blobs" / etag


def fetch(hub: Hub, repo: str, commit: str, remote: RemoteFile, src: FileSource, sink: Sink,
          trust_existing: bool) -> tuple[Path, str]:
    """Put ``remote`` in the cache under its blob name; returns (blob path, status).

    ``trust_existing``: a complete blob already there was verified before and has not changed
    since (the caller knows from its records); otherwise it is hashed now, and re-fetched when
    it does not match.
    """
    blob = blob_path(hub, repo, src.etag)
    lock = hub.lock_dir(repo) / f"{src.etag}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    blob.parent.mkdir(parents=True, exist_ok=True)
    with WeakFileLock(lock):
        status, resumed, fetched = "fetched", False, 0
        if blob.exists():
            if trust_existing or verify(blob, remote):
                sink.file_start(remote.path, remote.size, remote.size)
                sink.file_done(remote.path, 0, "present")
                return blob, "present"
            sink.note(f"{remote.path}: the file on disk does not match the hub's checksum; fetching it again")
            log.warning("%s/%s: blob %s is corrupt; re-fetching", repo, remote.path, src.etag)
            blob.unlink()
            status = "refetched"
        partial = blob.with_name(blob.name + ".incomplete")
        want = expected_digest(remote)
        for attempt in (1, 2):
            fetched, resumed, digest = _download(hub, repo, src, remote, partial, sink)
            if partial.stat().st_size == remote.size and want in (None, digest):
                break
            partial.unlink(missing_ok=True)
            if attempt == 2:
                raise CorruptDownload(f"{repo}/{remote.path}: the bytes received twice do not match the hub's "
                                      "checksum; the mirror or the network corrupts them. Nothing was kept")
            sink.note(f"{remote.path}: checksum mismatch after download; fetching it again from the start")
        os.replace(partial, blob)
        _chmod_like_hf(blob)
    if status == "fetched" and resumed:
        status = "resumed"
    sink.file_done(remote.path, fetched, status)
    return blob, status


def _download(hub: Hub, repo: str, src: FileSource, remote: RemoteFile, partial: Path,
              sink: Sink) -> tuple[int, bool, str]:
    """Fill ``partial`` up to ``remote.size`` bytes: (bytes fetched now, whether it resumed, digest)."""
    have = partial.stat().st_size if partial.exists() else 0
    if have > remote.size:
        partial.unlink()
        have = 0
    h = file_digest(partial, remote, upto=have)[1] if have else hasher(remote)
    resumed = have > 0
    sink.file_start(remote.path, remote.size, have)
    fetched = drops = 0
    session = get_session()
    with partial.open("ab") as out:
        while have < remote.size:
            headers = hub.headers(src.same_host)
            headers["Accept-Encoding"] = "identity"
            if have:
                headers["Range"] = f"bytes={have}-"
            try:
                with translated(repo, remote.path), session.stream(
                        "GET", src.url, headers=headers, follow_redirects=True,
                        timeout=httpx2.Timeout(30.0, read=READ_TIMEOUT_S)) as r:
                    if r.status_code >= 400:
                        r.read()
                        hf_raise_for_status(r)
                    if have and r.status_code == 200:  # the server ignored the Range: start over
                        log.warning("%s ignored the Range request; fetching %s from the start", src.url, remote.path)
                        out.seek(0)
                        out.truncate()
                        sink.advance(remote.path, -have)
                        have, h = 0, hasher(remote)
                    for chunk in r.iter_bytes(CHUNK):
                        out.write(chunk)
                        h.update(chunk)
                        have += len(chunk)
                        fetched += len(chunk)
                        drops = 0
                        sink.advance(remote.path, len(chunk))
            except HubUnreachable as exc:
                drops += 1
                if drops > RETRIES:
                    raise HubUnreachable(f"the download of {remote.path} broke off {drops} times in a row with "
                                         f"{gb(have)} of {gb(remote.size)} on disk; run the same command again "
                                         "to resume") from exc
                sink.note(f"{remote.path}: connection lost; resuming at {gb(have)} in {min(2 ** drops, 30)} s")
                out.flush()
                time.sleep(min(2 ** drops, 30))
    return fetched, resumed, h.hexdigest()


def _chmod_like_hf(path: Path) -> None:
    """Blobs readable as huggingface_hub leaves them: 0o666 less the umask (temporary files are 0o600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
