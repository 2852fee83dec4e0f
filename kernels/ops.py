"""Float32 activations -> float32 activations: the non-matmul ops of a llama/qwen2 block.

RMSNorm, RoPE (normal and NeoX pairing), causal attention over a float16 KV
cache, SwiGLU gating and the residual add. Each is one Numba call per layer op
with the GIL released, so a decode step costs few Python dispatches.

The KV cache is float16, as llama.cpp's default F16 cache: the caller writes it
with numpy (`np.copyto` rounds to nearest even, no allocation) and passes its
uint16 view here, read back through a 65536-entry f16 -> f32 table (256 KiB,
stays in L2) because Numba has no float16 arithmetic on the CPU.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .actq import f16round

F16_TO_F32 = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)  # (65536,)


@njit(nogil=True, cache=True)
def rmsnorm(x, w, eps, out):
    """out[i] = x[i] / sqrt(mean(x[i]^2) + eps) * w.   x, out: (n, d) f32; w: (d,) f32.

    Rounded as ggml's rms_norm: squares in f32 summed in f64, mean and sqrt in f32.
    An ulp of difference here flips the int8 rounding of an activation downstream.
    """
    n, d = x.shape
    feps = np.float32(eps)
    for i in range(n):
        s = 0.0
        for j in range(d):
            s += np.float64(x[i, j] * x[i, j])
        mean = np.float32(s / d)
        scale = np.float32(1.0) / np.float32(math.sqrt(mean + feps))
        for j in range(d):
            out[i, j] = (x[i, j] * scale) * w[j]


@njit(nogil=True, cache=True)
def add_bias(x, b):
    """x[i, :] += b.   x: (n, m) f32; b: (m,) f32."""
    n, m = x.shape
    for i in range(n):
        for j in range(m):
            x[i, j] += b[j]


@njit(nogil=True, cache=True)
def rope(x, n_heads, head_dim, pos0, cos, sin, neox):
    """Rotate each head of x[i] (position pos0 + i) in place.

    x: (n, n_heads * head_dim) f32; cos, sin: (n_ctx, rope_dim // 2) f32 tables.
    Normal (llama): pairs (2k, 2k + 1).  NeoX (qwen2): pairs (k, k + rope_dim / 2).
    """
    n = x.shape[0]
    half = cos.shape[1]
    for i in range(n):
        p = pos0 + i
        for h in range(n_heads):
            base = h * head_dim
            for k in range(half):
                c = cos[p, k]
                s = sin[p, k]
                if neox:
                    a = base + k
                    b = base + k + half
                else:
                    a = base + 2 * k
                    b = a + 1
                x0 = x[i, a]
                x1 = x[i, b]
                x[i, a] = x0 * c - x1 * s
                x[i, b] = x0 * s + x1 * c


def rope_tables(n_ctx: int, rope_dim: int, base: float) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin of theta(pos, k) = pos * base^(-2k/rope_dim), two (n_ctx, rope_dim/2) f32 arrays.

    Computed the way ggml does, in float32: theta_scale = powf(base, -2/rope_dim),
    theta starts at pos and is multiplied by theta_scale once per pair, then
    cosf/sinf (correctly rounded). Rounding theta differently flips the f16 rounding
    of an occasional roped key, and 30 layers turn that into visible logit noise.
    """
    f32 = np.float32
    scale = f32(np.power(np.float64(f32(base)), np.float64(f32(-2.0) / f32(rope_dim))))
    half = rope_dim // 2
    theta = np.empty((n_ctx, half), f32)
    t = np.arange(n_ctx, dtype=f32)
    for k in range(half):
        theta[:, k] = t
        t = (t * scale).astype(f32)
    th = theta.astype(np.float64)
    return np.cos(th).astype(f32), np.sin(th).astype(f32)


@njit(nogil=True, cache=True, parallel=True)
def attention(q, kcache, vcache, pos0, n_heads, n_kv_heads, head_dim, f16, scores, out):
    """Causal softmax attention of n queries at positions pos0.. over cache rows 0..pos0+n-1.

    q: (n, n_heads * head_dim) f32; kcache, vcache: (n_ctx, n_kv_heads * head_dim) uint16;
    f16: the f16 -> f32 table; scores: (n * n_heads, >= pos0 + n) f32 scratch;
    out: (n, n_heads * head_dim) f32.  Query head h reads kv head h // (n_heads / n_kv_heads).
    """
    n = q.shape[0]
    group = n_heads // n_kv_heads
    scale = np.float32(1.0 / math.sqrt(head_dim))
    for job in prange(n * n_heads):
        i = job // n_heads
        h = job % n_heads
        kvo = (h // group) * head_dim
        qo = h * head_dim
        T = pos0 + i + 1
        s = scores[job]
        mx = np.float32(-np.inf)
        for t in range(T):
            acc = np.float32(0.0)
            for d in range(head_dim):
                acc += f16round(q[i, qo + d]) * f16[kcache[t, kvo + d]]
            acc *= scale
            s[t] = acc
            if acc > mx:
                mx = acc
        tot = 0.0
        for t in range(T):
            e = np.float32(math.exp(s[t] - mx))
            s[t] = e
            tot += e
        inv = np.float32(1.0 / tot)
        for d in range(head_dim):
            out[i, qo + d] = 0.0
        for t in range(T):
            p = f16round(s[t] * inv)
            for d in range(head_dim):
                out[i, qo + d] += p * f16[vcache[t, kvo + d]]


@njit(nogil=True, cache=True)
def swiglu(gate, up):
    """gate[i] = silu(gate[i]) * up[i] in place.   gate, up: (n, m) f32."""
    n, m = gate.shape
    for i in range(n):
        for j in range(m):
            g = gate[i, j]
            gate[i, j] = g / (np.float32(1.0) + np.float32(math.exp(-g))) * up[i, j]


@njit(nogil=True, cache=True)
def add_inplace(x, y):
    """x += y.   x, y: (n, m) f32."""
    n, m = x.shape
    for i in range(n):
        for j in range(m):
            x[i, j] += y[i, j]
