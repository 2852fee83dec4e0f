"""GGUF metadata + tensor table -> ModelConfig, its hyper-parameters checked against each other and the shapes.

One `Family` per architecture says which keys its forward pass reads and which
tensors, with which shapes, it needs. Everything a kernel will index with is
checked here, when the file is opened: a head size that is not an integer, a rope
dimension larger than the head (the rope kernel would write past the head: SIGSEGV),
a vocabulary larger than the embedding (the embedding kernel would read past it), a
layer count that does not match the tensor table. Each failure is a GGUFError that
names the key or tensor and says expected vs got, as llama.cpp's loader does.

Shapes are in GGUF order (row length first, as `TensorInfo.shape`) and are written
with ModelConfig field names, so a wrong shape can say which keys it comes from.
Adding a family (llama 3 rope scaling, qwen3, gemma3, phi3, MoE) means adding its
keys and tensors to the tables below and, where its forward pass differs, to model.py.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gguf import GGMLQuantizationType

from .errors import GGUFError, UnsupportedError

if TYPE_CHECKING:
    from .gguf import TensorInfo

LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")  # blk.<layer>.<role>
_VECTOR_TYPES = (int(GGMLQuantizationType.F32), int(GGMLQuantizationType.F16))

# --- the families -----------------------------------------------------------------------

Shape = tuple[str, ...]  # ModelConfig field names, GGUF order: ("n_embd", "n_ff") = n_ff rows of n_embd

# Tensors outside the blocks. output.weight is optional: without it the output head is
# tied to token_embd.weight (ModelConfig.tied_output).
GLOBAL_TENSORS: dict[str, Shape] = {
    "token_embd.weight": ("n_embd", "vocab_size"),
    "output_norm.weight": ("n_embd",),
}
OUTPUT_TENSOR: tuple[str, Shape] = ("output.weight", ("n_embd", "vocab_size"))

# One llama block: pre-norm attention (q: n_head heads, k/v: n_head_kv heads) and a SwiGLU FFN.
LLAMA_BLOCK: dict[str, Shape] = {
    "attn_norm.weight": ("n_embd",),
    "attn_q.weight": ("n_embd", "n_embd"),  # n_head * head_dim = n_embd rows
    "attn_k.weight": ("n_embd", "kv_dim"),  # n_head_kv * head_dim rows
    "attn_v.weight": ("n_embd", "kv_dim"),
    "attn_output.weight": ("n_embd", "n_embd"),
    "ffn_norm.weight": ("n_embd",),
    "ffn_gate.weight": ("n_embd", "n_ff"),
    "ffn_up.weight": ("n_embd", "n_ff"),
    "ffn_down.weight": ("n_ff", "n_embd"),
}
QKV_BIAS: dict[str, Shape] = {"attn_q.bias": ("n_embd",), "attn_k.bias": ("kv_dim",), "attn_v.bias": ("kv_dim",)}

# ModelConfig field -> (key under "<arch>.", kind, default). `...` = required (llama.cpp
# requires context_length and the eps too; flexio has always defaulted them).
# n_head_kv defaults to n_head and rope_dim to the head size, as in llama.cpp.
LLAMA_KEYS: dict[str, tuple[str, type, Any]] = {
    "n_layer": ("block_count", int, ...),
    "n_ctx_train": ("context_length", int, 4096),
    "n_embd": ("embedding_length", int, ...),
    "n_ff": ("feed_forward_length", int, ...),
    "n_head": ("attention.head_count", int, ...),
    "n_head_kv": ("attention.head_count_kv", int, None),
    "rope_base": ("rope.freq_base", float, 10000.0),
    "rope_dim": ("rope.dimension_count", int, None),
    "norm_eps": ("attention.layer_norm_rms_epsilon", float, 1e-5),
}


@dataclass(frozen=True)
class Family:
    """What one architecture's forward pass reads from a GGUF file."""

    name: str
    block: Mapping[str, Shape]  # per block: role -> shape
    keys: Mapping[str, tuple[str, type, Any]] = field(default_factory=lambda: LLAMA_KEYS)
    rope_neox: bool = False  # rotate pairs (i, i + rope_dim/2) (NeoX) instead of (2i, 2i + 1)
    qkv_bias: bool = False


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", LLAMA_BLOCK),
    "qwen2": Family("qwen2", LLAMA_BLOCK | QKV_BIAS, rope_neox=True, qkv_bias=True),
}
SUPPORTED_ARCHS = tuple(FAMILIES)


def check_architecture(value: Any) -> str:
    """`general.architecture` -> its family name; UnsupportedError listing the supported ones.

    Called by the GGUF reader as soon as the key is read, so that an unsupported file
    is refused before the rest of its header (a 262k-token vocabulary) is parsed.
    """
    if not isinstance(value, str):
        raise GGUFError(f"key 'general.architecture' has wrong type {type(value).__name__}, expected str")
    if value not in FAMILIES:
        raise UnsupportedError(
            f"architecture {value!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})"
        )
    return value


# --- the config -------------------------------------------------------------------------


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
        fam = FAMILIES.get(self.arch)
        object.__setattr__(self, "head_dim", self.n_embd // self.n_head)
        object.__setattr__(self, "rope_neox", fam.rope_neox if fam else False)
        object.__setattr__(self, "qkv_bias", fam.qkv_bias if fam else False)

    @property
    def kv_dim(self) -> int:
        return self.n_head_kv * self.head_dim


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def model_config(metadata: Mapping[str, Any], tensors: Mapping[str, TensorInfo]) -> ModelConfig:
    """Read and cross-check the hyper-parameters; every failure names the key (expected vs got)."""
    if "general.architecture" not in metadata:
        _missing("general.architecture")
    arch = check_architecture(metadata["general.architecture"])
    fam = FAMILIES[arch]
    keys = {f: f"{arch}.{k}" for f, (k, _, _) in fam.keys.items()}

    def get(f: str, default: Any = ...) -> Any:
        key, kind, fam_default = keys[f], fam.keys[f][1], fam.keys[f][2]
        if default is ...:
            default = fam_default
        if key not in metadata:
            if default is ...:
                _missing(key)
            return default
        v = metadata[key]
        ok = (_is_int(v) or isinstance(v, float)) if kind is float else _is_int(v)
        if not ok:
            raise GGUFError(f"metadata key {key!r} has wrong type {type(v).__name__}, expected {kind.__name__}")
        return kind(v)

    def at_least_1(f: str, v: int) -> int:
        if v < 1:
            raise GGUFError(f"key {keys[f]!r} = {v} is invalid: expected at least 1")
        return v

    def positive_finite(f: str, v: float) -> float:
        if not (math.isfinite(v) and v > 0):
            raise GGUFError(f"key {keys[f]!r} = {v} is invalid: expected a finite number > 0")
        return v

    n_embd = at_least_1("n_embd", get("n_embd"))
    n_head = at_least_1("n_head", get("n_head"))
    if n_embd % n_head:
        raise GGUFError(
            f"key {keys['n_embd']!r} = {n_embd} is not divisible by key {keys['n_head']!r} = {n_head}: "
            "the head size must be an integer"
        )
    head_dim = n_embd // n_head
    why = f"({keys['n_embd']} {n_embd} / {keys['n_head']} {n_head})"
    if head_dim % 2:
        raise GGUFError(f"head size {head_dim} {why} is odd: rope rotates pairs, expected an even head size")
    n_head_kv = at_least_1("n_head_kv", get("n_head_kv", n_head))
    if n_head % n_head_kv:
        raise GGUFError(
            f"key {keys['n_head_kv']!r} = {n_head_kv} does not divide key {keys['n_head']!r} = {n_head}: "
            "each kv head must serve a whole number of query heads"
        )
    rope_dim = get("rope_dim", head_dim)
    if rope_dim > head_dim:
        raise GGUFError(f"key {keys['rope_dim']!r} = {rope_dim} is larger than the head size {head_dim} {why}")
    if rope_dim < 2 or rope_dim % 2:
        raise GGUFError(f"key {keys['rope_dim']!r} = {rope_dim} is invalid: expected an even number from 2 to the head size {head_dim}")
    n_ctx = at_least_1("n_ctx_train", get("n_ctx_train"))
    rope_base = positive_finite("rope_base", get("rope_base"))
    norm_eps = positive_finite("norm_eps", get("norm_eps"))
    n_ff = at_least_1("n_ff", get("n_ff"))
    n_layer = _check_block_count(keys["n_layer"], at_least_1("n_layer", get("n_layer")), tensors)
    vocab = _vocab_size(metadata, keys, arch, tensors)
    return ModelConfig(
        arch=arch, n_layer=n_layer, n_embd=n_embd, n_ff=n_ff, n_head=n_head, n_head_kv=n_head_kv,
        n_ctx_train=n_ctx, vocab_size=vocab, rope_base=rope_base, rope_dim=rope_dim, norm_eps=norm_eps,
        tied_output=OUTPUT_TENSOR[0] not in tensors,
    )


def _missing(key: str) -> Any:
    raise GGUFError(f"required metadata key {key!r} is missing")


def _check_block_count(key: str, n_layer: int, tensors: Mapping[str, TensorInfo]) -> int:
    """block_count must be the number of blk.N groups in the tensor table, numbered 0..N-1.

    Checked before any per-layer name is built, so a bogus count (2**32-1) costs nothing.
    """
    layers = {int(m.group(1)) for m in map(LAYER_RE.match, tensors) if m}
    if not layers:
        raise GGUFError(f"key {key!r} = {n_layer} but the file has no blk.N tensors")
    top = max(layers)
    if n_layer != top + 1 or len(layers) != n_layer:
        gaps = []  # the first missing blocks: at most len(layers) + 3 steps, whatever `top` is
        i = 0
        while len(gaps) < 3 and i <= top:
            if i not in layers:
                gaps.append(i)
            i += 1
        hole = f", and block(s) {', '.join(f'blk.{i}' for i in gaps)} have no tensors" if gaps else ""
        raise GGUFError(
            f"key {key!r} = {n_layer} does not match the tensor table: it has {len(layers)} blocks "
            f"numbered up to blk.{top} (expected {key} = {top + 1}{hole})"
        )
    return n_layer


def _vocab_size(metadata: Mapping[str, Any], keys: dict[str, str], arch: str, tensors: Mapping[str, TensorInfo]) -> int:
    """The embedding's row count, which the token count and `<arch>.vocab_size` must equal:
    the embedding kernel reads row `id` for every token id the tokenizer can produce."""
    emb = tensors.get("token_embd.weight")
    if emb is None:
        raise GGUFError("tensor 'token_embd.weight' is missing (expected shape [n_embd, n_vocab])")
    if len(emb.shape) != 2:
        raise GGUFError(
            f"tensor 'token_embd.weight' has wrong shape; expected 2 dimensions [n_embd, n_vocab], got {list(emb.shape)}"
        )
    rows = emb.shape[1]
    tokens = metadata.get("tokenizer.ggml.tokens")
    if tokens is not None:
        if not isinstance(tokens, list):
            raise GGUFError(
                f"metadata key 'tokenizer.ggml.tokens' has wrong type {type(tokens).__name__}, expected an array of strings"
            )
        if len(tokens) != rows:
            raise GGUFError(
                f"the vocabulary has {len(tokens):,} tokens ('tokenizer.ggml.tokens') but tensor 'token_embd.weight' "
                f"has {rows:,} rows: expected one row per token"
            )
    key = f"{arch}.vocab_size"
    if key in metadata:
        v = metadata[key]
        if not _is_int(v):
            raise GGUFError(f"metadata key {key!r} has wrong type {type(v).__name__}, expected int")
        if v != rows:
            raise GGUFError(f"key {key!r} = {v} but tensor 'token_embd.weight' has {rows:,} rows: expected equal")
    return rows


# --- the tensors each family needs ---------------------------------------------------------


def expected_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the forward pass of `c` reads, with its GGUF shape (row length first)."""
    return {name: shape for name, (shape, _) in _expected(c).items()}


def _expected(c: ModelConfig) -> dict[str, tuple[tuple[int, ...], Shape]]:
    fam = FAMILIES[c.arch]
    want = dict(GLOBAL_TENSORS)
    if not c.tied_output:
        want[OUTPUT_TENSOR[0]] = OUTPUT_TENSOR[1]
    for i in range(c.n_layer):  # n_layer was checked against the tensor table: no bogus counts here
        want.update({f"blk.{i}.{role}": shape for role, shape in fam.block.items()})
    return {name: (tuple(getattr(c, f) if f != "kv_dim" else c.kv_dim for f in dims), dims) for name, dims in want.items()}


def _dims_source(c: ModelConfig, dims: Shape) -> str:
    fam = FAMILIES[c.arch]
    src = {
        "vocab_size": "n_vocab",
        "kv_dim": f"{c.arch}.{fam.keys['n_head_kv'][0]} x head size",
    }
    names = [src.get(f, f"{c.arch}.{fam.keys[f][0]}" if f in fam.keys else f) for f in dict.fromkeys(dims)]
    return ", ".join(names)


def check_tensors(c: ModelConfig, tensors: Mapping[str, TensorInfo]) -> list[str]:
    """Check every needed tensor's presence, shape and (for vectors) type; return the unused names."""
    unused = dict.fromkeys(tensors)
    for name, (shape, dims) in _expected(c).items():
        t = tensors.get(name)
        if t is None:
            raise GGUFError(f"tensor {name!r} is missing (expected shape {list(shape)})")
        if t.shape != shape:
            raise GGUFError(
                f"tensor {name!r} has wrong shape; expected {list(shape)}, got {list(t.shape)} "
                f"(from {_dims_source(c, dims)})"
            )
        # norm and bias vectors are read as float arrays, not through a matmul kernel
        if len(shape) == 1 and t.ggml_type not in _VECTOR_TYPES:
            raise UnsupportedError(f"tensor {name!r} is a vector of type {t.type_name}; expected F32 or F16")
        unused.pop(name)
    return list(unused)

