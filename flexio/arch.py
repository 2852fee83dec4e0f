"""GGUF metadata + tensor table -> ModelConfig, its hyper-parameters checked against each other and the shapes.

One `Family` per architecture says which keys its forward pass reads, which tensors,
with which shapes, it needs or applies when present, and how its layer differs from
llama's (the per-family options of the one forward pass in model.py). The rules follow
llama.cpp's loader and graphs (src/llama-model.cpp, src/models/<arch>.cpp) at the version
flexio is compared with, so that a file runs as llama.cpp runs it:

* every key llama.cpp reads that changes the computation is implemented or, when flexio
  cannot compute it (YaRN, non-causal attention, experts), refused naming the key;
* every tensor llama.cpp would apply is implemented, and a tensor flexio does not use
  refuses the file (llama.cpp refuses unknown tensors too: "wrong number of tensors");
* keys llama.cpp does not read for the family (llama's or phi3's `attention.sliding_window`,
  `attention.scale`, ...) are ignored, as there.

Everything a kernel will index with is checked here, when the file is opened: a head
size that is not an integer, a rope dimension larger than the head, a vocabulary larger
than the embedding, a layer count that does not match the tensor table. Each failure is
a GGUFError that names the key or tensor and says expected vs got.

Shapes are in GGUF order (row length first, as `TensorInfo.shape`) and are written with
dimension names (`DIMS`), so a wrong shape can say which keys it comes from.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from gguf import GGMLQuantizationType

from .errors import GGUFError, UnsupportedError



class TensorInfo(Protocol):
    """What this module reads of a file's tensor (flexio.gguf.TensorInfo is one): it checks names and shapes
    before anything else trusts them, and knows nothing of how a file is parsed."""

    shape: tuple[int, ...]
    ggml_type: int
    nbytes: int

    @property
    def type_name(self) -> str: ...

LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")  # blk.<layer>.<role>
_VECTOR_TYPES = (int(GGMLQuantizationType.F32), int(GGMLQuantizationType.F16))
CTX_PAD = 256  # llama.cpp pads a context to a multiple of this (llama-context.cpp: GGML_PAD(n_ctx, 256))

# --- tensor shapes ----------------------------------------------------------------------

Shape = tuple[str, ...]  # dimension names, GGUF order: ("n_embd", "n_ff") = n_ff rows of n_embd

# Tensors outside the blocks. output.weight is optional: without it the output head is
# tied to token_embd.weight (ModelConfig.tied_output).
GLOBAL_TENSORS: dict[str, Shape] = {
    "token_embd.weight": ("n_embd", "vocab_size"),
    "output_norm.weight": ("n_embd",),
}
OUTPUT_TENSOR: tuple[str, Shape] = ("output.weight", ("n_embd", "vocab_size"))
# Per-pair rope frequency factors (one global tensor each, n_rot / 2 floats that divide theta):
# llama 3.1+'s rope_freqs; LongRoPE's long and short sets (phi3; llama with rope.scaling.type longrope).
ROPE_FREQS = "rope_freqs.weight"
ROPE_LONG, ROPE_SHORT = "rope_factors_long.weight", "rope_factors_short.weight"

# Q, K, V: three matrices, or one fused attn_qkv whose output rows are Q's, then K's, then V's
# (llama.cpp's create_tensor_qkv, accepted by every family). Biases are applied when present.
QKV_SPLIT: dict[str, Shape] = {"attn_q.weight": ("n_embd", "q_dim"), "attn_k.weight": ("n_embd", "kv_dim"),
                               "attn_v.weight": ("n_embd", "kv_dim")}
QKV_FUSED: dict[str, Shape] = {"attn_qkv.weight": ("n_embd", "qkv_dim")}
QKV_BIAS: dict[str, Shape] = {"attn_q.bias": ("q_dim",), "attn_k.bias": ("kv_dim",), "attn_v.bias": ("kv_dim",)}
QKV_FUSED_BIAS: dict[str, Shape] = {"attn_qkv.bias": ("qkv_dim",)}

# One llama block: pre-norm attention (q: n_head heads, k/v: n_head_kv heads) and a SwiGLU FFN.
LLAMA_BLOCK: dict[str, Shape] = {
    "attn_norm.weight": ("n_embd",),
    "attn_output.weight": ("q_dim", "n_embd"),
    "ffn_norm.weight": ("n_embd",),
    "ffn_gate.weight": ("n_embd", "n_ff"),
    "ffn_up.weight": ("n_embd", "n_ff"),
    "ffn_down.weight": ("n_ff", "n_embd"),
}
QK_NORM: dict[str, Shape] = {"attn_q_norm.weight": ("head_dim",), "attn_k_norm.weight": ("head_dim",)}
POST_NORMS: dict[str, Shape] = {"post_attention_norm.weight": ("n_embd",), "post_ffw_norm.weight": ("n_embd",)}
# phi3: one up matrix of 2 * n_ff rows, the gate's rows first (ggml_swiglu on the fused output)
PHI3_BLOCK: dict[str, Shape] = {
    "attn_norm.weight": ("n_embd",),
    "attn_output.weight": ("q_dim", "n_embd"),
    "ffn_norm.weight": ("n_embd",),
    "ffn_up.weight": ("n_embd", "ff2"),
    "ffn_down.weight": ("n_ff", "n_embd"),
}
# Mixture-of-experts FFN (llama with expert_count > 0 = Mixtral; qwen3moe): a router (F32, one row per
# expert) and the experts' three matrices stacked on the slowest axis, (row length, rows, n_expert).
MOE_FFN: dict[str, Shape] = {
    "ffn_gate_inp.weight": ("n_embd", "n_expert"),
    "ffn_up_exps.weight": ("n_embd", "n_ff_exp", "n_expert"),
    "ffn_down_exps.weight": ("n_ff_exp", "n_embd", "n_expert"),
}
MOE_GATE: dict[str, Shape] = {"ffn_gate_exps.weight": ("n_embd", "n_ff_exp", "n_expert")}
DENSE_FFN = ("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")
# llama's graph applies these when the file has them (src/models/llama.cpp: wo_b, ffn_*_b)
LLAMA_BIASES: dict[str, Shape] = {"attn_output.bias": ("n_embd",), "ffn_gate.bias": ("n_ff",),
                                  "ffn_up.bias": ("n_ff",), "ffn_down.bias": ("n_embd",)}

# --- keys -------------------------------------------------------------------------------

# ModelConfig field -> (key under "<arch>.", kind, default). `...` = required, as in llama.cpp.
# n_head_kv defaults to n_head, head_dim to n_embd / n_head and rope_dim to the head size.
COMMON_KEYS: dict[str, tuple[str, type, Any]] = {
    "n_layer": ("block_count", int, ...),
    "n_ctx_train": ("context_length", int, ...),
    "n_embd": ("embedding_length", int, ...),
    "n_ff": ("feed_forward_length", int, ...),
    "n_head": ("attention.head_count", int, ...),
    "n_head_kv": ("attention.head_count_kv", int, None),
    "head_dim": ("attention.key_length", int, None),
    "head_dim_v": ("attention.value_length", int, None),
    "rope_base": ("rope.freq_base", float, 10000.0),
    "rope_dim": ("rope.dimension_count", int, None),
    "norm_eps": ("attention.layer_norm_rms_epsilon", float, ...),
    "rope_scale_factor": ("rope.scaling.factor", float, 0.0),
    "rope_scale_linear": ("rope.scale_linear", float, 0.0),  # the older name of rope.scaling.factor
    "rope_attn_factor": ("rope.scaling.attn_factor", float, 1.0),
    "n_ctx_orig": ("rope.scaling.original_context_length", int, None),
    "n_expert": ("expert_count", int, 0),
    "n_expert_used": ("expert_used_count", int, 0),
    "n_ff_exp": ("expert_feed_forward_length", int, 0),
    "n_nextn": ("nextn_predict_layers", int, 0),
    "head_dim_swa": ("attention.key_length_swa", int, None),
    "head_dim_v_swa": ("attention.value_length_swa", int, None),
    "rope_dim_swa": ("rope.dimension_count_swa", int, None),
}
SWA_KEYS: dict[str, tuple[str, type, Any]] = {  # gemma3
    "swa_window": ("attention.sliding_window", int, 0),
    "rope_base_swa": ("rope.freq_base_swa", float, 10000.0),
    "logit_softcap": ("final_logit_softcapping", float, 0.0),
}
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")  # llama.cpp's names; "yarn" is refused
SWA_PATTERN_DEFAULT = 6  # gemma3: load_swa_pattern(ml, 6) when the key is absent


@dataclass(frozen=True)
class Family:
    """What one architecture's forward pass reads from a GGUF file, and how its layer differs from llama's."""

    name: str
    block: Mapping[str, Shape]  # per block, besides Q/K/V (which may be fused): role -> shape, required
    optional: Mapping[str, Shape] = field(default_factory=dict)  # per block: applied when present
    rope_neox: bool = False  # rotate pairs (i, i + rope_dim/2) (NeoX) instead of (2i, 2i + 1)
    rope_factors: str = "none"  # "llama": rope_freqs, or the LongRoPE pair with scaling type longrope; "longrope"
    qk_norm: bool = False  # per-head RMSNorm of Q and K before RoPE (attn_q_norm, attn_k_norm)
    post_norms: bool = False  # RMSNorm of the attention and FFN outputs before their residual adds (gemma3)
    ffn_act: str = "silu"  # gate activation: "silu" (SwiGLU) or "gelu" (GeGLU through ggml's f16 table)
    fused_gate_up: bool = False  # ffn_up holds the gate rows then the up rows (phi3)
    q_is_n_embd: bool = False  # Q and attn_output are n_embd wide whatever the head size (qwen2, phi3)
    rope_dim_is_head: bool = False  # llama.cpp refuses or asserts rope.dimension_count != head size
    q_scale: str | None = None  # Q scaled in f32 before attention (kq_scale 1): "head" 1/sqrt(head), "gemma3"
    embed_scale: bool = False  # embeddings times sqrtf(n_embd) (gemma3)
    swa: bool = False  # reads attention.sliding_window and its pattern (gemma3)
    moe: str = "none"  # experts: "none" (expert_count > 0 refused), "optional" (llama: Mixtral), "required"
    moe_ff_key: bool = False  # the experts' width is expert_feed_forward_length (qwen3moe), else feed_forward_length
    moe_gate_required: bool = True  # llama.cpp's llama makes ffn_gate_exps optional (an expert is then down(silu(up)))


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", LLAMA_BLOCK, optional=LLAMA_BIASES, rope_factors="llama", rope_dim_is_head=True,
                    moe="optional", moe_gate_required=False),
    "qwen2": Family("qwen2", LLAMA_BLOCK, rope_neox=True, q_is_n_embd=True, rope_dim_is_head=True),
    "qwen3": Family("qwen3", LLAMA_BLOCK | QK_NORM, rope_neox=True, qk_norm=True, rope_dim_is_head=True),
    "gemma3": Family("gemma3", LLAMA_BLOCK | QK_NORM | POST_NORMS, rope_neox=True, qk_norm=True, post_norms=True,
                     ffn_act="gelu", q_scale="gemma3", embed_scale=True, swa=True, rope_dim_is_head=True),
    "phi3": Family("phi3", PHI3_BLOCK, rope_neox=True, rope_factors="longrope", fused_gate_up=True,
                   q_is_n_embd=True, q_scale="head"),
    "qwen3moe": Family("qwen3moe", LLAMA_BLOCK | QK_NORM, rope_neox=True, qk_norm=True, rope_dim_is_head=True,
                       moe="required", moe_ff_key=True),
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


def f32_inv_sqrt(n: float) -> float:
    """1.0f / sqrtf((float)n) in float32, as llama.cpp's graphs compute their attention scales."""
    return float(np.float32(1.0) / np.sqrt(np.float32(n)))


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters read from the metadata (and what the tensor table says); derived values computed once.

    The per-family options the forward pass reads (rope_neox, qk_norm, post_norms, ffn_act,
    fused_gate_up, embed_scale, q_scale, kq_scale) are derived from `arch` here.
    """

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
    head_dim: int = 0  # attention.key_length (= value_length); 0: n_embd // n_head
    rope_scale: float = 1.0  # freq_scale of full-attention layers: 1 / rope.scaling.factor (1 for type none)
    rope_attn_factor: float = 1.0  # rope.scaling.attn_factor: multiplies RoPE's cos and sin (LongRoPE)
    rope_factors: tuple[str, ...] = ()  # frequency-factor tensors of the file: (ROPE_FREQS,) or LongRoPE's
    n_ctx_orig: int = 0  # rope.scaling.original_context_length (0: n_ctx_train); LongRoPE's long/short switch
    swa_window: int = 0  # sliding-window attention: a query sees this many positions, itself included (0: none)
    swa_layers: tuple[bool, ...] = ()  # per layer: sliding window (its rope: rope_base_swa, scale 1)
    rope_base_swa: float = 10000.0
    logit_softcap: float = 0.0  # logits = c * tanh(logits / c) when c > 0 (final_logit_softcapping)
    qkv_fused: bool = False  # the blocks hold one attn_qkv matrix instead of attn_q/k/v
    qkv_bias: bool = False  # the blocks hold Q/K/V biases
    n_expert: int = 0  # mixture of experts: experts per layer (0: a dense FFN)
    n_expert_used: int = 0  # experts each token uses (k)
    n_ff_exp: int = 0  # an expert's FFN width
    rope_neox: bool = field(init=False)  # NeoX pairs (i, i + d/2); llama rotates (2i, 2i + 1)
    qk_norm: bool = field(init=False)
    post_norms: bool = field(init=False)
    ffn_act: str = field(init=False)
    fused_gate_up: bool = field(init=False)
    embed_scale: float = field(init=False)  # 0: none; else embeddings times this (f32 sqrtf(n_embd))
    q_scale: float = field(init=False)  # 0: none; else Q times this (f32) before the f16 rounding of attention
    kq_scale: float = field(init=False)  # attention scores times this (1 when Q is pre-scaled)

    def __post_init__(self) -> None:
        fam = FAMILIES.get(self.arch) or FAMILIES["llama"]
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.n_embd // self.n_head)
        if not self.n_ctx_orig:
            object.__setattr__(self, "n_ctx_orig", self.n_ctx_train)
        if len(self.swa_layers) != self.n_layer:
            object.__setattr__(self, "swa_layers", (False,) * self.n_layer)
        setattr_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        setattr_("rope_neox", fam.rope_neox)
        setattr_("qk_norm", fam.qk_norm)
        setattr_("post_norms", fam.post_norms)
        setattr_("ffn_act", fam.ffn_act)
        setattr_("fused_gate_up", fam.fused_gate_up)
        setattr_("embed_scale", float(np.sqrt(np.float32(self.n_embd))) if fam.embed_scale else 0.0)
        if fam.q_scale == "gemma3":
            # src/models/gemma3.cpp: the 27B (62 layers) scales by 1/sqrt(n_embd / n_head), integer division
            n = self.n_embd // self.n_head if self.n_layer == 62 else self.head_dim
            setattr_("q_scale", f32_inv_sqrt(n))
        elif fam.q_scale == "head":
            setattr_("q_scale", f32_inv_sqrt(self.head_dim))
        else:
            setattr_("q_scale", 0.0)
        setattr_("kq_scale", 1.0 if self.q_scale else f32_inv_sqrt(self.head_dim))

    @property
    def q_dim(self) -> int:
        return self.n_head * self.head_dim

    @property
    def moe(self) -> bool:
        return self.n_expert > 0

    @property
    def kv_dim(self) -> int:
        return self.n_head_kv * self.head_dim

    def is_swa(self, layer: int) -> bool:
        return self.swa_layers[layer]

    def rope_for(self, layer: int) -> tuple[float, float]:
        """(freq_base, freq_scale) of a layer: sliding layers use rope_base_swa unscaled (llama.cpp's
        get_rope_freq_base/scale), the others rope_base and rope_scale."""
        return (self.rope_base_swa, 1.0) if self.swa_layers[layer] else (self.rope_base, self.rope_scale)

    def rope_factor_tensor(self, n_ctx_seq: int) -> str | None:
        """The frequency-factor tensor a context of n_ctx_seq tokens per sequence uses, as llama.cpp's
        get_rope_factors: rope_freqs when present; else LongRoPE's long set when the context (padded to
        256 as llama.cpp pads it) exceeds the original context, the short set otherwise; None without."""
        if ROPE_FREQS in self.rope_factors:
            return ROPE_FREQS
        want = ROPE_LONG if -(-n_ctx_seq // CTX_PAD) * CTX_PAD > self.n_ctx_orig else ROPE_SHORT
        return want if want in self.rope_factors else None


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def model_config(metadata: Mapping[str, Any], tensors: Mapping[str, TensorInfo]) -> ModelConfig:
    """Read and cross-check the hyper-parameters; every failure names the key (expected vs got)."""
    if "general.architecture" not in metadata:
        _missing("general.architecture")
    arch = check_architecture(metadata["general.architecture"])
    fam = FAMILIES[arch]
    table = COMMON_KEYS | (SWA_KEYS if fam.swa else {})
    keys = {f: f"{arch}.{k}" for f, (k, _, _) in table.items()}

    def get(f: str, default: Any = ...) -> Any:
        key, kind, fam_default = keys[f], table[f][1], table[f][2]
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

    _refuse_unsupported_keys(metadata, arch, fam, get, keys)
    n_embd = at_least_1("n_embd", get("n_embd"))
    n_head = at_least_1("n_head", get("n_head"))
    explicit_head = get("head_dim")
    if explicit_head is None and n_embd % n_head:
        raise GGUFError(
            f"key {keys['n_embd']!r} = {n_embd} is not divisible by key {keys['n_head']!r} = {n_head}: "
            "the head size must be an integer"
        )
    head_dim = at_least_1("head_dim", explicit_head) if explicit_head is not None else n_embd // n_head
    why = (f"({keys['head_dim']})" if explicit_head is not None
           else f"({keys['n_embd']} {n_embd} / {keys['n_head']} {n_head})")
    if head_dim % 2:
        raise GGUFError(f"head size {head_dim} {why} is odd: rope rotates pairs, expected an even head size")
    head_dim_v = get("head_dim_v", n_embd // n_head)
    if head_dim_v != head_dim:
        raise UnsupportedError(f"key {keys['head_dim_v']!r} = {head_dim_v} differs from the key head size {head_dim} "
                               f"{why}: flexio needs keys and values of one head size")
    for f, full in (("head_dim_swa", head_dim), ("head_dim_v_swa", head_dim)):
        v = get(f)
        if v is not None and v != full:
            raise UnsupportedError(f"key {keys[f]!r} = {v} differs from the head size {full}: per-layer head sizes "
                                   "are not supported")
    if fam.q_is_n_embd and head_dim * n_head != n_embd:
        raise GGUFError(f"key {keys['head_dim']!r} = {head_dim} x {keys['n_head']!r} = {n_head} is not "
                        f"{keys['n_embd']!r} = {n_embd}: {arch}'s query and output matrices are n_embd wide")
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
    if fam.rope_dim_is_head and rope_dim != head_dim:
        raise UnsupportedError(f"key {keys['rope_dim']!r} = {rope_dim} differs from the head size {head_dim} {why}: "
                               f"{arch} rotates whole heads (llama.cpp refuses this file too)")
    rope_dim_swa = get("rope_dim_swa")
    if rope_dim_swa is not None and rope_dim_swa != rope_dim:
        raise UnsupportedError(f"key {keys['rope_dim_swa']!r} = {rope_dim_swa} differs from "
                               f"{keys['rope_dim']!r} = {rope_dim}: per-layer rope sizes are not supported")
    n_ctx = at_least_1("n_ctx_train", get("n_ctx_train"))
    rope_base = positive_finite("rope_base", get("rope_base"))
    norm_eps = positive_finite("norm_eps", get("norm_eps"))
    n_ff = at_least_1("n_ff", get("n_ff"))
    n_layer = _check_block_count(keys["n_layer"], at_least_1("n_layer", get("n_layer")), tensors)
    vocab = _vocab_size(metadata, keys, arch, tensors)

    scaling = _rope_scaling_type(metadata, arch)
    factor = get("rope_scale_factor")
    if factor == 0.0 and keys["rope_scale_factor"] not in metadata:
        factor = get("rope_scale_linear")
    if not (math.isfinite(factor) and factor >= 0):
        raise GGUFError(f"key {keys['rope_scale_factor']!r} = {factor} is invalid: expected a finite number >= 0")
    with np.errstate(over="ignore", divide="ignore"):
        rope_scale = 1.0 if factor == 0.0 or scaling == "none" else float(np.float32(1.0) / np.float32(factor))
    if not (math.isfinite(rope_scale) and rope_scale > 0):
        raise GGUFError(f"key {keys['rope_scale_factor']!r} = {factor}: its inverse (the rope frequency scale) "
                        f"is {rope_scale} in float32, expected a finite number > 0")
    attn_factor = get("rope_attn_factor")
    if not math.isfinite(np.float32(attn_factor)):
        raise GGUFError(f"key {keys['rope_attn_factor']!r} = {attn_factor} is invalid: expected a finite number")
    n_ctx_orig = get("n_ctx_orig", n_ctx)
    if n_ctx_orig < 0:
        raise GGUFError(f"key {keys['n_ctx_orig']!r} = {n_ctx_orig} is invalid: expected at least 0")

    swa_window, swa_layers, rope_base_swa, softcap = 0, (False,) * n_layer, 10000.0, 0.0
    if fam.swa:
        swa_window = get("swa_window")
        if swa_window < 0:
            raise GGUFError(f"key {keys['swa_window']!r} = {swa_window} is invalid: expected at least 0")
        if swa_window > 0:
            swa_layers = _swa_pattern(metadata, f"{arch}.attention.sliding_window_pattern", n_layer)
            rope_base_swa = positive_finite("rope_base_swa", get("rope_base_swa"))
        softcap = get("logit_softcap")
        if not (math.isfinite(softcap) and softcap >= 0):
            raise GGUFError(f"key {keys['logit_softcap']!r} = {softcap} is invalid: expected a finite number >= 0")

    if fam.rope_factors == "llama":
        names = (ROPE_LONG, ROPE_SHORT) if scaling == "longrope" else (ROPE_FREQS,)
    elif fam.rope_factors == "longrope":
        names = (ROPE_LONG, ROPE_SHORT)
    else:
        names = ()
    qkv_fused = _qkv_layout(tensors, n_layer)
    n_expert, n_used, n_ff_exp = _experts(fam, get, keys, n_ff)
    return ModelConfig(
        arch=arch, n_layer=n_layer, n_embd=n_embd, n_ff=n_ff, n_head=n_head, n_head_kv=n_head_kv,
        n_ctx_train=n_ctx, vocab_size=vocab, rope_base=rope_base, rope_dim=rope_dim, norm_eps=norm_eps,
        tied_output=OUTPUT_TENSOR[0] not in tensors, head_dim=head_dim, rope_scale=rope_scale,
        rope_attn_factor=float(attn_factor), rope_factors=tuple(n for n in names if n in tensors),
        n_ctx_orig=n_ctx_orig, swa_window=swa_window, swa_layers=swa_layers, rope_base_swa=rope_base_swa,
        logit_softcap=softcap, qkv_fused=qkv_fused,
        qkv_bias=any(f"blk.{i}.{r}" in tensors for i in range(n_layer) for r in (*QKV_BIAS, *QKV_FUSED_BIAS)),
        n_expert=n_expert, n_expert_used=n_used, n_ff_exp=n_ff_exp,
    )


def _experts(fam: Family, get, keys: dict[str, str], n_ff: int) -> tuple[int, int, int]:
    """(n_expert, n_expert_used, the experts' FFN width), all 0 for a dense model; checked against each other."""
    n_expert = get("n_expert")
    if fam.moe == "none" or (fam.moe == "optional" and not n_expert):
        return 0, 0, 0
    if n_expert < 1:
        raise GGUFError(f"key {keys['n_expert']!r} = {n_expert} is invalid: {fam.name} needs at least 1 expert")
    n_used = get("n_expert_used")
    if not 1 <= n_used <= n_expert:
        raise GGUFError(f"key {keys['n_expert_used']!r} = {n_used} is invalid: expected 1..{keys['n_expert']} "
                        f"= {n_expert} experts per token")
    n_ff_exp = n_ff
    if fam.moe_ff_key:
        n_ff_exp = get("n_ff_exp") or n_ff // n_used  # llama.cpp: n_ff / n_expert_used when the key is absent
        if n_ff_exp < 1:
            raise GGUFError(f"key {keys['n_ff_exp']!r} = {n_ff_exp} is invalid: expected at least 1")
    return n_expert, n_used, n_ff_exp


def _refuse_unsupported_keys(metadata: Mapping[str, Any], arch: str, fam: Family, get, keys: dict[str, str]) -> None:
    """Keys llama.cpp reads for this family that change the computation in a way flexio does not compute."""
    n_expert = get("n_expert")
    if n_expert and fam.moe == "none":
        moe = [a for a, f in FAMILIES.items() if f.moe != "none"]
        raise UnsupportedError(f"key {keys['n_expert']!r} = {n_expert}: {arch} has no mixture-of-experts variant "
                               f"(mixture-of-experts families: {', '.join(moe)})")
    n_nextn = get("n_nextn")
    if n_nextn:
        raise UnsupportedError(f"key {keys['n_nextn']!r} = {n_nextn}: multi-token-prediction layers are not supported")
    causal = metadata.get(f"{arch}.attention.causal")
    if causal is not None and not causal:
        raise UnsupportedError(f"key '{arch}.attention.causal' = {causal}: non-causal attention is not supported")


def _rope_scaling_type(metadata: Mapping[str, Any], arch: str) -> str:
    key = f"{arch}.rope.scaling.type"
    v = metadata.get(key, "linear")
    if not isinstance(v, str):
        raise GGUFError(f"metadata key {key!r} has wrong type {type(v).__name__}, expected str")
    if v not in ROPE_SCALING_TYPES:
        raise GGUFError(f"key {key!r} = {v!r} is invalid: expected one of {', '.join(ROPE_SCALING_TYPES)}")
    if v == "yarn":
        raise UnsupportedError(f"key {key!r} = 'yarn': YaRN rope scaling is not supported "
                               "(supported: none, linear, longrope)")
    if v == "longrope" and FAMILIES[arch].rope_factors not in ("llama", "longrope"):
        raise UnsupportedError(f"key {key!r} = 'longrope' is not supported for {arch}")
    return v


def _swa_pattern(metadata: Mapping[str, Any], key: str, n_layer: int) -> tuple[bool, ...]:
    """Which layers use the sliding window: an array of one flag per layer, or a period n (layer i slides
    unless i % n == n - 1; n = 0: every layer), default 6 (llama.cpp's load_swa_pattern / set_swa_pattern)."""
    v = metadata.get(key, SWA_PATTERN_DEFAULT)
    if isinstance(v, np.ndarray):
        if v.dtype.kind not in "biu":
            raise GGUFError(f"metadata key {key!r} is an array of {v.dtype}, expected bools or integers (one per layer)")
        if v.shape != (n_layer,):
            raise GGUFError(f"metadata key {key!r} has {v.size} entries, expected {n_layer} (one per layer)")
        return tuple(bool(x) for x in v)
    if not _is_int(v) or v < 0:
        raise GGUFError(f"metadata key {key!r} = {v!r} is invalid: expected a period >= 0 or one flag per layer")
    n = int(v)
    return tuple(n == 0 or i % n < n - 1 for i in range(n_layer))


def _qkv_layout(tensors: Mapping[str, TensorInfo], n_layer: int) -> bool:
    """True when the blocks hold fused attn_qkv matrices; a file that mixes both layouts is refused."""
    fused = [f"blk.{i}.attn_qkv.weight" in tensors for i in range(n_layer)]
    if any(fused) and not all(fused):
        i = fused.index(not fused[0])
        raise GGUFError(f"blk.0 {'has' if fused[0] else 'lacks'} a fused 'attn_qkv.weight' but blk.{i} "
                        f"{'lacks' if fused[0] else 'has'} one: expected one layout in every block")
    return bool(fused and fused[0])


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


def _dims(c: ModelConfig) -> dict[str, int]:
    return {"n_embd": c.n_embd, "n_ff": c.n_ff, "ff2": 2 * c.n_ff, "q_dim": c.q_dim, "kv_dim": c.kv_dim,
            "qkv_dim": c.q_dim + 2 * c.kv_dim, "head_dim": c.head_dim, "rope_half": c.rope_dim // 2,
            "vocab_size": c.vocab_size, "n_expert": c.n_expert, "n_ff_exp": c.n_ff_exp}


def _wanted(c: ModelConfig, tensors: Mapping[str, TensorInfo]) -> dict[str, tuple[Shape, bool]]:
    """name -> (dimension names, required) of every tensor the forward pass of `c` reads or applies if present."""
    fam = FAMILIES[c.arch]
    want: dict[str, tuple[Shape, bool]] = {n: (s, True) for n, s in GLOBAL_TENSORS.items()}
    if not c.tied_output:
        want[OUTPUT_TENSOR[0]] = (OUTPUT_TENSOR[1], True)
    for name in c.rope_factors:
        want[name] = (("rope_half",), True)
    qkv = QKV_FUSED if c.qkv_fused else QKV_SPLIT
    for i in range(c.n_layer):  # n_layer was checked against the tensor table: no bogus counts here
        p = f"blk.{i}."
        block = dict(qkv | fam.block)
        optional = dict(fam.optional) | QKV_BIAS
        if c.moe:  # the dense FFN (and its biases) gives way to the router and the experts
            for role in DENSE_FFN:
                block.pop(role, None)
                optional.pop(role.replace(".weight", ".bias"), None)
            block |= MOE_FFN | (MOE_GATE if fam.moe_gate_required else {})
            if not fam.moe_gate_required:
                optional |= MOE_GATE
        want.update({p + role: (shape, True) for role, shape in block.items()})
        if c.qkv_fused:
            if p + "attn_qkv.bias" in tensors:
                optional = dict(fam.optional) | QKV_FUSED_BIAS
            else:  # separate biases with a fused matrix: llama.cpp applies them only as a set of three
                have = [p + r in tensors for r in QKV_BIAS]
                if any(have) and not all(have):
                    missing = [p + r for r, h in zip(QKV_BIAS, have) if not h]
                    raise GGUFError(f"block {i} has a fused attn_qkv.weight and some of the Q/K/V biases but not "
                                    f"{', '.join(repr(m) for m in missing)}: expected all three or none")
        want.update({p + role: (shape, False) for role, shape in optional.items() if p + role in tensors})
    return want


def expected_shapes(c: ModelConfig, tensors: Mapping[str, TensorInfo]) -> dict[str, tuple[int, ...]]:
    """Every tensor the forward pass of `c` reads from this tensor table, with its GGUF shape (row length first)."""
    d = _dims(c)
    return {name: tuple(d[f] for f in dims) for name, (dims, _) in _wanted(c, tensors).items()}


def _dims_source(c: ModelConfig, dims: Shape) -> str:
    a = c.arch
    src = {
        "vocab_size": "n_vocab", "n_embd": f"{a}.embedding_length", "n_ff": f"{a}.feed_forward_length",
        "ff2": f"2 x {a}.feed_forward_length", "q_dim": f"{a}.attention.head_count x head size",
        "kv_dim": f"{a}.attention.head_count_kv x head size", "qkv_dim": "q + 2 x kv head count x head size",
        "head_dim": "head size", "rope_half": f"{a}.rope.dimension_count / 2",
        "n_expert": f"{a}.expert_count",
        "n_ff_exp": f"{a}.expert_feed_forward_length" if FAMILIES[a].moe_ff_key else f"{a}.feed_forward_length",
    }
    return ", ".join(src[f] for f in dict.fromkeys(dims))


def check_tensors(c: ModelConfig, tensors: Mapping[str, TensorInfo]) -> None:
    """Check every needed tensor's presence, shape and (for vectors) type, and refuse tensors the forward
    pass does not use (a tensor llama.cpp applies but flexio ignored would change the output silently)."""
    d = _dims(c)
    wanted = _wanted(c, tensors)
    for name, (dims, required) in wanted.items():
        shape = tuple(d[f] for f in dims)
        t = tensors.get(name)
        if t is None:
            if required:
                raise GGUFError(f"tensor {name!r} is missing (expected shape {list(shape)})")
            continue
        if t.shape != shape:
            raise GGUFError(
                f"tensor {name!r} has wrong shape; expected {list(shape)}, got {list(t.shape)} "
                f"(from {_dims_source(c, dims)})"
            )
        # norm, bias and factor vectors are read as float arrays, not through a matmul kernel
        if len(shape) == 1 and t.ggml_type not in _VECTOR_TYPES:
            raise UnsupportedError(f"tensor {name!r} is a vector of type {t.type_name}; expected F32 or F16")
        if name.endswith("ffn_gate_inp.weight") and t.ggml_type != _VECTOR_TYPES[0]:  # converters write F32
            raise UnsupportedError(f"tensor {name!r} (a router) has type {t.type_name}; expected F32")
    unused = sorted(n for n in tensors if n not in wanted)
    if unused:
        shown = [f"{n} ({tensors[n].type_name}, {tensors[n].nbytes:,} bytes)" for n in unused[:10]]
        more = f" and {len(unused) - 10} more" if len(unused) > 10 else ""
        raise UnsupportedError(
            f"{len(unused)} tensor(s) are not used by flexio's {c.arch} model: {', '.join(shown)}{more}; "
            "refused rather than ignored (llama.cpp would apply or refuse them, so the output would differ)"
        )
