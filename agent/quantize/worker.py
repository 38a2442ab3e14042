"""The quantizer process: llm-compressor's one-shot recipe on one checkpoint, run by
``agent/quantize/runner.py`` in the quantizer's own Python environment (agent/quantize/env.py).

This file is a script, not part of the agent's import graph: it imports only the standard library,
torch, transformers and llm-compressor (the quantizer environment has no node-agent installed),
and it is run by path: ``python worker.py JOB.json``. The job (written by the runner) names the
checkpoint, the scheme, the group size and the layers to leave 16-bit, the calibration and
held-out samples, the seed and where to write.

Events go to the original stdout as one JSON object per line; everything the libraries print goes
to stderr (stdout is re-pointed there), so a library's print can never break the protocol:

  {"event": "stage", "stage": "loading" | "reference" | "calibrating" | "saving" | "checking"}
  {"event": "layers", "done": i, "total": n}        after each decoder layer is calibrated
  {"event": "quality", ...}                         held-out perplexity, bf16 vs quantized
  {"event": "done", "seconds": s, "peak_rss_bytes": b, ...}
  {"event": "error", "message": "...", "kind": "..."}

Two things are patched in this process only, never on disk:

- llm-compressor's activation cache pins host memory before AWQ's grid search
  (``IntermediatesCache.pin_memory``, llmcompressor/pipelines/cache.py). Pinning only speeds up
  host-to-device copies; without a CUDA device there are none, and torch cannot pin without a
  CUDA driver ("Found no NVIDIA driver"), so on a host without one that method is a no-op here.
- nothing else: progress comes from the library's own event hook, a Modifier that counts
  ``SEQUENTIAL_EPOCH_END`` (one per decoder layer in the sequential pipeline).
"""

from __future__ import annotations

import gc
import json
import math
import os
import random
import resource
import sys
import time
import traceback
from pathlib import Path

_EVENTS = None
_STARTED = time.monotonic()


def emit(event: str, **fields) -> None:
    """One event line; ``at_s``: seconds since the worker started (where the time goes, per stage)."""
    _EVENTS.write(json.dumps({"event": event, **fields, "at_s": round(time.monotonic() - _STARTED, 1)}) + "\n")
    _EVENTS.flush()


def _redirect_stdout() -> None:
    """Keep the real stdout for events; send every other write to stdout to stderr."""
    global _EVENTS
    _EVENTS = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr


def skip_pinning_without_cuda() -> bool:
    """Make the activation cache's pin_memory a no-op when no CUDA device exists (see above)."""
    import torch

    if torch.cuda.is_available():
        return False
    from llmcompressor.pipelines.cache import IntermediatesCache

    def pin_memory(self, batch_index, input_names=None):  # noqa: ARG001 - same signature
        return None

    IntermediatesCache.pin_memory = pin_memory
    return True


def progress_modifier(total: int, layer_class: str | None):
    """A Modifier that reports each calibrated decoder layer: llm-compressor's own event hook.
    It is the recipe's last modifier, so the others have finished with a layer when it counts it."""
    from llmcompressor.core import EventType
    from llmcompressor.modifiers import Modifier

    class Progress(Modifier):
        done: int = 0

        def on_initialize(self, state, **kwargs) -> bool:
            return True

        def on_event(self, state, event, **kwargs) -> None:
            if event.type_ == EventType.SEQUENTIAL_EPOCH_END:
                modules = kwargs.get("modules") or ()
                n = sum(type(m).__name__ == layer_class for m in modules) if layer_class else 1
                if n:
                    self.done = min(total, self.done + n)
                    emit("layers", done=self.done, total=total)
            elif event.type_ == EventType.CALIBRATION_END and self.done < total:
                self.done = total
                emit("layers", done=total, total=total)

    return Progress()


def weight_args(job: dict) -> dict:
    strategy = "group" if job["group_size"] > 0 else "channel"
    args = {"num_bits": job["bits"], "type": "int", "symmetric": job["symmetric"], "strategy": strategy}
    if job["group_size"] > 0:
        args["group_size"] = job["group_size"]
    return args


def awq_mappings(model, ignore: list[str]) -> list:
    """llm-compressor's AWQ mappings for the model, without those that scale into a layer left
    16-bit: a smoothing scale must be folded into every layer that reads the smoothed output,
    and AWQ can only fold it into quantized ones (llm-compressor divides by zero otherwise)."""
    from llmcompressor.modifiers.transform.awq import get_layer_mappings_from_model

    skipped = set(ignore)
    return [m for m in get_layer_mappings_from_model(model) if not skipped & set(m.balance_layers)]


def recipe(job: dict, layers: int, layer_class: str | None, model=None) -> list:
    """The modifiers for the job's scheme, then the progress counter (it only listens)."""
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    ignore = list(job["ignore"])
    progress = progress_modifier(layers, layer_class)
    if job["scheme"] == "fp8-dynamic":
        return [QuantizationModifier(targets=["Linear"], scheme="FP8_DYNAMIC", ignore=ignore), progress]
    groups = {"group_0": {"targets": ["Linear"], "weights": weight_args(job)}}
    if job["scheme"] == "gptq":
        return [GPTQModifier(config_groups=groups, ignore=ignore), progress]
    from llmcompressor.modifiers.transform.awq import AWQModifier

    mappings = awq_mappings(model, ignore) if model is not None else None
    return [AWQModifier(n_grid=job.get("awq_grid", 20), mappings=mappings),
            QuantizationModifier(config_groups=groups, ignore=ignore),
            progress]


def render(tokenizer, sample: dict) -> str:
    if "messages" in sample:
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(sample["messages"], tokenize=False)
        return "\n".join(m["content"] for m in sample["messages"])
    return sample["text"]


def encode(tokenizer, samples: list[dict], seq_len: int) -> list[list[int]]:
    out = []
    for s in samples:
        ids = tokenizer(render(tokenizer, s), add_special_tokens=False, truncation=True, max_length=seq_len)["input_ids"]
        if len(ids) >= 2:
            out.append(ids)
    return out


def score_dtype(model) -> str | None:
    """The dtype to score the held-out text in: float32 for a 16-bit model on a CPU without native
    bf16 matmuls (no AVX512-BF16 or AMX; the AVX2 EPYC here took 128 s for 1.5k tokens of a 135M
    model in bf16), where the float32 copy fits in the memory available; else None (as loaded).
    bf16 -> float32 is exact, so the reference is the same model, only faster."""
    import torch

    if torch.cuda.is_available() or model.dtype not in (torch.bfloat16, torch.float16):
        return None
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    if " avx512_bf16" in flags or " amx_bf16" in flags:
        return None
    params = sum(t.numel() for t in model.parameters())
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None
    return "float32" if 4 * params * 1.5 < available else None


def held_out_score(model, sequences: list[list[int]], reference: list | None = None) -> dict:
    """Mean next-token NLL over the held-out sequences, and each position's top-1 token (to
    compare against the reference model's)."""
    import torch

    nll, count, agree, tops = 0.0, 0, 0, []
    model.eval()
    with torch.no_grad():
        for i, ids in enumerate(sequences):
            x = torch.tensor([ids])
            logits = model(input_ids=x).logits[0, :-1].float()
            target = x[0, 1:]
            nll += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
            count += target.numel()
            top = logits.argmax(-1)
            tops.append(top)
            if reference is not None:
                agree += int((top == reference[i]).sum().item())
    return {"nll": nll / max(1, count), "tokens": count, "tops": tops,
            "agreement": agree / max(1, count) if reference is not None else None}


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run(job: dict) -> None:
    started = time.monotonic()
    random.seed(job["seed"])
    import torch

    torch.manual_seed(job["seed"])
    threads = job.get("threads")
    if threads:
        torch.set_num_threads(threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pinned = skip_pinning_without_cuda()
    emit("stage", stage="loading", pin_memory_skipped=pinned)
    src = job["model_dir"]
    tokenizer = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    layers = int(getattr(model.config, "num_hidden_layers", 0) or 0)
    no_split = getattr(model, "_no_split_modules", None) or ()
    layer_class = next(iter(no_split), None)

    held = encode(tokenizer, job["held_out"], job["seq_len"])
    reference = None
    scored_in = score_dtype(model) if held else None
    if held and job["scheme"] != "none":
        emit("stage", stage="reference", dtype=scored_in or str(model.dtype).removeprefix("torch."))
        loaded = model.dtype
        if scored_in:
            model.to(getattr(torch, scored_in))
        reference = held_out_score(model, held)
        if scored_in:
            model.to(loaded)  # exact: every value came from the 16-bit weights

    emit("stage", stage="calibrating", layers=layers)
    calib = encode(tokenizer, job["calibration"], job["seq_len"])[: job["samples"]]
    from datasets import Dataset
    from llmcompressor import oneshot

    ds = Dataset.from_dict({"input_ids": calib, "attention_mask": [[1] * len(c) for c in calib]})
    oneshot(model=model, dataset=ds, recipe=recipe(job, layers, layer_class, model), max_seq_length=job["seq_len"],
            num_calibration_samples=len(calib), shuffle_calibration_samples=False, pipeline="sequential")
    calibrated_at = time.monotonic()

    emit("stage", stage="saving")
    out = Path(job["out_dir"])
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
    del model
    gc.collect()

    quality = None
    if reference is not None:
        emit("stage", stage="checking")
        reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=getattr(torch, scored_in) if scored_in else "auto")
        after = held_out_score(reloaded, held, reference["tops"])
        quality = {"samples": len(held), "tokens": after["tokens"],
                   "perplexity_bf16": math.exp(reference["nll"]), "perplexity": math.exp(after["nll"]),
                   "top1_agreement": after["agreement"]}
        emit("quality", **quality)
        del reloaded
    emit("done", seconds=round(time.monotonic() - started, 2),
         calibration_seconds=round(calibrated_at - started, 2), peak_rss_bytes=_rss(),
         calibration_samples=len(calib), calibration_tokens=sum(len(c) for c in calib), quality=quality,
         scored_in=scored_in)


def main(argv: list[str]) -> int:
    _redirect_stdout()
    try:
        job = json.loads(Path(argv[1]).read_text(encoding="utf-8"))
        run(job)
    except MemoryError:
        emit("error", kind="memory", message="the quantizer ran out of memory")
        return 1
    except Exception as exc:  # noqa: BLE001 - reported to the runner, which raises a typed error
        traceback.print_exc()
        emit("error", kind=type(exc).__name__, message=str(exc) or type(exc).__name__)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
