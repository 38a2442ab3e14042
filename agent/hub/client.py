"""The one door to the hub: metadata through ``huggingface_hub``, with its errors made typed.

``huggingface_hub`` reads ``HF_ENDPOINT`` (a LAN mirror works), ``HF_TOKEN`` (or the token file
``hf auth login`` writes), ``HF_HUB_OFFLINE`` and ``HF_HOME``/``HF_HUB_CACHE`` itself; this module
passes none of them explicitly, so the agent, vLLM and the ``hf`` command agree on all four. The
token is never logged or printed.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx2
from huggingface_hub import HfApi, constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub import errors as hf_errors
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import build_hf_headers, get_token

from agent.hub.errors import GatedRepo, HubError, HubUnreachable, RepoNotFound

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RemoteFile:
    """A file of a repo at one commit, as the hub lists it."""

    path: str
    size: int
    sha256: str | None  # LFS files: the content's sha256 (also their cache blob name)
    blob_id: str | None  # the git object id; for a non-LFS file, its cache blob name

    @property
    def lfs(self) -> bool:
        return self.sha256 is not None


@dataclass(frozen=True)
class Listing:
    """A repo at a resolved commit: every file with its size and checksum."""

    repo: str
    revision: str  # as asked ("main", a tag, a commit)
    commit: str
    files: dict[str, RemoteFile]
    gated: bool


@dataclass(frozen=True)
class FileSource:
    """Where one file's bytes come from (a HEAD on its resolve URL, no bytes moved)."""

    url: str  # after the hub's redirect (a CDN for LFS files)
    etag: str  # the cache blob name
    size: int
    same_host: bool  # the URL is on the hub itself: the token may go with it


def endpoint() -> str:
    """The hub's base URL in force (``HF_ENDPOINT`` or huggingface.co)."""
    return constants.ENDPOINT.rstrip("/")


def default_cache_dir() -> Path:
    """huggingface_hub's own cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ~/.cache/huggingface/hub."""
    return Path(constants.HF_HUB_CACHE)


class Hub:
    """Metadata calls and cache placement for one hub cache directory."""

    def __init__(self, cache_dir: Path | None = None) -> None:
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.api = HfApi()

    # --- where things live in the standard cache layout ---------------------------------
    def repo_dir(self, repo: str) -> Path:
        return self.cache_dir / repo_folder_name(repo_id=repo, repo_type="model")

    def lock_dir(self, repo: str) -> Path:
        return self.cache_dir / ".locks" / repo_folder_name(repo_id=repo, repo_type="model")

    def snapshot(self, repo: str, commit: str) -> Path:
        return self.repo_dir(repo) / "snapshots" / commit

    # --- metadata -----------------------------------------------------------------------
    def listing(self, repo: str, revision: str | None) -> Listing:
        """Every file of ``repo`` at ``revision`` with sizes and LFS sha256 (no file content)."""
        with translated(repo):
            info = self.api.model_info(repo, revision=revision, files_metadata=True)
        files = {}
        for s in info.siblings or ():
            files[s.rfilename] = RemoteFile(s.rfilename, s.lfs.size if s.lfs else (s.size or 0),
                                            s.lfs.sha256 if s.lfs else None, s.blob_id)
        return Listing(repo, revision or "main", info.sha, files, bool(info.gated))

    def cached(self, repo: str, commit: str, path: str) -> Path:
        """``path`` at ``commit`` through ``hf_hub_download``, which owns the cache layout: a small
        metadata file (config.json, an index) is fetched; a blob the transfer already put in place
        only gets its snapshot pointer (a symlink, or a copy where symlinks are refused)."""
        with translated(repo, path):
            return Path(hf_hub_download(repo, path, revision=commit, cache_dir=self.cache_dir))

    def source(self, repo: str, commit: str, path: str) -> FileSource:
        """Where ``path``'s bytes are, its blob name and size: one HEAD, no body."""
        url = hf_hub_url(repo, path, revision=commit, endpoint=endpoint())
        with translated(repo, path):
            meta = get_hf_file_metadata(url, retry_on_errors=True)
        if meta.etag is None or meta.size is None:
            raise HubError(f"{endpoint()} sent no ETag or size for {repo}/{path}; is HF_ENDPOINT a hub or a mirror of one?")
        location = meta.location or url
        return FileSource(location, meta.etag, meta.size, httpx2.URL(location).host == httpx2.URL(url).host)

    def headers(self, same_host: bool) -> dict[str, str]:
        """Request headers as huggingface_hub builds them; the token only for the hub's own host."""
        headers = build_hf_headers()
        if not same_host:
            headers.pop("authorization", None)
        return headers


def token_sent() -> bool:
    return get_token() is not None


@contextlib.contextmanager
def translated(repo: str, path: str | None = None) -> Iterator[None]:
    """huggingface_hub and httpx errors as the agent's typed errors, with what to do."""
    where = endpoint()
    try:
        yield
    except hf_errors.GatedRepoError as exc:
        raise GatedRepo(repo, f"{where}/{repo}", token_sent()) from exc
    except hf_errors.RevisionNotFoundError as exc:
        raise RepoNotFound(f"{repo} has no such revision on {where}; check the @revision (a branch, tag or commit)") from exc
    except hf_errors.RemoteEntryNotFoundError as exc:
        raise RepoNotFound(f"{repo} on {where} has no file {path or '(unknown)'}; check the file name") from exc
    except hf_errors.RepositoryNotFoundError as exc:
        hint = "" if token_sent() else " (a private repo needs HF_TOKEN)"
        raise RepoNotFound(f"no model repo {repo} on {where}{hint}; check the name") from exc
    except hf_errors.OfflineModeIsEnabled as exc:
        raise HubUnreachable(f"HF_HUB_OFFLINE is set, so {repo} cannot be fetched from {where}; unset it, "
                             "or plan with --offline (from the card alone)") from exc
    except hf_errors.LocalEntryNotFoundError as exc:
        raise HubUnreachable(f"cannot reach {where} for {repo} and it is not in the cache; check the network "
                             "or HF_ENDPOINT") from exc
    except hf_errors.HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise HubError(f"{where} answered HTTP {status} for {repo}; retry later") from exc
    except httpx2.TransportError as exc:
        raise HubUnreachable(f"cannot reach {where} ({type(exc).__name__}); check the network or HF_ENDPOINT, "
                             "or plan with --offline (from the card alone)") from exc
