"""Quantizing on the node: llm-compressor's one-shot recipes (AWQ/GPTQ W4A16, FP8-dynamic) on a
bf16 checkpoint, written as compressed-tensors, which vLLM serves as it is.

  schemes.py      pure: group size, layers left 16-bit, cost estimate (the planner uses it too)
  calibration.py  the built-in calibration text, or the operator's file; held-out split
  env.py          the quantizer's own Python environment (llm-compressor cannot live next to vLLM)
  worker.py       the script that runs in that environment (a subprocess; JSON events on stdout)
  runner.py       runs the worker, follows its events (layers done, ETA)
  quality.py      the quality guard's verdict (held-out perplexity vs the bf16 model)
  register.py     the result as a local variant of its model in the hub cache (#13's records)
  job.py          ``node-agent quantize``: find the source, check resources, run, register
  auto.py         ``model.quantize: auto``: pull and serve quantize what the plan needs
"""
