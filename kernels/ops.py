"""Float32 activations -> float32 activations: the non-matmul ops of a block (llama, qwen2/3, gemma3, phi3).

RMSNorm (per row, and per head for Q/K norms), RoPE (normal and NeoX pairing, with
per-pair frequency factors, a frequency scale and an attention factor), causal attention
over a float16 KV cache (optionally a sliding window read from a ring of positions),
SwiGLU and GELU-table GeGLU gating, scaling, logit soft-capping and the residual add.
Each is one Numba call per layer op with the GIL released, so a decode step costs few
Python dispatches. Every op replays llama.cpp's CPU op float for float (its AVX2 build).

The KV cache is float16, as llama.cpp's default F16 cache: the caller writes it
with numpy (`np.copyto` rounds to nearest even, no allocation) and passes its
uint16 view here, read back through a 65536-entry f16 -> f32 table (256 KiB,
stays in L2) because Numba has no float16 arithmetic on the CPU.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import types
from numba.extending import intrinsic

from .simd import fma32 as fmaf  # a * b + c rounded once (llvm.fma.f32)
from .simd import fma_f, hsum_f32x8, ld_f32x8, st_vec, zero_f32x8  # 8-lane float32 vectors (plain LLVM IR, any CPU)


F16_TO_F32 = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)  # (65536,)


# --- scalar float32 primitives with exact rounding -------------------------------------
# Numba keeps float32 arithmetic in float32 and never contracts a*b+c (no fastmath), so these
# two and simd.fma32 are all that is needed to replay ggml's SIMD float code lane by lane.

@intrinsic
def f32_bits(typingctx, x):
    sig = types.int32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@intrinsic
def bits_f32(typingctx, x):
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


_F = np.float32
# ggml_v_expf's constants, as written there in hex-float
_EXP_LOG2E, _EXP_LN2_HI, _EXP_LN2_LO = (_F(float.fromhex(h)) for h in ("0x1.715476p+0", "0x1.62e4p-1", "0x1.7f7d1cp-20"))
_EXP_C = tuple(_F(float.fromhex(h)) for h in ("0x1.0e4020p-7", "0x1.573e2ep-5", "0x1.555e66p-3", "0x1.fffdb6p-2",
                                               "0x1.ffffecp-1"))
_EXP_C0, _EXP_C1, _EXP_C2, _EXP_C3, _EXP_C4 = _EXP_C


@njit(nogil=True, cache=True, inline="always")
def f16round(x):
    """float32 -> the float32 value of its nearest-even IEEE half (F16C's vcvtps2ph, rounding mode 0)."""
    b = f32_bits(np.float32(x))
    sign = b & np.int32(-2147483648)
    a = b & np.int32(0x7FFFFFFF)
    if a >= np.int32(0x7F800000):  # inf or nan stay as they are
        return np.float32(x)
    if a >= np.int32(0x477FF000):  # >= 65520 rounds past the largest half (65504)
        return bits_f32(sign | np.int32(0x7F800000))
    if a < np.int32(0x38800000):  # below 2**-14: half subnormals, multiples of 2**-24
        m = np.float64(bits_f32(a)) * 16777216.0
        return bits_f32(sign | f32_bits(np.float32(np.rint(m) / 16777216.0)))
    a = (a + np.int32(0xFFF) + ((a >> 13) & 1)) & np.int32(-8192)  # round the 23-bit mantissa to 10 bits, ties even
    return bits_f32(sign | a)


@njit(nogil=True, cache=True, inline="always")
def v_expf(x):
    """exp(x) exactly as one lane of ggml's AVX2 `ggml_v_expf` (ARM optimized-routines algorithm,
    max error 1.45 ulp): the same float32 operations in the same order, so the results match bit
    for bit. llama.cpp's softmax and SiLU use it; libm's expf differs in the last bit now and then."""
    x = _F(x)
    r = _F(12582912.0)  # 0x1.8p23
    z = fmaf(x, _EXP_LOG2E, r)
    n = z - r
    b = fmaf(-n, _EXP_LN2_LO, fmaf(-n, _EXP_LN2_HI, x))
    e = f32_bits(z) << 23
    k = bits_f32(e + f32_bits(_F(1.0)))
    u = b * b
    j = fmaf(fmaf(fmaf(_EXP_C0, b, _EXP_C1), u, fmaf(_EXP_C2, b, _EXP_C3)), u, _EXP_C4 * b)
    if not abs(n) > _F(126.0):
        return fmaf(k, j, k)
    g = np.int32(-2113929216) if n <= _F(0.0) else np.int32(0)  # 0x82000000
    s1 = bits_f32(g + np.int32(0x7F000000))
    s2 = bits_f32(e - g)
    if abs(n) > _F(192.0):
        return s1 * s1
    return fmaf(s2, j, s2) * s1


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
def rmsnorm_heads(x, head_dim, w, eps):
    """Each head of each row of x, normalised in place: x[i, h*hd:(h+1)*hd] as one RMSNorm row times w.

    x: (n, n_heads * head_dim) f32; w: (head_dim,) f32. ggml's rms_norm on the [head_dim, n_head, n]
    view of Q or K (qwen3, gemma3), rounded as `rmsnorm`.
    """
    n, m = x.shape
    feps = np.float32(eps)
    for i in range(n):
        for h0 in range(0, m, head_dim):
            s = 0.0
            for j in range(h0, h0 + head_dim):
                s += np.float64(x[i, j] * x[i, j])
            mean = np.float32(s / head_dim)
            scale = np.float32(1.0) / np.float32(math.sqrt(mean + feps))
            for j in range(head_dim):
                x[i, h0 + j] = (x[i, h0 + j] * scale) * w[j]


@njit(nogil=True, cache=True)
def add_bias(x, b):
    """x[i, :] += b.   x: (n, m) f32; b: (m,) f32."""
    n, m = x.shape
    for i in range(n):
        for j in range(m):
            x[i, j] += b[j]


@njit(nogil=True, cache=True)
def scale(x, s):
    """x *= s in place, one f32 multiply per element (ggml_scale, bias 0).   x: (n, m) f32."""
    n, m = x.shape
    fs = np.float32(s)
    for i in range(n):
        for j in range(m):
            x[i, j] = x[i, j] * fs


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
                # as ggml's C compiles them with FMA contraction: x0*c - x1*s and x0*s + x1*c
                x[i, a] = fmaf(x0, c, -(x1 * s))
                x[i, b] = fmaf(x0, s, x1 * c)


@njit(nogil=True, cache=True)
def _rope_tables(n_ctx, half, base, rope_dim, freq_scale, factors, attn_factor, cos, sin):
    f = np.float32
    theta_scale = f(math.pow(f(base), f(-2.0) / f(rope_dim)))  # float32 pow -> libm powf, as ggml
    fs = f(freq_scale)
    mscale = f(attn_factor)
    for p in range(n_ctx):
        theta = f(p)
        for k in range(half):
            t = fs * (theta / factors[k])  # ggml_rope_cache_init: theta / ff, then rope_yarn's freq_scale *
            cos[p, k] = f(math.cos(t)) * mscale  # float32 cos/sin -> libm cosf/sinf, as ggml, then * mscale
            sin[p, k] = f(math.sin(t)) * mscale
            theta = theta * theta_scale


def rope_tables(n_ctx: int, rope_dim: int, base: float, freq_scale: float = 1.0, factors: np.ndarray | None = None,
                attn_factor: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin of the rotation angle of (position p, pair k), two (n_ctx, rope_dim/2) f32 arrays.

    Computed the way ggml's rope cache does (ggml_rope_cache_init + rope_yarn without YaRN's ramp),
    in float32: theta_scale = powf(base, -2/rope_dim); theta starts at p and is multiplied by
    theta_scale once per pair; the angle is freq_scale * (theta / factors[k]) (per-pair frequency
    factors: llama 3's rope_freqs, LongRoPE's long/short sets; 1 without); cos and sin come from
    the C library and are multiplied by attn_factor (LongRoPE's scale of Q and K; 1 without).
    Rounding theta differently flips the f16 rounding of an occasional roped key, and 30 layers
    turn that into visible logit noise.
    """
    half = rope_dim // 2
    ff = np.ones(half, np.float32) if factors is None else np.ascontiguousarray(factors, dtype=np.float32)
    if ff.shape != (half,):
        raise ValueError(f"rope factors: expected {half} values (rope_dim / 2), got {ff.shape}")
    cos = np.empty((n_ctx, half), np.float32)
    sin = np.empty((n_ctx, half), np.float32)
    _rope_tables(n_ctx, half, np.float32(base), rope_dim, np.float32(freq_scale), ff, np.float32(attn_factor), cos, sin)
    return cos, sin


@njit(nogil=True, cache=True, inline="always")
def hsum8(a, o):
    """Sum of the 8 lanes a[o:o+8] in the order of x86 `hsum_float_8` (128-bit halves, movehl, movehdup)."""
    return ((a[o] + a[o + 4]) + (a[o + 2] + a[o + 6])) + ((a[o + 1] + a[o + 5]) + (a[o + 3] + a[o + 7]))


@njit(nogil=True, cache=True, inline="always")
def reduce_4x8(a):
    """ggml_vec_dot_f16's reduction of 4 accumulators x 8 lanes (a: 32 floats): acc0 += acc2,
    acc1 += acc3, acc0 += acc1, then 128-bit halves added and two horizontal adds."""
    for lane in range(8):
        a[lane] = a[lane] + a[16 + lane]
        a[8 + lane] = a[8 + lane] + a[24 + lane]
        a[lane] = a[lane] + a[8 + lane]
    return ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))


QBLOCK = 16  # prefill queries per attention job: they share one f16 -> f32 conversion of the keys and values


@njit(nogil=True, cache=True, inline="always")
def _attend_group(job, q, kcache, vcache, pos0, n_heads, n_kv_heads, head_dim, f16, scale, window, tile, scores, out,
                  qblock):
    """Query tokens i0 .. i1 - 1 (the job's block of qblock queries) against kv head g, for the
    query heads that share it (GQA): job = block * n_kv_heads + g. The kv head's keys and values
    of the positions these queries see are converted from f16 once per job into float32 blocks,
    so that every inner loop below runs over contiguous float32 and vectorizes, and a prefill's
    queries share one conversion; the arithmetic per output element is unchanged (see
    `attention`)."""
    g = job % n_kv_heads
    i0 = (job // n_kv_heads) * qblock
    i1 = min(q.shape[0], i0 + qblock)
    group = n_heads // n_kv_heads
    kvo = g * head_dim
    cap = kcache.shape[0]  # the cache holds position t at row t % cap (a ring for sliding layers)
    hd = head_dim
    T0 = pos0 + i0 + 1
    P0 = T0 - window if 0 < window < T0 else 0  # the first position the block's first query sees
    T_end = pos0 + i1  # one past the last query's position
    k32 = np.empty((T_end - P0, hd), np.float32)  # row p - P0: position p
    v32 = np.empty((T_end - P0, hd), np.float32)
    for t in range(T_end - P0):
        r = (P0 + t) % cap
        for d in range(hd):
            k32[t, d] = f16[kcache[r, kvo + d]]
            v32[t, d] = f16[vcache[r, kvo + d]]
    lanes = 8 if tile else 32
    acc = np.zeros(32, np.float32)
    qh = np.empty(hd, np.float32)
    A = np.empty((lanes, hd), np.float32)
    for i in range(i0, i1):
        T = pos0 + i + 1  # positions 0..T-1 are causal for this query
        lo = T - window if 0 < window < T else 0  # sliding window: positions lo..T-1 (pos_q - pos_k < window)
        _attend_one(i, g, lo, T, P0, k32, v32, q, n_heads, group, hd, scale, tile, scores, out, acc, qh, A)


@njit(nogil=True, cache=True, inline="always")
def _attend_one(i, g, lo, T, P0, k32, v32, q, n_heads, group, hd, scale, tile, scores, out, acc, qh, A):
    """Query token i (seeing positions lo..T-1; k32 / v32 row p - P0 holds position p) for the
    query heads of kv head g; acc (32,), qh (hd,), A (lanes, hd): scratch."""
    base = lo - lo % 8  # softmax sums cells 8 at a time from cell 0: chunks stay aligned to absolute positions
    L = T - lo
    kb = lo - P0  # row of position lo in k32 / v32
    lanes = A.shape[0]  # 8 if tile else 32
    main = hd - hd % lanes
    for hq in range(g * group, (g + 1) * group):
        qo = hq * hd
        s = scores[i * n_heads + hq]  # s[t - base] for position t
        for d in range(hd):
            qh[d] = f16round(q[i, qo + d])
        # scores: q . k as llama.cpp's F16 matmul (tile kernel: 8 lanes + hsum8; vec_dot_f16: 32 lanes
        # = 4 accumulators x 8 + reduce_4x8, leftovers in double)
        mx = np.float32(-np.inf)
        qa = qh.ctypes.data
        for t in range(L):
            ka = k32.ctypes.data + 4 * hd * (kb + t)
            if tile:  # one 8-lane vector: lane l takes d = l mod 8 (vfmadd over 8 contiguous floats)
                a8 = zero_f32x8()
                for d0 in range(0, main, 8):
                    a8 = fma_f(a8, ld_f32x8(ka + 4 * d0), ld_f32x8(qa + 4 * d0))
                if main < hd:
                    st_vec(acc.ctypes.data, a8)
                    for d in range(main, hd):
                        acc[d % 8] = fmaf(k32[kb + t, d], qh[d], acc[d % 8])
                    v = hsum8(acc, 0)
                else:
                    v = hsum_f32x8(a8)
            else:  # 4 vectors = lanes 0-31
                a0, a1, a2, a3 = zero_f32x8(), zero_f32x8(), zero_f32x8(), zero_f32x8()
                for d0 in range(0, main, 32):
                    a0 = fma_f(a0, ld_f32x8(ka + 4 * d0), ld_f32x8(qa + 4 * d0))
                    a1 = fma_f(a1, ld_f32x8(ka + 4 * d0 + 32), ld_f32x8(qa + 4 * d0 + 32))
                    a2 = fma_f(a2, ld_f32x8(ka + 4 * d0 + 64), ld_f32x8(qa + 4 * d0 + 64))
                    a3 = fma_f(a3, ld_f32x8(ka + 4 * d0 + 96), ld_f32x8(qa + 4 * d0 + 96))
                st_vec(acc.ctypes.data, a0)
                st_vec(acc.ctypes.data + 32, a1)
                st_vec(acc.ctypes.data + 64, a2)
                st_vec(acc.ctypes.data + 96, a3)
                tot = np.float64(reduce_4x8(acc))
                for d in range(main, hd):
                    tot += np.float64(k32[kb + t, d] * qh[d])
                v = np.float32(tot)
            v = v * scale
            s[lo + t - base] = v
            if v > mx:
                mx = v
        # softmax as ggml_vec_soft_max_f32: 8-lane chunks of ggml_v_expf, chunk sums in double; masked
        # cells (before the window, after the query) are exact zeros in their chunk
        total = 0.0
        for c0 in range(base, T, 8):
            for lane in range(8):
                acc[lane] = 0.0
            for t in range(max(c0, lo), min(c0 + 8, T)):
                e = v_expf(s[t - base] - mx)
                acc[t - c0] = e
                s[t - base] = e
            total += np.float64(hsum8(acc, 0))
        inv = np.float32(1.0 / total)
        for t in range(lo, T):
            s[t - base] = f16round(s[t - base] * inv)
        # p . v over positions (masked cells add nothing), lane = absolute position % lanes,
        # vectorized across the head dimension
        A[:, :] = 0.0
        for t in range(lo, T):
            lane = t % lanes
            p = s[t - base]
            for d in range(hd):
                A[lane, d] = fmaf(v32[t - P0, d], p, A[lane, d])
        for d in range(hd):
            for lane in range(lanes):
                acc[lane] = A[lane, d]
            out[i, qo + d] = hsum8(acc, 0) if tile else reduce_4x8(acc)


@njit(nogil=True, cache=True, parallel=True)
def attention(q, kcache, vcache, pos0, n_heads, n_kv_heads, head_dim, f16, scale, window, scores, out):
    """Causal softmax attention of n queries at positions pos0.. over the cached positions before them.

    q: (n, n_heads * head_dim) f32; kcache, vcache: (cap, n_kv_heads * head_dim) uint16, position t
    at row t % cap (cap >= pos0 + n for a full cache; a ring of the last positions for a sliding
    window); f16: the f16 -> f32 table; scale: the scores' factor (kq_scale); window: a query at
    position p sees positions p - window + 1 .. p (0: all); scores: (n * n_heads, >= pos0 + n) f32
    scratch; out: (n, n_heads * head_dim) f32.  Query head h reads kv head h // (n_heads / n_kv_heads).

    The arithmetic replays llama.cpp's CPU graph (no flash attention) on AVX2 operation by
    operation: q rounded to f16; q.k as its F16 x F16 matmul (the tile kernel when several query
    tokens are computed together, vec_dot_f16 for one); scale; softmax with ggml_v_expf, summed
    per 8 lanes in double; probabilities rounded to f16; p.v the same way over positions. Masked
    cells (llama.cpp's -inf mask: future positions, and positions at or beyond the window) add
    exact zeros there, so they are skipped here with every lane and chunk kept at its absolute
    position (llama.cpp's swa_full cache holds position t in cell t).
    """
    tile = q.shape[0] > 1
    qb = QBLOCK if tile else 1
    jobs = (q.shape[0] + qb - 1) // qb * n_kv_heads
    fs = np.float32(scale)
    for job in prange(jobs):
        _attend_group(job, q, kcache, vcache, pos0, n_heads, n_kv_heads, head_dim, f16, fs, window, tile, scores, out, qb)


@njit(nogil=True, cache=True)
def attention_serial(q, kcache, vcache, pos0, n_heads, n_kv_heads, head_dim, f16, scale, window, scores, out):
    """`attention` on the calling thread: for short contexts a parallel launch costs more than the work."""
    tile = q.shape[0] > 1
    qb = QBLOCK if tile else 1
    fs = np.float32(scale)
    for job in range((q.shape[0] + qb - 1) // qb * n_kv_heads):
        _attend_group(job, q, kcache, vcache, pos0, n_heads, n_kv_heads, head_dim, f16, fs, window, tile, scores, out, qb)


@njit(nogil=True, cache=True)
def swiglu(gate, up):
    """gate[i] = silu(gate[i]) * up[i] in place.   gate, up: (n, m) f32.

    As ggml_vec_swiglu_f32 on AVX2: x / (1 + ggml_v_expf(0 - x)) in 8-wide chunks, libm expf for
    the tail.
    """
    n, m = gate.shape
    main = m - m % 8
    for i in range(n):
        for j in range(main):
            g = gate[i, j]
            gate[i, j] = (g / (np.float32(1.0) + v_expf(np.float32(0.0) - g))) * up[i, j]
        for j in range(main, m):
            g = gate[i, j]
            gate[i, j] = (g / (np.float32(1.0) + np.float32(math.exp(-g)))) * up[i, j]


@njit(nogil=True, cache=True, inline="always")
def f16_bits(x):
    """float32 -> the bits of its nearest-even IEEE half (F16C's vcvtps2ph, rounding mode 0), as int32."""
    b = f32_bits(np.float32(x))
    sign = (b >> 16) & np.int32(0x8000)
    a = b & np.int32(0x7FFFFFFF)
    if a > np.int32(0x7F800000):  # nan: a quiet nan with the top mantissa bits
        return sign | np.int32(0x7E00) | ((a >> 13) & np.int32(0x3FF))
    if a >= np.int32(0x477FF000):  # >= 65520 (and inf) rounds past the largest half
        return sign | np.int32(0x7C00)
    if a < np.int32(0x38800000):  # half subnormals: multiples of 2**-24
        return sign | np.int32(np.rint(np.float64(bits_f32(a)) * 16777216.0))
    a = (a + np.int32(0xFFF) + ((a >> 13) & 1)) & np.int32(-8192)  # round the mantissa to 10 bits, ties even
    return sign | ((a >> 13) - np.int32(112 << 10))  # rebias the exponent from 127 to 15


_GELU_COEF_A = np.float32(0.044715)
_SQRT_2_OVER_PI = np.float32(0.79788456080286535587989211986876)


@njit(nogil=True, cache=True)
def _gelu_table(f16, out):
    half = np.float32(0.5)
    one = np.float32(1.0)
    for h in range(65536):
        x = f16[h]
        # ggml_gelu_f32: 0.5f*x*(1.0f + tanhf(SQRT_2_OVER_PI*x*(1.0f + GELU_COEF_A*x*x))) as GCC compiles it
        # (-ffp-contract=fast: the inner 1 + (A*x)*x is one FMA), libm tanhf
        inner = fmaf(_GELU_COEF_A * x, x, one)
        t = np.float32(math.tanh((_SQRT_2_OVER_PI * x) * inner))
        out[h] = f16round((half * x) * (one + t))


def gelu_table() -> np.ndarray:
    """ggml's GELU lookup table (ggml_table_gelu_f16, built by ggml_cpu_init) as float32 values, (65536,):
    entry h is GELU-tanh of the f16 whose bits are h, rounded to f16."""
    out = np.empty(65536, np.float32)
    _gelu_table(F16_TO_F32, out)
    return out


GELU_F16 = gelu_table()  # (65536,) f32


@njit(nogil=True, cache=True)
def geglu(gate, up, table):
    """gate[i] = gelu(gate[i]) * up[i] in place, as ggml_vec_geglu_f32 with GGML_GELU_FP16 (always on).

    gate, up: (n, m) f32; table: GELU_F16. x <= -10: 0; x >= 10: x * up; otherwise the table entry of
    x rounded to f16, times up.
    """
    n, m = gate.shape
    for i in range(n):
        for j in range(m):
            x = gate[i, j]
            if x <= np.float32(-10.0):
                gate[i, j] = np.float32(0.0)
            elif x >= np.float32(10.0):
                gate[i, j] = x * up[i, j]
            else:
                gate[i, j] = table[f16_bits(x) & 0xFFFF] * up[i, j]


@njit(nogil=True, cache=True)
def softcap(x, cap):
    """x = cap * tanh(x / cap) in place, as llama.cpp's final logit soft-capping: ggml_scale by 1.0f/cap,
    ggml_tanh (libm tanhf), ggml_scale by cap.   x: (n, m) f32."""
    n, m = x.shape
    c = np.float32(cap)
    inv = np.float32(1.0) / c
    for i in range(n):
        for j in range(m):
            x[i, j] = np.float32(math.tanh(x[i, j] * inv)) * c


@njit(nogil=True, cache=True)
def add_inplace(x, y):
    """x += y.   x, y: (n, m) f32."""
    n, m = x.shape
    for i in range(n):
        for j in range(m):
            x[i, j] += y[i, j]
