"""The plan → engine arguments translation, without starting an engine (#4)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from agent.backends.base import ALLOWED, BackendState, StateOwner
from agent.backends.vllm import engine_args, engine_environment
from agent.catalog import resolve_model
from agent.hardware import detect
from agent.planner import plan
from agent.settings import Settings

import pytest


def homelab_70b():
    return plan(detect("rtx5090-rtx4090", env={}), resolve_model("llama-3.1-70b-instruct"),
                Settings.model_validate({})).primary


def test_uneven_pipeline_and_no_p2p_reach_the_engine():
    p = homelab_70b()
    env = engine_environment(p, cpu_kvcache_gib=1)
    assert env["VLLM_PP_LAYER_PARTITION"] == ",".join(map(str, p.pp_layer_partition))
    assert env["NCCL_P2P_DISABLE"] == "1" and env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    args = engine_args(p, Path("/models/llama"))
    assert args["pipeline_parallel_size"] == 2 and args["tensor_parallel_size"] == 1
    assert args["quantization"] == "awq" and args["disable_custom_all_reduce"] is True
    assert args["gpu_memory_utilization"] == p.gpu_memory_utilization and args["max_model_len"] == p.max_model_len
    assert "enforce_eager" not in args  # GPUs: CUDA graphs stay on


def test_visible_devices_reach_vllm_as_the_physical_gpus_behind_the_plan():
    """CUDA_VISIBLE_DEVICES=2,3 on a 4-GPU box: the planner sees CUDA ordinals 0 and 1; vLLM's
    processes must get the physical GPUs 2 and 3 (not the ordinals written back)."""
    host = detect("a100-80gb-x4", env={"CUDA_VISIBLE_DEVICES": "2,3"})
    assert [g.index for g in host.gpus] == [0, 1] and [g.nvml_index for g in host.gpus] == [2, 3]
    p = plan(host, resolve_model("llama-3.1-70b-instruct"), Settings.model_validate({})).primary
    assert p.devices == (0, 1)
    env = engine_environment(p, 1, {g.index: g.nvml_index for g in host.gpus})
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"


def test_engine_environment_is_set_only_while_vllm_spawns(monkeypatch):
    from agent.backends.vllm import spawn_environment

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    monkeypatch.delenv("VLLM_PP_LAYER_PARTITION", raising=False)
    with spawn_environment({"CUDA_VISIBLE_DEVICES": "3", "VLLM_PP_LAYER_PARTITION": "40,40"}):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "3" and os.environ["VLLM_PP_LAYER_PARTITION"] == "40,40"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,3" and "VLLM_PP_LAYER_PARTITION" not in os.environ


def test_llamacpp_tensor_split_lists_every_visible_gpu():
    """One share per visible device, 0 for those the plan leaves alone: without it llama.cpp
    spreads layers over every GPU it sees."""
    from agent.backends.llamacpp import llama_kwargs
    from agent.planner.llamacpp import plan_llamacpp
    from agent.planner.types import Pins

    host = detect("rtx5090-rtx4090", env={})
    lp = plan_llamacpp(host, resolve_model("llama-3.1-70b-instruct"), Settings.model_validate({}).planner, Pins(),
                       role="primary")
    assert len(lp.per_gpu) == 2, lp.reasons
    kwargs = llama_kwargs(lp, visible_gpus=len(host.gpus))
    assert len(kwargs["tensor_split"]) == len(host.gpus) == 2
    used = {g.index for g in lp.per_gpu}
    assert all((share > 0) == (i in used) for i, share in enumerate(kwargs["tensor_split"]))
    single = dataclasses.replace(lp, per_gpu=lp.per_gpu[1:], tensor_split=None, main_gpu=lp.per_gpu[1].index)
    assert llama_kwargs(single, visible_gpus=2)["tensor_split"] == [0.0, 1.0]
    assert "tensor_split" not in llama_kwargs(lp, visible_gpus=1)  # one GPU: nothing to split


def test_nvlink_tp_keeps_p2p():
    p = plan(detect("a100-80gb-x4", env={}), resolve_model("llama-3.1-70b-instruct"), Settings.model_validate({})).primary
    env = engine_environment(p, 1)
    assert "NCCL_P2P_DISABLE" not in env and "VLLM_PP_LAYER_PARTITION" not in env
    assert engine_args(p, Path("m"))["tensor_parallel_size"] == 4 and "quantization" not in engine_args(p, Path("m"))


def test_state_machine_allows_only_documented_transitions():
    owner = StateOwner("x")
    owner.move(BackendState.STARTING)
    owner.move(BackendState.READY)
    owner.move(BackendState.DEGRADED)
    owner.move(BackendState.READY)
    owner.move(BackendState.FAILED, error="boom")
    assert owner.health().last_error == "boom"
    with pytest.raises(RuntimeError, match="illegal transition failed -> ready"):
        owner.move(BackendState.READY)
    owner.move(BackendState.STOPPED)
    assert BackendState.READY not in ALLOWED[BackendState.STOPPED]


def test_start_reason_is_the_last_exception_a_vllm_process_logged():
    from agent.backends.vllm import _ErrorLog

    log = _ErrorLog()
    try:
        Path(log.path).write_text(
            "ERROR 11-21 23:52:51 [core.py:1510] EngineCore failed to start.\n"
            "ERROR 11-21 23:52:51 [core.py:1510] Traceback (most recent call last):\n"
            "ERROR 11-21 23:52:51 [core.py:1510]     raise ValueError(\n"
            "ERROR 11-21 23:52:51 [core.py:1510] ValueError: To serve at least one request with the model's "
            "max seq len (4000000), (3.81 GiB KV cache is needed\n")
        assert log.last_exception() == ("ValueError: To serve at least one request with the model's max seq len "
                                        "(4000000), (3.81 GiB KV cache is needed")
        Path(log.path).write_text("INFO nothing went wrong\n")
        assert log.last_exception() is None
    finally:
        log.close()
    assert not Path(log.path).exists() and not Path(log.config_path).exists()
