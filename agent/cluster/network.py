"""Where vLLM's cluster traffic goes: the interface, this host's address, the head's rendezvous.

vLLM's traffic between hosts is unauthenticated and its wire format can execute code (pickle;
vLLM's security docs), so the agent refuses to put it on a public address unless
``cluster.allow_public`` says so. Loopback and the private ranges (RFC 1918, link-local, IPv6 ULA)
pass; anything else, CGNAT's 100.64.0.0/10 included, is public here.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import psutil

from agent.errors import UsageError
from agent.settings import ClusterSettings


@dataclass(frozen=True)
class Network:
    """The addresses one host's agent and engine use."""

    interface: str | None
    host_ip: str  # VLLM_HOST_IP: what the other hosts reach this host's vLLM processes on
    head_host: str  # master_addr
    head_port: int  # master_port (torch.distributed's store on the head)
    head_api: str  # http://host:port of the head agent (heartbeats)
    head_ip: str = ""  # head_host resolved

    def environment(self) -> dict[str, str]:
        """What vLLM's processes need to find each other (read at spawn)."""
        env = {"VLLM_HOST_IP": self.host_ip}
        if self.interface:
            env["GLOO_SOCKET_IFNAME"] = self.interface
            env["NCCL_SOCKET_IFNAME"] = self.interface
        return env


def is_private(ip: str) -> bool:
    """Loopback, RFC 1918, link-local or ULA; CGNAT (100.64.0.0/10) and the rest are public."""
    addr = ipaddress.ip_address(ip)
    return addr.is_loopback or (addr.is_private and not getattr(addr, "is_global", False))


def resolve_network(c: ClusterSettings, addresses: Callable[[], Mapping] = psutil.net_if_addrs,
                    lookup: Callable[[str], str] = socket.gethostbyname) -> Network:
    """The addresses of this host's part in the group; UsageError (exit 2) names what to fix."""
    host, _, port = (c.head or "").rpartition(":")
    if_ip = _interface_ip(c.interface, addresses) if c.interface else None
    if c.host_ip:
        try:
            ipaddress.ip_address(c.host_ip)
        except ValueError:
            raise UsageError(f"cluster.host_ip {c.host_ip!r} is not an IP address") from None
    host_ip = c.host_ip or if_ip
    if host_ip is None:
        raise UsageError("a cluster needs the network vLLM's traffic uses: set cluster.interface (the NIC the hosts "
                         "reach each other on) or cluster.host_ip (this host's address on it)")
    try:
        head_ip = lookup(host)
    except OSError as exc:
        raise UsageError(f"cluster.head {c.head}: cannot resolve {host!r} ({exc}); use the head's IP address") from exc
    for what, ip in (("cluster.host_ip" if c.host_ip else f"cluster.interface {c.interface}", host_ip),
                     (f"cluster.head {c.head}", head_ip)):
        if not is_private(ip) and not c.allow_public:
            raise UsageError(f"{what} is {ip}, a public address: vLLM's cluster traffic is unauthenticated and can "
                             f"execute code, so it must stay on a private network (docs/cluster.md); use a private "
                             f"interface, or set cluster.allow_public: true if this network is yours alone")
    api_host = f"[{host}]" if ":" in host else host
    return Network(c.interface, host_ip, host, int(port), f"http://{api_host}:{c.head_api_port}", head_ip)


def _interface_ip(name: str, addresses: Callable[[], Mapping]) -> str:
    found = addresses()
    if name not in found:
        raise UsageError(f"cluster.interface {name!r} does not exist here; interfaces: {', '.join(sorted(found))}")
    ipv4 = [a.address for a in found[name] if a.family == socket.AF_INET]
    if not ipv4:
        raise UsageError(f"cluster.interface {name!r} has no IPv4 address; set cluster.host_ip")
    return ipv4[0]
