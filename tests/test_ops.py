"""The non-matmul ops (kernels/ops.py) against scalar references written from llama.cpp's CPU ops.

Each reference does what ggml's C code does, one float32 operation at a time, with the C library's
own functions through ctypes (fmaf, powf, cosf, sinf, tanhf) where ggml calls them, so a difference
in the last bit fails. The GELU table is also compared with the one llama.cpp itself builds
(`ggml_table_gelu_f16`, exported by libggml-cpu) when llama-cpp-python is installed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import math
import os

import numpy as np
import pytest

from flexio_kernels import ops

f32 = np.float32
_libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
for _name, _n in (("fmaf", 3), ("powf", 2), ("cosf", 1), ("sinf", 1), ("tanhf", 1)):
    getattr(_libm, _name).restype = ctypes.c_float
    getattr(_libm, _name).argtypes = [ctypes.c_float] * _n


def cf(name: str, *args) -> np.float32:
    return f32(getattr(_libm, name)(*(float(a) for a in args)))


def f16(x) -> np.float32:
    return f32(np.float16(x))  # numpy rounds float32 -> float16 to nearest even, as F16C


# --- RMSNorm, per row and per head ------------------------------------------------------------------


def ref_rmsnorm_row(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """ggml_compute_forward_rms_norm_f32 (+ the fused mul): squares in f32 summed in double, in order."""
    s = 0.0
    for v in x:
        s += float(f32(v * v))
    mean = f32(s / x.size)
    scale = f32(1.0) / f32(math.sqrt(f32(mean + f32(eps))))
    return np.array([f32(f32(v * scale) * wv) for v, wv in zip(x, w)], np.float32)


def test_rmsnorm_heads_is_rms_norm_per_head():
    rng = np.random.default_rng(1)
    n, heads, hd = 3, 4, 48
    x = (rng.standard_normal((n, heads * hd)) * 3).astype(np.float32)
    w = (1 + 0.1 * rng.standard_normal(hd)).astype(np.float32)
    want = np.concatenate([np.concatenate([ref_rmsnorm_row(x[i, h * hd:(h + 1) * hd], w, 1e-6) for h in range(heads)])[None]
                           for i in range(n)])
    got = x.copy()
    ops.rmsnorm_heads(got, hd, w, 1e-6)
    assert np.array_equal(got, want)
    row = np.empty_like(x)
    ops.rmsnorm(x, np.tile(w, heads)[: heads * hd], 1e-6, row)  # the whole row is a different normalisation
    assert not np.array_equal(row, want)


def test_rmsnorm_in_place():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    w = rng.standard_normal(64).astype(np.float32)
    want = np.stack([ref_rmsnorm_row(r, w, 1e-5) for r in x])
    ops.rmsnorm(x, w, 1e-5, x)  # gemma3's post-norms run in place
    assert np.array_equal(x, want)


def test_scale():
    x = np.random.default_rng(3).standard_normal((3, 33)).astype(np.float32)
    s = f32(1) / np.sqrt(f32(168))  # gemma-3-27b's query scale, not a power of two
    want = x * s
    ops.scale(x, float(s))
    assert np.array_equal(x, want)


# --- RoPE: frequency factors, frequency scale, attention factor ----------------------------------------


def ref_rope_tables(n_ctx, rope_dim, base, freq_scale=1.0, factors=None, attn_factor=1.0):
    """ggml_rope_cache_init + rope_yarn (ext_factor 0): theta /= ff; theta *= freq_scale; cosf/sinf * mscale."""
    half = rope_dim // 2
    ff = np.ones(half, np.float32) if factors is None else factors
    theta_scale = cf("powf", f32(base), f32(-2.0) / f32(rope_dim))
    cos = np.empty((n_ctx, half), np.float32)
    sin = np.empty((n_ctx, half), np.float32)
    for p in range(n_ctx):
        theta = f32(p)
        for k in range(half):
            t = f32(f32(freq_scale) * f32(theta / ff[k]))
            cos[p, k] = f32(cf("cosf", t) * f32(attn_factor))
            sin[p, k] = f32(cf("sinf", t) * f32(attn_factor))
            theta = f32(theta * theta_scale)
    return cos, sin


@pytest.mark.parametrize("case", [
    dict(base=10000.0),
    dict(base=500000.0, factors="llama3"),  # rope_freqs: 1 .. 8 across the pairs
    dict(base=1e6, freq_scale=0.125),  # gemma3's global layers (linear factor 8)
    dict(base=10000.0, factors="longrope", attn_factor=1.1902380714238083),  # phi3 128k
], ids=["plain", "rope_freqs", "linear-scale", "longrope"])
def test_rope_tables(case):
    rope_dim, n_ctx = 64, 300
    kw = dict(case)
    if kw.get("factors") == "llama3":
        kw["factors"] = np.geomspace(1.0, 8.0, rope_dim // 2).astype(np.float32)
    elif kw.get("factors") == "longrope":
        kw["factors"] = (1.0 + 39.0 * np.linspace(0, 1, rope_dim // 2) ** 3).astype(np.float32)
    want = ref_rope_tables(n_ctx, rope_dim, **kw)
    got = ops.rope_tables(n_ctx, rope_dim, **kw)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


@pytest.mark.parametrize("neox", [False, True])
def test_rope_rotation_with_factors(neox):
    """ggml's rotate_pairs as GCC compiles it: y0 = fmaf(x0, c, -(x1*s)), y1 = fmaf(x0, s, x1*c)."""
    rng = np.random.default_rng(4)
    heads, hd, n, pos0 = 2, 16, 3, 7
    cos, sin = ops.rope_tables(16, hd, 10000.0, 1.0, np.linspace(1, 4, hd // 2).astype(np.float32), 1.2)
    x = rng.standard_normal((n, heads * hd)).astype(np.float32)
    want = x.copy()
    for i in range(n):
        for h in range(heads):
            for k in range(hd // 2):
                a, b = (h * hd + k, h * hd + k + hd // 2) if neox else (h * hd + 2 * k, h * hd + 2 * k + 1)
                c, s = cos[pos0 + i, k], sin[pos0 + i, k]
                x0, x1 = x[i, a], x[i, b]
                want[i, a] = cf("fmaf", x0, c, -f32(x1 * s))
                want[i, b] = cf("fmaf", x0, s, f32(x1 * c))
    ops.rope(x, heads, hd, pos0, cos, sin, neox)
    assert np.array_equal(x, want)


# --- GELU table, GeGLU, soft-capping ---------------------------------------------------------------------


def _llama_gelu_table() -> np.ndarray | None:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None:
        return None
    lib = ctypes.CDLL(os.path.join(os.path.dirname(spec.origin), "lib", "libggml-cpu.so"))
    lib.ggml_cpu_init()
    return np.frombuffer((ctypes.c_uint16 * 65536).in_dll(lib, "ggml_table_gelu_f16"), np.uint16).copy()


def test_gelu_table_is_ggmls():
    """Every finite entry: the formula with its FMA and glibc's tanhf (NaN inputs give NaN either way)."""
    xs = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)
    finite = np.isfinite(xs)
    a, c = f32(0.044715), f32(0.79788456080286535587989211986876)
    sample = np.flatnonzero(finite)[::97]
    for h in sample:
        x = xs[h]
        t = cf("tanhf", f32(f32(c * x) * cf("fmaf", f32(a * x), x, f32(1.0))))
        assert ops.GELU_F16[h] == f16(f32(f32(f32(0.5) * x) * f32(f32(1.0) + t))), h
    lib = _llama_gelu_table()
    if lib is not None:
        want = lib.view(np.float16).astype(np.float32)
        assert np.array_equal(ops.GELU_F16[finite], want[finite])


def test_f16_bits_rounds_like_f16c():
    rng = np.random.default_rng(5)
    x = np.concatenate([(rng.standard_normal(20000) * 20).astype(np.float32), np.float32([65519, 65520, 1e-8, -6e-8,
                        6.1e-5, -0.0, 0.0, np.inf, -np.inf]), np.arange(65536, dtype=np.uint16).view(np.float16)
                        .astype(np.float32)[np.isfinite(np.arange(65536, dtype=np.uint16).view(np.float16))]])
    from numba import njit

    @njit
    def bits(a, out):
        for i in range(a.size):
            out[i] = ops.f16_bits(a[i]) & 0xFFFF

    got = np.empty(x.size, np.int32)
    with np.errstate(over="ignore"):
        bits(x, got)
        assert np.array_equal(got, x.astype(np.float16).view(np.uint16).astype(np.int32))


def test_geglu():
    rng = np.random.default_rng(6)
    gate = (rng.standard_normal((3, 40)) * 6).astype(np.float32)
    gate[0, :4] = [-10.0, 10.0, -10.5, 12.0]  # the table's edges: <= -10 gives 0, >= 10 gives x * up
    up = rng.standard_normal((3, 40)).astype(np.float32)
    want = np.empty_like(gate)
    for i, j in np.ndindex(gate.shape):
        x = gate[i, j]
        if x <= -10:
            want[i, j] = 0.0
        elif x >= 10:
            want[i, j] = x * up[i, j]
        else:
            want[i, j] = f32(ops.GELU_F16[np.float16(x).view(np.uint16)] * up[i, j])
    ops.geglu(gate, up, ops.GELU_F16)
    assert np.array_equal(gate, want)


def test_softcap():
    x = (np.random.default_rng(7).standard_normal((2, 50)) * 40).astype(np.float32)
    cap = 30.0
    inv = f32(1.0) / f32(cap)
    want = np.array([[f32(cf("tanhf", f32(v * inv)) * f32(cap)) for v in row] for row in x], np.float32)
    ops.softcap(x, cap)
    assert np.array_equal(x, want)


# --- attention: llama.cpp's masked full scan vs flexio's window and ring ------------------------------------


def _hsum8(a):
    return f32(f32(f32(a[0] + a[4]) + f32(a[2] + a[6])) + f32(f32(a[1] + a[5]) + f32(a[3] + a[7])))


def _reduce_4x8(a):
    a = a.copy()
    for lane in range(8):
        a[lane] = f32(a[lane] + a[16 + lane])
        a[8 + lane] = f32(a[8 + lane] + a[24 + lane])
        a[lane] = f32(a[lane] + a[8 + lane])
    return f32(f32(f32(a[0] + a[4]) + f32(a[1] + a[5])) + f32(f32(a[2] + a[6]) + f32(a[3] + a[7])))


def ref_attention(q, K, V, pos0, n_heads, n_kv_heads, hd, scale, window):
    """llama.cpp's non-flash attention over all n_kv cells of a swa_full cache (cell = position, n_kv a
    multiple of 256), masked cells -inf: the q.k dots, soft_max_f32 in 8-lane chunks from cell 0 with
    double sums, f16 probabilities, the p.v dot over every cell. K, V: (positions, kv) f16 values."""
    n = q.shape[0]
    n_kv = -(-(pos0 + n) // 256) * 256
    Kp = np.zeros((n_kv, K.shape[1]), np.float32)
    Vp = np.zeros((n_kv, V.shape[1]), np.float32)
    Kp[: K.shape[0]], Vp[: V.shape[0]] = K, V
    tile = n > 1
    lanes = 8 if tile else 32
    out = np.zeros((n, n_heads * hd), np.float32)
    group = n_heads // n_kv_heads
    for i in range(n):
        p = pos0 + i
        for h in range(n_heads):
            kvo = (h // group) * hd
            qh = np.array([f16(v) for v in q[i, h * hd:(h + 1) * hd]], np.float32)
            s = np.full(n_kv, -np.inf, np.float32)
            for t in range(n_kv):
                if t > p or (window and p - t >= window):
                    continue
                acc = np.zeros(32, np.float32)
                main = hd - hd % lanes
                for d0 in range(0, main, lanes):
                    for lane in range(lanes):
                        acc[lane] = cf("fmaf", Kp[t, kvo + d0 + lane], qh[d0 + lane], acc[lane])
                if tile:
                    for d in range(main, hd):
                        acc[d % 8] = cf("fmaf", Kp[t, kvo + d], qh[d], acc[d % 8])
                    v = _hsum8(acc)
                else:
                    tot = float(_reduce_4x8(acc))
                    for d in range(main, hd):
                        tot += float(f32(Kp[t, kvo + d] * qh[d]))
                    v = f32(tot)
                s[t] = f32(v * f32(scale))
            mx = s.max()
            e = np.array([ops.v_expf(f32(v - mx)) for v in s], np.float32)
            total = 0.0
            for c0 in range(0, n_kv, 8):
                total += float(_hsum8(e[c0:c0 + 8]))
            inv = f32(1.0 / total)
            pr = np.array([f16(f32(v * inv)) for v in e], np.float32)
            for d in range(hd):
                A = np.zeros(32, np.float32)
                for t in range(n_kv):
                    A[t % lanes] = cf("fmaf", Vp[t, kvo + d], pr[t], A[t % lanes])
                out[i, h * hd + d] = _hsum8(A) if tile else _reduce_4x8(A)
    return out


@pytest.mark.parametrize("pos0,n,window,cap", [
    (0, 5, 0, 16),  # prefill, full cache
    (11, 1, 0, 16),  # decode, full cache (vec_dot_f16's 32 lanes)
    (0, 9, 4, 9),  # prefill with a window of 4: chunks of 8 partly masked at both ends
    (21, 3, 6, 9),  # a window over a ring of 9 rows that has wrapped twice
    (37, 1, 6, 8),  # decode over a wrapped ring, window not a multiple of 8
], ids=["prefill", "decode", "window-prefill", "window-ring", "window-ring-decode"])
def test_attention_window_ring_is_llama_cpps_masked_scan(pos0, n, window, cap):
    rng = np.random.default_rng(pos0 * 7 + n)
    n_heads, n_kv_heads, hd = 4, 2, 20  # hd not a multiple of 8: the tile's leftovers too
    T = pos0 + n
    K = np.array(rng.standard_normal((T, n_kv_heads * hd)), np.float16)
    V = np.array(rng.standard_normal((T, n_kv_heads * hd)), np.float16)
    q = (rng.standard_normal((n, n_heads * hd)) * 2).astype(np.float32)
    scale = 1.0 / math.sqrt(hd)
    want = ref_attention(q, K.astype(np.float32), V.astype(np.float32), pos0, n_heads, n_kv_heads, hd, scale, window)
    # the ring: position t at row t % cap; only the last cap positions are still there
    kc = np.full((cap if window else T, n_kv_heads * hd), np.float16(np.nan))
    vc = kc.copy()
    for t in range(max(0, T - kc.shape[0]), T):
        kc[t % kc.shape[0]], vc[t % kc.shape[0]] = K[t], V[t]
    for attend in (ops.attention, ops.attention_serial):
        out = np.empty_like(q)
        scores = np.empty((n * n_heads, T), np.float32)
        attend(q, kc.view(np.uint16), vc.view(np.uint16), pos0, n_heads, n_kv_heads, hd, ops.F16_TO_F32,
               scale, window, scores, out)
        assert np.array_equal(out, want), attend
