"""A hub on loopback: the endpoints huggingface_hub calls, over test repositories on disk.

Why not olah (the self-hosted mirror): its local-repository mode reads a git checkout with
git-lfs objects, answers model info without file sizes or LFS metadata (``blobs=true`` is
ignored), ignores Range requests, reads a whole LFS file into memory per request (and hashes it
on every HEAD), and has no gated repos. The tests need all of those, so this server implements
what huggingface_hub 2.x sends, as the real hub answers it:

  GET  /api/models/{repo}[/revision/{rev}][?blobs=true]   model info; siblings with size, blobId, lfs
  GET  /api/models/{repo}/tree/{rev}[/{path}]               tree listing (snapshot_download)
  HEAD|GET /{repo}/resolve/{rev}/{path}                     200 + ETag for a regular file; 302 to
                                                            /cdn/{sha256} with X-Linked-Etag and
                                                            X-Linked-Size for an LFS file
  HEAD|GET /cdn/{sha256}                                    the LFS bytes, with Range (206), on a
                                                            second port (another origin, like a CDN)

Errors carry ``X-Error-Code`` as the hub's do: RepoNotFound (401), RevisionNotFound (404),
EntryNotFound (404), GatedRepo (401 without a token, 403 with one that has no access).
Every request is logged (method, path, range, status, body bytes sent), so a test can assert
which bytes moved. Faults for tests: ``stall_after`` (send N bytes of a file, then hold the
connection), ``rate`` (bytes per second), ``corrupt_next`` (flip a byte of the next transfer).

Run alone (benchmarks): ``python -m tests.support.hub --repo owner/name=DIR [--port N]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pth", ".pt")
LFS_MIN_BYTES = 10 * 1024 * 1024
CHUNK = 1024 * 1024


@dataclass(frozen=True)
class RepoFile:
    path: str
    source: Path
    size: int
    blob_id: str  # git object id of the file (of its LFS pointer for an LFS file)
    sha256: str | None  # LFS files only


@dataclass
class Repo:
    repo_id: str
    files: dict[str, RepoFile]
    commit: str
    gated: bool = False
    granted_tokens: frozenset[str] = frozenset()
    refs: dict[str, str] = field(default_factory=dict)  # branch/tag -> commit


@dataclass(frozen=True)
class Logged:
    method: str
    path: str
    range: str | None
    status: int
    sent: int  # body bytes sent
    file: str | None  # "owner/name:path" when the request carried a repo file's bytes
    authorized: bool


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK * 8):
            h.update(block)
    return h.hexdigest()


def make_repo(repo_id: str, files: dict[str, Path], gated: bool = False,
              granted_tokens: tuple[str, ...] = ()) -> Repo:
    """A repo at one commit from files on disk (``{path in repo: file}``)."""
    entries = {}
    for rpath, src in sorted(files.items()):
        size = src.stat().st_size
        if rpath.endswith(LFS_SUFFIXES) or size >= LFS_MIN_BYTES:
            sha = _sha256(src)
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {size}\n".encode()
            entries[rpath] = RepoFile(rpath, src, size, git_blob_id(pointer), sha)
        else:
            entries[rpath] = RepoFile(rpath, src, size, git_blob_id(src.read_bytes()), None)
    tree = "".join(f"{p}\0{f.blob_id}\n" for p, f in entries.items())
    commit = hashlib.sha1(f"{repo_id}\n{tree}".encode()).hexdigest()
    return Repo(repo_id, entries, commit, gated, frozenset(granted_tokens), {"main": commit})


def repo_from_dir(repo_id: str, folder: Path, **kw) -> Repo:
    return make_repo(repo_id, {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*"))
                               if p.is_file() and not p.name.startswith(".")}, **kw)


class HubServer:
    """The server in a thread on 127.0.0.1; ``url`` is what HF_ENDPOINT should be."""

    def __init__(self, repos: list[Repo] = (), port: int = 0) -> None:
        self.repos: dict[str, Repo] = {r.repo_id: r for r in repos}
        self.log: list[Logged] = []
        self.rate: float | None = None  # bytes per second per transfer
        self.stall_after: dict[str, int] = {}  # "owner/name:path" -> bytes to send before stalling
        self.corrupt_next: set[str] = set()  # files whose next transfer has one byte flipped
        self.release = threading.Event()
        self._lock = threading.Lock()
        # LFS bytes come from a second origin, as the real hub's come from a CDN: huggingface_hub
        # follows redirects within the hub's origin and reads the file metadata off the redirect
        # to any other one.
        self.servers = [ThreadingHTTPServer(("127.0.0.1", p), _handler(self)) for p in (port, 0)]
        for httpd in self.servers:
            httpd.daemon_threads = True
        self.url, self.cdn_url = (f"http://127.0.0.1:{h.server_address[1]}" for h in self.servers)
        self._threads = [threading.Thread(target=h.serve_forever, name="test-hub", daemon=True) for h in self.servers]

    def __enter__(self) -> HubServer:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        for httpd in self.servers:
            httpd.shutdown()
            httpd.server_close()

    def add(self, repo: Repo) -> Repo:
        self.repos[repo.repo_id] = repo
        return repo

    def record(self, entry: Logged) -> None:
        with self._lock:
            self.log.append(entry)

    def bytes_sent(self, file: str) -> int:
        """Body bytes of ``owner/name:path`` sent so far, over every request."""
        return sum(e.sent for e in self.log if e.file == file)

    def transfers(self, file: str | None = None) -> list[Logged]:
        """GETs that carried repo file bytes (of ``file`` when given)."""
        return [e for e in self.log if e.method == "GET" and e.file and e.sent and (file is None or e.file == file)]

    def find_lfs(self, sha: str) -> tuple[Repo, RepoFile] | None:
        for repo in self.repos.values():
            for f in repo.files.values():
                if f.sha256 == sha:
                    return repo, f
        return None


_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")
_TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$")
_CDN = re.compile(r"^/cdn/(?P<sha>[0-9a-f]{64})$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


def _handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args) -> None:  # the structured log is hub.log
            pass

        def do_HEAD(self) -> None:
            self._route("HEAD")

        def do_GET(self) -> None:
            self._route("GET")

        # --- routing ------------------------------------------------------------------
        def _route(self, method: str) -> None:
            url = urlsplit(self.path)
            path, query = unquote(url.path), parse_qs(url.query)
            self._sent, self._file, self._status = 0, None, 500
            try:
                if m := _INFO.match(path):
                    self._info(m["repo"], m["rev"], query.get("blobs") == ["true"] or query.get("blobs") == ["True"])
                elif m := _TREE.match(path):
                    self._tree(m["repo"], m["rev"], m["path"] or "")
                elif m := _RESOLVE.match(path):
                    self._resolve(method, m["repo"], m["rev"], m["path"])
                elif m := _CDN.match(path):
                    self._cdn(method, m["sha"])
                else:
                    self._error(404, "EntryNotFound", f"no route {path}")
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
            finally:
                hub.record(Logged(method, path, self.headers.get("Range"), self._status, self._sent, self._file,
                                  bool(self.headers.get("Authorization"))))

        def _token(self) -> str | None:
            auth = self.headers.get("Authorization") or ""
            return auth.removeprefix("Bearer ").strip() or None

        def _repo(self, repo_id: str, rev: str | None) -> tuple[Repo, str] | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(401, "RepoNotFound", "Repository not found")
                return None
            rev = rev or "main"
            commit = repo.refs.get(rev) or (rev if rev == repo.commit else None)
            if commit is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", commit=None)
                return None
            return repo, commit

        # --- endpoints ----------------------------------------------------------------
        def _info(self, repo_id: str, rev: str | None, blobs: bool) -> None:
            found = self._repo(repo_id, rev)
            if found is None:
                return
            repo, commit = found
            siblings = []
            for f in repo.files.values():
                s: dict = {"rfilename": f.path}
                if blobs:
                    s.update(size=f.size, blobId=f.blob_id)
                    if f.sha256:
                        s["lfs"] = {"size": f.size, "sha256": f.sha256, "pointerSize": 134}
                siblings.append(s)
            self._json({"_id": commit[:24], "id": repo.repo_id, "modelId": repo.repo_id, "sha": commit,
                        "private": False, "gated": "manual" if repo.gated else False, "disabled": False,
                        "downloads": 0, "likes": 0, "tags": [], "library_name": "transformers",
                        "lastModified": "2026-01-01T00:00:00.000Z", "createdAt": "2026-01-01T00:00:00.000Z",
                        "siblings": siblings})

        def _tree(self, repo_id: str, rev: str, prefix: str) -> None:
            found = self._repo(repo_id, rev)
            if found is None:
                return
            repo, _ = found
            out = []
            for f in repo.files.values():
                if prefix and not f.path.startswith(prefix.rstrip("/") + "/"):
                    continue
                e: dict = {"type": "file", "oid": f.blob_id, "size": f.size, "path": f.path}
                if f.sha256:
                    e["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
                out.append(e)
            self._json(out)

        def _resolve(self, method: str, repo_id: str, rev: str, rpath: str) -> None:
            found = self._repo(repo_id, rev)
            if found is None:
                return
            repo, commit = found
            if repo.gated and self._token() not in repo.granted_tokens:
                if self._token() is None:
                    self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access "
                                "to it and be authenticated to access it. Please log in.", commit)
                else:
                    self._error(403, "GatedRepo", f"Access to model {repo_id} is restricted and you are not in "
                                f"the authorized list. Visit {hub.url}/{repo_id} to ask for access.", commit)
                return
            f = repo.files.get(rpath)
            if f is None:
                self._error(404, "EntryNotFound", f"{rpath} does not exist on {rev}", commit)
                return
            if f.sha256:
                self._status = 302
                self.send_response(302)
                self.send_header("Location", f"{hub.cdn_url}/cdn/{f.sha256}")
                self.send_header("X-Repo-Commit", commit)
                self.send_header("ETag", f'"{f.blob_id}"')
                self.send_header("X-Linked-Etag", f'"{f.sha256}"')
                self.send_header("X-Linked-Size", str(f.size))
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self._body(method, repo, f, {"X-Repo-Commit": commit, "ETag": f'"{f.blob_id}"'})

        def _cdn(self, method: str, sha: str) -> None:
            found = hub.find_lfs(sha)
            if found is None:
                self._error(404, "EntryNotFound", "no such object")
                return
            repo, f = found
            self._body(method, repo, f, {"ETag": f'"{sha}"'})

        # --- responses ----------------------------------------------------------------
        def _body(self, method: str, repo: Repo, f: RepoFile, headers: dict[str, str]) -> None:
            start, end = 0, f.size - 1
            status = 200
            rng = self.headers.get("Range")
            if rng and (m := _RANGE.match(rng.strip())):
                start = int(m[1])
                end = min(int(m[2]), f.size - 1) if m[2] else f.size - 1
                if start >= f.size:
                    self._status = 416
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{f.size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
            self._status = status
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(end - start + 1))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{f.size}")
            self.end_headers()
            if method == "HEAD":
                return
            key = f"{repo.repo_id}:{f.path}"
            self._file = key
            self._send_file(f, key, start, end + 1)

        def _send_file(self, f: RepoFile, key: str, start: int, stop: int) -> None:
            stall_at = hub.stall_after.get(key)
            corrupt = key in hub.corrupt_next
            if corrupt:
                hub.corrupt_next.discard(key)
            began = time.monotonic()
            with f.source.open("rb") as src:
                src.seek(start)
                pos = start
                if stall_at is None and hub.rate is None and not corrupt:
                    while pos < stop:  # zero-copy fast path
                        n = self.connection.sendfile(src, pos, stop - pos)
                        if not n:
                            break
                        pos += n
                        self._sent += n
                    return
                while pos < stop:
                    n = min(CHUNK, stop - pos)
                    if stall_at is not None:
                        if pos >= stall_at:
                            hub.release.wait()
                            stall_at = None
                        else:
                            n = min(n, stall_at - pos)
                    block = src.read(n)
                    if corrupt and block:
                        block = bytes([block[0] ^ 0xFF]) + block[1:]
                        corrupt = False
                    self.wfile.write(block)
                    pos += len(block)
                    self._sent += len(block)
                    if hub.rate:
                        ahead = self._sent / hub.rate - (time.monotonic() - began)
                        if ahead > 0:
                            time.sleep(ahead)

        def _json(self, body) -> None:
            data = json.dumps(body).encode()
            self._status = 200
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, code: str, message: str, commit: str | None = None) -> None:
            data = json.dumps({"error": message}).encode()
            self._status = status
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            if commit:
                self.send_header("X-Repo-Commit", commit)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description="serve folders as hub repos on 127.0.0.1")
    parser.add_argument("--repo", action="append", default=[], metavar="OWNER/NAME=DIR")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    repos = [repo_from_dir(spec.split("=", 1)[0], Path(spec.split("=", 1)[1])) for spec in args.repo]
    with HubServer(repos, args.port) as hub:
        print(hub.url, flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main()
