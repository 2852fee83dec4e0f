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
Prefill (n > 1) takes the columns 4 at a time: each weight block is unpacked once and
dotted with 4 activation rows (a 1 x 4 register tile; the row is re-read from L1 for the
next 4 columns).

All functions are module-level @njit(cache=True) so the on-disk cache works.  Numba's cache
only checks this file's timestamp: after editing simd.py, delete kernels/__pycache__/*.nb[ci].
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .layouts import QK, QK_K
from .portable import (
    Q4_0_BB, Q4_0_D, Q4_0_QS, Q4_1_BB, Q4_1_D, Q4_1_M, Q4_1_QS, Q4_K_BB, Q4_K_D, Q4_K_DMIN, Q4_K_QS, Q4_K_SC,
    Q5_0_BB, Q5_0_D, Q5_0_QH, Q5_0_QS, Q5_K_BB, Q5_K_D, Q5_K_DMIN, Q5_K_QH, Q5_K_QS, Q5_K_SC, Q6_K_BB, Q6_K_D,
    Q6_K_QH, Q6_K_QL, Q6_K_SC, Q8_0_BB, Q8_0_D, Q8_0_QS, ROW_CHUNK, check, quantize_x,
)
from .actq import f16round_inplace
from .simd import (
    add_i32x8, and_i8, bits32_to_bytes, dot_ss, dot_us, dot_us_k, dot_us_off, fma32, fma_f, fma_i, fma_iv,
    hsum_f32x8, hsum_i32x8, hsum_lo4, k4_mins, k4_scales, k_dup, dot_us_k2, q6_off, sub_i32x8, ld_f16, ld_f16x8, ld_f32, ld_f32x8, ld_i8x32,
    ld_nibbles16, ld_u32, mul_f32x8, or_i8, pairsum_lo4, prefetch, q6_scales, select_bit, sll_i8, splat_f32_ld, splat_tab,
    srl_i8, tab_f32, zero_f32x8,
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
def rows(t, w, x, xq, xd, xbs, xe, out, col0, r0, r1, tab):
    """out[j, col0 + r] for r in r0..r1, every column j; rows two at a time (an odd last row alone).

    x: float32 activations for F32 / F16 (F16: already rounded to f16 values).
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
    if n >= 4:
        rows4(t, w, xq, xd, xbs, xe, out, col0, r0, r1, tab)
        j0 = n - n % 4
    else:
        j0 = 0
    nbx = xd.shape[1]
    nbs = xbs.shape[1]
    if t == 12 or t == 13 or t == 14:
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

@njit(nogil=True, cache=True)
def dot4_legacy(t, wa, nb, xa, k, xva, xea, nbx, tab, out, j, col):
    """Q4_0 / Q4_1 / Q5_0 / Q8_0 row at wa against the 4 activation rows at xa, xa + k, ... -> out[j..j+3, col].

    xva / xea: x scales and extra terms of column j (stride nbx per column).
    """
    a0 = zero_f32x8()
    a1 = zero_f32x8()
    a2 = zero_f32x8()
    a3 = zero_f32x8()
    s0 = np.float32(0.0)
    s1 = np.float32(0.0)
    s2 = np.float32(0.0)
    s3 = np.float32(0.0)
    cs = 4 * nbx  # bytes between the per-block x scalars of consecutive columns
    for b in range(nb):
        xo = xa + b * QK
        xv = xva + 4 * b
        xe = xea + 4 * b
        if t == 2:
            o = wa + b * Q4_0_BB
            a0 = blk_q4_0(a0, o, xo, xv, tab)
            a1 = blk_q4_0(a1, o, xo + k, xv + cs, tab)
            a2 = blk_q4_0(a2, o, xo + 2 * k, xv + 2 * cs, tab)
            a3 = blk_q4_0(a3, o, xo + 3 * k, xv + 3 * cs, tab)
        elif t == 6:
            o = wa + b * Q5_0_BB
            a0 = blk_q5_0(a0, o, xo, xv, tab)
            a1 = blk_q5_0(a1, o, xo + k, xv + cs, tab)
            a2 = blk_q5_0(a2, o, xo + 2 * k, xv + 2 * cs, tab)
            a3 = blk_q5_0(a3, o, xo + 3 * k, xv + 3 * cs, tab)
        elif t == 3:
            o = wa + b * Q4_1_BB
            a0 = blk_q4_1(a0, o, xo, xv, tab)
            a1 = blk_q4_1(a1, o, xo + k, xv + cs, tab)
            a2 = blk_q4_1(a2, o, xo + 2 * k, xv + 2 * cs, tab)
            a3 = blk_q4_1(a3, o, xo + 3 * k, xv + 3 * cs, tab)
            s0 = min_q4_1(s0, o, xe, tab)
            s1 = min_q4_1(s1, o, xe + cs, tab)
            s2 = min_q4_1(s2, o, xe + 2 * cs, tab)
            s3 = min_q4_1(s3, o, xe + 3 * cs, tab)
        else:
            o = wa + b * Q8_0_BB
            a0 = blk_q8_0(a0, o, xo, xv, tab)
            a1 = blk_q8_0(a1, o, xo + k, xv + cs, tab)
            a2 = blk_q8_0(a2, o, xo + 2 * k, xv + 2 * cs, tab)
            a3 = blk_q8_0(a3, o, xo + 3 * k, xv + 3 * cs, tab)
    out[j, col] = hsum_f32x8(a0) + s0  # s* stay 0 unless Q4_1 (x + 0 is x)
    out[j + 1, col] = hsum_f32x8(a1) + s1
    out[j + 2, col] = hsum_f32x8(a2) + s2
    out[j + 3, col] = hsum_f32x8(a3) + s3


@njit(nogil=True, cache=True)
def dot4_k(t, wa, nb, xa, k, xda, nbx, bsa, nbs, out, j, col):
    """Q4_K / Q5_K / Q6_K row at wa against the 4 activation rows at xa, xa + k, ... -> out[j..j+3, col].

    xda / bsa: scale and 16-sums rows of column j (strides nbx floats / nbs ints per column).
    The weight unpacking is written once per column but loads the same addresses, so LLVM
    shares it between the 4 dots.
    """
    a0 = zero_f32x8()
    a1 = zero_f32x8()
    a2 = zero_f32x8()
    a3 = zero_f32x8()
    m0 = zero_f32x8()  # Q4_K: llama.cpp's 4-lane acc_m per column (lanes 0-3)
    m1 = zero_f32x8()
    m2 = zero_f32x8()
    m3 = zero_f32x8()
    s0 = np.float32(0.0)  # Q5_K: its scalar summs per column
    s1 = np.float32(0.0)
    s2 = np.float32(0.0)
    s3 = np.float32(0.0)
    for b in range(nb):
        xo = xa + b * QK_K
        xd0 = xda + 4 * b
        bs0 = bsa + 64 * b
        if t == 14:
            o = wa + b * Q6_K_BB
            scv = q6_scales(o + Q6_K_SC)
            d = ld_f16(o + Q6_K_D)
            a0 = fma_i(a0, isum_q6_k(o, xo, scv, bs0), d * ld_f32(xd0))
            a1 = fma_i(a1, isum_q6_k(o, xo + k, scv, bs0 + 4 * nbs), d * ld_f32(xd0 + 4 * nbx))
            a2 = fma_i(a2, isum_q6_k(o, xo + 2 * k, scv, bs0 + 8 * nbs), d * ld_f32(xd0 + 8 * nbx))
            a3 = fma_i(a3, isum_q6_k(o, xo + 3 * k, scv, bs0 + 12 * nbs), d * ld_f32(xd0 + 12 * nbx))
        else:
            if t == 12:
                o = wa + b * Q4_K_BB
                scv = k4_scales(o + Q4_K_SC)
                d = ld_f16(o + Q4_K_D)
                dm = -ld_f16(o + Q4_K_DMIN)
                a0 = fma_i(a0, isum_q4_k(o + Q4_K_QS, xo, scv), d * ld_f32(xd0))
                a1 = fma_i(a1, isum_q4_k(o + Q4_K_QS, xo + k, scv), d * ld_f32(xd0 + 4 * nbx))
                a2 = fma_i(a2, isum_q4_k(o + Q4_K_QS, xo + 2 * k, scv), d * ld_f32(xd0 + 8 * nbx))
                a3 = fma_i(a3, isum_q4_k(o + Q4_K_QS, xo + 3 * k, scv), d * ld_f32(xd0 + 12 * nbx))
            else:
                o = wa + b * Q5_K_BB
                scv = k4_scales(o + Q5_K_SC)
                d = ld_f16(o + Q5_K_D)
                dm = -ld_f16(o + Q5_K_DMIN)
                a0 = fma_i(a0, isum_q5_k(o + Q5_K_QS, o + Q5_K_QH, xo, scv), d * ld_f32(xd0))
                a1 = fma_i(a1, isum_q5_k(o + Q5_K_QS, o + Q5_K_QH, xo + k, scv), d * ld_f32(xd0 + 4 * nbx))
                a2 = fma_i(a2, isum_q5_k(o + Q5_K_QS, o + Q5_K_QH, xo + 2 * k, scv), d * ld_f32(xd0 + 8 * nbx))
                a3 = fma_i(a3, isum_q5_k(o + Q5_K_QS, o + Q5_K_QH, xo + 3 * k, scv), d * ld_f32(xd0 + 12 * nbx))
            if t == 12:
                m0 = fma_i(m0, pairsum_lo4(k4_mins(scv, bs0)), dm * ld_f32(xd0))
                m1 = fma_i(m1, pairsum_lo4(k4_mins(scv, bs0 + 4 * nbs)), dm * ld_f32(xd0 + 4 * nbx))
                m2 = fma_i(m2, pairsum_lo4(k4_mins(scv, bs0 + 8 * nbs)), dm * ld_f32(xd0 + 8 * nbx))
                m3 = fma_i(m3, pairsum_lo4(k4_mins(scv, bs0 + 12 * nbs)), dm * ld_f32(xd0 + 12 * nbx))
            else:
                s0 = fma32(np.float32(hsum_i32x8(k4_mins(scv, bs0))), dm * ld_f32(xd0), s0)
                s1 = fma32(np.float32(hsum_i32x8(k4_mins(scv, bs0 + 4 * nbs))), dm * ld_f32(xd0 + 4 * nbx), s1)
                s2 = fma32(np.float32(hsum_i32x8(k4_mins(scv, bs0 + 8 * nbs))), dm * ld_f32(xd0 + 8 * nbx), s2)
                s3 = fma32(np.float32(hsum_i32x8(k4_mins(scv, bs0 + 12 * nbs))), dm * ld_f32(xd0 + 12 * nbx), s3)
    if t == 12:
        out[j, col] = hsum_f32x8(a0) + hsum_lo4(m0)
        out[j + 1, col] = hsum_f32x8(a1) + hsum_lo4(m1)
        out[j + 2, col] = hsum_f32x8(a2) + hsum_lo4(m2)
        out[j + 3, col] = hsum_f32x8(a3) + hsum_lo4(m3)
    else:
        out[j, col] = hsum_f32x8(a0) + s0  # Q6_K: s* stay 0
        out[j + 1, col] = hsum_f32x8(a1) + s1
        out[j + 2, col] = hsum_f32x8(a2) + s2
        out[j + 3, col] = hsum_f32x8(a3) + s3


@njit(nogil=True, cache=True)
def rows4(t, w, xq, xd, xbs, xe, out, col0, r0, r1, tab):
    """Columns 0 .. n - n%4 in groups of 4, rows r0..r1: a 1 x 4 tile, the weight row re-read from L1."""
    n, k = xq.shape
    rb = w.shape[1]
    wbase = w.ctypes.data
    xqa = xq.ctypes.data
    nbx = xd.shape[1]
    nbs = xbs.shape[1]
    for r in range(r0, r1):
        wa = wbase + r * rb
        for j in range(0, n - 3, 4):
            if t == 12 or t == 13 or t == 14:
                dot4_k(t, wa, rb // (Q6_K_BB if t == 14 else (Q4_K_BB if t == 12 else Q5_K_BB)), xqa + j * k, k,
                       xd.ctypes.data + 4 * nbx * j, nbx, xbs.ctypes.data + 4 * nbs * j, nbs, out, j, col0 + r)
            else:
                bb = Q4_0_BB if t == 2 else (Q4_1_BB if t == 3 else (Q5_0_BB if t == 6 else Q8_0_BB))
                dot4_legacy(t, wa, rb // bb, xqa + j * k, k, xd.ctypes.data + 4 * nbx * j, xe.ctypes.data + 4 * nbx * j,
                            nbx, tab.ctypes.data, out, j, col0 + r)


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
    xq, xd, xbs, xs = quantize_x(t, x)
    xe = x_extra(t, xd, xs)
    if t == 1:  # llama.cpp rounds x to f16 for F16 weights
        x = x.copy()
        f16round_inplace(x)
    rows(t, w, x, xq, xd, xbs, xe, out, col0, 0, w.shape[0], tab)


@njit(nogil=True, cache=True, parallel=True)
def matmul_parallel(w, t, x, out, col0, tab):
    check(w, t, x, out, col0)
    xq, xd, xbs, xs = quantize_x(t, x)
    xe = x_extra(t, xd, xs)
    if t == 1:  # llama.cpp rounds x to f16 for F16 weights
        x = x.copy()
        f16round_inplace(x)
    nrows = w.shape[0]
    # numba's static schedule gives each thread one contiguous run of chunks (a sequential
    # stream for the prefetcher); get_num_threads() here would defeat cache=True
    for c in prange((nrows + ROW_CHUNK - 1) // ROW_CHUNK):
        rows(t, w, x, xq, xd, xbs, xe, out, col0, c * ROW_CHUNK, min(nrows, (c + 1) * ROW_CHUNK), tab)
