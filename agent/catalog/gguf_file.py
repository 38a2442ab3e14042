"""A .gguf file → ModelSpec, from the file's header and tensor infos only.

The header is parsed here with ``struct`` over a read-only mmap, using the ``gguf`` package's
constants (value types, quant block sizes, file types). ``gguf.GGUFReader`` would give the same
answers but builds a numpy view per array element: 2-3 s for SmolLM2-135M's tokenizer, about
four times that for a 128k-vocab Llama 3 GGUF, on every resolve. Only the pages holding the
header are touched; tensor data is never read.

Byte counts are the truth the planner uses for GGUF offload: ``tensor_bytes_per_layer[i]`` sums
the ``blk.<i>.*`` tensors, ``non_layer_bytes`` the rest (token_embd, output, output_norm, ...).
A split GGUF (``name-00001-of-00003.gguf``) is read shard by shard from its first file.
"""

from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import gguf

from agent.catalog.types import ModelArch, ModelSpec, WeightSource
from agent.errors import ModelError

# GGUF general.architecture → HF architectures[0]. "llama" with experts is Mixtral.
HF_ARCHITECTURES = MappingProxyType(
    {
        "llama": "LlamaForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "qwen2moe": "Qwen2MoeForCausalLM",
        "qwen3": "Qwen3ForCausalLM",
        "qwen3moe": "Qwen3MoeForCausalLM",
        "gemma": "GemmaForCausalLM",
        "gemma2": "Gemma2ForCausalLM",
        "gemma3": "Gemma3ForCausalLM",
        "phi3": "Phi3ForCausalLM",
        "starcoder2": "Starcoder2ForCausalLM",
    }
)

_SCALAR_FORMATS = MappingProxyType(
    {
        gguf.GGUFValueType.UINT8: "B",
        gguf.GGUFValueType.INT8: "b",
        gguf.GGUFValueType.UINT16: "H",
        gguf.GGUFValueType.INT16: "h",
        gguf.GGUFValueType.UINT32: "I",
        gguf.GGUFValueType.INT32: "i",
        gguf.GGUFValueType.FLOAT32: "f",
        gguf.GGUFValueType.BOOL: "?",
        gguf.GGUFValueType.UINT64: "Q",
        gguf.GGUFValueType.INT64: "q",
        gguf.GGUFValueType.FLOAT64: "d",
    }
)
_SHARD_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})$")


@dataclass(frozen=True)
class GgufArray:
    """A metadata array, kept as its length only (token lists run to 100k+ strings)."""

    item_type: gguf.GGUFValueType
    length: int


@dataclass(frozen=True)
class GgufHeader:
    """What one .gguf file declares: metadata and the byte size of each tensor."""

    path: Path
    fields: dict[str, Any]
    tensor_bytes: dict[str, int]
    tensor_types: dict[str, str]
    file_size: int


class _Truncated(Exception):
    """The header runs past the end of the file."""


class _Cursor:
    """Sequential little/big-endian reads over a buffer; raises _Truncated past its end."""

    def __init__(self, buf: mmap.mmap, order: str) -> None:
        self.buf, self.order, self.pos = buf, order, 0

    def scalar(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise _Truncated
        (value,) = struct.unpack_from(self.order + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.scalar("Q")
        if self.pos + n > len(self.buf):
            raise _Truncated
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        vtype = gguf.GGUFValueType(vtype)
        if vtype == gguf.GGUFValueType.STRING:
            return self.string()
        if vtype != gguf.GGUFValueType.ARRAY:
            return self.scalar(_SCALAR_FORMATS[vtype])
        item_type = gguf.GGUFValueType(self.scalar("I"))
        length = self.scalar("Q")
        if item_type == gguf.GGUFValueType.STRING:
            for _ in range(length):
                n = self.scalar("Q")  # read before moving: `self.pos += self.scalar()` loses the read
                self.pos += n
        elif item_type == gguf.GGUFValueType.ARRAY:
            for _ in range(length):
                self.value(gguf.GGUFValueType.ARRAY)
        else:
            self.pos += length * struct.calcsize(_SCALAR_FORMATS[item_type])
        if self.pos > len(self.buf):
            raise _Truncated
        return GgufArray(item_type, length)


def read_header(path: Path) -> GgufHeader:
    """Parse one file's header and tensor infos; ModelError if it is not a whole GGUF file."""
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(path, buf)
    except FileNotFoundError as exc:
        raise ModelError(f"GGUF file {path} does not exist; check the path") from exc
    except OSError as exc:
        raise ModelError(f"cannot read GGUF file {path}: {exc.strerror}") from exc
    except ValueError as exc:  # mmap of an empty file, or an unknown enum value
        raise ModelError(f"{path} is not a GGUF file or is damaged ({exc}); re-download it") from exc
    except _Truncated as exc:
        raise ModelError(f"{path} is truncated: its header runs past the end; re-download it") from exc


def _parse(path: Path, buf: mmap.mmap | bytes, file_size: int | None = None) -> GgufHeader:
    """``file_size``: the whole file's size when ``buf`` holds only its beginning (a header
    fetched over HTTP); tensor data past ``buf`` is then not required."""
    if buf[:4] != b"GGUF":
        raise ModelError(f"{path} is not a GGUF file (no GGUF magic at its start)")
    order = "<" if struct.unpack_from("<I", buf, 4)[0] & 0xFFFF else ">"
    cur = _Cursor(buf, order)
    cur.pos = 4
    version = cur.scalar("I")
    if version not in (2, 3):
        raise ModelError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
    n_tensors, n_fields = cur.scalar("Q"), cur.scalar("Q")
    fields: dict[str, Any] = {}
    for _ in range(n_fields):
        key = cur.string()
        fields[key] = cur.value(cur.scalar("I"))
    tensor_bytes: dict[str, int] = {}
    tensor_types: dict[str, str] = {}
    ends: list[int] = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = [cur.scalar("Q") for _ in range(cur.scalar("I"))]
        qtype = gguf.GGMLQuantizationType(cur.scalar("I"))
        offset = cur.scalar("Q")
        if qtype not in gguf.GGML_QUANT_SIZES:
            raise ModelError(f"{path}: tensor {name} has type {qtype.name}, which this gguf package cannot size")
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        n_elements = 1
        for d in dims:
            n_elements *= d
        tensor_bytes[name] = n_elements // block * type_size
        tensor_types[name] = qtype.name
        ends.append(offset + tensor_bytes[name])
    alignment = fields.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    data_start = -(-cur.pos // alignment) * alignment
    size = len(buf) if file_size is None else file_size
    if ends and data_start + max(ends) > size:
        raise _Truncated
    return GgufHeader(path, fields, tensor_bytes, tensor_types, size)


class HeaderIncomplete(Exception):
    """The bytes given end inside the header: fetch more of the file."""


def parse_header_prefix(name: str, prefix: bytes, file_size: int) -> GgufHeader:
    """The header of a GGUF file of ``file_size`` bytes from its first bytes only."""
    try:
        return _parse(Path(name), prefix, file_size)
    except _Truncated as exc:
        if len(prefix) >= file_size:
            raise ModelError(f"{name} is truncated: its header runs past the end") from exc
        raise HeaderIncomplete from exc
    except ValueError as exc:
        raise ModelError(f"{name} is not a GGUF file or is damaged ({exc})") from exc


def read_gguf(path: str | Path) -> ModelSpec:
    """A ModelSpec for a local .gguf file (the first shard of a split GGUF)."""
    path = Path(path).expanduser()
    head = read_header(path)
    spec = spec_from_headers([head] + [read_header(p) for p in _other_shards(head)])
    return replace(spec, local_path=str(path))


def spec_from_headers(shards: list[GgufHeader], total_size: int | None = None) -> ModelSpec:
    """A ModelSpec from the headers of a GGUF's shards (the first shard first). With the first
    shard's header alone (a file not on disk yet), pass the whole size: per-layer bytes are then
    those of the tensors that header lists."""
    head = shards[0]
    path = head.path
    fields = head.fields
    arch_name = _field(head, "general.architecture", str)
    pre = f"{arch_name}."
    tensor_bytes = {k: v for s in shards for k, v in s.tensor_bytes.items()}

    layers = _field(head, pre + "block_count", int)
    heads = _field(head, pre + "attention.head_count", int)
    hidden = _field(head, pre + "embedding_length", int)
    experts = _opt_int(head, pre + "expert_count", 0)
    ffn_key = pre + "expert_feed_forward_length"
    ffn = _field(head, ffn_key if experts and ffn_key in fields else pre + "feed_forward_length", int)
    hf_arch = HF_ARCHITECTURES.get(arch_name, arch_name)
    if arch_name == "llama" and experts:
        hf_arch = "MixtralForCausalLM"
    file_type = _file_type(head)
    arch = ModelArch(
        architecture=hf_arch,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_layers=layers,
        num_attention_heads=heads,
        num_kv_heads=_opt_int(head, pre + "attention.head_count_kv", heads),
        head_dim=_opt_int(head, pre + "attention.key_length", hidden // heads),
        vocab_size=_vocab_size(head, pre),
        max_position_embeddings=_field(head, pre + "context_length", int),
        tie_word_embeddings="output.weight" not in tensor_bytes,
        num_experts=experts,
        num_experts_per_tok=_opt_int(head, pre + "expert_used_count", 0),
        attention_bias="blk.0.attn_q.bias" in tensor_bytes,
        dtype={"F16": "float16", "F32": "float32"}.get(file_type or "", "bfloat16"),
    )
    per_layer = [0] * layers
    non_layer = 0
    for name, n in tensor_bytes.items():
        parts = name.split(".")
        if parts[0] == "blk" and len(parts) > 2 and parts[1].isdigit():
            index = int(parts[1])
            if index >= layers:
                raise ModelError(f"{path}: tensor {name} is past {pre}block_count={layers}; the file is damaged")
            per_layer[index] += n
        else:
            non_layer += n
    # A split GGUF known by its first shard only: the other shards' tensors are unknown, so the
    # planner estimates per-layer bytes from the total size instead.
    partial = _opt_int(head, "split.count", 1) > len(shards)
    source = WeightSource(
        format="gguf",
        file=str(path),
        quant_type=file_type,
        size_bytes=total_size or sum(s.file_size for s in shards),
        tensor_bytes_per_layer=() if partial else tuple(per_layer),
        non_layer_bytes=None if partial else non_layer,
    )
    notes = () if arch_name in HF_ARCHITECTURES else (f"GGUF architecture {arch_name!r} has no known HF name",)
    name = _SHARD_NAME.sub(r"\g<prefix>", path.stem)
    return ModelSpec(name=name, arch=arch, sources=(source,), origin="gguf", notes=notes)


def _other_shards(head: GgufHeader) -> list[Path]:
    count = _opt_int(head, "split.count", 1)
    if count <= 1:
        return []
    if _opt_int(head, "split.no", 0) != 0:
        raise ModelError(f"{head.path} is not the first shard of a split GGUF; pass the -00001-of-... file")
    match = _SHARD_NAME.match(head.path.stem)
    if not match:
        raise ModelError(f"{head.path}: split GGUF with a non-standard name; expect <name>-00001-of-{count:05d}.gguf")
    prefix = match["prefix"]
    return [head.path.with_name(f"{prefix}-{i:05d}-of-{count:05d}.gguf") for i in range(2, count + 1)]


def _field(head: GgufHeader, key: str, kind: type) -> Any:
    value = head.fields.get(key)
    if value is None:
        raise ModelError(f"{head.path}: GGUF metadata key {key!r} is missing; the file cannot be planned for")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ModelError(f"{head.path}: GGUF metadata key {key!r} must be an integer, got {value!r}")
    if kind is str and not isinstance(value, str):
        raise ModelError(f"{head.path}: GGUF metadata key {key!r} must be a string, got {value!r}")
    return value


def _opt_int(head: GgufHeader, key: str, default: int) -> int:
    return _field(head, key, int) if key in head.fields else default


def _vocab_size(head: GgufHeader, pre: str) -> int:
    if pre + "vocab_size" in head.fields:
        return _field(head, pre + "vocab_size", int)
    tokens = head.fields.get("tokenizer.ggml.tokens")
    if isinstance(tokens, GgufArray):
        return tokens.length
    raise ModelError(f"{head.path}: no vocabulary size ({pre}vocab_size or tokenizer.ggml.tokens)")


def _file_type(head: GgufHeader) -> str | None:
    """general.file_type as llama.cpp names it (Q4_K_M, Q4_1, F16), else the dominant tensor type."""
    value = head.fields.get("general.file_type")
    if isinstance(value, int):
        try:
            return gguf.LlamaFileType(value).name.removeprefix("MOSTLY_").replace("ALL_F32", "F32")
        except ValueError:
            pass
    weights = [t for n, t in head.tensor_types.items() if n.startswith("blk.") and n.endswith(".weight")]
    return max(set(weights), key=weights.count) if weights else None
