"""The head's view of its group: who reported, who is usable, which group (epoch) is forming or
running, and who was lost. One object per head agent, changed only through its methods, on the
event loop; every decision reads a clock given to it, so the rules are tested without waiting.

A group goes idle → forming (``form``: an epoch and each worker's engine spec) → running, and
back to idle on ``dissolve``. A member is lost, while a group forms or runs, when its heartbeat
is older than ``cluster.heartbeat_timeout_s`` or when its engine, having joined this epoch,
reports that it stopped (its agent pushes that report at once). vLLM itself notices neither in
time: its RPC to a dead rank waits VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS (300 s) and its /health keeps
answering 200 (docs/cluster.md).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from agent.cluster.network import Network
from agent.cluster.protocol import EngineSpec, GroupState, Heartbeat, Reply
from agent.hardware.report import host_from_dict
from agent.hardware.types import HostInfo
from agent.settings import ClusterSettings


@dataclass
class Member:
    """One worker rank as the head last heard of it."""

    rank: int
    beat: Heartbeat | None = None
    seen: float | None = None  # clock() of the last heartbeat
    host: HostInfo | None = None
    refusal: str | None = None  # why it cannot be a member as it is
    joined: str | None = None  # the epoch its engine reported for (starting or running)
    lost: str | None = None  # why the group lost it; cleared when a group runs again

    @property
    def name(self) -> str:
        host = f" ({self.beat.hostname})" if self.beat and self.beat.hostname else ""
        return f"rank {self.rank}{host}"


class Coordinator:
    """See the module docstring."""

    def __init__(self, c: ClusterSettings, network: Network, head: HostInfo, fingerprint: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = c
        self.network = network
        self.head = head
        self.fingerprint = fingerprint
        self._clock = clock
        self.head_id = uuid.uuid4().hex[:12]
        self.members = {rank: Member(rank) for rank in range(1, c.nodes)}
        self.group: GroupState = "idle"
        self.epoch: str | None = None
        self.reason: str | None = None  # why the group is idle (its last loss), if it ran
        self.layers: dict[int, tuple[tuple[int, ...], int]] = {}  # rank -> (stages, layers) of the group's plan
        self._specs: dict[int, EngineSpec] = {}
        self._count = 0

    # --- heartbeats ------------------------------------------------------------------------
    def heartbeat(self, hb: Heartbeat) -> Reply:
        """Record a worker's report and answer it."""
        m = self.members.get(hb.rank)
        if m is None:
            return self._reply(None, f"rank {hb.rank} is not in this group: the head has cluster.nodes "
                                     f"{self.settings.nodes} (ranks 1 to {self.settings.nodes - 1} are workers)")
        now = self._clock()
        if m.beat is not None and m.beat.agent_id != hb.agent_id and self._fresh(m, now) \
                and m.beat.host_ip != hb.host_ip:
            return self._reply(None, f"rank {hb.rank} is taken by the agent on {m.beat.hostname} ({m.beat.host_ip}); "
                                     f"give every host its own cluster.rank")
        m.beat, m.seen = hb, now
        m.refusal = self._refusal(m, hb)
        if self.epoch is not None and hb.engine != "idle" and hb.engine_epoch == self.epoch:
            m.joined = self.epoch
        spec = self._specs.get(hb.rank) if self.group != "idle" and m.refusal is None else None
        return self._reply(spec, m.refusal)

    def _refusal(self, m: Member, hb: Heartbeat) -> str | None:
        try:
            m.host = host_from_dict(hb.host)
        except ValueError as exc:
            return f"its detection report is unreadable ({exc}); run the same node-agent version on every host"
        if hb.model_fingerprint != self.fingerprint:
            return (f"it serves another model ({hb.model_name}, whose config.json differs from the head's): set the "
                    f"same model on every host")
        taken = [("the head", self.network.host_ip)] + [
            (o.name, o.beat.host_ip) for o in self.members.values() if o is not m and o.beat and self._fresh(o)]
        for who, ip in taken:
            if ip == hb.host_ip:
                return (f"its VLLM_HOST_IP {hb.host_ip} is also {who}'s: every host needs its own address "
                        f"(cluster.interface or cluster.host_ip)")
        return None

    def _reply(self, spec: EngineSpec | None, refusal: str | None) -> Reply:
        return Reply(head_id=self.head_id, epoch=self.epoch, group=self.group, spec=spec, refusal=refusal,
                     reason=self.reason, members=self.describe()["members"])

    def _fresh(self, m: Member, now: float | None = None) -> bool:
        now = self._clock() if now is None else now
        return m.seen is not None and now - m.seen <= self.settings.heartbeat_timeout_s

    # --- what the head's backend asks ------------------------------------------------------
    def absent(self) -> dict[int, str]:
        """Ranks that cannot join a group now, and why (empty: a group can form)."""
        now = self._clock()
        out = {}
        for r, m in self.members.items():
            if m.seen is None:
                out[r] = (f"{m.name} has not reported: start its agent with cluster.rank {r} and cluster.head "
                          f"{self.settings.head}")
            elif not self._fresh(m, now):
                out[r] = f"{m.name} is silent: its agent's heartbeat stopped"
            elif m.refusal:
                out[r] = f"{m.name} is refused: {m.refusal}"
            elif m.beat.engine != "idle":
                out[r] = f"{m.name} still runs an engine of group {m.beat.engine_epoch}; waiting for it to stop"
        return out

    def hosts(self) -> list[HostInfo]:
        """The members' detection, head first (every member must have reported)."""
        return [self.head] + [self.members[r].host for r in sorted(self.members)]

    def loss(self) -> tuple[int, str] | None:
        """While a group forms or runs: the first member it lost, and why."""
        if self.group == "idle":
            return None
        now = self._clock()
        for r, m in sorted(self.members.items()):
            if not self._fresh(m, now):
                silent = f"{now - m.seen:.1f} s ago" if m.seen is not None else "before it reported"
                return r, f"{m.name} lost: its agent's heartbeat stopped {silent}"
            if m.refusal:
                return r, f"{m.name} lost: {m.refusal}"
            beat = m.beat
            if m.joined == self.epoch and (beat.engine == "idle" or beat.engine_epoch != self.epoch):
                return r, f"{m.name} lost: its engine stopped ({beat.error or 'no reason given'})"
        return None

    def form(self, spec_for: Callable[[int, str], EngineSpec], layers: dict[int, tuple[tuple[int, ...], int]]) -> str:
        """A new group: its epoch, and each worker's spec (``spec_for(rank, epoch)``)."""
        self._count += 1
        self.epoch = f"{self.head_id}-{self._count}"
        self._specs = {r: spec_for(r, self.epoch) for r in self.members}
        self.layers = dict(layers)
        self.group, self.reason = "forming", None
        return self.epoch

    def waiting_for(self) -> list[str]:
        """Members whose engine has not joined the forming group yet."""
        return [m.name for m in self.members.values() if m.joined != self.epoch]

    def not_joined(self) -> str:
        """What each member that has not joined the forming group last reported (for a join timeout)."""
        now = self._clock()
        out = []
        for m in self.members.values():
            if m.joined == self.epoch:
                continue
            if m.beat is None:
                out.append(f"{m.name} never reported")
                continue
            engine = m.beat.engine + (f" for group {m.beat.engine_epoch}" if m.beat.engine_epoch else "")
            error = f", its last engine error: {m.beat.error}" if m.beat.error else ""
            out.append(f"{m.name} reported its engine {engine} {now - m.seen:.1f} s ago{error}")
        return "; ".join(out)

    def running(self) -> None:
        """Every rank's engine is in the group and the head's engine is built."""
        self.group = "running"
        for m in self.members.values():
            m.lost = None

    def dissolve(self, reason: str, rank: int | None = None) -> None:
        """The group is over (a member was lost, vLLM died, the head stops): workers stop their engines."""
        if self.group != "idle":
            self.group, self.reason, self._specs = "idle", reason, {}
            if rank in self.members:
                self.members[rank].lost = reason

    # --- reporting -------------------------------------------------------------------------
    def describe(self) -> dict:
        """The group for /health/ready and /v1/node (docs/schemas/node.schema.json, cluster)."""
        now = self._clock()
        head = {"rank": 0, "hostname": self.head.hostname, "address": self.network.host_ip,
                "state": "ok" if self.group == "running" else "idle", "engine": self.group,
                "last_seen_s": 0.0, "reason": None, **self._share(0)}
        members = [head]
        for r, m in sorted(self.members.items()):
            state = self._state(m, now)
            why = m.lost or m.refusal or (self.absent().get(r) if state == "missing" else None)
            members.append({"rank": r, "hostname": m.beat.hostname if m.beat else None,
                            "address": m.beat.host_ip if m.beat else None, "state": state,
                            "engine": m.beat.engine if m.beat else None,
                            "last_seen_s": round(now - m.seen, 2) if m.seen is not None else None,
                            "reason": why, **self._share(r)})
        missing = [{"rank": x["rank"], "hostname": x["hostname"], "reason": x["reason"]}
                   for x in members[1:] if x["state"] == "missing" or self.members[x["rank"]].lost]
        return {"role": "head", "nodes": self.settings.nodes, "rank": 0, "rendezvous": self.settings.head,
                "head_id": self.head_id, "epoch": self.epoch, "group": self.group, "reason": self.reason,
                "members": members, "missing": missing}

    def _state(self, m: Member, now: float) -> str:
        if not self._fresh(m, now) or m.refusal:
            return "missing"
        if self.group != "idle" and m.joined == self.epoch:
            return "ok" if self.group == "running" else "joining"
        return "idle"

    def _share(self, rank: int) -> dict:
        stages, layers = self.layers.get(rank, ((), None))
        return {"stages": list(stages), "layers": layers}
