"""Planning one model across hosts for vLLM's multi-node executor: pure, like the rest of the planner.

Tensor parallel stays inside a host, pipeline parallel crosses hosts (vLLM's own advice for
multi-node serving), and the layers are split unevenly so each stage gets what its GPUs can
hold (VLLM_PP_LAYER_PARTITION, the same string on every host). The group is planned as one set of
GPUs (head first) by the single-host vLLM planner, restricted to the layouts vLLM's executor can
run across hosts; what it cannot run is refused with the rule from vLLM's source:

- every host runs the same number of ranks: ``--nnodes`` must divide the world size
  (vllm/engine/arg_utils.py create_engine_config) and each host starts ``world_size // nnodes``
  workers (vllm/v1/executor/multiproc_executor.py ``_get_parallel_sizes``, ``local_world_size``);
- ranks are numbered host by host (``global_start_rank = local_world_size * node_rank``) and a TP
  group is a run of consecutive ranks, so a TP size above the ranks of one host spans hosts: every
  layer's two all-reduces would cross the network (over TCP where there is no RDMA). Refused;
- one platform per world: a host without a GPU cannot join a CUDA group (and vLLM's CPU build
  runs the group only when every host is a CPU host).

The llama.cpp fallback runs on the head alone and is planned for the head's memory alone: the
largest GGUF of the model that fits there, named in the plan.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from agent.catalog.types import ModelSpec
from agent.errors import PlanError
from agent.hardware.types import GIB, MIB, GpuInfo, GpuLink, HostInfo
from agent.planner import kvcache, weights
from agent.planner.budget import budgets, gib, margin_reason
from agent.planner.llamacpp import plan_llamacpp
from agent.planner.types import GpuBudget, LlamaCppPlan, Pins, VllmPlan
from agent.planner.versions import NEWEST_READ, rules_for
from agent.planner.vllm import plan_vllm
from agent.planner.vllm_cpu import CPU_BLOCK_SIZE, plan_vllm_cpu
from agent.planner.vllm_layouts import Layout, tp_problem
from agent.settings import Settings

TP_ACROSS_HOSTS = ("vLLM numbers ranks host by host (multiproc_executor.py: global_start_rank = local_world_size "
                   "x node_rank) and a TP group is consecutive ranks, so it would span hosts and all-reduce twice "
                   "per layer over the network")
EQUAL_RANKS = ("vLLM starts world_size // nnodes workers on every host (arg_utils.py: --nnodes must evenly divide "
               "the world size; multiproc_executor.py local_world_size)")


@dataclass(frozen=True)
class MemberPlan:
    """What one host of the group runs: its rank, GPUs (this host's CUDA ordinals), pipeline
    stages and decoder layers, and the engine arguments for it (``plan``: devices are this host's)."""

    rank: int
    hostname: str
    gpus: tuple[GpuBudget, ...]
    stages: tuple[int, ...]
    layers: int
    plan: VllmPlan


@dataclass(frozen=True)
class ClusterPlan:
    """The group's plan: the vLLM layout over every host, each member's share, the head's fallback."""

    model: str
    fits: bool
    vllm: VllmPlan  # the whole group (devices: positions over the hosts, head first)
    members: tuple[MemberPlan, ...]  # by rank; empty when it does not fit
    fallback: LlamaCppPlan | None  # on the head alone
    reasons: tuple[str, ...]
    refusals: tuple[str, ...] = ()
    refusal: str | None = None

    @property
    def partition(self) -> tuple[int, ...]:
        """Decoder layers per pipeline stage (VLLM_PP_LAYER_PARTITION)."""
        return self.vllm.pp_layer_partition or ()


def plan_cluster(hosts: Sequence[HostInfo], model: ModelSpec, settings: Settings, pins: Pins = Pins(),
                 vllm_cpu: bool = False, vllm_version: str | None = None, fallback: bool = True) -> ClusterPlan:
    """Plan ``model`` over ``hosts`` (rank order: the head first). ``vllm_cpu``: vLLM's CPU build is
    what runs (every host without a GPU). ``fallback``: also plan the head's llama.cpp from the
    model's GGUFs (``serve`` plans it from the GGUF on disk instead)."""
    if len(hosts) < 2:
        raise PlanError("a cluster plan needs at least two hosts (--profile A --profile B ...)")
    if pins.engine == "llamacpp" or "vllm" not in settings.engines.chain:
        raise PlanError("a model across hosts runs on vLLM's multi-node executor; llama.cpp serves on one host "
                        "(drop --engine llamacpp, keep vllm in engines.chain)")
    if pins.quantization and pins.quantization.startswith("gguf:"):
        raise PlanError("--quantization gguf:* is a llama.cpp format; the group runs vLLM")
    version = settings.planner.vllm_version or vllm_version
    rules = rules_for(version or NEWEST_READ)
    notes = [] if version else [f"vLLM version unknown: planned with the rules of {rules.label}, the newest "
                                f"release modelled"]
    without = [h for h in hosts if not h.gpus]
    if len(without) == len(hosts) and vllm_cpu:
        plan = _plan_cpu(hosts, model, settings, pins, rules.label, notes)
    elif without:
        names = ", ".join(f"{h.hostname} ({h.gpu_reason or 'no GPU'})" for h in without)
        why = (f"{names} has no GPU: one vLLM group runs on one platform, so every host needs GPUs "
               f"(or every host runs vLLM's CPU build)")
        plan = _refused(model, why)
    else:
        plan = _plan_gpus(hosts, model, settings, pins, rules, notes)
    if not fallback:
        return plan
    head_plan, lines = plan_head_fallback(hosts[0], model, settings)
    return dataclasses.replace(plan, fallback=head_plan, reasons=(*plan.reasons, *lines))


# --- GPU hosts ---------------------------------------------------------------------------------

def _plan_gpus(hosts: Sequence[HostInfo], model: ModelSpec, settings: Settings, pins: Pins, rules,
               notes: list[str]) -> ClusterPlan:
    s = settings.planner
    per_host = min(len(h.gpus) for h in hosts)
    reasons = list(notes)
    refusals: list[str] = []
    counts = [len(h.gpus) for h in hosts]
    if len(set(counts)) > 1:
        reasons.append(f"GPUs per host {'/'.join(map(str, counts))}: {EQUAL_RANKS}, so {per_host} GPU(s) of each "
                       f"host are used and the rest stay idle")
    if pins.tp is not None and pins.tp > per_host:
        raise PlanError(f"--tp {pins.tp} spans hosts (each host runs at most {per_host} rank(s)): {TP_ACROSS_HOSTS}; "
                        f"use --tp {per_host} or less and let pipeline parallel cross the hosts")
    gpus, group, offsets = _group(hosts, s, "llamacpp" in settings.engines.chain)
    lays = _layouts(model, gpus, offsets, per_host, pins)
    if not lays:
        raise PlanError(f"no TP x PP layout over {len(hosts)} hosts fits the pins (--tp {pins.tp}, --pp {pins.pp}): "
                        f"PP must be hosts x ranks per host / TP")
    every = per_host * len(hosts)
    if not tp_problem(model.arch.num_attention_heads, model.arch.num_kv_heads, every):
        refusals.append(f"TP={every} over all {every} GPUs (any TP above {per_host}): refused, {TP_ACROSS_HOSTS}")
    if len(set(counts)) > 1:
        refusals.append(f"layouts using more than {per_host} GPU(s) of a host: refused, {EQUAL_RANKS}")
    chosen, _, _, vllm_refusals = plan_vllm(group, model, s, pins, reserve_fallback=False, rules=rules,
                                            gpus=gpus, lays=lays)
    refusals = vllm_refusals + refusals
    if chosen is None:
        why = "; ".join(vllm_refusals) or "no layout fits"
        return _refused(model, f"vLLM cannot serve {model.name} on these {len(hosts)} hosts: {why}",
                        tuple(refusals), tuple(reasons))
    members = _members(hosts, chosen, offsets, per_host)
    own = [f"rank {rank} ({h.hostname}): " + margin_reason(h.gpus[g.index], s, rank == 0 and "llamacpp" in settings.engines.chain)
           for rank, (h, m) in enumerate(zip(hosts, members)) for g in m.gpus]
    kept = [line for line in chosen.reasons if not any(line.startswith(f"GPU {g.index} (") for g in chosen.per_gpu)]
    split = "/".join(str(m.layers) for m in members)
    reasons += own
    legend = ", ".join(f"rank {r} ({h.hostname}): GPU {o}" + (f"-{o + len(h.gpus) - 1}" if len(h.gpus) > 1 else "")
                       for r, (h, o) in enumerate(zip(hosts, offsets)))
    reasons.append(f"GPU numbers below count over the group, host by host in rank order ({legend})")
    reasons.append(f"{len(hosts)} hosts x {per_host} rank(s): TP={chosen.tensor_parallel_size} inside each host, "
                   f"PP={chosen.pipeline_parallel_size} across them (vLLM's advice for several nodes: TP within a "
                   f"node, PP across nodes); layers per host {split}")
    whole = dataclasses.replace(chosen, pp_layer_partition=_partition(chosen), reasons=tuple(kept))
    return ClusterPlan(model.name, True, whole, members, None, tuple(reasons), tuple(refusals))


def _group(hosts: Sequence[HostInfo], s, fallback: bool) -> tuple[list[GpuBudget], HostInfo, list[int]]:
    """Every host's GPU budgets as one list (head first) and a host standing for the whole group:
    its GPUs renumbered by position, named with their host, and only links inside a host (hosts
    share no P2P); ``offsets``: where each host's GPUs start."""
    gpus: list[GpuBudget] = []
    infos: list[GpuInfo] = []
    links: list[GpuLink] = []
    offsets: list[int] = []
    for rank, h in enumerate(hosts):
        base = len(infos)
        offsets.append(base)
        for b, g in zip(budgets(h, s, reserve_fallback=fallback and rank == 0), h.gpus):
            name = f"{g.name} of rank {rank} ({h.hostname}, GPU {g.index})"
            gpus.append(dataclasses.replace(b, index=base + g.index, name=name))
            infos.append(dataclasses.replace(g, index=base + g.index, name=name))
        links += [dataclasses.replace(l, a=base + l.a, b=base + l.b) for l in h.links]
    head = hosts[0]
    group = HostInfo(hostname=f"{len(hosts)} hosts", cpu_model=head.cpu_model, cpu_physical_cores=head.cpu_physical_cores,
                     cpu_logical_cores=head.cpu_logical_cores, ram_total_bytes=head.ram_total_bytes,
                     ram_available_bytes=head.ram_available_bytes, gpus=tuple(infos), links=tuple(links),
                     driver_version=head.driver_version, cuda_driver_version=head.cuda_driver_version,
                     source="cluster")
    return gpus, group, offsets


def _layouts(model: ModelSpec, gpus: Sequence[GpuBudget], offsets: list[int], per_host_max: int,
             pins: Pins) -> list[Layout]:
    """Layouts vLLM's executor runs over the hosts: the same ranks on every host (its GPUs with the
    most room), TP inside a host, stages in host order."""
    arch = model.arch
    n = len(offsets)
    ends = offsets[1:] + [len(gpus)]
    out = []
    for per_host in range(1, per_host_max + 1):
        devices: list[int] = []
        for start, end in zip(offsets, ends):
            mine = sorted(range(start, end), key=lambda i: (-gpus[i].usable_bytes, i))[:per_host]
            devices += sorted(mine)
        for tp in range(1, per_host + 1):
            if per_host % tp or tp_problem(arch.num_attention_heads, arch.num_kv_heads, tp):
                continue
            pp = n * per_host // tp
            if pp > arch.num_layers or (pins.tp is not None and tp != pins.tp) or (pins.pp is not None and pp != pins.pp):
                continue
            out.append(Layout(tp, pp, tuple(devices)))
    return out


def _partition(p: VllmPlan) -> tuple[int, ...]:
    """Layers per stage, always explicit: every host must export the same VLLM_PP_LAYER_PARTITION."""
    tp = p.tensor_parallel_size
    return tuple(p.per_gpu[stage * tp].layers for stage in range(p.pipeline_parallel_size))


def _members(hosts: Sequence[HostInfo], p: VllmPlan, offsets: list[int], per_host: int) -> tuple[MemberPlan, ...]:
    tp = p.tensor_parallel_size
    partition = _partition(p)
    out = []
    for rank, (h, base) in enumerate(zip(hosts, offsets)):
        ranks = p.per_gpu[rank * per_host:(rank + 1) * per_host]
        local = tuple(dataclasses.replace(g, index=g.index - base, name=h.gpus[g.index - base].name) for g in ranks)
        stages = tuple(range(rank * per_host // tp, (rank + 1) * per_host // tp))
        mine = dataclasses.replace(p, devices=tuple(g.index for g in local), per_gpu=local,
                                   pp_layer_partition=partition)
        out.append(MemberPlan(rank, h.hostname, local, stages, sum(partition[s] for s in stages), mine))
    return tuple(out)


# --- CPU hosts (vLLM's CPU build) --------------------------------------------------------------

def even_partition(layers: int, stages: int) -> tuple[int, ...]:
    """vLLM's own split when VLLM_PP_LAYER_PARTITION is unset (vllm/distributed/utils.py get_pp_indices):
    equal shares, the remainder spread over the stages before the last."""
    split = [layers // stages] * stages
    for i in range(2, layers % stages + 2):
        split[-i] += 1
    return tuple(split)


def _plan_cpu(hosts: Sequence[HostInfo], model: ModelSpec, settings: Settings, pins: Pins, version: str,
              notes: list[str]) -> ClusterPlan:
    """One rank per host (TP=1: the CPU build's tensor parallel is for the sockets of one host), PP
    across hosts, vLLM's even split; each rank holds its own VLLM_CPU_KVCACHE_SPACE of KV cache
    for its layers only, and the group's capacity is the smallest stage's."""
    s = settings.planner
    arch = model.arch
    kv_gib = settings.engines.vllm_cpu_kvcache_gib
    base = plan_vllm_cpu(hosts[0], model, s, kv_gib, pins, version)
    n = len(hosts)
    if pins.tp not in (None, 1) or pins.pp not in (None, n):
        raise PlanError(f"vLLM's CPU build runs one rank per host here: --tp 1 --pp {n} (got --tp {pins.tp} "
                        f"--pp {pins.pp})")
    if n > arch.num_layers:
        raise PlanError(f"{n} hosts but {model.name} has {arch.num_layers} layers: a stage needs at least one")
    split = even_partition(arch.num_layers, n)
    per_layer = kvcache.layer_token_bytes(arch, 1, weights.DTYPE_BYTES.get(arch.dtype, 2))
    tokens = min((kv_gib * GIB // (per_layer * layers)) // CPU_BLOCK_SIZE * CPU_BLOCK_SIZE for layers in split)
    want = min(pins.max_model_len or s.target_context, arch.max_position_embeddings)
    max_len = min(want, tokens)
    reasons = list(notes)
    problems = []
    for h, layers in zip(hosts, split):
        need = base.weights_bytes * layers // arch.num_layers + kv_gib * GIB
        free = h.ram_available_bytes - s.ram_margin_mib * MIB
        if need > free:
            problems.append(f"{h.hostname}: {layers} layers ({gib(need - kv_gib * GIB)} GiB) + KV {kv_gib} GiB exceed "
                            f"the {gib(free)} GiB of RAM available after the margin")
    reasons.append(f"{n} CPU hosts: vLLM's CPU build, one rank per host, PP={n}; layers per host "
                   f"{'/'.join(map(str, split))} (vLLM's even split)")
    reasons.append(f"KV cache {kv_gib} GiB per host for its own layers (engines.vllm_cpu_kvcache_gib): {tokens:,} tokens, "
                   f"the smallest stage's")
    reasons.append(f"max_model_len {max_len}: target {s.target_context}, model {arch.max_position_embeddings}")
    refusal = "; ".join(problems) or None
    whole = dataclasses.replace(base, tensor_parallel_size=1, pipeline_parallel_size=n, pp_layer_partition=split,
                                kv_cache_tokens=tokens, max_model_len=max_len, reasons=(),
                                fits=base.fits and refusal is None, refusal=refusal or base.refusal)
    members = tuple(MemberPlan(rank, h.hostname, (), (rank,), split[rank], whole) for rank, h in enumerate(hosts))
    return ClusterPlan(model.name, whole.fits, whole, members if whole.fits else (), None, tuple(reasons), (),
                       whole.refusal)


# --- the head's fallback -----------------------------------------------------------------------

def plan_head_fallback(head: HostInfo, model: ModelSpec, settings: Settings) -> tuple[LlamaCppPlan | None, list[str]]:
    """llama.cpp on the head alone: the largest GGUF of the model that fits the head's memory (the
    whole model, sized for the group, usually does not), and why."""
    if "llamacpp" not in settings.engines.chain:
        return None, ["no fallback: llamacpp is not in engines.chain, so nothing serves while the group is down"]
    ggufs = sorted((src for src in model.sources if src.format == "gguf"), key=lambda src: -(src.size_bytes or 0))
    if not ggufs:
        plan = plan_llamacpp(head, model, settings.planner, Pins(), role="fallback")
        return plan, [f"no fallback on the head ({head.hostname}): {plan.refusal}"]
    tried: list[str] = []
    plan = None
    for src in ggufs:
        plan = plan_llamacpp(head, model, settings.planner, Pins(quantization=f"gguf:{src.quant_type}"),
                             role="fallback")
        if plan.fits:
            size = f"{src.size_bytes / 1e9:.1f} GB" if src.size_bytes else "size unknown"
            smaller = f" (larger ones do not fit there: {'; '.join(tried)})" if tried else ""
            where = "on the CPU" if plan.n_gpu_layers == 0 else f"n_gpu_layers {plan.n_gpu_layers}"
            return plan, [f"fallback on the head ({head.hostname}) alone: llama.cpp with {src.quant_type} GGUF "
                          f"{src.file} ({size}), {where}, n_ctx {plan.n_ctx}{smaller}; it serves while the group "
                          f"is down"]
        tried.append(f"{src.quant_type}: {plan.refusal}")
    return plan, [f"no fallback on the head ({head.hostname}): no GGUF of {model.name} fits there ({'; '.join(tried)})"]


def _refused(model: ModelSpec, why: str, refusals: tuple[str, ...] = (), reasons: tuple[str, ...] = ()) -> ClusterPlan:
    empty = VllmPlan(
        fits=False, tensor_parallel_size=0, pipeline_parallel_size=0, pp_layer_partition=None, quantization="none",
        dtype=model.arch.dtype, kv_cache_dtype="auto", gpu_memory_utilization=0.0, max_model_len=0, max_num_seqs=0,
        max_num_batched_tokens=0, kv_cache_tokens=0, kv_bytes_per_token=0, weights_bytes=0, devices=(),
        disable_p2p=False, per_gpu=(), reasons=(), refusal=why)
    return ClusterPlan(model.name, False, empty, (), None, reasons, refusals or (why,), why)
