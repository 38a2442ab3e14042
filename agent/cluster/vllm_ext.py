"""Loaded by vLLM into every worker process of a group (``worker_extension_cls``).

vLLM 0.32's CPU build never allocates the buffers a pipeline stage after the first receives its
input into when the model runs eager with an explicit KV size (VLLM_CPU_KVCACHE_SPACE): its
warm-up, which would allocate them in ``_dummy_run``, is skipped then
(vllm/v1/worker/cpu_worker.py ``_should_warm_up_model``; cpu_model_runner.py ``warming_up_model``
returns at once under CompilationMode.NONE), and the first request fails with an AssertionError
in ``sync_and_gather_intermediate_tensors``. Compiling instead costs minutes on a small CPU. The
head calls ``node_agent_pp_buffers`` on every rank once the engine is built; it allocates the
buffers exactly as ``_dummy_run`` does, and does nothing where they exist (GPU workers allocate
them in their profile run).
"""

from __future__ import annotations


class PipelineBuffers:
    """Mixed into vLLM's worker class: its methods become collective RPCs."""

    def node_agent_pp_buffers(self) -> bool:
        """Allocate the intermediate-tensor buffers of a later pipeline stage; True if it did."""
        from vllm.distributed.parallel_state import get_pp_group

        runner = self.model_runner
        if get_pp_group().is_first_rank or runner.intermediate_tensors is not None:
            return False
        runner.intermediate_tensors = runner.model.make_empty_intermediate_tensors(
            batch_size=runner.max_num_tokens, dtype=runner.model_config.dtype, device=runner.device)
        return True
