"""Raw GGUF rows x float32 activations -> float32 outputs, with AVX2 SIMD (simd.py intrinsics).

The same integer math and float order as portable.py, both llama.cpp's AVX2 order bit for bit
(ggml_vec_dot_*_q8_*, tinyBLAS): per 32 weights, unpack to 32 bytes, vpmaddubsw with the int8
activations, vpmaddwd to 8 x i32 (lane l: elements 4l..4l+3; Q4_0/Q5_0 subtract maddubs(8 or 16, x)
first, Q6_K subtracts 32 * sc * bsums per lane pair), then one vcvtdq2ps + FMA with d_w * d_x into
ONE 8-lane accumulator per output, blocks in order; Q4_1 / Q5_K keep a scalar fma chain for the
mins, Q4_K a 4-lane one.  Reductions as llama.cpp's hsum_float_8.

What it took to approach the memory-read ceiling on this Zen 3 (no VNNI), each measured:
- a software prefetch 8 KiB ahead (0.59 -> 0.8 of the ceiling on one thread): the loops are
  too dense in instructions for out-of-order execution to keep enough lines in flight;
- f16 scales read without `vpinsrw` (simd.ld_f16, simd.splat_tab): its merge into a register
  that was a loop accumulator chained every block behind the previous FMA (2x slower);
- weight scales as one table load + vbroadcastss, x scales and offsets as 4-byte scalars
  per block (not 32-byte splats) to keep the per-row x footprint in L1.

Decode (one column) reads two weight rows per iteration (legacy types, F32/F16), one accumulator
each: two independent FMA chains without changing any row's order.
Several columns (prefill, batched decode) go through register tiles: 1 x 8 columns for the
legacy types (tile8; 3-4 columns take its 4-wide form), 1 x 4 for the K-quants (tile4_k); each
weight block is unpacked once for the tile's columns, and every column keeps the one-column
arithmetic, so it has the same bits alone or in a batch.  matmul_many runs several matrices
of one shape (a mixture of experts' layer) in one threaded call.

All functions are module-level @njit(cache=True) so the on-disk cache works.  Numba's cache
only checks this file's timestamp: after editing simd.py, delete kernels/__pycache__/*.nb[ci].
"""

from __future__ import annotations

import numpy as np
from numba import carray, njit, prange

from .layouts import QK, QK_K
from .portable import (
    Q4_0_BB, Q4_0_D, Q4_0_QS, Q4_1_BB, Q4_1_D, Q4_1_M, Q4_1_QS, Q4_K_BB, Q4_K_D, Q4_K_DMIN, Q4_K_QS, Q4_K_SC,
    Q5_0_BB, Q5_0_D, Q5_0_QH, Q5_0_QS, Q5_K_BB, Q5_K_D, Q5_K_DMIN, Q5_K_QH, Q5_K_QS, Q5_K_SC, Q6_K_BB, Q6_K_D,
    Q6_K_QH, Q6_K_QL, Q6_K_SC, Q8_0_BB, Q8_0_D, Q8_0_QS, MANY_PARTS, ROW_CHUNK, check, many_job, prepare_x,
)
from .simd import (
    add_i32x8, and_i8, bits32_to_bytes, dot_ss, dot_us, dot_us_k, dot_us_off, fma32, fma_f, fma_i, fma_iv,
    hsum_f32x8, hsum_i32x8, hsum_lo4, k4_mins, k4_scales, k_dup, dot_us_k2, q6_off, sub_i32x8, ld_f16, ld_f16x8, ld_f32, ld_f32x8, ld_i8x32,
    ld_nibbles16, ld_u32, mul_f32x8, or_i8, pairsum_lo4, prefetch, q6_scales, select_bit, sll_i8, splat_f32_ld, splat_tab,
    srl_i8, tab_f32, zero_f32x8, st_vec, st_off16, dot_us_pre, abs_i8, dot_ss_abs, fence4, zero_i32x8, k4_mins16, q6_off16, u8_ptr,
)

# Software prefetch distance in bytes.  Decode loops are dense in instructions (~14 per 18
# bytes of Q4_0), so out-of-order execution alone keeps few cache lines in flight and the
# hardware prefetcher does not cover DRAM latency: measured 0.59 -> 0.76 of the read ceiling
# on one thread with a prefetch 8 KiB ahead (4-32 KiB all similar).  The prefetch runs past
# the row end into the next rows, i.e. it follows the thread's contiguous row range.
PF = 8192

# ---- legacy blocks of 32 ----


@njit(nogil=True, cache=True, inline="always")
def w_q5_0(o):
    return or_i8(ld_nibbles16(o + Q5_0_QS), bits32_to_bytes(ld_u32(o + Q5_0_QH), 16))


# ---- one column ----
# llama.cpp's float order (ggml_vec_dot_*_q8_* AVX2 and tinyBLAS_Q0_AVX): per output one 8-lane
# accumulator, per block acc = fma(d_w * d_x, float(lanes), acc) in block order, lane l the int32
# sum of the products of elements 4l..4l+3; then ((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7)).
# Q4_1 adds a float32 scalar summs = fma(m, s_x, summs) after that sum.


@njit(nogil=True, cache=True, inline="always")
def blk_q4_0(acc, o, xo, xv, tab):
    """acc + lanes((q - 8) . x) * d_w * (x scale at xv): Q4_0 block o with x block xo."""
    return fma_iv(acc, dot_us_off(ld_nibbles16(o + Q4_0_QS), xo, 8), mul_f32x8(splat_tab(tab, o + Q4_0_D), splat_f32_ld(xv)))


@njit(nogil=True, cache=True, inline="always")
def blk_q5_0(acc, o, xo, xv, tab):
    return fma_iv(acc, dot_us_off(w_q5_0(o), xo, 16), mul_f32x8(splat_tab(tab, o + Q5_0_D), splat_f32_ld(xv)))


@njit(nogil=True, cache=True, inline="always")
def blk_q4_1(acc, o, xo, xv, tab):
    """Q4_1: (d q + m) . (d_x q_x) = d d_x (q . q_x) + m s_x; this is the first term (see min_q4_1)."""
    return fma_iv(acc, dot_us(ld_nibbles16(o + Q4_1_QS), xo), mul_f32x8(splat_tab(tab, o + Q4_1_D), splat_f32_ld(xv)))


@njit(nogil=True, cache=True, inline="always")
def min_q4_1(summs, o, xsv, tab):
    """Q4_1's scalar min term: fma(m, s_x, summs) (s_x the float32 at xsv), as llama.cpp's summs."""
    return fma32(tab_f32(tab, o + Q4_1_M), ld_f32(xsv), summs)


@njit(nogil=True, cache=True, inline="always")
def blk_q8_0(acc, o, xo, xv, tab):
    return fma_iv(acc, dot_ss(ld_i8x32(o + Q8_0_QS), xo), mul_f32x8(splat_tab(tab, o + Q8_0_D), splat_f32_ld(xv)))


@njit(nogil=True, cache=True)
def dot2_legacy(t, wa, rs, nb, xa, xva, xea, tab):
    """Q4_0 / Q4_1 / Q5_0 / Q8_0 rows at wa and wa + rs . int8 x at xa -> (float32, float32).

    xva: f32 x scale per block; xea (Q4_1): f32 s_x per block.  Each row keeps llama.cpp's
    single accumulator (its order exactly); two rows interleaved give two independent FMA
    chains and share the x loads.  rs = 0 computes one row twice (an odd last row).  Two
    blocks per row per iteration, one prefetch per row (two for Q8_0).
    """
    a0 = zero_f32x8()
    a1 = zero_f32x8()
    s0 = np.float32(0.0)
    s1 = np.float32(0.0)
    nb2 = nb - nb % 2
    if t == 2:
        for b in range(0, nb2, 2):
            o = wa + b * Q4_0_BB
            prefetch(o + PF)
            prefetch(o + rs + PF)
            a0 = blk_q4_0(a0, o, xa + b * QK, xva + 4 * b, tab)
            a1 = blk_q4_0(a1, o + rs, xa + b * QK, xva + 4 * b, tab)
            a0 = blk_q4_0(a0, o + Q4_0_BB, xa + (b + 1) * QK, xva + 4 * (b + 1), tab)
            a1 = blk_q4_0(a1, o + rs + Q4_0_BB, xa + (b + 1) * QK, xva + 4 * (b + 1), tab)
        if nb2 < nb:
            o = wa + nb2 * Q4_0_BB
            a0 = blk_q4_0(a0, o, xa + nb2 * QK, xva + 4 * nb2, tab)
            a1 = blk_q4_0(a1, o + rs, xa + nb2 * QK, xva + 4 * nb2, tab)
    elif t == 6:
        for b in range(0, nb2, 2):
            o = wa + b * Q5_0_BB
            prefetch(o + PF)
            prefetch(o + rs + PF)
            a0 = blk_q5_0(a0, o, xa + b * QK, xva + 4 * b, tab)
            a1 = blk_q5_0(a1, o + rs, xa + b * QK, xva + 4 * b, tab)
            a0 = blk_q5_0(a0, o + Q5_0_BB, xa + (b + 1) * QK, xva + 4 * (b + 1), tab)
            a1 = blk_q5_0(a1, o + rs + Q5_0_BB, xa + (b + 1) * QK, xva + 4 * (b + 1), tab)
        if nb2 < nb:
            o = wa + nb2 * Q5_0_BB
            a0 = blk_q5_0(a0, o, xa + nb2 * QK, xva + 4 * nb2, tab)
            a1 = blk_q5_0(a1, o + rs, xa + nb2 * QK, xva + 4 * nb2, tab)
    elif t == 3:
        for b in range(0, nb2, 2):
            o = wa + b * Q4_1_BB
            prefetch(o + PF)
            prefetch(o + rs + PF)
            a0 = blk_q4_1(a0, o, xa + b * QK, xva + 4 * b, tab)
            s0 = min_q4_1(s0, o, xea + 4 * b, tab)
            a1 = blk_q4_1(a1, o + rs, xa + b * QK, xva + 4 * b, tab)
            s1 = min_q4_1(s1, o + rs, xea + 4 * b, tab)
            a0 = blk_q4_1(a0, o + Q4_1_BB, xa + (b + 1) * QK, xva + 4 * (b + 1), tab)
            s0 = min_q4_1(s0, o + Q4_1_BB, xea + 4 * (b + 1), tab)
            a1 = blk_q4_1(a1, o + rs + Q4_1_BB, xa + (b + 1) * QK, xva + 4 * (b + 1), tab)
            s1 = min_q4_1(s1, o + rs + Q4_1_BB, xea + 4 * (b + 1), tab)
        if nb2 < nb:
            o = wa + nb2 * Q4_1_BB
            a0 = blk_q4_1(a0, o, xa + nb2 * QK, xva + 4 * nb2, tab)
            s0 = min_q4_1(s0, o, xea + 4 * nb2, tab)
            a1 = blk_q4_1(a1, o + rs, xa + nb2 * QK, xva + 4 * nb2, tab)
            s1 = min_q4_1(s1, o + rs, xea + 4 * nb2, tab)
    else:
        for b in range(0, nb2, 2):
            o = wa + b * Q8_0_BB
            prefetch(o + PF)
            prefetch(o + PF + 64)
            prefetch(o + rs + PF)
            prefetch(o + rs + PF + 64)
            a0 = blk_q8_0(a0, o, xa + b * QK, xva + 4 * b, tab)
            a1 = blk_q8_0(a1, o + rs, xa + b * QK, xva + 4 * b, tab)
            a0 = blk_q8_0(a0, o + Q8_0_BB, xa + (b + 1) * QK, xva + 4 * (b + 1), tab)
            a1 = blk_q8_0(a1, o + rs + Q8_0_BB, xa + (b + 1) * QK, xva + 4 * (b + 1), tab)
        if nb2 < nb:
            o = wa + nb2 * Q8_0_BB
            a0 = blk_q8_0(a0, o, xa + nb2 * QK, xva + 4 * nb2, tab)
            a1 = blk_q8_0(a1, o + rs, xa + nb2 * QK, xva + 4 * nb2, tab)
    if t == 3:
        return hsum_f32x8(a0) + s0, hsum_f32x8(a1) + s1
    return hsum_f32x8(a0), hsum_f32x8(a1)


@njit(nogil=True, cache=True, inline="always")
def isum_q4_k(q, xo, scv):
    """Integer dot of one Q4_K super-block (qs at q) with 256 int8 x at xo, sub-block scales applied."""
    sc = k_dup(scv, 0)
    v = ld_i8x32(q)
    i = add_i32x8(dot_us_k(and_i8(v, 15), xo, sc, 0), dot_us_k(and_i8(srl_i8(v, 4), 15), xo + 32, sc, 1))
    v = ld_i8x32(q + 32)
    i = add_i32x8(i, add_i32x8(dot_us_k(and_i8(v, 15), xo + 64, sc, 2), dot_us_k(and_i8(srl_i8(v, 4), 15), xo + 96, sc, 3)))
    v = ld_i8x32(q + 64)
    i = add_i32x8(i, add_i32x8(dot_us_k(and_i8(v, 15), xo + 128, sc, 4), dot_us_k(and_i8(srl_i8(v, 4), 15), xo + 160, sc, 5)))
    v = ld_i8x32(q + 96)
    i = add_i32x8(i, add_i32x8(dot_us_k(and_i8(v, 15), xo + 192, sc, 6), dot_us_k(and_i8(srl_i8(v, 4), 15), xo + 224, sc, 7)))
    return i


@njit(nogil=True, cache=True, inline="always")
def isum_q5_k(q, qha, xo, scv):
    """As isum_q4_k, with sub-block i's fifth bits in bit i of the 32 qh bytes at qha."""
    sc = k_dup(scv, 0)
    h = ld_i8x32(qha)
    v = ld_i8x32(q)
    i = add_i32x8(dot_us_k(or_i8(and_i8(v, 15), select_bit(h, 1, 16)), xo, sc, 0),
                  dot_us_k(or_i8(and_i8(srl_i8(v, 4), 15), select_bit(h, 2, 16)), xo + 32, sc, 1))
    v = ld_i8x32(q + 32)
    i = add_i32x8(i, add_i32x8(dot_us_k(or_i8(and_i8(v, 15), select_bit(h, 4, 16)), xo + 64, sc, 2),
                               dot_us_k(or_i8(and_i8(srl_i8(v, 4), 15), select_bit(h, 8, 16)), xo + 96, sc, 3)))
    v = ld_i8x32(q + 64)
    i = add_i32x8(i, add_i32x8(dot_us_k(or_i8(and_i8(v, 15), select_bit(h, 16, 16)), xo + 128, sc, 4),
                               dot_us_k(or_i8(and_i8(srl_i8(v, 4), 15), select_bit(h, 32, 16)), xo + 160, sc, 5)))
    v = ld_i8x32(q + 96)
    i = add_i32x8(i, add_i32x8(dot_us_k(or_i8(and_i8(v, 15), select_bit(h, 64, 16)), xo + 192, sc, 6),
                               dot_us_k(or_i8(and_i8(srl_i8(v, 4), 15), select_bit(h, 128, 16)), xo + 224, sc, 7)))
    return i


@njit(nogil=True, cache=True, inline="always")
def isum_q6_k(o, xo, scv, bsa):
    """Integer dot of one Q6_K super-block at o with 256 int8 x at xo, in llama.cpp's lanes:
    sum over groups of 16 of sc * q . x (q unsigned), minus q6_off's 32 * sc * bsum per lane pair."""
    a = k_dup(scv, 0)  # scales 0-7: sub-blocks 0-3
    b = k_dup(scv, 1)  # scales 8-15: sub-blocks 4-7
    i = add_i32x8(dot_us_k2(w_q6_k(o, 0, 0), xo, a, 0, 1), dot_us_k2(w_q6_k(o, 0, 1), xo + 32, a, 2, 3))
    i = add_i32x8(i, add_i32x8(dot_us_k2(w_q6_k(o, 0, 2), xo + 64, a, 4, 5), dot_us_k2(w_q6_k(o, 0, 3), xo + 96, a, 6, 7)))
    i = add_i32x8(i, add_i32x8(dot_us_k2(w_q6_k(o, 1, 0), xo + 128, b, 0, 1), dot_us_k2(w_q6_k(o, 1, 1), xo + 160, b, 2, 3)))
    i = add_i32x8(i, add_i32x8(dot_us_k2(w_q6_k(o, 1, 2), xo + 192, b, 4, 5), dot_us_k2(w_q6_k(o, 1, 3), xo + 224, b, 6, 7)))
    return sub_i32x8(i, q6_off(scv, bsa))


@njit(nogil=True, cache=True)
def dot1_q4_k(wa, nb, xa, xda, bsa):
    """Q4_K row at wa . int8 x at xa (q8_K: xda one f32 per 256, bsa 16 int32 sums per 256).

    llama.cpp's order: acc (8 lanes) += d float(sumi); the mins in a separate 4-lane accm
    (lanes 0-3 of an 8-lane vector here) += -dmin float(pair-summed min products); then
    hsum8(acc) + ((m0 + m2) + (m1 + m3)).
    """
    acc = zero_f32x8()
    accm = zero_f32x8()
    for b in range(nb):
        o = wa + b * Q4_K_BB
        prefetch(o + PF)
        prefetch(o + PF + 64)
        prefetch(o + PF + 128)
        scv = k4_scales(o + Q4_K_SC)
        dx = ld_f32(xda + 4 * b)
        acc = fma_i(acc, isum_q4_k(o + Q4_K_QS, xa + b * QK_K, scv), ld_f16(o + Q4_K_D) * dx)
        accm = fma_i(accm, pairsum_lo4(k4_mins(scv, bsa + 64 * b)), -(ld_f16(o + Q4_K_DMIN) * dx))
    return hsum_f32x8(acc) + hsum_lo4(accm)


@njit(nogil=True, cache=True)
def dot1_q5_k(wa, nb, xa, xda, bsa):
    """llama.cpp's order: acc as Q4_K, the mins as a float32 scalar summs = fma(float(sum), -dmin, summs)."""
    acc = zero_f32x8()
    summs = np.float32(0.0)
    for b in range(nb):
        o = wa + b * Q5_K_BB
        prefetch(o + PF)
        prefetch(o + PF + 64)
        prefetch(o + PF + 128)
        scv = k4_scales(o + Q5_K_SC)
        dx = ld_f32(xda + 4 * b)
        acc = fma_i(acc, isum_q5_k(o + Q5_K_QS, o + Q5_K_QH, xa + b * QK_K, scv), ld_f16(o + Q5_K_D) * dx)
        summs = fma32(np.float32(hsum_i32x8(k4_mins(scv, bsa + 64 * b))), -(ld_f16(o + Q5_K_DMIN) * dx), summs)
    return hsum_f32x8(acc) + summs


@njit(nogil=True, cache=True, inline="always")
def w_q6_k(o, h, t):
    """Sub-block 4h + t of a Q6_K block at o as 32 unsigned 6-bit values."""
    a = ld_i8x32(o + Q6_K_QL + 64 * h + 32 * (t & 1))
    lo = and_i8(srl_i8(a, 4 * (t >> 1)), 15)
    hi = sll_i8(and_i8(srl_i8(ld_i8x32(o + Q6_K_QH + 32 * h), 2 * t), 3), 4)
    return or_i8(lo, hi)


@njit(nogil=True, cache=True)
def dot1_q6_k(wa, nb, xa, xda, bsa):
    acc = zero_f32x8()
    for b in range(nb):
        o = wa + b * Q6_K_BB
        prefetch(o + PF)
        prefetch(o + PF + 64)
        prefetch(o + PF + 128)
        prefetch(o + PF + 192)
        acc = fma_i(acc, isum_q6_k(o, xa + b * QK_K, q6_scales(o + Q6_K_SC), bsa + 64 * b), ld_f16(o + Q6_K_D) * ld_f32(xda + 4 * b))
    return hsum_f32x8(acc)


@njit(nogil=True, cache=True)
def dot2_f32(wa, rs, xa, k8):
    """F32 rows at wa and wa + rs . x at xa over k8 (a multiple of 8) elements: llama.cpp's
    tinyBLAS order, one 8-lane accumulator per output, fma in element order, hsum8."""
    a0 = zero_f32x8()
    a1 = zero_f32x8()
    for i in range(0, k8, 8):
        if i % 16 == 0:
            prefetch(wa + 4 * i + PF)
            prefetch(wa + rs + 4 * i + PF)
        xv = ld_f32x8(xa + 4 * i)
        a0 = fma_f(a0, ld_f32x8(wa + 4 * i), xv)
        a1 = fma_f(a1, ld_f32x8(wa + rs + 4 * i), xv)
    return hsum_f32x8(a0), hsum_f32x8(a1)


@njit(nogil=True, cache=True)
def dot2_f16(wa, rs, xa, k8):
    """As dot2_f32 with f16 weights; x (float32 at xa) must already be rounded to f16 values."""
    a0 = zero_f32x8()
    a1 = zero_f32x8()
    for i in range(0, k8, 8):
        if i % 32 == 0:
            prefetch(wa + 2 * i + PF)
            prefetch(wa + rs + 2 * i + PF)
        xv = ld_f32x8(xa + 4 * i)
        a0 = fma_f(a0, ld_f16x8(wa + 2 * i), xv)
        a1 = fma_f(a1, ld_f16x8(wa + rs + 2 * i), xv)
    return hsum_f32x8(a0), hsum_f32x8(a1)


# ---- rows r0..r1, all columns ----

@njit(nogil=True, cache=True)
def rows(t, w, x, xq, xd, xbs, xe, gx, go, gd, ge, ks, out, col0, r0, r1, tab):
    """out[j, col0 + r] for r in r0..r1, every column j; rows two at a time (an odd last row alone).

    x: float32 activations for F32 / F16 (F16: already rounded to f16 values).  Legacy types:
    the columns that x_groups gathered (gx, go, gd, ge) go through rows8, the others one by one.
    K-quants: groups of 4 columns through rows4 (with ks = x_sums16), the others one by one.
    """
    n = x.shape[0]
    k = x.shape[1]
    rb = w.shape[1]
    wbase = w.ctypes.data
    xqa = xq.ctypes.data
    if t == 0 or t == 1:
        xfa = x.ctypes.data
        k8 = k - k % 8
        for r in range(r0, r1, 2):
            wa = wbase + r * rb
            rs = rb if r + 1 < r1 else 0
            for j in range(n):
                if t == 0:
                    s0, s1 = dot2_f32(wa, rs, xfa + 4 * k * j, k8)
                    for e in range(k8, k):
                        s0 = fma32(ld_f32(wa + 4 * e), x[j, e], s0)
                        s1 = fma32(ld_f32(wa + rs + 4 * e), x[j, e], s1)
                else:
                    s0, s1 = dot2_f16(wa, rs, xfa + 4 * k * j, k8)
                    for e in range(k8, k):
                        s0 = fma32(ld_f16(wa + 2 * e), x[j, e], s0)
                        s1 = fma32(ld_f16(wa + rs + 2 * e), x[j, e], s1)
                out[j, col0 + r] = s0
                if rs:
                    out[j, col0 + r + 1] = s1
        return
    nbx = xd.shape[1]
    nbs = xbs.shape[1]
    if t == 12 or t == 13 or t == 14:
        if n >= 4:
            rows4(t, w, xq, xd, ks, out, col0, r0, r1)
        j0 = n - n % 4 if n >= 4 else 0
        for r in range(r0, r1):
            wa = wbase + r * rb
            for j in range(j0, n):
                xa = xqa + j * k
                xda = xd.ctypes.data + 4 * nbx * j
                if t == 12:
                    s = dot1_q4_k(wa, rb // Q4_K_BB, xa, xda, xbs.ctypes.data + 4 * nbs * j)
                elif t == 13:
                    s = dot1_q5_k(wa, rb // Q5_K_BB, xa, xda, xbs.ctypes.data + 4 * nbs * j)
                else:
                    s = dot1_q6_k(wa, rb // Q6_K_BB, xa, xda, xbs.ctypes.data + 4 * nbs * j)
                out[j, col0 + r] = s
        return
    nb = rb // (Q4_0_BB if t == 2 else (Q4_1_BB if t == 3 else (Q5_0_BB if t == 6 else Q8_0_BB)))
    ng = gx.shape[0]
    if ng:
        rows8(t, w, gx, go, gd, ge, out, col0, r0, r1, tab, n)
    j0 = min(n, GROUP * ng)
    for r in range(r0, r1, 2):
        wa = wbase + r * rb
        rs = rb if r + 1 < r1 else 0
        for j in range(j0, n):
            s0, s1 = dot2_legacy(t, wa, rs, nb, xqa + j * k, xd.ctypes.data + 4 * nbx * j,
                                 xe.ctypes.data + 4 * nbx * j, tab.ctypes.data)
            out[j, col0 + r] = s0
            if rs:
                out[j, col0 + r + 1] = s1


# ---- four columns at once (prefill): each weight block unpacked once ----

@njit(nogil=True, cache=True, inline="always")
def sub4(i0, i1, i2, i3, u, xo, k, sc, s):
    """The 4 columns' integer sums plus sub-block s (a literal; u its 32 unsigned weights, scale s
    of the k_dup table sc) . x (column c's at xo + c k)."""
    return fence4(add_i32x8(i0, dot_us_k(u, xo, sc, s)), add_i32x8(i1, dot_us_k(u, xo + k, sc, s)),
                  add_i32x8(i2, dot_us_k(u, xo + 2 * k, sc, s)), add_i32x8(i3, dot_us_k(u, xo + 3 * k, sc, s)))


@njit(nogil=True, cache=True, inline="always")
def sub4_6(i0, i1, i2, i3, u, xo, k, sc, lo, hi):
    """As sub4 for Q6_K: scale lo for the first 16 weights, hi for the last 16 (dot_us_k2)."""
    return fence4(add_i32x8(i0, dot_us_k2(u, xo, sc, lo, hi)), add_i32x8(i1, dot_us_k2(u, xo + k, sc, lo, hi)),
                  add_i32x8(i2, dot_us_k2(u, xo + 2 * k, sc, lo, hi)), add_i32x8(i3, dot_us_k2(u, xo + 3 * k, sc, lo, hi)))


@njit(nogil=True, cache=True, inline="always")
def sub4_45(i0, i1, i2, i3, q, h, five, xo, k, sc, s, s1, bit):
    """Sub-blocks s and s1 = s + 1 (literals) of a Q4_K / Q5_K super-block (low and high nibbles of
    the 32 bytes at q; Q5_K: fifth bits `bit` and `2 bit` of the qh bytes h) into sub4's sums."""
    v = ld_i8x32(q)
    lo = and_i8(v, 15)
    hi = and_i8(srl_i8(v, 4), 15)
    if five:
        lo = or_i8(lo, select_bit(h, bit, 16))
        hi = or_i8(hi, select_bit(h, 2 * bit, 16))
    i0, i1, i2, i3 = sub4(i0, i1, i2, i3, lo, xo, k, sc, s)
    return sub4(i0, i1, i2, i3, hi, xo + 32, k, sc, s1)


@njit(nogil=True, cache=True, inline="always")
def tile4_k(t, wa, nb, xa, k, xda, nbx, bsa, nbs, out, j, col):
    """Q4_K / Q5_K / Q6_K row at wa . the 4 activation rows at xa, xa + k, ... -> out[j..j+3, col].

    xda / bsa: x scales and x_sums16 rows of column j (strides nbx floats / nbs int16 per column).
    A 1 x 4 register tile: each super-block's scales and weights are unpacked once for the 4
    columns, one sub-block at a time (fence4), into 4 integer sums; then each column's float
    operations are dot1_q4_k / dot1_q5_k / dot1_q6_k's, in their order.  Inlined into one
    function per type (dot4_q4_k, ...) so that no type branch is left in the loop.
    """
    z = zero_f32x8()
    a0, a1, a2, a3 = z, z, z, z
    m0, m1, m2, m3 = z, z, z, z  # Q4_K: llama.cpp's 4-lane acc_m per column (lanes 0-3)
    f0 = np.float32(0.0)
    s0, s1, s2, s3 = f0, f0, f0, f0  # Q5_K: its scalar summs per column
    bb = Q4_K_BB if t == 12 else (Q5_K_BB if t == 13 else Q6_K_BB)
    cd = 4 * nbx  # bytes from one column's x scales to the next's
    cb = 2 * nbs  # and its int16 sums (x_sums16)
    sb16 = 32 if t == 14 else 16  # bytes of int16 sums per super-block
    for b in range(nb):
        o = wa + b * bb
        prefetch(o + PF)
        prefetch(o + PF + 64)
        prefetch(o + PF + 128)
        xo = xa + b * QK_K
        xd = xda + 4 * b
        bs = bsa + sb16 * b
        zi = zero_i32x8()
        if t == 14:
            prefetch(o + PF + 192)
            scv = q6_scales(o + Q6_K_SC)
            sa = k_dup(scv, 0)
            sb = k_dup(scv, 1)
            i0, i1, i2, i3 = sub4_6(zi, zi, zi, zi, w_q6_k(o, 0, 0), xo, k, sa, 0, 1)
            i0, i1, i2, i3 = sub4_6(i0, i1, i2, i3, w_q6_k(o, 0, 1), xo + 32, k, sa, 2, 3)
            i0, i1, i2, i3 = sub4_6(i0, i1, i2, i3, w_q6_k(o, 0, 2), xo + 64, k, sa, 4, 5)
            i0, i1, i2, i3 = sub4_6(i0, i1, i2, i3, w_q6_k(o, 0, 3), xo + 96, k, sa, 6, 7)
            i0, i1, i2, i3 = sub4_6(i0, i1, i2, i3, w_q6_k(o, 1, 0), xo + 128, k, sb, 0, 1)
            i0, i1, i2, i3 = sub4_6(i0, i1, i2, i3, w_q6_k(o, 1, 1), xo + 160, k, sb, 2, 3)
            i0, i1, i2, i3 = sub4_6(i0, i1, i2, i3, w_q6_k(o, 1, 2), xo + 192, k, sb, 4, 5)
            i0, i1, i2, i3 = sub4_6(i0, i1, i2, i3, w_q6_k(o, 1, 3), xo + 224, k, sb, 6, 7)
            d = ld_f16(o + Q6_K_D)
            a0 = fma_i(a0, sub_i32x8(i0, q6_off16(scv, bs)), d * ld_f32(xd))
            a1 = fma_i(a1, sub_i32x8(i1, q6_off16(scv, bs + cb)), d * ld_f32(xd + cd))
            a2 = fma_i(a2, sub_i32x8(i2, q6_off16(scv, bs + 2 * cb)), d * ld_f32(xd + 2 * cd))
            a3 = fma_i(a3, sub_i32x8(i3, q6_off16(scv, bs + 3 * cb)), d * ld_f32(xd + 3 * cd))
        else:
            five = t == 13
            scv = k4_scales(o + (Q5_K_SC if five else Q4_K_SC))
            sc = k_dup(scv, 0)
            q = o + (Q5_K_QS if five else Q4_K_QS)
            h = ld_i8x32(o + Q5_K_QH)  # (unused for Q4_K)
            i0, i1, i2, i3 = sub4_45(zi, zi, zi, zi, q, h, five, xo, k, sc, 0, 1, 1)
            i0, i1, i2, i3 = sub4_45(i0, i1, i2, i3, q + 32, h, five, xo + 64, k, sc, 2, 3, 4)
            i0, i1, i2, i3 = sub4_45(i0, i1, i2, i3, q + 64, h, five, xo + 128, k, sc, 4, 5, 16)
            i0, i1, i2, i3 = sub4_45(i0, i1, i2, i3, q + 96, h, five, xo + 192, k, sc, 6, 7, 64)
            d = ld_f16(o + (Q5_K_D if five else Q4_K_D))
            dm = -ld_f16(o + (Q5_K_DMIN if five else Q4_K_DMIN))
            dx0, dx1, dx2, dx3 = ld_f32(xd), ld_f32(xd + cd), ld_f32(xd + 2 * cd), ld_f32(xd + 3 * cd)
            a0, a1, a2, a3 = fma_i(a0, i0, d * dx0), fma_i(a1, i1, d * dx1), fma_i(a2, i2, d * dx2), fma_i(a3, i3, d * dx3)
            if five:
                s0 = fma32(np.float32(hsum_i32x8(k4_mins16(scv, bs))), dm * dx0, s0)
                s1 = fma32(np.float32(hsum_i32x8(k4_mins16(scv, bs + cb))), dm * dx1, s1)
                s2 = fma32(np.float32(hsum_i32x8(k4_mins16(scv, bs + 2 * cb))), dm * dx2, s2)
                s3 = fma32(np.float32(hsum_i32x8(k4_mins16(scv, bs + 3 * cb))), dm * dx3, s3)
            else:
                m0 = fma_i(m0, k4_mins16(scv, bs), dm * dx0)
                m1 = fma_i(m1, k4_mins16(scv, bs + cb), dm * dx1)
                m2 = fma_i(m2, k4_mins16(scv, bs + 2 * cb), dm * dx2)
                m3 = fma_i(m3, k4_mins16(scv, bs + 3 * cb), dm * dx3)
    if t == 12:
        out[j, col] = hsum_f32x8(a0) + hsum_lo4(m0)
        out[j + 1, col] = hsum_f32x8(a1) + hsum_lo4(m1)
        out[j + 2, col] = hsum_f32x8(a2) + hsum_lo4(m2)
        out[j + 3, col] = hsum_f32x8(a3) + hsum_lo4(m3)
    elif t == 13:
        out[j, col] = hsum_f32x8(a0) + s0
        out[j + 1, col] = hsum_f32x8(a1) + s1
        out[j + 2, col] = hsum_f32x8(a2) + s2
        out[j + 3, col] = hsum_f32x8(a3) + s3
    else:
        out[j, col] = hsum_f32x8(a0)
        out[j + 1, col] = hsum_f32x8(a1)
        out[j + 2, col] = hsum_f32x8(a2)
        out[j + 3, col] = hsum_f32x8(a3)


@njit(nogil=True, cache=True)
def dot4_q4_k(wa, nb, xa, k, xda, nbx, bsa, nbs, out, j, col):
    tile4_k(12, wa, nb, xa, k, xda, nbx, bsa, nbs, out, j, col)


@njit(nogil=True, cache=True)
def dot4_q5_k(wa, nb, xa, k, xda, nbx, bsa, nbs, out, j, col):
    tile4_k(13, wa, nb, xa, k, xda, nbx, bsa, nbs, out, j, col)


@njit(nogil=True, cache=True)
def dot4_q6_k(wa, nb, xa, k, xda, nbx, bsa, nbs, out, j, col):
    tile4_k(14, wa, nb, xa, k, xda, nbx, bsa, nbs, out, j, col)


@njit(nogil=True, cache=True)
def x_sums16(t, xbs, n):
    """K-quants with 4 or more columns: the activations' q8_K sums of 16 as the tile reads them,
    int16 (|sum| <= 16 * 128): Q6_K 16 per super-block as they are; Q4_K / Q5_K 8, summed in
    pairs (sums of 32, llama.cpp's hadd).  Else (n, 0)."""
    if n < 4 or (t != 12 and t != 13 and t != 14):
        return np.empty((n, 0), np.int16)
    m = xbs.shape[1]
    if t == 14:
        out = np.empty((n, m), np.int16)
        for j in range(n):
            for i in range(m):
                out[j, i] = xbs[j, i]
        return out
    out = np.empty((n, m // 2), np.int16)
    for j in range(n):
        for i in range(m // 2):
            out[j, i] = xbs[j, 2 * i] + xbs[j, 2 * i + 1]
    return out


@njit(nogil=True, cache=True)
def rows4(t, w, xq, xd, ks, out, col0, r0, r1):
    """K-quants: columns 0 .. n - n%4 in groups of 4, rows r0..r1: a 1 x 4 tile, the weight row re-read from L1."""
    n, k = xq.shape
    rb = w.shape[1]
    wbase = w.ctypes.data
    xqa = xq.ctypes.data
    nbx = xd.shape[1]
    nbs = ks.shape[1]
    for r in range(r0, r1):
        wa = wbase + r * rb
        for j in range(0, n - 3, 4):
            xa, xda, bsa = xqa + j * k, xd.ctypes.data + 4 * nbx * j, ks.ctypes.data + 2 * nbs * j
            if t == 12:
                dot4_q4_k(wa, rb // Q4_K_BB, xa, k, xda, nbx, bsa, nbs, out, j, col0 + r)
            elif t == 13:
                dot4_q5_k(wa, rb // Q5_K_BB, xa, k, xda, nbx, bsa, nbs, out, j, col0 + r)
            else:
                dot4_q6_k(wa, rb // Q6_K_BB, xa, k, xda, nbx, bsa, nbs, out, j, col0 + r)


# ---- legacy types, several columns (prefill, batched decode): a 1 x 8 register tile ----
# Each weight block is unpacked once and dotted with 8 activation columns.  On Zen 3 (AVX2, no
# VNNI) the cost is the per-column work, not the unpacking: a one-column dot is ~14 instructions
# per block; with a tile the floor is maddubs, (offset), maddwd, cvt, fma -- measured ~2 cycles
# per column and block on this CPU.  x_groups lays each group of 8 columns out block by block
# (their 8 x 32 int8 x, then their x scales), and precomputes the part of Q4_0 / Q5_0's offset
# that depends on x alone, so a column costs one vpmaddubsw and no unpacking.  The products
# d_w * d_x of the 8 columns are one vmulps, stored and broadcast back per column.  Each output
# is still the one-column dot (same integer lanes, same float operations in the same order), so
# a column has the same bits alone or in any batch.

GROUP = 8  # columns per tile (a group of 3 or 4 columns takes the tile's 4-wide form)
GROUP_MIN = 3  # a last group of fewer columns goes column by column (dot2_legacy): cheaper


@njit(nogil=True, cache=True)
def x_groups(t, xq, xd, xe):
    """Legacy type t, activations (n, k) int8 + per-block scales -> the tile groups' layout:
    gx (ng, nb, 8, 32) int8; go (ng, nb, 8, 16) int16 Q4_0 / Q5_0 offset pair sums (st_off16,
    else empty); gd (ng, nb, 8) float32 x scales; ge (ng, nb, 8) Q4_1 s_x (else empty).
    ng = n // 8, plus one when n % 8 >= GROUP_MIN (its missing columns repeat column n - 1; with 3
    or 4 columns it goes through the 4-wide tile)."""
    n, k = xq.shape
    nb = k // QK
    ng = n // GROUP + (1 if n % GROUP >= GROUP_MIN else 0)
    if t != 2 and t != 3 and t != 6 and t != 8:
        ng = 0
    off = 8 if t == 2 else 16
    gx = np.empty((ng, nb, GROUP, QK), np.int8)
    go = np.empty((ng, nb if t == 2 or t == 6 else 0, GROUP, QK // 2), np.int16)
    gd = np.empty((ng, nb, GROUP), np.float32)
    ge = np.empty((ng, nb if t == 3 else 0, GROUP), np.float32)
    xe32 = xe.view(np.float32)
    for g in range(ng):
        for c in range(GROUP):
            j = min(g * GROUP + c, n - 1)
            src = xq.ctypes.data + j * k
            for b in range(nb):
                dst = gx.ctypes.data + ((g * nb + b) * GROUP + c) * QK
                st_vec(dst, ld_i8x32(src + b * QK))
                gd[g, b, c] = xd[j, b]
                if t == 2 or t == 6:
                    st_off16(go.ctypes.data + ((g * nb + b) * GROUP + c) * QK, dst, off)
                if t == 3:
                    ge[g, b, c] = xe32[j, b]
    return gx, go, gd, ge


@njit(nogil=True, cache=True, inline="always")
def col8(t, a, u, aw, xo, oo, sa):
    """One column of a tile: a + (integer lanes of weights u . x at xo) * (d_w d_x stored at sa)."""
    if t == 2 or t == 6:
        return fma_iv(a, dot_us_pre(u, xo, oo), splat_f32_ld(sa))
    if t == 3:
        return fma_iv(a, dot_us(u, xo), splat_f32_ld(sa))
    return fma_iv(a, dot_ss_abs(aw, u, xo), splat_f32_ld(sa))


@njit(nogil=True, cache=True, inline="always")
def tile8(t, wide, wa, nb, xa, oa, da, ea, sa, tab):
    """Q4_0 / Q4_1 / Q5_0 / Q8_0 row at wa . the 8 columns of one x_groups group (x at xa, offsets
    at oa, scales at da, Q4_1 s_x at ea) -> 8 float32, each as dot2_legacy forms it; only the first
    4 unless wide (the others are then 0).  sa: 16 float32 of scratch (the products, then Q4_1's
    mins).  Inlined into one function per type and width (tile8_q4_0, tile4_q4_0, ...): with t and
    wide constants, the loop has no branches and its accumulators stay in registers."""
    z = zero_f32x8()
    a0, a1, a2, a3, a4, a5, a6, a7 = z, z, z, z, z, z, z, z
    m = z  # Q4_1: column c's min chain in lane c, as dot2_legacy's scalar s0
    bb = Q4_0_BB if t == 2 else (Q4_1_BB if t == 3 else (Q5_0_BB if t == 6 else Q8_0_BB))
    for b in range(nb):
        o = wa + b * bb
        prefetch(o + PF)
        if t == 8:
            prefetch(o + PF + 64)
        if t == 2:
            u = ld_nibbles16(o + Q4_0_QS)
            dw = splat_tab(tab, o + Q4_0_D)
        elif t == 6:
            u = w_q5_0(o)
            dw = splat_tab(tab, o + Q5_0_D)
        elif t == 3:
            u = ld_nibbles16(o + Q4_1_QS)
            dw = splat_tab(tab, o + Q4_1_D)
            m = fma_f(m, splat_tab(tab, o + Q4_1_M), ld_f32x8(ea + 32 * b))
        else:
            u = ld_i8x32(o + Q8_0_QS)
            dw = splat_tab(tab, o + Q8_0_D)
        aw = abs_i8(u)  # Q8_0's |w|; dead code for the others
        st_vec(sa, mul_f32x8(dw, ld_f32x8(da + 32 * b)))
        xo = xa + b * GROUP * QK
        oo = oa + b * GROUP * QK
        a0 = col8(t, a0, u, aw, xo, oo, sa)
        a1 = col8(t, a1, u, aw, xo + QK, oo + QK, sa + 4)
        a2 = col8(t, a2, u, aw, xo + 2 * QK, oo + 2 * QK, sa + 8)
        a3 = col8(t, a3, u, aw, xo + 3 * QK, oo + 3 * QK, sa + 12)
        if wide:
            a4 = col8(t, a4, u, aw, xo + 4 * QK, oo + 4 * QK, sa + 16)
            a5 = col8(t, a5, u, aw, xo + 5 * QK, oo + 5 * QK, sa + 20)
            a6 = col8(t, a6, u, aw, xo + 6 * QK, oo + 6 * QK, sa + 24)
            a7 = col8(t, a7, u, aw, xo + 7 * QK, oo + 7 * QK, sa + 28)
    if t == 3:
        st_vec(sa + 32, m)
        return (hsum_f32x8(a0) + ld_f32(sa + 32), hsum_f32x8(a1) + ld_f32(sa + 36), hsum_f32x8(a2) + ld_f32(sa + 40),
                hsum_f32x8(a3) + ld_f32(sa + 44), hsum_f32x8(a4) + ld_f32(sa + 48), hsum_f32x8(a5) + ld_f32(sa + 52),
                hsum_f32x8(a6) + ld_f32(sa + 56), hsum_f32x8(a7) + ld_f32(sa + 60))
    return (hsum_f32x8(a0), hsum_f32x8(a1), hsum_f32x8(a2), hsum_f32x8(a3), hsum_f32x8(a4), hsum_f32x8(a5),
            hsum_f32x8(a6), hsum_f32x8(a7))


@njit(nogil=True, cache=True)
def tile8_q4_0(wa, nb, xa, oa, da, ea, sa, tab):
    return tile8(2, True, wa, nb, xa, oa, da, ea, sa, tab)


@njit(nogil=True, cache=True)
def tile4_q4_0(wa, nb, xa, oa, da, ea, sa, tab):
    return tile8(2, False, wa, nb, xa, oa, da, ea, sa, tab)


@njit(nogil=True, cache=True)
def tile8_q4_1(wa, nb, xa, oa, da, ea, sa, tab):
    return tile8(3, True, wa, nb, xa, oa, da, ea, sa, tab)


@njit(nogil=True, cache=True)
def tile4_q4_1(wa, nb, xa, oa, da, ea, sa, tab):
    return tile8(3, False, wa, nb, xa, oa, da, ea, sa, tab)


@njit(nogil=True, cache=True)
def tile8_q5_0(wa, nb, xa, oa, da, ea, sa, tab):
    return tile8(6, True, wa, nb, xa, oa, da, ea, sa, tab)


@njit(nogil=True, cache=True)
def tile4_q5_0(wa, nb, xa, oa, da, ea, sa, tab):
    return tile8(6, False, wa, nb, xa, oa, da, ea, sa, tab)


@njit(nogil=True, cache=True)
def tile8_q8_0(wa, nb, xa, oa, da, ea, sa, tab):
    return tile8(8, True, wa, nb, xa, oa, da, ea, sa, tab)


@njit(nogil=True, cache=True)
def tile4_q8_0(wa, nb, xa, oa, da, ea, sa, tab):
    return tile8(8, False, wa, nb, xa, oa, da, ea, sa, tab)


@njit(nogil=True, cache=True)
def rows8(t, w, gx, go, gd, ge, out, col0, r0, r1, tab, n):
    """out[j, col0 + r] for rows r0..r1 and the columns of x_groups' groups (j < n): group by
    group, so that a group's activations stay in L1/L2 while the chunk's rows pass by."""
    ng, nb = gx.shape[0], gx.shape[1]
    rb = w.shape[1]
    sa = np.zeros(16, np.float32)
    for g in range(ng):
        xa = gx.ctypes.data + g * nb * GROUP * QK
        oa = go.ctypes.data + g * go.shape[1] * GROUP * QK
        da = gd.ctypes.data + g * nb * GROUP * 4
        ea = ge.ctypes.data + g * ge.shape[1] * GROUP * 4
        nc = min(GROUP, n - g * GROUP)
        for r in range(r0, r1):
            wa = w.ctypes.data + r * rb
            s_, t_ = sa.ctypes.data, tab.ctypes.data
            if nc > 4:
                if t == 2:
                    v = tile8_q4_0(wa, nb, xa, oa, da, ea, s_, t_)
                elif t == 3:
                    v = tile8_q4_1(wa, nb, xa, oa, da, ea, s_, t_)
                elif t == 6:
                    v = tile8_q5_0(wa, nb, xa, oa, da, ea, s_, t_)
                else:
                    v = tile8_q8_0(wa, nb, xa, oa, da, ea, s_, t_)
            elif t == 2:
                v = tile4_q4_0(wa, nb, xa, oa, da, ea, s_, t_)
            elif t == 3:
                v = tile4_q4_1(wa, nb, xa, oa, da, ea, s_, t_)
            elif t == 6:
                v = tile4_q5_0(wa, nb, xa, oa, da, ea, s_, t_)
            else:
                v = tile4_q8_0(wa, nb, xa, oa, da, ea, s_, t_)
            for c in range(nc):
                out[g * GROUP + c, col0 + r] = v[c]


# ---- drivers ----

@njit(nogil=True, cache=True)
def x_extra(t, xd, xs):
    """Legacy types: the per-block extra term of each activation block, (n, nb) 4-byte words:
    Q4_1's float32 s_x for the min term; else empty."""
    if t == 3:
        return xs.view(np.int32)
    return np.zeros((xd.shape[0], 0), np.int32)


@njit(nogil=True, cache=True)
def matmul_serial(w, t, x, out, col0, tab):
    check(w, t, x, out, col0)
    x, xq, xd, xbs, xs = prepare_x(t, x)
    xe = x_extra(t, xd, xs)
    gx, go, gd, ge = x_groups(t, xq, xd, xe)
    ks = x_sums16(t, xbs, x.shape[0])
    rows(t, w, x, xq, xd, xbs, xe, gx, go, gd, ge, ks, out, col0, 0, w.shape[0], tab)


@njit(nogil=True, cache=True, parallel=True)
def matmul_parallel(w, t, x, out, col0, tab):
    check(w, t, x, out, col0)
    x, xq, xd, xbs, xs = prepare_x(t, x)
    xe = x_extra(t, xd, xs)
    gx, go, gd, ge = x_groups(t, xq, xd, xe)
    ks = x_sums16(t, xbs, x.shape[0])
    nrows = w.shape[0]
    # numba's static schedule gives each thread one contiguous run of chunks (a sequential
    # stream for the prefetcher); get_num_threads() here would defeat cache=True
    for c in prange((nrows + ROW_CHUNK - 1) // ROW_CHUNK):
        rows(t, w, x, xq, xd, xbs, xe, gx, go, gd, ge, ks, out, col0, c * ROW_CHUNK, min(nrows, (c + 1) * ROW_CHUNK), tab)


@njit(nogil=True, cache=True, parallel=True)
def matmul_many(addrs, nrows, rb, t, x, spans, out, tab):
    """Several weight matrices of one shape (nrows, rb bytes) of type t, at the addresses addrs:
    matrix e times rows spans[e]:spans[e+1] of x -> the same rows of out[:, :nrows].  One threaded
    loop over (matrix, part): a mixture of experts' layer in one call instead of one per expert.
    Every output is the one `rows` gives alone."""
    x, xq, xd, xbs, xs = prepare_x(t, x)
    xe = x_extra(t, xd, xs)
    for job in prange(addrs.shape[0] * MANY_PARTS):
        e, a, b, r0, r1 = many_job(job, nrows, spans)
        if a < b and r0 < r1:
            w = carray(u8_ptr(addrs[e]), (nrows, rb))
            gx, go, gd, ge = x_groups(t, xq[a:b], xd[a:b], xe[a:b])
            ks = x_sums16(t, xbs[a:b], b - a)
            rows(t, w, x[a:b], xq[a:b], xd[a:b], xbs[a:b], xe[a:b], gx, go, gd, ge, ks, out[a:b], 0, r0, r1, tab)
