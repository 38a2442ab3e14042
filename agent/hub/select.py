"""Which weights to fetch: exactly the variants the plan chose, and only the files each engine loads.

Pure functions of (plan, model, listing). vLLM gets one checkpoint (bf16, FP8, AWQ or GPTQ) and
from it only config, tokenizer and safetensors files; llama.cpp gets the one GGUF its plan chose,
every shard of it when it is split.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from agent.catalog.cards import PYPI_PREFIX
from agent.catalog.types import ModelSpec, WeightSource
from agent.hub.client import Listing, RemoteFile
from agent.hub.errors import NoVariant, RepoNotFound
from agent.planner.types import LlamaCppPlan, NodePlan, VllmPlan

# Files vLLM reads besides the weights: configs, tokenizers, chat templates. Top level only
# (``original/`` holds another format of the same weights).
_VLLM_SIDE_FILES = re.compile(
    r"^(config\.json|generation_config\.json|tokenizer[\w.-]*|special_tokens_map\.json|added_tokens\.json"
    r"|vocab\.(json|txt)|merges\.txt|[\w.-]+\.model|[\w.-]+\.tiktoken|chat_template\.(jinja|json)"
    r"|preprocessor_config\.json|quant(ize)?_config\.json|[\w.-]+\.safetensors\.index\.json)$")
SAFETENSORS_INDEX = "model.safetensors.index.json"
# The repo owner of variants `node-agent quantize` made (agent/quantize/register.py): on disk, not on a hub.
LOCAL_VARIANT_OWNER = "node-agent-quantized"
_SHARD = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


@dataclass(frozen=True)
class Variant:
    """One set of weights to fetch for one engine."""

    engine: str  # vllm | llamacpp
    repo: str
    revision: str | None  # as the reference asked; None = the repo's default branch
    format: str  # hf | fp8 | awq | gptq | gguf
    quant: str | None  # Q4_K_M, w4a16, fp8; None for bf16
    file: str | None  # GGUF: the file (first shard); None = a checkpoint snapshot
    why: str

    @property
    def label(self) -> str:
        what = self.file or {"hf": "bf16"}.get(self.format, self.format)
        return f"{self.engine}: {self.repo} {what}"


def vllm_source(model: ModelSpec, quantization: str) -> WeightSource | None:
    """The checkpoint a vLLM plan runs on: a pre-quantized one of that method, else for bf16 and
    FP8 the full checkpoint (vLLM quantizes it to FP8 while loading)."""
    if quantization == "none":
        return model.source("hf")
    if quantization == "fp8":
        return model.source("fp8") or model.source("hf")
    return model.source(quantization)


def on_node(p: VllmPlan | LlamaCppPlan, model: ModelSpec) -> str | None:
    """Why the checkpoint plan ``p`` runs needs no download (a variant `node-agent quantize` made
    on this node, or a GGUF shipped in a Python package), or None when it must be fetched."""
    if isinstance(p, VllmPlan):
        src = None if p.quantize else vllm_source(model, p.quantization)
        if src is not None and (src.repo or "").startswith(LOCAL_VARIANT_OWNER + "/"):
            return (f"vllm: {src.quant_type or src.format} variant made by `node-agent quantize` is on disk "
                    f"({src.repo}); nothing to fetch")
        return None
    if p.gguf_repo and p.gguf_repo.startswith(PYPI_PREFIX):
        return (f"llamacpp: {p.quant_type} GGUF ships in the Python package "
                f"{p.gguf_repo.removeprefix(PYPI_PREFIX)}; nothing to fetch")
    return None


def already_here(plan: NodePlan, model: ModelSpec, engine: str = "auto") -> bool:
    """Every checkpoint the plan runs (``engine``'s, when pinned) needs no download (``on_node``)."""
    plans = [p for p in (plan.primary, plan.fallback) if p is not None and p.fits and engine in ("auto", p.engine)]
    return bool(plans) and all(on_node(p, model) for p in plans)


def choose(plan: NodePlan, model: ModelSpec, revision: str | None = None,
           pinned_repo: str | None = None) -> tuple[list[Variant], list[str]]:
    """The variants ``plan`` runs on, and a note for each engine that gets none (with why).

    ``revision`` applies to ``pinned_repo`` (the repo the reference named), or to every repo
    when the reference named no repo among several.
    """
    variants: list[Variant] = []
    notes: list[str] = []
    plans: list[VllmPlan | LlamaCppPlan] = [plan.primary] + ([plan.fallback] if plan.fallback else [])
    for p in plans:
        if not p.fits:
            notes.append(f"{p.engine}: nothing to fetch, the plan does not fit ({p.refusal})")
            continue
        here = on_node(p, model)
        if here:
            notes.append(here)
            continue
        if isinstance(p, VllmPlan):
            # p.quantize: the agent makes this checkpoint itself, from the bf16 one
            src = model.source("hf") if p.quantize else vllm_source(model, p.quantization)
            if src is None or not src.repo:
                notes.append(f"vllm: no {p.quantization} checkpoint is known for {model.name}")
                continue
            why = (f"the vLLM plan runs {'bf16' if p.quantization == 'none' else p.quantization}"
                   + (" (quantized on load)" if p.quantization == "fp8" and src.format == "hf" else ""))
            if p.quantize:
                why = (f"the vLLM plan runs {p.quantize}, which no repo provides: the bf16 weights, quantized on "
                       f"this node after the download (model.quantize: auto)")
            variants.append(Variant("vllm", src.repo, _rev(src.repo, revision, pinned_repo), src.format,
                                    src.quant_type, None, why))
        else:
            if not p.gguf_repo or not p.gguf_file:
                notes.append(f"llamacpp: no GGUF is known for {model.name}")
                continue
            variants.append(Variant("llamacpp", p.gguf_repo, _rev(p.gguf_repo, revision, pinned_repo), "gguf",
                                    p.quant_type, p.gguf_file, f"the llama.cpp plan runs {p.quant_type}"))
    return variants, notes


def _rev(repo: str, revision: str | None, pinned_repo: str | None) -> str | None:
    return revision if pinned_repo is None or repo == pinned_repo else None


def vllm_files(listing: Listing, index: dict | None) -> list[RemoteFile]:
    """The files vLLM loads from a checkpoint: side files, and the safetensors shards the index
    names (all top-level ``*.safetensors`` but ``consolidated*`` when there is no index)."""
    names = [p for p in listing.files if "/" not in p]
    side = [p for p in names if _VLLM_SIDE_FILES.match(p)]
    if index is not None:
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise RepoNotFound(f"{listing.repo}: {SAFETENSORS_INDEX} has no weight_map; the checkpoint is damaged")
        weights = sorted(set(weight_map.values()))
        missing = [w for w in weights if w not in listing.files]
        if missing:
            raise RepoNotFound(f"{listing.repo}@{listing.commit[:12]}: {SAFETENSORS_INDEX} names "
                               f"{', '.join(missing[:3])}, which the repo does not have")
    else:
        weights = sorted(p for p in names if p.endswith(".safetensors") and not p.startswith("consolidated"))
    if not weights:
        other = sorted({p.rsplit(".", 1)[-1] for p in names if p.endswith((".bin", ".pth", ".pt", ".gguf"))})
        hint = f" (it has .{', .'.join(other)} files, which this agent does not load for vLLM)" if other else ""
        raise NoVariant(f"{listing.repo} has no safetensors weights{hint}; pick a safetensors checkpoint")
    return [listing.files[p] for p in sorted(set(side) | set(weights))]


def gguf_files(listing: Listing, file: str) -> list[RemoteFile]:
    """The GGUF ``file`` and, for a split GGUF named by its first shard, every other shard."""
    m = _SHARD.match(file.rsplit("/", 1)[-1])
    if m is None:
        if file not in listing.files:
            have = sorted(p for p in listing.files if p.endswith(".gguf"))
            raise RepoNotFound(f"{listing.repo} has no file {file}; its GGUF files: {', '.join(have[:12]) or 'none'}"
                               + (" ..." if len(have) > 12 else ""))
        return [listing.files[file]]
    if m["no"] != "00001":
        raise NoVariant(f"{file} is shard {int(m['no'])} of a split GGUF; name the first one (-00001-of-{m['count']})")
    folder = file.rsplit("/", 1)[0] + "/" if "/" in file else ""
    count = int(m["count"])
    shards = [f"{folder}{m['prefix']}-{i:05d}-of-{m['count']}.gguf" for i in range(1, count + 1)]
    missing = [s for s in shards if s not in listing.files]
    if missing:
        raise RepoNotFound(f"{listing.repo} lacks {len(missing)} of the {count} shards of {file} (first: {missing[0]})")
    return [listing.files[s] for s in shards]


def files_for(variant: Variant, listing: Listing, index: dict | None) -> list[RemoteFile]:
    """The files of one variant."""
    return gguf_files(listing, variant.file) if variant.file else vllm_files(listing, index)
