"""What a quantization will do to a model, decided from its architecture alone (pure: no I/O).

- which weight scheme (AWQ or GPTQ 4-bit weights with 16-bit activations, or FP8-dynamic);
- the group size: one 16-bit scale (and a zero) per group of input columns, so a layer whose
  columns are not a multiple of the group cannot be quantized with it. The largest of 128, 64, 32
  that divides every linear layer's columns is chosen (SmolLM2's 576-wide layers take 64); when
  none divides them all, the one that covers the most weights is taken and the layers it does
  not divide stay 16-bit, by name;
- the layers that stay 16-bit: always the LM head (and embeddings and norms, which are not
  linear layers), MoE routers, and the layers the group size does not divide;
- the cost: peak memory (host RAM for the whole 16-bit model, GPU memory for one decoder layer
  at a time when there is a GPU), time, and the size of the result (``estimate``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from agent.catalog.types import ModelArch, WeightSource
from agent.planner import weights

GIB = 1024**3
GROUP_SIZES = (128, 64, 32)
SCHEMES = ("awq-w4a16", "gptq-w4a16", "fp8-dynamic")
# Layers every recipe leaves alone: the LM head (quantizing it costs the most quality per byte
# saved) and MoE routers (tiny, and their softmax is sensitive).
ALWAYS_IGNORED = ("lm_head",)
ROUTER_PATTERN = "re:.*mlp\\.gate$"


@dataclass(frozen=True)
class Linear:
    """One kind of linear layer in every decoder layer (columns = input features)."""

    name: str  # the module name's last part, as transformers names it (q_proj, down_proj, ...)
    columns: int
    params: int  # all layers, all experts


@dataclass(frozen=True)
class Choice:
    """What ``node-agent quantize`` will run: scheme, bits, group size, what stays 16-bit, why."""

    scheme: str  # awq-w4a16 | gptq-w4a16 | fp8-dynamic
    method: str  # awq | gptq | fp8-dynamic (the recipe the worker runs)
    bits: int
    group_size: int  # 0 for fp8-dynamic (per channel)
    ignore: tuple[str, ...]  # llm-compressor ignore patterns
    ignored: tuple[str, ...]  # the layers that stay 16-bit, for people
    reasons: tuple[str, ...]

    @property
    def label(self) -> str:
        """The variant's name: awq-w4a16-g64, gptq-w4a16-g128, fp8-dynamic."""
        if self.method == "fp8-dynamic":
            return "fp8-dynamic"
        return f"{self.method}-w{self.bits}a16-g{self.group_size}"

    @property
    def quant_type(self) -> str:
        """The compressed-tensors scheme name the catalog reads back (w4a16, w8a8-fp8)."""
        return "w8a8-fp8" if self.method == "fp8-dynamic" else f"w{self.bits}a16"

    def source(self, size_bytes: int | None = None) -> WeightSource:
        """The checkpoint this choice writes, as the planner sees it."""
        if self.method == "fp8-dynamic":
            return WeightSource(format="compressed-tensors", quant_type="w8a8-fp8", bits=8, scheme="w8a8-fp8",
                                size_bytes=size_bytes)
        return WeightSource(format="compressed-tensors", quant_type=self.quant_type, bits=self.bits,
                            group_size=self.group_size, scheme=self.quant_type, size_bytes=size_bytes,
                            zero_points=True)


def linears(arch: ModelArch) -> list[Linear]:
    """The linear layers of a decoder layer, with their columns, as transformers builds them."""
    h, layers = arch.hidden_size, arch.num_layers
    out: list[Linear] = []
    if arch.is_mla:
        qk = arch.qk_nope_head_dim + arch.qk_rope_head_dim
        a = arch.num_attention_heads
        if arch.q_lora_rank:
            out += [Linear("q_a_proj", h, h * arch.q_lora_rank * layers),
                    Linear("q_b_proj", arch.q_lora_rank, arch.q_lora_rank * a * qk * layers)]
        else:
            out.append(Linear("q_proj", h, h * a * qk * layers))
        out += [Linear("kv_a_proj_with_mqa", h, h * (arch.kv_lora_rank + arch.qk_rope_head_dim) * layers),
                Linear("kv_b_proj", arch.kv_lora_rank,
                       arch.kv_lora_rank * a * (arch.qk_nope_head_dim + arch.v_head_dim) * layers),
                Linear("o_proj", a * arch.v_head_dim, a * arch.v_head_dim * h * layers)]
    else:
        q, kv = arch.num_attention_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
        full = sum(k != "linear_attention" for k in arch.kinds())
        out += [Linear("q_proj", h, h * q * full), Linear("k_proj", h, h * kv * full),
                Linear("v_proj", h, h * kv * full), Linear("o_proj", q, q * h * full)]
    dense_layers = layers if not arch.num_experts else min(layers, arch.first_dense_layers)
    if dense_layers:
        inter = arch.dense_intermediate_size if arch.num_experts else arch.intermediate_size
        out += [Linear("gate_proj", h, h * inter * dense_layers), Linear("up_proj", h, h * inter * dense_layers),
                Linear("down_proj", inter, inter * h * dense_layers)]
    moe_layers = layers - dense_layers
    if arch.num_experts and moe_layers:
        n, inter = arch.num_experts, arch.intermediate_size
        out += [Linear("experts.gate_proj", h, n * h * inter * moe_layers),
                Linear("experts.up_proj", h, n * h * inter * moe_layers),
                Linear("experts.down_proj", inter, n * inter * h * moe_layers)]
        shared = arch.shared_expert_intermediate_size
        if shared:
            out += [Linear("shared_expert.gate_proj", h, h * shared * moe_layers),
                    Linear("shared_expert.up_proj", h, h * shared * moe_layers),
                    Linear("shared_expert.down_proj", shared, shared * h * moe_layers)]
    return out


def _pattern(name: str) -> str:
    return "re:.*" + name.replace(".", "\\.") + "$"


def choose(arch: ModelArch, scheme: str = "awq-w4a16", group_size: int | None = None, bits: int = 4) -> Choice:
    """The group size, the layers that stay 16-bit and why, for ``scheme`` on ``arch``.

    ``group_size``: pinned by the operator (layers it does not divide stay 16-bit), else chosen.
    ``bits``: the weight bits of the AWQ/GPTQ schemes (4; 8 keeps more quality, 2 and 3 are for
    experiments: the quality guard flags what they break).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose {', '.join(SCHEMES)}")
    method = scheme.split("-", 1)[0] if scheme != "fp8-dynamic" else "fp8-dynamic"
    ignore = list(ALWAYS_IGNORED) + ([ROUTER_PATTERN] if arch.num_experts else [])
    ignored = ["lm_head (the output head stays 16-bit, as embeddings and norms do)"]
    if arch.num_experts:
        ignored.append("mlp.gate (MoE routers)")
    layers = linears(arch)
    if method == "fp8-dynamic":
        reasons = ("fp8-dynamic: FP8 weights with one scale per output channel and FP8 activations scaled per "
                   "token at run time; no calibration data and no group size",)
        return Choice(scheme, method, 8, 0, tuple(ignore), tuple(ignored), reasons)
    reasons: list[str] = []
    widths = sorted({f"{l.name} {l.columns}" for l in layers})
    if group_size:
        group = group_size
        reasons.append(f"group size {group}: pinned (--group-size)")
    else:
        total = sum(l.params for l in layers)

        def covered(g: int) -> int:
            return sum(l.params for l in layers if l.columns % g == 0)

        whole = [g for g in GROUP_SIZES if covered(g) == total]
        group = whole[0] if whole else max(GROUP_SIZES, key=lambda g: (covered(g), g))
        if whole and group == GROUP_SIZES[0]:
            reasons.append(f"group size {group}: it divides the columns of every quantized layer ({', '.join(widths)})")
        elif whole:
            bigger = [g for g in GROUP_SIZES if g > group]
            misfits = sorted({f"{l.name} ({l.columns})" for l in layers if l.columns % bigger[0]})
            reasons.append(f"group size {group}: the largest of {', '.join(map(str, GROUP_SIZES))} that divides the "
                           f"columns of every quantized layer ({bigger[0]} does not divide {', '.join(misfits)})")
        else:
            reasons.append(f"group size {group}: no group of {', '.join(map(str, GROUP_SIZES))} divides every layer's "
                           f"columns; {group} covers the most weights ({covered(group) / total:.0%})")
    for l in layers:
        if l.columns % group:
            ignore.append(_pattern(l.name))
            ignored.append(f"{l.name} ({l.columns} columns are not a multiple of the group size {group})")
            reasons.append(f"{l.name} stays 16-bit: its {l.columns} columns are not a multiple of {group}")
    kind = "AWQ (activation-aware scales)" if method == "awq" else "GPTQ (error-correcting rounding)"
    reasons.insert(0, f"{scheme.split('-')[0]}: {kind}, {bits}-bit integer weights, asymmetric, one scale and zero "
                      f"per group; activations stay 16-bit")
    return Choice(scheme, method, bits, group, tuple(ignore), tuple(ignored), tuple(reasons))


@dataclass(frozen=True)
class Cost:
    """What quantizing costs on a host (estimates: docs/models.md says how they are made)."""

    seconds: float
    ram_bytes: int  # host RAM at the peak (the whole 16-bit model is loaded there)
    gpu_bytes: int  # GPU memory at the peak (one decoder layer at a time); 0 on the CPU
    output_bytes: int  # the checkpoint written
    on_gpu: bool

    @property
    def minutes(self) -> int:
        return max(1, math.ceil(self.seconds / 60))

    @property
    def peak_gib(self) -> float:
        return (self.gpu_bytes if self.on_gpu else self.ram_bytes) / GIB


# Work rates, in (linear weights x calibration tokens x grid passes) per second. The CPU one is
# per physical core, from `node-agent quantize` end to end (calibration, the quality guard,
# saving) with bench/quantize.py on SmolLM2-135M, 2 cores of an AMD EPYC without AVX-512, whose
# bf16 matmuls are slow (docs/benchmarks.md, 80.9 s): conservative where the CPU has native bf16
# (an earlier Intel box ran 2x this). The GPU one from llm-compressor's runtime guide (AWQ on
# Llama-3-8B, 256 x 512 calibration tokens, ~30 min on one A100), not measured here: no GPU.
CPU_RATE_PER_CORE = 7.5e9
GPU_RATE = 1.2e13
# AWQ searches a 20-point grid of scales per smoothed layer group, each a forward pass over the
# calibration tokens; GPTQ does about the same work in its Hessian updates; both also pass the
# tokens through each layer twice (calibrate, propagate).
PASSES = {"awq": 22.0, "gptq": 22.0, "fp8-dynamic": 0.0}
# What torch, transformers and llm-compressor hold before any weight is loaded (measured peak RSS
# of the tiny model's run, bench/quantize.py).
RUNTIME_BYTES = int(1.2 * GIB)
CUDA_CONTEXT_BYTES = int(0.8 * GIB)


def estimate(arch: ModelArch, choice: Choice, samples: int, seq_len: int, gpus: int = 0,
             physical_cores: int = 1) -> Cost:
    """Peak memory, time and output size of quantizing ``arch`` with ``choice``."""
    half = weights.DTYPE_BYTES.get(arch.dtype, 2)
    full_bytes = weights.weights_total(arch, "none")
    out_bytes = weights.weights_total(arch, "compressed-tensors", choice.source())
    tokens = samples * seq_len if choice.method != "fp8-dynamic" else 0
    p = weights.param_counts(arch)
    work = p.linear * tokens * PASSES[choice.method] + p.linear * 50  # + rounding every weight once
    # Activations kept between layers for every sample (inputs and outputs, 16-bit), plus AWQ's
    # cache of each layer group's inputs.
    activations = 3 * tokens * arch.hidden_size * half
    ram = RUNTIME_BYTES + full_bytes + out_bytes + activations
    if gpus:
        per_layer = (p.per_layer_linear + p.per_layer_other) * half
        batch = seq_len * (arch.hidden_size + arch.intermediate_size * max(1, arch.num_experts_per_tok)) * 4
        gpu = CUDA_CONTEXT_BYTES + 3 * per_layer + 4 * batch + p.lm_head * half
        return Cost(work / GPU_RATE, int(ram), int(gpu), out_bytes, True)
    return Cost(work / (CPU_RATE_PER_CORE * max(1, physical_cores)), int(ram), 0, out_bytes, False)
