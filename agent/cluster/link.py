"""A worker agent's line to the head agent: a heartbeat every ``cluster.heartbeat_interval_s``,
at once when the engine changes state, and the head's last answer.

The heartbeat authenticates with the health token (``Authorization: Bearer``), never logged. The
link knows the head is gone when no answer came for ``cluster.heartbeat_timeout_s``, and that it
was restarted when the answer carries another ``head_id``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable

import httpx2

from agent.cluster.network import Network
from agent.cluster.protocol import EngineState, Heartbeat, Reply
from agent.settings import ClusterSettings

log = logging.getLogger(__name__)
PATH = "/health/cluster/heartbeat"


class HeadLink:
    """Owned by the worker's serve; the headless backend sets the engine state and reads ``reply``."""

    def __init__(self, c: ClusterSettings, network: Network, host: dict, hostname: str, model_name: str,
                 fingerprint: str, token: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = c
        self.network = network
        self.url = network.head_api + PATH
        self._token = token
        self._clock = clock
        self.agent_id = uuid.uuid4().hex[:12]
        self._static = dict(rank=c.rank, agent_id=self.agent_id, hostname=hostname, host_ip=network.host_ip,
                            host=host, model_name=model_name, model_fingerprint=fingerprint)
        self.engine: EngineState = "idle"
        self.engine_epoch: str | None = None
        self.engine_pid: int | None = None
        self.error: str | None = None
        self.reply: Reply | None = None
        self.reply_at: float | None = None
        self.last_error: str | None = None  # why the last heartbeat got no answer
        self.started = clock()
        self._wake = asyncio.Event()

    def set_engine(self, state: EngineState, epoch: str | None = None, pid: int | None = None,
                   error: str | None = None) -> None:
        """The engine changed: the head hears of it with the next heartbeat, which goes at once."""
        self.engine, self.engine_epoch, self.engine_pid = state, epoch, pid
        if error is not None:
            self.error = error
        self._wake.set()

    def silent_for(self) -> float:
        """Seconds since the head last answered (since this agent started, before it ever did)."""
        return self._clock() - (self.reply_at if self.reply_at is not None else self.started)

    def head_alive(self) -> bool:
        return self.reply_at is not None and self.silent_for() <= self.settings.heartbeat_timeout_s

    def beat(self) -> Heartbeat:
        return Heartbeat(**self._static, engine=self.engine, engine_epoch=self.engine_epoch,
                         engine_pid=self.engine_pid, error=self.error)

    async def run(self) -> None:
        """Heartbeats until cancelled."""
        # httpx2 logs every request at INFO: one line per heartbeat would drown the journal.
        logging.getLogger("httpx2").setLevel(logging.WARNING)
        timeout = httpx2.Timeout(max(0.5, self.settings.heartbeat_timeout_s / 2))
        headers = {"Authorization": f"Bearer {self._token}"}
        async with httpx2.AsyncClient(timeout=timeout, headers=headers, trust_env=False) as client:
            while True:
                self._wake.clear()
                await self._send(client)
                try:
                    await asyncio.wait_for(self._wake.wait(), self.settings.heartbeat_interval_s)
                except TimeoutError:
                    pass

    async def _send(self, client) -> None:
        try:
            r = await client.post(self.url, content=self.beat().model_dump_json(),
                                  headers={"content-type": "application/json"})
            if r.status_code != 200:
                raise _Refused(f"HTTP {r.status_code}: {_message(r)}")
            reply = Reply.model_validate_json(r.content)
        except (httpx2.HTTPError, _Refused, ValueError) as exc:
            text = f"{type(exc).__name__}: {exc}" if not isinstance(exc, _Refused) else str(exc)
            if text != self.last_error:
                log.warning("cluster: no answer from the head at %s: %s", self.network.head_api, text)
            self.last_error = text
            return
        if self.reply is not None and reply.head_id != self.reply.head_id:
            log.warning("cluster: the head at %s restarted (id %s, was %s)", self.network.head_api, reply.head_id,
                        self.reply.head_id)
        if reply.refusal and (self.reply is None or self.reply.refusal != reply.refusal):
            log.error("cluster: the head refuses this host as rank %d: %s", self.settings.rank, reply.refusal)
        if self.last_error is not None:
            log.info("cluster: the head at %s answers again", self.network.head_api)
        self.reply, self.reply_at, self.last_error = reply, self._clock(), None

    def describe(self) -> dict:
        """This worker's view of the group, for /health/ready and /v1/node."""
        r = self.reply
        silent = self.silent_for()
        reason = None
        if not self.head_alive():  # stable text (readiness logs each change); the seconds are head_seen_s
            reason = (f"the head agent at {self.network.head_api} does not answer"
                      + (f" ({self.last_error})" if self.last_error else ""))
        elif r.refusal:
            reason = f"the head refuses this host: {r.refusal}"
        members = list(r.members) if r is not None else []
        missing = [{"rank": m["rank"], "hostname": m["hostname"], "reason": m["reason"]}
                   for m in members if m["state"] == "missing"]
        if not self.head_alive():
            missing.insert(0, {"rank": 0, "hostname": None, "reason": reason})
        return {"role": "worker", "nodes": self.settings.nodes, "rank": self.settings.rank,
                "rendezvous": self.settings.head, "head_id": r.head_id if r else None,
                "epoch": r.epoch if r else None, "group": r.group if r and self.head_alive() else "idle",
                "reason": reason or (r.reason if r else None), "members": members, "missing": missing,
                "engine": self.engine, "engine_pid": self.engine_pid, "head_seen_s": round(silent, 2)}


class _Refused(Exception):
    pass


def _message(r) -> str:
    try:
        return r.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return r.text[:200]
