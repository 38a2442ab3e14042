"""A model across hosts (#16), the parts that need no engine: the settings and network rules, the
head's membership decisions on a fake clock, the supervisor's wait before a group start, and what
readiness and /v1/node say about a group. The real group runs in tests/e2e/test_cluster.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import jsonschema
import pytest

from agent.backends.base import Backend, BackendState
from agent.backends.vllm_cluster import ClusterVllmBackend
from agent.backends.vllm_headless import HeadlessBackend
from agent.cluster.coordinator import Coordinator
from agent.cluster.link import HeadLink
from agent.cluster.network import Network, is_private, resolve_network
from agent.cluster.protocol import EngineSpec, Heartbeat
from agent.cluster.runtime import ClusterRuntime, cluster_runtime
from agent.catalog.resolve import resolve_model
from agent.errors import ConfigError, UsageError
from agent.hardware import detect
from agent.hardware.report import host_to_dict
from agent.planner.cluster import plan_cluster
from agent.serving.app import create_app
from agent.serving.monitor import NodeMonitor
from agent.serving.node import build_node
from agent.serving.router import Router
from agent.settings import AdmissionSettings, ClusterSettings, RouterSettings, Settings, load_settings
from tests.unit.fake_backend import FakeBackend

ROOT = Path(__file__).parents[2]
NODE_SCHEMA = json.loads((ROOT / "docs/schemas/node.schema.json").read_text())
CLUSTER_SCHEMA = {"$defs": NODE_SCHEMA["$defs"], "$ref": "#/$defs/cluster"}
HEAD_IP = "10.0.0.1"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- settings and network ------------------------------------------------------------------------


def test_without_a_cluster_section_nothing_changes():
    s = Settings.model_validate({})
    assert not s.cluster.enabled and s.cluster.nodes == 1 and s.cluster.head is None


@pytest.mark.parametrize("cluster, message", [
    ({"nodes": 2}, "needs head: host:port"),
    ({"nodes": 2, "rank": 2, "head": "10.0.0.1:29501"}, "rank 2 must be below nodes"),
    ({"nodes": 2, "head": "10.0.0.1:29501", "heartbeat_interval_s": 2, "heartbeat_timeout_s": 3},
     "must exceed two heartbeats"),
    ({"nodes": 2, "head": "not a host port"}, "cluster.head"),
    ({"nodes": 65, "head": "10.0.0.1:29501"}, "cluster.nodes"),
])
def test_bad_cluster_settings_name_the_key(tmp_path, cluster, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"cluster": cluster}))
    with pytest.raises(ConfigError, match=message):
        load_settings(cfg, env={})


def _addresses(**nics):
    return lambda: {name: [SimpleNamespace(family=socket.AF_INET, address=ip)] for name, ip in nics.items()}


def _lookup(host: str) -> str:
    return {"head.lan": "192.168.1.10"}.get(host, host)


def test_the_interface_gives_vllm_host_ip_and_the_socket_interfaces():
    c = ClusterSettings(nodes=2, rank=1, head="head.lan:29501", interface="eth1", head_api_port=9000)
    n = resolve_network(c, _addresses(eth1="192.168.1.20", lo="127.0.0.1"), _lookup)
    assert (n.host_ip, n.head_host, n.head_port, n.head_ip, n.head_api) == (
        "192.168.1.20", "head.lan", 29501, "192.168.1.10", "http://head.lan:9000")
    assert n.environment() == {"VLLM_HOST_IP": "192.168.1.20", "GLOO_SOCKET_IFNAME": "eth1",
                               "NCCL_SOCKET_IFNAME": "eth1"}


def test_a_public_address_is_refused_unless_allowed():
    c = ClusterSettings(nodes=2, head="10.0.0.1:29501", host_ip="93.184.216.34")
    with pytest.raises(UsageError, match="93.184.216.34, a public address: vLLM's cluster traffic is unauthenticated"):
        resolve_network(c, _addresses(), _lookup)
    c = ClusterSettings(nodes=2, head="10.0.0.1:29501", interface="wan0")
    with pytest.raises(UsageError, match=r"cluster.interface wan0 is 100.64.0.5, a public address"):
        resolve_network(c, _addresses(wan0="100.64.0.5"), _lookup)  # CGNAT is not private
    allowed = ClusterSettings(nodes=2, head="10.0.0.1:29501", interface="wan0", allow_public=True)
    assert resolve_network(allowed, _addresses(wan0="100.64.0.5"), _lookup).host_ip == "100.64.0.5"
    assert is_private("127.0.0.2") and is_private("172.16.4.4") and is_private("fd12::1") and not is_private("8.8.8.8")


def test_missing_interfaces_and_addresses_say_what_to_set():
    with pytest.raises(UsageError, match="interfaces: eth0, lo"):
        resolve_network(ClusterSettings(nodes=2, head="10.0.0.1:1", interface="eth9"),
                        _addresses(eth0="10.0.0.2", lo="127.0.0.1"), _lookup)
    with pytest.raises(UsageError, match="set cluster.interface .* or cluster.host_ip"):
        resolve_network(ClusterSettings(nodes=2, head="10.0.0.1:1"), _addresses(), _lookup)


def _settings(**cluster) -> Settings:
    return Settings.model_validate({"health": {"token": "t" * 20}, "cluster": {
        "nodes": 2, "head": "127.0.0.1:29501", "host_ip": "127.0.0.1", "head_api_port": 8080, **cluster}})


def test_a_group_member_needs_the_health_token_and_a_reachable_head(monkeypatch):
    monkeypatch.setattr("agent.cluster.runtime.vllm_installed", lambda: True)
    host = detect("cpu-only", env={})
    model = resolve_model("smollm2-135m-instruct")
    bare = Settings.model_validate({"cluster": {"nodes": 2, "head": "127.0.0.1:29501", "host_ip": "127.0.0.1"}})
    with pytest.raises(UsageError, match="needs health.token"):
        cluster_runtime(bare, host, model, "m")
    with pytest.raises(UsageError, match="server.host is 127.0.0.1"):
        cluster_runtime(_settings(head="10.0.0.1:29501", host_ip="10.0.0.1"), host, model, "m")
    with pytest.raises(UsageError, match="must be this head's server.port"):
        cluster_runtime(_settings(head_api_port=9999), host, model, "m")
    assert cluster_runtime(_settings(), host, model, "m").is_head
    monkeypatch.setattr("agent.cluster.runtime.vllm_installed", lambda: False)
    with pytest.raises(UsageError, match="runs vLLM's multi-node executor: install vLLM"):
        cluster_runtime(_settings(), host, model, "m")
    monkeypatch.setattr("agent.cluster.runtime.vllm_installed", lambda: True)
    worker = cluster_runtime(_settings(rank=1, host_ip="127.0.0.2"), host, model, "m")
    assert not worker.is_head and worker.link.url == "http://127.0.0.1:8080/health/cluster/heartbeat"


# --- the head's view of its members --------------------------------------------------------------


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def coord(clock):
    c = ClusterSettings(nodes=3, head=f"{HEAD_IP}:29501", heartbeat_interval_s=0.5, heartbeat_timeout_s=3)
    net = Network(None, HEAD_IP, HEAD_IP, 29501, f"http://{HEAD_IP}:8080", HEAD_IP)
    return Coordinator(c, net, detect("rtx5090-rtx4090", env={}), "fp-70b", clock=clock)


HOST = host_to_dict(detect("rtx5090-rtx4090", env={}))


def beat(rank: int, engine: str = "idle", epoch: str | None = None, agent: str | None = None, **kw) -> Heartbeat:
    base = dict(rank=rank, agent_id=agent or f"agent-{rank}", hostname=f"box-{rank}", host_ip=f"10.0.0.{rank + 1}",
                host=HOST, model_name="llama-3.1-70b-instruct", model_fingerprint="fp-70b", engine=engine,
                engine_epoch=epoch)
    return Heartbeat(**{**base, **kw})


def spec(rank: int, epoch: str) -> EngineSpec:
    return EngineSpec(epoch=epoch, nnodes=3, node_rank=rank, master_addr=HEAD_IP, master_port=29501,
                      tensor_parallel_size=1, pipeline_parallel_size=3, pp_layer_partition=(27, 27, 26),
                      dtype="bfloat16", quantization="fp8", kv_cache_dtype="auto", gpu_memory_utilization=0.9,
                      max_model_len=8192, max_num_seqs=64, max_num_batched_tokens=2048, chunked_prefill=True,
                      devices=(0, 1), disable_p2p=True, cpu_kvcache_gib=1)


def running_group(coord, clock) -> str:
    for r in (1, 2):
        coord.heartbeat(beat(r))
    epoch = coord.form(spec, {0: ((0,), 27), 1: ((1,), 27), 2: ((2,), 26)})
    for r in (1, 2):
        reply = coord.heartbeat(beat(r, "starting", epoch))
        assert reply.group == "forming" and reply.spec.node_rank == r and reply.spec.epoch == epoch
    assert coord.waiting_for() == []
    coord.running()
    return epoch


def test_a_group_forms_only_once_every_member_reports_with_its_engine_stopped(coord, clock):
    absent = coord.absent()
    assert set(absent) == {1, 2} and "start its agent with cluster.rank 1" in absent[1]
    coord.heartbeat(beat(1))
    coord.heartbeat(beat(2, "running", "old-epoch"))
    assert list(coord.absent()) == [2] and "still runs an engine" in coord.absent()[2]
    coord.heartbeat(beat(2))
    assert coord.absent() == {}
    assert [h.hostname for h in coord.hosts()] == ["homelab"] * 3  # the members' own detection, head first


def test_a_worker_whose_heartbeat_stops_is_lost_within_the_timeout(coord, clock):
    epoch = running_group(coord, clock)
    clock.now += 2.9
    coord.heartbeat(beat(1, "running", epoch))
    assert coord.loss() is None
    clock.now += 0.2  # rank 2 silent for 3.1 s
    rank, why = coord.loss()
    assert rank == 2 and why == "rank 2 (box-2) lost: its agent's heartbeat stopped 3.1 s ago"
    coord.dissolve(why, rank)
    d = coord.describe()
    assert d["group"] == "idle" and d["missing"] == [{"rank": 2, "hostname": "box-2", "reason": why}]
    jsonschema.validate(d, CLUSTER_SCHEMA)


def test_an_engine_that_stopped_after_joining_is_lost_at_once_with_its_reason(coord, clock):
    epoch = running_group(coord, clock)
    coord.heartbeat(beat(1, "idle", None, error="vLLM's headless engine exited with status -9"))
    assert coord.loss() == (1, "rank 1 (box-1) lost: its engine stopped (vLLM's headless engine exited with status -9)")
    # a worker agent restarted with its engine idle counts the same: it left the running group
    coord.heartbeat(beat(1, "running", epoch))
    coord.heartbeat(beat(2, "idle", agent="agent-2-restarted"))
    assert coord.loss()[0] == 2


def test_a_member_still_joining_is_not_lost_and_a_dissolved_group_hands_out_no_spec(coord, clock):
    coord.heartbeat(beat(1))
    coord.heartbeat(beat(2))
    epoch = coord.form(spec, {})
    coord.heartbeat(beat(1, "starting", epoch))
    assert coord.loss() is None and coord.waiting_for() == ["rank 2 (box-2)"]
    clock.now += 1.5
    # what a join timeout tells the operator: what the missing member last said about its engine
    assert coord.not_joined() == "rank 2 (box-2) reported its engine idle 1.5 s ago"
    coord.heartbeat(beat(2, "idle", error="vLLM's headless engine exited with status 2"))
    assert coord.not_joined() == ("rank 2 (box-2) reported its engine idle 0.0 s ago, its last engine error: "
                                  "vLLM's headless engine exited with status 2")
    coord.dissolve("the head is stopping")
    reply = coord.heartbeat(beat(2))
    assert reply.group == "idle" and reply.spec is None and reply.reason == "the head is stopping"


def test_members_that_cannot_be_in_the_group_are_refused_with_the_reason(coord, clock):
    other = coord.heartbeat(beat(1, model_fingerprint="fp-8b", model_name="llama-3.1-8b-instruct"))
    assert "serves another model (llama-3.1-8b-instruct" in other.refusal and "is refused" in coord.absent()[1]
    same_ip = coord.heartbeat(beat(2, host_ip=HEAD_IP))
    assert f"VLLM_HOST_IP {HEAD_IP} is also the head's" in same_ip.refusal
    assert "rank 5 is not in this group" in coord.heartbeat(beat(5)).refusal
    coord.heartbeat(beat(1))
    taken = coord.heartbeat(beat(1, agent="intruder", host_ip="10.0.0.9", hostname="other"))
    assert "rank 1 is taken by the agent on box-1 (10.0.0.2)" in taken.refusal
    bad = coord.heartbeat(beat(2, host={"schema_version": 99}))
    assert "detection report is unreadable" in bad.refusal


def test_a_new_head_has_a_new_id_and_every_group_a_new_epoch(coord, clock):
    first = running_group(coord, clock)
    coord.dissolve("lost")
    assert coord.form(spec, {}) != first and coord.form(spec, {}).startswith(coord.head_id)
    again = Coordinator(coord.settings, coord.network, coord.head, "fp-70b", clock=clock)
    assert again.head_id != coord.head_id


def test_the_worker_link_says_when_the_head_is_silent(clock):
    c = ClusterSettings(nodes=2, rank=1, head=f"{HEAD_IP}:29501", heartbeat_timeout_s=3)
    net = Network(None, "10.0.0.2", HEAD_IP, 29501, f"http://{HEAD_IP}:8080", HEAD_IP)
    link = HeadLink(c, net, HOST, "box-1", "m", "fp", "t" * 20, clock=clock)
    clock.now += 10
    d = link.describe()
    jsonschema.validate(d, CLUSTER_SCHEMA)
    assert d["role"] == "worker" and d["group"] == "idle" and d["head_seen_s"] == 10
    assert d["missing"] == [{"rank": 0, "hostname": None, "reason": f"the head agent at http://{HEAD_IP}:8080 does not answer"}]
    assert link.beat().engine == "idle" and link.beat().rank == 1


def test_the_spec_round_trips_the_plan_each_host_runs():
    cpu = detect("cpu-only", env={})
    p = plan_cluster([cpu, cpu], resolve_model("smollm2-135m-instruct"), Settings.model_validate({}), vllm_cpu=True)
    s = EngineSpec.for_rank(p.members[1].plan, "e-1", 2, 1, ("127.0.0.1", 29501), 1)
    back = EngineSpec.model_validate_json(s.model_dump_json()).plan()
    assert (back.pipeline_parallel_size, back.pp_layer_partition, back.devices) == (2, (15, 15), ())
    assert s.cluster_kwargs() == {"nnodes": 2, "node_rank": 1, "master_addr": "127.0.0.1", "master_port": 29501,
                                  "distributed_executor_backend": "mp"}


# --- the supervisor and readiness ----------------------------------------------------------------


class WaitingBackend(FakeBackend):
    """A fake whose start waits for ``until_startable``, as a vLLM group waits for its members."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.members = asyncio.Event()
        self.cluster = {"role": "head", "nodes": 2, "rank": 0, "rendezvous": "h:1", "head_id": "x", "epoch": None,
                        "group": "idle", "reason": None, "members": [],
                        "missing": [{"rank": 1, "hostname": None, "reason": "rank 1 has not reported"}]}

    async def until_startable(self) -> None:
        await self.members.wait()

    def health(self):
        h = super().health()
        return type(h)(h.state, h.since, h.last_error, h.restarts, {**h.detail, "cluster": self.cluster})


def test_the_supervisor_waits_for_the_members_without_counting_failed_starts_and_readiness_names_them():
    group, fallback = WaitingBackend("vllm"), FakeBackend("llamacpp")

    async def run():
        r = Router([group, fallback], RouterSettings(restart_backoff_s=0.01, max_restart_attempts=1),
                   AdmissionSettings())
        monitor = NodeMonitor(r, None, 0, 1.0)
        starting = asyncio.create_task(r.start())
        for _ in range(100):
            if fallback.state is BackendState.READY:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        waiting = monitor.compute_readiness()
        assert group.starts == 0 and not r.routes[0].gave_up  # waiting is no failed start
        group.members.set()
        await starting
        group.cluster = {**group.cluster, "group": "running", "missing": []}
        up = monitor.compute_readiness()
        await r.stop()
        return waiting, up
    waiting, up = asyncio.run(run())
    assert waiting.status == "degraded" and waiting.backend == "llamacpp"
    assert "cluster: group idle; missing rank 1: rank 1 has not reported" in waiting.reason
    assert waiting.cluster["missing"][0]["rank"] == 1
    assert up.status == "ok" and up.backend == "vllm" and up.cluster["group"] == "running"


def test_a_worker_agents_node_document_shows_its_link_to_the_head():
    """The worker's own endpoint (its backend is the headless engine, not started here)."""
    token = "t" * 20
    s = Settings.model_validate({"health": {"token": token},
                                 "cluster": {"nodes": 2, "rank": 1, "head": f"{HEAD_IP}:29501"}})
    net = Network(None, "10.0.0.2", HEAD_IP, 29501, f"http://{HEAD_IP}:8080", HEAD_IP)
    link = HeadLink(s.cluster, net, HOST, "box-1", "m", "fp", token, clock=Clock())
    router = Router([HeadlessBackend(link, Path("/models/m"), "m")], s.router, s.admission)
    app = create_app(s, build_node(s, router, "m"))

    async def get():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.get("/v1/node", headers={"Authorization": f"Bearer {token}"})
    r = asyncio.run(get())
    assert r.status_code == 200
    doc = r.json()
    jsonschema.validate(doc, NODE_SCHEMA)
    assert doc["plan"] == {}  # the head plans the group and shows it
    assert doc["cluster"]["role"] == "worker" and doc["cluster"]["missing"][0]["rank"] == 0
    assert doc["backends"][0]["name"] == "vllm" and doc["backends"][0]["features"]["constraints"]


def test_a_group_that_stops_producing_tokens_is_failed_and_dissolved(coord, clock):
    """The members all answer their heartbeats, but requests get no token: the head's guard fails
    vLLM after cluster.stall_timeout_s (vLLM itself would wait 300 s) and dissolves the group."""
    running_group(coord, clock)
    s = Settings.model_validate({"cluster": {"nodes": 3, "head": f"{HEAD_IP}:29501", "stall_timeout_s": 1}})
    b = ClusterVllmBackend(coord, coord.network, resolve_model("smollm2-135m-instruct"), s, Path("/models/m"), "m",
                           vllm_cpu=True, vllm_version=None)
    b._state.move(BackendState.STARTING)
    b._state.move(BackendState.READY)

    async def guard(idle_s: float, active: dict) -> None:
        b._active, b._progress = active, time.monotonic() - idle_s
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(b._watch_group(), 0.5)

    asyncio.run(guard(30, {}))  # idle with nothing running is no stall
    assert b.state is BackendState.READY and coord.group == "running"
    asyncio.run(guard(1.5, {"r-1": 64}))
    assert b.state is BackendState.FAILED
    assert re.fullmatch(r"generation stalled: no token from the group for \d+ s with 1 request\(s\) running",
                        b.health().last_error)
    assert coord.group == "idle" and coord.reason == b.health().last_error


def test_heartbeats_need_the_health_token_even_with_the_open_health_check(coord):
    """GET /health may be open (health.open_health_check, for gateways); a heartbeat never is."""
    token = "t" * 20
    s = Settings.model_validate({"health": {"token": token, "open_health_check": True},
                                 "cluster": {"nodes": 3, "head": f"{HEAD_IP}:29501"}})
    router = Router([FakeBackend("vllm")], s.router, s.admission)
    app = create_app(s, build_node(s, router, "m"))
    app.include_router(ClusterRuntime(s, coord.network, coordinator=coord).routes())
    body = beat(1).model_dump(mode="json")

    async def post(headers):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.post("/health/cluster/heartbeat", json=body, headers=headers)
    refused = asyncio.run(post({}))
    wrong = asyncio.run(post({"Authorization": "Bearer " + "x" * 20}))
    answered = asyncio.run(post({"Authorization": f"Bearer {token}"}))
    assert (refused.status_code, wrong.status_code) == (401, 401)
    assert answered.status_code == 200 and answered.json()["head_id"] == coord.head_id
    assert list(coord.absent()) == [2]  # rank 1 reported, through the token only


def test_the_group_backends_implement_the_whole_backend_protocol():
    """A method added to Backend (as #12 added features and detokenize) must reach both group backends."""
    wanted = {n for n in dir(Backend) if not n.startswith("_")}
    for cls in (ClusterVllmBackend, HeadlessBackend):
        assert wanted - set(dir(cls)) == set(), cls.__name__
