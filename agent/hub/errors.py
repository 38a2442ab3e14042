"""Typed errors of the hub: each message says what to do next.

They subclass the agent's own errors, so the CLI prints one line and exits with the right code
(2 for what the operator must fix: a reference, a license, disk space; 1 for the network).
"""

from __future__ import annotations

from agent.errors import NodeAgentError, UsageError

GB = 1e9


def gb(n: int | float) -> str:
    """Bytes as decimal gigabytes, the unit hub listings and disk tools show."""
    return f"{n / GB:.1f} GB" if n >= GB else f"{n / 1e6:.1f} MB"


class HubError(NodeAgentError):
    """The hub could not answer (network, server error): retry later or check HF_ENDPOINT."""


class HubUnreachable(HubError):
    """No connection to the hub, or HF_HUB_OFFLINE is set."""


class RepoNotFound(UsageError):
    """The repo, revision or file does not exist (or is private and no token was sent)."""


class GatedRepo(UsageError):
    """The repo needs its license accepted by the account whose token is in HF_TOKEN."""

    def __init__(self, repo: str, page: str, token_sent: bool) -> None:
        if token_sent:
            what = (f"access to {repo} is gated and the token in HF_TOKEN has not been granted it: "
                    f"accept the license at {page} with that token's account (approval can take a while), "
                    "then retry")
        else:
            what = (f"access to {repo} is gated: accept the license at {page}, create a read token "
                    "(hub settings, Access Tokens), put it in HF_TOKEN (for the service: "
                    "/etc/node-agent/node-agent.env), then retry")
        super().__init__(what)
        self.repo, self.page = repo, page


class NotEnoughDisk(UsageError):
    """The pull would not fit on the disk that holds the cache; nothing was downloaded."""

    def __init__(self, where: str, need: int, free: int) -> None:
        super().__init__(
            f"not enough disk space in {where}: the pull needs {gb(need)} more, {gb(free)} is free "
            f"({gb(need - free)} missing); nothing was downloaded. Free {gb(need - free)} there, or point "
            "model.cache_dir (or HF_HOME) at a bigger disk")
        self.need, self.free = need, free


class CorruptDownload(HubError):
    """A file's bytes do not match the hub's checksum even after fetching it again."""


class NotPulled(UsageError):
    """``serve`` was asked for a hub model that is not on disk and ``model.pull`` is never."""


class InUse(UsageError):
    """``rm`` refused: a running ``serve`` uses the files."""


class NoVariant(UsageError):
    """Nothing to pull: the plan chose a variant no known repo provides, or the pins exclude all."""
