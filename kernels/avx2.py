"""Raw GGUF rows x float32 activations -> float32 outputs, with AVX2 SIMD (simd.py intrinsics).

The same integer math as portable.py (llama.cpp's): per 32 weights, unpack to 32 unsigned
bytes (nibble split with vpsrlvd/vpand, fifth/sixth bits or-ed in), vpmaddubsw with the int8
activations, vpmaddwd with ones (or with the K-quant sub-block scales) to 8 x i32, add the
integer offset (-8 / -16 * sum(q_x)) to lane 0, then one vcvtdq2ps + FMA with d_w * d_x per
block (per super-block for K-quants).  One horizontal sum per output.

What it took to approach the memory-read ceiling on this Zen 3 (no VNNI), each measured:
- a software prefetch 8 KiB ahead (0.59 -> 0.8 of the ceiling on one thread): the loops are
  too dense in instructions for out-of-order execution to keep enough lines in flight;
- f16 scales read without `vpinsrw` (simd.ld_f16, simd.splat_tab): its merge into a register
  that was a loop accumulator chained every block behind the previous FMA (2x slower);
- weight scales as one table load + vbroadcastss, x scales and offsets as 4-byte scalars
  per block (not 32-byte splats) to keep the per-row x footprint in L1.

Decode (one column) reads one weight row per iteration with two float accumulators.
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
from .simd import (
    add_f32x8, add_i32x8, add_lane0_ld, and_i8, bits32_to_bytes, dot_ss, dot_us, dot_us_k, dot_us_off_k, fma_f, fma_i,
    fma_iv, hsum_f32x8, k4_mins, k4_scales, k_dup, lane0_f32_ld, ld_f16, ld_f16x8, ld_f32, ld_f32x8, ld_i8x32, ld_nibbles16,
    ld_u32, mul_f32x8, or_i8, prefetch, q6_scales, select_bit, sll_i8, splat_f32_ld, splat_tab, srl_i8, zero_f32x8,
    zero_i32x8,
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

@njit(nogil=True, cache=True, inline="always")
def blk_q4_0(acc, o, xo, xv, xov, tab):
    """acc + (dot of Q4_0 block o with x block xo, + int32 offset at xov) * d_w * (x scale at xv)."""
    v = add_lane0_ld(dot_us(ld_nibbles16(o + Q4_0_QS), xo), xov)
    return fma_iv(acc, v, mul_f32x8(splat_tab(tab, o + Q4_0_D), splat_f32_ld(xv)))


@njit(nogil=True, cache=True, inline="always")
def blk_q5_0(acc, o, xo, xv, xov, tab):
    v = add_lane0_ld(dot_us(w_q5_0(o), xo), xov)
    return fma_iv(acc, v, mul_f32x8(splat_tab(tab, o + Q5_0_D), splat_f32_ld(xv)))


@njit(nogil=True, cache=True, inline="always")
def blk_q4_1(acc, o, xo, xv, tab):
    """Q4_1: (d q + m) . (d_x q_x) = d d_x (q . q_x) + m s_x; this is the first term (see min_q4_1)."""
    return fma_iv(acc, dot_us(ld_nibbles16(o + Q4_1_QS), xo), mul_f32x8(splat_tab(tab, o + Q4_1_D), splat_f32_ld(xv)))


@njit(nogil=True, cache=True, inline="always")
def min_q4_1(macc, o, xsv, tab):
    """Q4_1's m * s_x (s_x the float32 at xsv, into lane 0), kept in its own accumulator so
    the block's two FMAs do not form one dependency chain."""
    return fma_f(macc, splat_tab(tab, o + Q4_1_M), lane0_f32_ld(xsv))


@njit(nogil=True, cache=True, inline="always")
def blk_q8_0(acc, o, xo, xv, tab):
    return fma_iv(acc, dot_ss(ld_i8x32(o + Q8_0_QS), xo), mul_f32x8(splat_tab(tab, o + Q8_0_D), splat_f32_ld(xv)))


@njit(nogil=True, cache=True)
def dot1_legacy(t, wa, nb, xa, xva, xea, tab):
    """Q4_0 / Q4_1 / Q5_0 / Q8_0 row at wa . int8 x at xa -> float32.

    xva: f32 x scale per block; xea: the extra term per block (Q4_0 / Q5_0: int32 offset,
    Q4_1: f32 s_x).  Four blocks per iteration into two accumulators (FMA latency; loop
    overhead), one prefetch per iteration.
    """
    acc0 = zero_f32x8()
    acc1 = zero_f32x8()
    nb4 = nb - nb % 4
    if t == 2:
        for b in range(0, nb4, 4):
            o = wa + b * Q4_0_BB
            prefetch(o + PF)
            prefetch(o + PF + 64)
            acc0 = blk_q4_0(acc0, o, xa + b * QK, xva + 4 * b, xea + 4 * b, tab)
            acc1 = blk_q4_0(acc1, o + Q4_0_BB, xa + (b + 1) * QK, xva + 4 * (b + 1), xea + 4 * (b + 1), tab)
            acc0 = blk_q4_0(acc0, o + 2 * Q4_0_BB, xa + (b + 2) * QK, xva + 4 * (b + 2), xea + 4 * (b + 2), tab)
            acc1 = blk_q4_0(acc1, o + 3 * Q4_0_BB, xa + (b + 3) * QK, xva + 4 * (b + 3), xea + 4 * (b + 3), tab)
        for b in range(nb4, nb):
            acc0 = blk_q4_0(acc0, wa + b * Q4_0_BB, xa + b * QK, xva + 4 * b, xea + 4 * b, tab)
    elif t == 6:
        for b in range(0, nb4, 4):
            o = wa + b * Q5_0_BB
            prefetch(o + PF)
            prefetch(o + PF + 64)
            acc0 = blk_q5_0(acc0, o, xa + b * QK, xva + 4 * b, xea + 4 * b, tab)
            acc1 = blk_q5_0(acc1, o + Q5_0_BB, xa + (b + 1) * QK, xva + 4 * (b + 1), xea + 4 * (b + 1), tab)
            acc0 = blk_q5_0(acc0, o + 2 * Q5_0_BB, xa + (b + 2) * QK, xva + 4 * (b + 2), xea + 4 * (b + 2), tab)
            acc1 = blk_q5_0(acc1, o + 3 * Q5_0_BB, xa + (b + 3) * QK, xva + 4 * (b + 3), xea + 4 * (b + 3), tab)
        for b in range(nb4, nb):
            acc0 = blk_q5_0(acc0, wa + b * Q5_0_BB, xa + b * QK, xva + 4 * b, xea + 4 * b, tab)
    elif t == 3:
        m0 = zero_f32x8()
        m1 = zero_f32x8()
        for b in range(0, nb4, 4):
            o = wa + b * Q4_1_BB
            prefetch(o + PF)
            prefetch(o + PF + 64)
            acc0 = blk_q4_1(acc0, o, xa + b * QK, xva + 4 * b, tab)
            m0 = min_q4_1(m0, o, xea + 4 * b, tab)
            acc1 = blk_q4_1(acc1, o + Q4_1_BB, xa + (b + 1) * QK, xva + 4 * (b + 1), tab)
            m1 = min_q4_1(m1, o + Q4_1_BB, xea + 4 * (b + 1), tab)
            acc0 = blk_q4_1(acc0, o + 2 * Q4_1_BB, xa + (b + 2) * QK, xva + 4 * (b + 2), tab)
            m0 = min_q4_1(m0, o + 2 * Q4_1_BB, xea + 4 * (b + 2), tab)
            acc1 = blk_q4_1(acc1, o + 3 * Q4_1_BB, xa + (b + 3) * QK, xva + 4 * (b + 3), tab)
            m1 = min_q4_1(m1, o + 3 * Q4_1_BB, xea + 4 * (b + 3), tab)
        for b in range(nb4, nb):
            acc0 = blk_q4_1(acc0, wa + b * Q4_1_BB, xa + b * QK, xva + 4 * b, tab)
            m0 = min_q4_1(m0, wa + b * Q4_1_BB, xea + 4 * b, tab)
        acc0 = add_f32x8(acc0, add_f32x8(m0, m1))
    else:
        for b in range(0, nb4, 4):
            o = wa + b * Q8_0_BB
            prefetch(o + PF)
            prefetch(o + PF + 64)
            prefetch(o + PF + 128)
            acc0 = blk_q8_0(acc0, o, xa + b * QK, xva + 4 * b, tab)
            acc1 = blk_q8_0(acc1, o + Q8_0_BB, xa + (b + 1) * QK, xva + 4 * (b + 1), tab)
            acc0 = blk_q8_0(acc0, o + 2 * Q8_0_BB, xa + (b + 2) * QK, xva + 4 * (b + 2), tab)
            acc1 = blk_q8_0(acc1, o + 3 * Q8_0_BB, xa + (b + 3) * QK, xva + 4 * (b + 3), tab)
        for b in range(nb4, nb):
            acc0 = blk_q8_0(acc0, wa + b * Q8_0_BB, xa + b * QK, xva + 4 * b, tab)
    return hsum_f32x8(add_f32x8(acc0, acc1))


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
def isum_q6_k(o, xo, scv):
    """Integer dot of one Q6_K super-block at o with 256 int8 x at xo: sum over groups of 16 of sc * (q - 32) . x."""
    a = k_dup(scv, 0)  # scales 0-7: sub-blocks 0-3
    b = k_dup(scv, 1)  # scales 8-15: sub-blocks 4-7
    i = add_i32x8(dot_us_off_k(w_q6_k(o, 0, 0), xo, 32, a, 0, 1), dot_us_off_k(w_q6_k(o, 0, 1), xo + 32, 32, a, 2, 3))
    i = add_i32x8(i, add_i32x8(dot_us_off_k(w_q6_k(o, 0, 2), xo + 64, 32, a, 4, 5), dot_us_off_k(w_q6_k(o, 0, 3), xo + 96, 32, a, 6, 7)))
    i = add_i32x8(i, add_i32x8(dot_us_off_k(w_q6_k(o, 1, 0), xo + 128, 32, b, 0, 1), dot_us_off_k(w_q6_k(o, 1, 1), xo + 160, 32, b, 2, 3)))
    i = add_i32x8(i, add_i32x8(dot_us_off_k(w_q6_k(o, 1, 2), xo + 192, 32, b, 4, 5), dot_us_off_k(w_q6_k(o, 1, 3), xo + 224, 32, b, 6, 7)))
    return i


@njit(nogil=True, cache=True)
def dot1_q4_k(wa, nb, xa, xda, bsa):
    """Q4_K row at wa . int8 x at xa (q8_K: xda one f32 per 256, bsa 16 int32 sums per 256)."""
    acc = zero_f32x8()
    for b in range(nb):
        o = wa + b * Q4_K_BB
        prefetch(o + PF)
        prefetch(o + PF + 64)
        prefetch(o + PF + 128)
        scv = k4_scales(o + Q4_K_SC)
        dx = ld_f32(xda + 4 * b)
        acc = fma_i(acc, isum_q4_k(o + Q4_K_QS, xa + b * QK_K, scv), ld_f16(o + Q4_K_D) * dx)
        acc = fma_i(acc, k4_mins(scv, bsa + 64 * b), -(ld_f16(o + Q4_K_DMIN) * dx))
    return hsum_f32x8(acc)


@njit(nogil=True, cache=True)
def dot1_q5_k(wa, nb, xa, xda, bsa):
    acc = zero_f32x8()
    for b in range(nb):
        o = wa + b * Q5_K_BB
        prefetch(o + PF)
        prefetch(o + PF + 64)
        prefetch(o + PF + 128)
        scv = k4_scales(o + Q5_K_SC)
        dx = ld_f32(xda + 4 * b)
        acc = fma_i(acc, isum_q5_k(o + Q5_K_QS, o + Q5_K_QH, xa + b * QK_K, scv), ld_f16(o + Q5_K_D) * dx)
        acc = fma_i(acc, k4_mins(scv, bsa + 64 * b), -(ld_f16(o + Q5_K_DMIN) * dx))
    return hsum_f32x8(acc)


@njit(nogil=True, cache=True, inline="always")
def w_q6_k(o, h, t):
    """Sub-block 4h + t of a Q6_K block at o as 32 unsigned 6-bit values."""
    a = ld_i8x32(o + Q6_K_QL + 64 * h + 32 * (t & 1))
    lo = and_i8(srl_i8(a, 4 * (t >> 1)), 15)
    hi = sll_i8(and_i8(srl_i8(ld_i8x32(o + Q6_K_QH + 32 * h), 2 * t), 3), 4)
    return or_i8(lo, hi)


@njit(nogil=True, cache=True)
def dot1_q6_k(wa, nb, xa, xda):
    acc = zero_f32x8()
    for b in range(nb):
        o = wa + b * Q6_K_BB
        prefetch(o + PF)
        prefetch(o + PF + 64)
        prefetch(o + PF + 128)
        prefetch(o + PF + 192)
        acc = fma_i(acc, isum_q6_k(o, xa + b * QK_K, q6_scales(o + Q6_K_SC)), ld_f16(o + Q6_K_D) * ld_f32(xda + 4 * b))
    return hsum_f32x8(acc)


@njit(nogil=True, cache=True)
def dot1_f32(wa, xa, k):
    a0 = zero_f32x8()
    a1 = zero_f32x8()
    a2 = zero_f32x8()
    a3 = zero_f32x8()
    i = 0
    while i + 32 <= k:
        prefetch(wa + 4 * i + PF)
        prefetch(wa + 4 * i + PF + 64)
        a0 = fma_f(a0, ld_f32x8(wa + 4 * i), ld_f32x8(xa + 4 * i))
        a1 = fma_f(a1, ld_f32x8(wa + 4 * i + 32), ld_f32x8(xa + 4 * i + 32))
        a2 = fma_f(a2, ld_f32x8(wa + 4 * i + 64), ld_f32x8(xa + 4 * i + 64))
        a3 = fma_f(a3, ld_f32x8(wa + 4 * i + 96), ld_f32x8(xa + 4 * i + 96))
        i += 32
    while i + 8 <= k:
        a0 = fma_f(a0, ld_f32x8(wa + 4 * i), ld_f32x8(xa + 4 * i))
        i += 8
    return hsum_f32x8(add_f32x8(add_f32x8(a0, a1), add_f32x8(a2, a3))), i


@njit(nogil=True, cache=True)
def dot1_f16(wa, xa, k):
    a0 = zero_f32x8()
    a1 = zero_f32x8()
    a2 = zero_f32x8()
    a3 = zero_f32x8()
    i = 0
    while i + 32 <= k:
        prefetch(wa + 2 * i + PF)
        a0 = fma_f(a0, ld_f16x8(wa + 2 * i), ld_f32x8(xa + 4 * i))
        a1 = fma_f(a1, ld_f16x8(wa + 2 * i + 16), ld_f32x8(xa + 4 * i + 32))
        a2 = fma_f(a2, ld_f16x8(wa + 2 * i + 32), ld_f32x8(xa + 4 * i + 64))
        a3 = fma_f(a3, ld_f16x8(wa + 2 * i + 48), ld_f32x8(xa + 4 * i + 96))
        i += 32
    while i + 8 <= k:
        a0 = fma_f(a0, ld_f16x8(wa + 2 * i), ld_f32x8(xa + 4 * i))
        i += 8
    return hsum_f32x8(add_f32x8(add_f32x8(a0, a1), add_f32x8(a2, a3))), i


# ---- rows r0..r1, all columns ----

@njit(nogil=True, cache=True)
def rows(t, w, x, xq, xd, xbs, xe, out, col0, r0, r1, tab):
    n = x.shape[0]
    k = x.shape[1]
    rb = w.shape[1]
    wbase = w.ctypes.data
    xqa = xq.ctypes.data
    if t == 0 or t == 1:
        xfa = x.ctypes.data
        for r in range(r0, r1):
            wa = wbase + r * rb
            for j in range(n):
                if t == 0:
                    s, i = dot1_f32(wa, xfa + 4 * k * j, k)
                    for e in range(i, k):
                        s += ld_f32(wa + 4 * e) * x[j, e]
                else:
                    s, i = dot1_f16(wa, xfa + 4 * k * j, k)
                    for e in range(i, k):
                        s += ld_f16(wa + 2 * e) * x[j, e]
                out[j, col0 + r] = s
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
                    s = dot1_q6_k(wa, rb // Q6_K_BB, xa, xda)
                out[j, col0 + r] = s
        return
    nb = rb // (Q4_0_BB if t == 2 else (Q4_1_BB if t == 3 else (Q5_0_BB if t == 6 else Q8_0_BB)))
    for r in range(r0, r1):
        wa = wbase + r * rb
        for j in range(j0, n):
            out[j, col0 + r] = dot1_legacy(t, wa, nb, xqa + j * k, xd.ctypes.data + 4 * nbx * j,
                                           xe.ctypes.data + 4 * nbx * j, tab.ctypes.data)


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
    cs = 4 * nbx  # bytes between the per-block x scalars of consecutive columns
    for b in range(nb):
        xo = xa + b * QK
        xv = xva + 4 * b
        xe = xea + 4 * b
        if t == 2:
            o = wa + b * Q4_0_BB
            a0 = blk_q4_0(a0, o, xo, xv, xe, tab)
            a1 = blk_q4_0(a1, o, xo + k, xv + cs, xe + cs, tab)
            a2 = blk_q4_0(a2, o, xo + 2 * k, xv + 2 * cs, xe + 2 * cs, tab)
            a3 = blk_q4_0(a3, o, xo + 3 * k, xv + 3 * cs, xe + 3 * cs, tab)
        elif t == 6:
            o = wa + b * Q5_0_BB
            a0 = blk_q5_0(a0, o, xo, xv, xe, tab)
            a1 = blk_q5_0(a1, o, xo + k, xv + cs, xe + cs, tab)
            a2 = blk_q5_0(a2, o, xo + 2 * k, xv + 2 * cs, xe + 2 * cs, tab)
            a3 = blk_q5_0(a3, o, xo + 3 * k, xv + 3 * cs, xe + 3 * cs, tab)
        elif t == 3:
            o = wa + b * Q4_1_BB
            a0 = min_q4_1(blk_q4_1(a0, o, xo, xv, tab), o, xe, tab)
            a1 = min_q4_1(blk_q4_1(a1, o, xo + k, xv + cs, tab), o, xe + cs, tab)
            a2 = min_q4_1(blk_q4_1(a2, o, xo + 2 * k, xv + 2 * cs, tab), o, xe + 2 * cs, tab)
            a3 = min_q4_1(blk_q4_1(a3, o, xo + 3 * k, xv + 3 * cs, tab), o, xe + 3 * cs, tab)
        else:
            o = wa + b * Q8_0_BB
            a0 = blk_q8_0(a0, o, xo, xv, tab)
            a1 = blk_q8_0(a1, o, xo + k, xv + cs, tab)
            a2 = blk_q8_0(a2, o, xo + 2 * k, xv + 2 * cs, tab)
            a3 = blk_q8_0(a3, o, xo + 3 * k, xv + 3 * cs, tab)
    out[j, col] = hsum_f32x8(a0)
    out[j + 1, col] = hsum_f32x8(a1)
    out[j + 2, col] = hsum_f32x8(a2)
    out[j + 3, col] = hsum_f32x8(a3)


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
    for b in range(nb):
        xo = xa + b * QK_K
        xd0 = xda + 4 * b
        if t == 14:
            o = wa + b * Q6_K_BB
            scv = q6_scales(o + Q6_K_SC)
            d = ld_f16(o + Q6_K_D)
            a0 = fma_i(a0, isum_q6_k(o, xo, scv), d * ld_f32(xd0))
            a1 = fma_i(a1, isum_q6_k(o, xo + k, scv), d * ld_f32(xd0 + 4 * nbx))
            a2 = fma_i(a2, isum_q6_k(o, xo + 2 * k, scv), d * ld_f32(xd0 + 8 * nbx))
            a3 = fma_i(a3, isum_q6_k(o, xo + 3 * k, scv), d * ld_f32(xd0 + 12 * nbx))
        else:
            bs0 = bsa + 64 * b
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
            a0 = fma_i(a0, k4_mins(scv, bs0), dm * ld_f32(xd0))
            a1 = fma_i(a1, k4_mins(scv, bs0 + 4 * nbs), dm * ld_f32(xd0 + 4 * nbx))
            a2 = fma_i(a2, k4_mins(scv, bs0 + 8 * nbs), dm * ld_f32(xd0 + 8 * nbx))
            a3 = fma_i(a3, k4_mins(scv, bs0 + 12 * nbs), dm * ld_f32(xd0 + 12 * nbx))
    out[j, col] = hsum_f32x8(a0)
    out[j + 1, col] = hsum_f32x8(a1)
    out[j + 2, col] = hsum_f32x8(a2)
    out[j + 3, col] = hsum_f32x8(a3)


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
def x_extra(t, xd, xbs, xs):
    """Legacy types: the per-block extra term of each activation block, (n, nb) 4-byte words.

    Q4_0 / Q5_0: int32 (-8 / -16) * sum(q_x), added to lane 0 of the block's integer dot so it
    becomes the dot with (q - 8) / (q - 16); Q4_1: float32 s_x for the min term; else empty.
    """
    n, nb = xd.shape
    if t == 3:
        return xs.view(np.int32)
    if t != 2 and t != 6:
        return np.zeros((n, 0), np.int32)
    off = -8 if t == 2 else -16
    xe = np.empty((n, nb), np.int32)
    for j in range(n):
        for b in range(nb):
            xe[j, b] = off * (xbs[j, 2 * b] + xbs[j, 2 * b + 1])
    return xe


@njit(nogil=True, cache=True)
def matmul_serial(w, t, x, out, col0, tab):
    check(w, t, x, out, col0)
    xq, xd, xbs, xs = quantize_x(t, x)
    xe = x_extra(t, xd, xbs, xs)
    rows(t, w, x, xq, xd, xbs, xe, out, col0, 0, w.shape[0], tab)


@njit(nogil=True, cache=True, parallel=True)
def matmul_parallel(w, t, x, out, col0, tab):
    check(w, t, x, out, col0)
    xq, xd, xbs, xs = quantize_x(t, x)
    xe = x_extra(t, xd, xbs, xs)
    nrows = w.shape[0]
    # numba's static schedule gives each thread one contiguous run of chunks (a sequential
    # stream for the prefetcher); get_num_threads() here would defeat cache=True
    for c in prange((nrows + ROW_CHUNK - 1) // ROW_CHUNK):
        rows(t, w, x, xq, xd, xbs, xe, out, col0, c * ROW_CHUNK, min(nrows, (c + 1) * ROW_CHUNK), tab)
