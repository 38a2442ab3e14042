"""How long ``node-agent quantize`` takes on SmolLM2-135M here, against llm-compressor's own
``oneshot`` called directly on the same model, recipe and calibration tokens (the anchor), in the
same run. The ratio is the agent's overhead: the subprocess, the bf16 reference pass and the
quality check on held-out text, hashing and registering the files.

    .venv/bin/python -m bench.quantize [--samples 16] [--seq-len 128] [--grid 20]

Needs the test models (.cache/test-models/smollm2-hf, built by the tests) and the quantizer
environment (scripts/test makes it in .cache/quantizer). Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ANCHOR = r'''
import json, sys, time
job = json.load(open(sys.argv[1]))
t0 = time.monotonic()
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from llmcompressor.modifiers.transform.awq import AWQModifier
if not torch.cuda.is_available():  # the same no-CUDA workaround the agent's worker needs
    from llmcompressor.pipelines.cache import IntermediatesCache
    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
torch.manual_seed(job["seed"])
tok = AutoTokenizer.from_pretrained(job["model_dir"])
model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype="auto")
def render(s):
    return tok.apply_chat_template(s["messages"], tokenize=False) if "messages" in s else s["text"]
ids = [tok(render(s), add_special_tokens=False, truncation=True, max_length=job["seq_len"])["input_ids"]
       for s in job["calibration"]][: job["samples"]]
ds = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids]})
groups = {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": False,
                                                         "strategy": "group", "group_size": job["group_size"]}}}
oneshot(model=model, dataset=ds, recipe=[AWQModifier(n_grid=job["awq_grid"]),
        QuantizationModifier(config_groups=groups, ignore=job["ignore"])], max_seq_length=job["seq_len"],
        num_calibration_samples=len(ids), shuffle_calibration_samples=False, pipeline="sequential")
model.save_pretrained(job["out_dir"], save_compressed=True)
tok.save_pretrained(job["out_dir"])
print(json.dumps({"seconds": time.monotonic() - t0}))
'''


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--grid", type=int, default=20)
    args = parser.parse_args()
    model = ROOT / ".cache" / "test-models" / "smollm2-hf"
    env_dir = Path(os.environ.get("NODE_AGENT_TEST_QUANTIZER", ROOT / ".cache" / "quantizer"))
    from agent.quantize import env as qenv
    from agent.quantize.job import find_source, job_for, prepare
    from agent.hardware import detect
    from agent.settings import Settings

    settings = Settings(quantize={"samples": args.samples, "seq_len": args.seq_len, "awq_grid": args.grid,
                                  "env_dir": str(env_dir)})
    quantizer = qenv.ensure(None, env_dir, print)
    host = detect(None)
    with tempfile.TemporaryDirectory() as tmp:
        run_env = {**os.environ, "HF_HOME": str(Path(tmp) / "hf"), "HF_HUB_OFFLINE": "1",
                   "NODE_AGENT_QUANTIZE__ENV_DIR": str(env_dir), "NODE_AGENT_QUANTIZE__AWQ_GRID": str(args.grid)}
        prep = prepare(find_source(str(model), settings), settings.quantize, host, settings)
        job = job_for(prep, Path(tmp) / "anchor")
        (Path(tmp) / "job.json").write_text(json.dumps(job))
        (Path(tmp) / "anchor.py").write_text(ANCHOR)
        t = time.monotonic()
        a = subprocess.run([str(quantizer.python), str(Path(tmp) / "anchor.py"), str(Path(tmp) / "job.json")],
                           capture_output=True, text=True, env=run_env)
        anchor_s = time.monotonic() - t
        if a.returncode:
            print(a.stderr[-3000:], file=sys.stderr)
            return 1
        t = time.monotonic()
        r = subprocess.run([str(Path(sys.executable).parent / "node-agent"), "quantize", str(model), "--samples",
                            str(args.samples), "--seq-len", str(args.seq_len), "--json"], capture_output=True,
                           text=True, env=run_env)
        agent_s = time.monotonic() - t
        if r.returncode:
            print(r.stderr[-3000:], file=sys.stderr)
            return 1
        done = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")][-1]
    print(f"SmolLM2-135M, AWQ W4A16 g{prep.choice.group_size}, {args.samples} samples x <= {args.seq_len} tokens, "
          f"grid {args.grid}, {host.cpu_physical_cores} cores ({host.cpu_model})")
    print(f"  llm-compressor oneshot directly (anchor): {anchor_s:7.1f} s")
    print(f"  node-agent quantize (end to end):         {agent_s:7.1f} s   ratio {agent_s / anchor_s:.2f}")
    print(f"  planner's estimate: {prep.cost.seconds:.0f} s; quality: {done['quality']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
