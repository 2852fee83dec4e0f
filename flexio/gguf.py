"""GGUF file -> validated GGUFFile: metadata, tensor table with absolute offsets, ModelConfig.

Parsing is done by the `gguf` package's reader; this module checks everything the
engine relies on when the file is opened, before any arena exists, and turns every
problem into a GGUFError that names the key or tensor (expected vs got).

Byte layout reminders (GGUF v2/v3, little endian):
  header: magic 'GGUF' | version u32 | n_tensors u64 | n_kv u64
  kv pairs, then tensor infos (name, n_dims, dims[ne0..], type u32, offset u64),
  padding to `general.alignment` (default 32), then the data section.
  A tensor's absolute offset = data_offset + its relative offset; ne0 is the row
  length (innermost dimension), so a 2-D weight with dims (k, n) has n rows of k.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType

from .errors import GGUFError, UnsupportedError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)

T = GGMLQuantizationType
# Tensor types the kernels implement (kernels/layouts.py has their block layouts).
SUPPORTED_TYPES: frozenset[int] = frozenset(
    int(t) for t in (T.F32, T.F16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K)
)
SUPPORTED_ARCHS = ("llama", "qwen2")

_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


def type_name(ggml_type: int) -> str:
    try:
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"type#{ggml_type}"


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the file. `shape` is in GGUF order: shape[0] is the row length."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]
    offset: int  # absolute file offset of the first byte
    nbytes: int

    @property
    def type_name(self) -> str:
        return type_name(self.ggml_type)

    @property
    def layer(self) -> int | None:
        m = _LAYER_RE.match(self.name)
        return int(m.group(1)) if m else None

    @property
    def role(self) -> str:
        """Name without the layer prefix: 'attn_q.weight', 'token_embd.weight', ..."""
        m = _LAYER_RE.match(self.name)
        return m.group(2) if m else self.name

    @property
    def row_len(self) -> int:
        return self.shape[0]

    @property
    def n_rows(self) -> int:
        n = 1
        for d in self.shape[1:]:
            n *= d
        return n

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.n_rows


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters read from the metadata; derived values computed once."""

    arch: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    n_ctx_train: int
    vocab_size: int
    rope_base: float
    rope_dim: int
    norm_eps: float
    tied_output: bool
    head_dim: int = field(init=False)
    rope_neox: bool = field(init=False)  # qwen2 rotates (i, i + d/2) pairs; llama rotates (2i, 2i + 1)
    qkv_bias: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "head_dim", self.n_embd // self.n_head)
        object.__setattr__(self, "rope_neox", self.arch == "qwen2")
        object.__setattr__(self, "qkv_bias", self.arch == "qwen2")

    @property
    def kv_dim(self) -> int:
        return self.n_head_kv * self.head_dim


def _field_value(f) -> Any:
    t = f.types[0]
    if t == GGUFValueType.ARRAY:
        sub = f.types[-1] if len(f.types) > 1 else None
        if sub == GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8", errors="replace") for i in f.data]
        if sub is None:
            return []
        # numeric arrays: one numpy array (copied so the file mapping can be dropped)
        return np.concatenate([f.parts[i] for i in f.data]) if f.data else np.zeros(0)
    if t == GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8", errors="replace")
    v = f.parts[f.data[0]][0]
    if t == GGUFValueType.BOOL:
        return bool(v)
    if t in (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64):
        return float(v)
    return int(v)


class _TableReader(GGUFReader):
    """GGUFReader that records the tensor table without mapping tensor data.

    The stock reader builds a numpy view of every tensor, which fails with an
    opaque reshape error on a truncated file; we validate bounds ourselves.
    It also parses through an np.memmap, whose per-slice subclass bookkeeping
    makes a 49k-token vocabulary take seconds: a plain ndarray view of the same
    mapping parses 3x faster.
    """

    @property
    def data(self):
        return self._plain

    @data.setter
    def data(self, mm) -> None:
        self._plain = mm.view(np.ndarray)

    def _build_tensors(self, start_offs: int, fields) -> None:  # noqa: D401
        self.table = []
        for f in fields:
            _nl, name_data, _nd, dims, raw_dtype, offset_tensor = f.parts
            self.table.append(
                (
                    bytes(name_data).decode("utf-8", errors="replace"),
                    int(raw_dtype[0]),
                    tuple(int(d) for d in dims),
                    int(start_offs + int(offset_tensor[0])),
                )
            )
        self.tensors = []


class GGUFFile:
    """A validated GGUF file: `metadata` (key -> value), `tensors` (file order), `config`."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        try:
            self.size = os.path.getsize(self.path)
        except OSError as e:
            raise GGUFError(f"cannot open model file {self.path!r}: {e.strerror}") from None
        with open(self.path, "rb") as fh:
            head = fh.read(8)
        if len(head) < 8:
            raise GGUFError(f"{self.path}: file is {self.size} bytes, too short for a GGUF header")
        if head[:4] != GGUF_MAGIC:
            raise GGUFError(f"{self.path}: not a GGUF file (magic {head[:4]!r}, expected {GGUF_MAGIC!r})")
        version = int.from_bytes(head[4:8], "little")
        if version not in SUPPORTED_VERSIONS:
            raise GGUFError(f"{self.path}: GGUF version {version} is not supported (expected one of {SUPPORTED_VERSIONS})")
        try:
            reader = _TableReader(self.path, "r")
        except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as e:
            raise GGUFError(
                f"{self.path}: malformed or truncated GGUF header/metadata ({type(e).__name__}: {e})"
            ) from None
        self.version = version
        self.alignment = int(reader.alignment)
        self.data_offset = int(reader.data_offset)
        self.metadata: dict[str, Any] = {}
        for key, f in reader.fields.items():
            if key.startswith("GGUF."):
                continue
            try:
                self.metadata[key] = _field_value(f)
            except (IndexError, ValueError) as e:
                raise GGUFError(f"{self.path}: metadata key {key!r} is malformed ({e})") from None
        table = reader.table
        del reader  # drop the whole-file memmap
        self.tensors: list[TensorInfo] = []
        for name, raw_type, dims, offset in table:
            self.tensors.append(self._check_tensor(name, raw_type, dims, offset))
        self.by_name = {t.name: t for t in self.tensors}
        if len(self.by_name) != len(self.tensors):
            raise GGUFError(f"{self.path}: duplicate tensor names")
        self.config = self._read_config()
        self._check_shapes()

    # --- validation -------------------------------------------------------------

    def _check_tensor(self, name: str, raw_type: int, dims: tuple[int, ...], offset: int) -> TensorInfo:
        try:
            qt = GGMLQuantizationType(raw_type)
        except ValueError:
            raise UnsupportedError(f"tensor {name!r} has unknown GGML type id {raw_type}") from None
        if raw_type not in SUPPORTED_TYPES:
            raise UnsupportedError(
                f"tensor {name!r} has type {qt.name}, which flexio does not support "
                f"(supported: {', '.join(type_name(t) for t in sorted(SUPPORTED_TYPES))})"
            )
        if not dims or any(d <= 0 for d in dims):
            raise GGUFError(f"tensor {name!r} has invalid shape {list(dims)}")
        block, type_size = GGML_QUANT_SIZES[qt]
        if dims[0] % block:
            raise GGUFError(f"tensor {name!r}: row length {dims[0]} is not a multiple of the {qt.name} block size {block}")
        n = 1
        for d in dims:
            n *= d
        nbytes = n // block * type_size
        if (offset - self.data_offset) % self.alignment:
            raise GGUFError(
                f"tensor {name!r} offset {offset - self.data_offset} is not aligned to {self.alignment} bytes"
            )
        if offset < self.data_offset or offset + nbytes > self.size:
            raise GGUFError(
                f"tensor {name!r} data is not within the file bounds "
                f"(ends at byte {offset + nbytes:,} > file size {self.size:,}): model is truncated or corrupt"
            )
        return TensorInfo(name, raw_type, dims, offset, nbytes)

    def _meta(self, key: str, kind: type, default: Any = ...) -> Any:
        if key not in self.metadata:
            if default is ...:
                raise GGUFError(f"{self.path}: required metadata key {key!r} is missing")
            return default
        v = self.metadata[key]
        ok = isinstance(v, (int, float)) if kind is float else isinstance(v, kind)
        if not ok or (kind is int and isinstance(v, bool)):
            raise GGUFError(f"metadata key {key!r} has wrong type {type(v).__name__}, expected {kind.__name__}")
        return kind(v)

    def _read_config(self) -> ModelConfig:
        arch = self._meta("general.architecture", str)
        if arch not in SUPPORTED_ARCHS:
            raise UnsupportedError(f"architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})")
        a = arch
        n_embd = self._meta(f"{a}.embedding_length", int)
        n_head = self._meta(f"{a}.attention.head_count", int)
        if n_head <= 0 or n_embd % n_head:
            raise GGUFError(f"{a}.embedding_length {n_embd} is not divisible by {a}.attention.head_count {n_head}")
        n_head_kv = self._meta(f"{a}.attention.head_count_kv", int, n_head)
        if n_head_kv <= 0 or n_head % n_head_kv:
            raise GGUFError(f"{a}.attention.head_count {n_head} is not a multiple of head_count_kv {n_head_kv}")
        emb = self.by_name.get("token_embd.weight")
        if emb is None:
            raise GGUFError(f"{self.path}: tensor 'token_embd.weight' is missing")
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        vocab = self._meta(f"{a}.vocab_size", int, len(tokens) if tokens else emb.n_rows)
        head_dim = n_embd // n_head
        return ModelConfig(
            arch=arch,
            n_layer=self._meta(f"{a}.block_count", int),
            n_embd=n_embd,
            n_ff=self._meta(f"{a}.feed_forward_length", int),
            n_head=n_head,
            n_head_kv=n_head_kv,
            n_ctx_train=self._meta(f"{a}.context_length", int, 4096),
            vocab_size=vocab,
            rope_base=self._meta(f"{a}.rope.freq_base", float, 10000.0),
            rope_dim=self._meta(f"{a}.rope.dimension_count", int, head_dim),
            norm_eps=self._meta(f"{a}.attention.layer_norm_rms_epsilon", float, 1e-5),
            tied_output="output.weight" not in self.by_name,
        )

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the engine needs, with its GGUF shape (row length first)."""
        c = self.config
        d, kv, ff = c.n_embd, c.kv_dim, c.n_ff
        want: dict[str, tuple[int, ...]] = {
            "token_embd.weight": (d, c.vocab_size),
            "output_norm.weight": (d,),
        }
        if not c.tied_output:
            want["output.weight"] = (d, c.vocab_size)
        for i in range(c.n_layer):
            p = f"blk.{i}."
            want.update({
                p + "attn_norm.weight": (d,),
                p + "attn_q.weight": (d, d),
                p + "attn_k.weight": (d, kv),
                p + "attn_v.weight": (d, kv),
                p + "attn_output.weight": (d, d),
                p + "ffn_norm.weight": (d,),
                p + "ffn_gate.weight": (d, ff),
                p + "ffn_up.weight": (d, ff),
                p + "ffn_down.weight": (ff, d),
            })
            if c.qkv_bias:
                want.update({p + "attn_q.bias": (d,), p + "attn_k.bias": (kv,), p + "attn_v.bias": (kv,)})
        return want

    def _check_shapes(self) -> None:
        unused = set(self.by_name)
        for name, shape in self.expected_shapes().items():
            t = self.by_name.get(name)
            if t is None:
                raise GGUFError(f"{self.path}: tensor {name!r} is missing (expected shape {list(shape)})")
            if t.shape != shape:
                raise GGUFError(f"tensor {name!r} has wrong shape; expected {list(shape)}, got {list(t.shape)}")
            unused.discard(name)
        # Norm and bias vectors are read as float arrays: they must be F32 or F16.
        for name in self.expected_shapes():
            t = self.by_name[name]
            if len(t.shape) == 1 and t.ggml_type not in (int(T.F32), int(T.F16)):
                raise UnsupportedError(f"tensor {name!r} is a vector of type {t.type_name}; expected F32 or F16")
        self.unused = sorted(unused)

    # --- helpers ----------------------------------------------------------------

    def layer_tensors(self, layer: int) -> list[TensorInfo]:
        return [t for t in self.tensors if t.layer == layer]

    def read_tensor_bytes(self, t: TensorInfo) -> np.ndarray:
        """Read one tensor's bytes into a new uint8 array shaped (rows, row_bytes)."""
        buf = np.empty(t.nbytes, dtype=np.uint8)
        with open(self.path, "rb", buffering=0) as fh:
            fh.seek(t.offset)
            got = fh.readinto(memoryview(buf))
        if got != t.nbytes:
            raise GGUFError(f"tensor {t.name!r}: short read ({got} of {t.nbytes} bytes): file changed or truncated")
        return buf.reshape(t.n_rows, t.row_bytes)

    def __repr__(self) -> str:
        return f"GGUFFile({self.path!r}, {self.config.arch}, {len(self.tensors)} tensors, {self.size:,} bytes)"


def open_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    return GGUFFile(path)
