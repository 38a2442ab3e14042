"""The plan → engine arguments translation, without starting an engine (#4)."""

from __future__ import annotations

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
