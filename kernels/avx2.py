"""Raw GGUF rows x float32 activations -> float32 outputs, with AVX2 SIMD (simd.py intrinsics).

The same integer math as portable.py (llama.cpp's): per 32 weights, unpack to 32 unsigned
bytes (nibble split with and/shift, fifth/sixth bits or-ed in), vpmaddubsw with the int8
activations, vpmaddwd with ones (or with the K-quant sub-block scales) to 8 x i32, fold
integer offsets (-8, -16 * sum(x)) into lane 0, then one vcvtdq2ps + FMA with d_w * d_x per
block (per super-block for K-quants).  One horizontal sum per output.

Decode (one column) reads one weight row per iteration, two float accumulators to hide
FMA latency; memory-bound.  Prefill (n > 1) takes the columns 4 at a time: each weight
block is unpacked once and dotted with 4 activation rows (a 1 x 4 register tile, weight
row re-read from L1 for the next 4 columns).

All functions are module-level @njit(cache=True) so the on-disk cache works.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .layouts import QK, QK_K
from .portable import (
    Q4_0_BB, Q4_0_D, Q4_0_QS, Q4_1_BB, Q4_1_D, Q4_1_M, Q4_1_QS, Q4_K_BB, Q4_K_D, Q4_K_DMIN, Q4_K_QS, Q4_K_SC,
    Q5_0_BB, Q5_0_D, Q5_0_QH, Q5_0_QS, Q5_K_BB, Q5_K_D, Q5_K_DMIN, Q5_K_QH, Q5_K_QS, Q5_K_SC, Q6_K_BB, Q6_K_D,
    Q6_K_QH, Q6_K_QL, Q6_K_SC, Q8_0_BB, Q8_0_D, Q8_0_QS, ROW_CHUNK, check, i8, k_scale_min, quantize_x,
)
from .simd import (
    add_f32x8, add_i32x8, add_i32x8_ld, add_lane0, and_i8, bits32_to_bytes, dot_ss, dot_us, dot_us_off_scaled, dot_us_scaled,
    fma_f, fma_i, hsum_f32x8, ld_f16, ld_f16x8, ld_f32, ld_f32x8, ld_i8x32, ld_nibbles16, ld_u32, or_i8, prefetch, select_bit, sll_i8,
    srl_i8, zero_f32x8, zero_i32x8,
)

# Software prefetch distance in bytes.  Decode loops are dense in instructions (~14 per 18
# bytes of Q4_0), so out-of-order execution alone keeps few cache lines in flight and the
# hardware prefetcher does not cover DRAM latency: measured 0.59 -> 0.76 of the read ceiling
# on one thread with a prefetch 8 KiB ahead (4-32 KiB all similar).  The prefetch runs past
# the row end into the next rows, i.e. it follows the thread's contiguous row range.
PF = 8192

# ---- legacy blocks of 32: weights -> 32 unsigned bytes + integer offset per activation sum ----


@njit(nogil=True, cache=True, inline="always")
def w_q4_0(o):
    return ld_nibbles16(o + Q4_0_QS)


@njit(nogil=True, cache=True, inline="always")
def w_q5_0(o):
    return or_i8(ld_nibbles16(o + Q5_0_QS), bits32_to_bytes(ld_u32(o + Q5_0_QH), 16))


# ---- one column ----

@njit(nogil=True, cache=True)
def dot1_q4_0(wa, nb, xa, xda, xoa):
    """Q4_0 row at wa . int8 x at xa; xda: f32 scale per block, xoa: 8 x i32 offset lanes per block."""
    acc0 = zero_f32x8()
    acc1 = zero_f32x8()
    for b in range(0, nb - 1, 2):
        o = wa + b * Q4_0_BB
        prefetch(o + PF)
        v = add_i32x8_ld(dot_us(w_q4_0(o), xa + b * QK), xoa + 32 * b)
        acc0 = fma_i(acc0, v, ld_f16(o + Q4_0_D) * ld_f32(xda + 4 * b))
        o += Q4_0_BB
        v = add_i32x8_ld(dot_us(w_q4_0(o), xa + (b + 1) * QK), xoa + 32 * (b + 1))
        acc1 = fma_i(acc1, v, ld_f16(o + Q4_0_D) * ld_f32(xda + 4 * (b + 1)))
    if nb & 1:
        b = nb - 1
        o = wa + b * Q4_0_BB
        v = add_i32x8_ld(dot_us(w_q4_0(o), xa + b * QK), xoa + 32 * b)
        acc0 = fma_i(acc0, v, ld_f16(o + Q4_0_D) * ld_f32(xda + 4 * b))
    return hsum_f32x8(add_f32x8(acc0, acc1))


@njit(nogil=True, cache=True)
def dot1_q5_0(wa, nb, xa, xda, xoa):
    acc0 = zero_f32x8()
    acc1 = zero_f32x8()
    for b in range(0, nb - 1, 2):
        o = wa + b * Q5_0_BB
        prefetch(o + PF)
        v = add_i32x8_ld(dot_us(w_q5_0(o), xa + b * QK), xoa + 32 * b)
        acc0 = fma_i(acc0, v, ld_f16(o + Q5_0_D) * ld_f32(xda + 4 * b))
        o += Q5_0_BB
        v = add_i32x8_ld(dot_us(w_q5_0(o), xa + (b + 1) * QK), xoa + 32 * (b + 1))
        acc1 = fma_i(acc1, v, ld_f16(o + Q5_0_D) * ld_f32(xda + 4 * (b + 1)))
    if nb & 1:
        b = nb - 1
        o = wa + b * Q5_0_BB
        v = add_i32x8_ld(dot_us(w_q5_0(o), xa + b * QK), xoa + 32 * b)
        acc0 = fma_i(acc0, v, ld_f16(o + Q5_0_D) * ld_f32(xda + 4 * b))
    return hsum_f32x8(add_f32x8(acc0, acc1))


@njit(nogil=True, cache=True)
def dot1_q4_1(wa, nb, xa, xda, xsa):
    """xsa: f32 s = f16(d * sum(q)) per block, for the min term m * s."""
    acc0 = zero_f32x8()
    acc1 = zero_f32x8()
    macc = np.float32(0.0)
    for b in range(0, nb - 1, 2):
        o = wa + b * Q4_1_BB
        prefetch(o + PF)
        acc0 = fma_i(acc0, dot_us(ld_nibbles16(o + Q4_1_QS), xa + b * QK), ld_f16(o + Q4_1_D) * ld_f32(xda + 4 * b))
        macc += ld_f16(o + Q4_1_M) * ld_f32(xsa + 4 * b)
        o += Q4_1_BB
        acc1 = fma_i(acc1, dot_us(ld_nibbles16(o + Q4_1_QS), xa + (b + 1) * QK), ld_f16(o + Q4_1_D) * ld_f32(xda + 4 * (b + 1)))
        macc += ld_f16(o + Q4_1_M) * ld_f32(xsa + 4 * (b + 1))
    if nb & 1:
        b = nb - 1
        o = wa + b * Q4_1_BB
        acc0 = fma_i(acc0, dot_us(ld_nibbles16(o + Q4_1_QS), xa + b * QK), ld_f16(o + Q4_1_D) * ld_f32(xda + 4 * b))
        macc += ld_f16(o + Q4_1_M) * ld_f32(xsa + 4 * b)
    return hsum_f32x8(add_f32x8(acc0, acc1)) + macc


@njit(nogil=True, cache=True)
def dot1_q8_0(wa, nb, xa, xda):
    acc0 = zero_f32x8()
    acc1 = zero_f32x8()
    for b in range(0, nb - 1, 2):
        o = wa + b * Q8_0_BB
        prefetch(o + PF)
        prefetch(o + PF + 64)
        acc0 = fma_i(acc0, dot_ss(ld_i8x32(o + Q8_0_QS), xa + b * QK), ld_f16(o + Q8_0_D) * ld_f32(xda + 4 * b))
        o += Q8_0_BB
        acc1 = fma_i(acc1, dot_ss(ld_i8x32(o + Q8_0_QS), xa + (b + 1) * QK), ld_f16(o + Q8_0_D) * ld_f32(xda + 4 * (b + 1)))
    if nb & 1:
        b = nb - 1
        o = wa + b * Q8_0_BB
        acc0 = fma_i(acc0, dot_ss(ld_i8x32(o + Q8_0_QS), xa + b * QK), ld_f16(o + Q8_0_D) * ld_f32(xda + 4 * b))
    return hsum_f32x8(add_f32x8(acc0, acc1))


@njit(nogil=True, cache=True)
def dot1_q4_k(w, r, wa, nb, xa, xd, xbs, j):
    acc = zero_f32x8()
    macc = np.float32(0.0)
    for b in range(nb):
        o = wa + b * Q4_K_BB
        prefetch(o + PF)
        prefetch(o + PF + 64)
        prefetch(o + PF + 128)
        bo = b * Q4_K_BB + Q4_K_SC  # scales, as a column of w
        isum = zero_i32x8()
        msum = 0
        for c in range(4):  # 32 bytes of qs: sub-block 2c in the low nibbles, 2c+1 in the high
            q = ld_i8x32(o + Q4_K_QS + 32 * c)
            sc0, m0 = k_scale_min(w, r, bo, 2 * c)
            sc1, m1 = k_scale_min(w, r, bo, 2 * c + 1)
            xo = xa + b * QK_K + 64 * c
            isum = add_i32x8(isum, dot_us_scaled(and_i8(q, 15), xo, sc0, sc0))
            isum = add_i32x8(isum, dot_us_scaled(and_i8(srl_i8(q, 4), 15), xo + 32, sc1, sc1))
            g = 16 * b + 4 * c
            msum += m0 * (xbs[j, g] + xbs[j, g + 1]) + m1 * (xbs[j, g + 2] + xbs[j, g + 3])
        acc = fma_i(acc, isum, ld_f16(o + Q4_K_D) * xd[j, b])
        macc += (ld_f16(o + Q4_K_DMIN) * xd[j, b]) * np.float32(msum)
    return hsum_f32x8(acc) - macc


@njit(nogil=True, cache=True)
def dot1_q5_k(w, r, wa, nb, xa, xd, xbs, j):
    acc = zero_f32x8()
    macc = np.float32(0.0)
    for b in range(nb):
        o = wa + b * Q5_K_BB
        prefetch(o + PF)
        prefetch(o + PF + 64)
        prefetch(o + PF + 128)
        bo = b * Q5_K_BB + Q5_K_SC
        qh = ld_i8x32(o + Q5_K_QH)
        isum = zero_i32x8()
        msum = 0
        for c in range(4):
            q = ld_i8x32(o + Q5_K_QS + 32 * c)
            sc0, m0 = k_scale_min(w, r, bo, 2 * c)
            sc1, m1 = k_scale_min(w, r, bo, 2 * c + 1)
            xo = xa + b * QK_K + 64 * c
            u0 = or_i8(and_i8(q, 15), select_bit(qh, 1 << (2 * c), 16))
            u1 = or_i8(and_i8(srl_i8(q, 4), 15), select_bit(qh, 2 << (2 * c), 16))
            isum = add_i32x8(isum, dot_us_scaled(u0, xo, sc0, sc0))
            isum = add_i32x8(isum, dot_us_scaled(u1, xo + 32, sc1, sc1))
            g = 16 * b + 4 * c
            msum += m0 * (xbs[j, g] + xbs[j, g + 1]) + m1 * (xbs[j, g + 2] + xbs[j, g + 3])
        acc = fma_i(acc, isum, ld_f16(o + Q5_K_D) * xd[j, b])
        macc += (ld_f16(o + Q5_K_DMIN) * xd[j, b]) * np.float32(msum)
    return hsum_f32x8(acc) - macc


@njit(nogil=True, cache=True, inline="always")
def w_q6_k(o, h, t):
    """Sub-block 4h + t of a Q6_K block at o as 32 unsigned 6-bit values."""
    a = ld_i8x32(o + Q6_K_QL + 64 * h + 32 * (t & 1))
    lo = and_i8(srl_i8(a, 4 * (t >> 1)), 15)
    hi = sll_i8(and_i8(srl_i8(ld_i8x32(o + Q6_K_QH + 32 * h), 2 * t), 3), 4)
    return or_i8(lo, hi)


@njit(nogil=True, cache=True)
def dot1_q6_k(w, r, wa, nb, xa, xd, j):
    acc = zero_f32x8()
    for b in range(nb):
        o = wa + b * Q6_K_BB
        prefetch(o + PF)
        prefetch(o + PF + 64)
        prefetch(o + PF + 128)
        prefetch(o + PF + 192)
        so = b * Q6_K_BB + Q6_K_SC
        isum = zero_i32x8()
        for s in range(8):
            u = w_q6_k(o, s >> 2, s & 3)
            isum = add_i32x8(isum, dot_us_off_scaled(u, xa + b * QK_K + 32 * s, 32, i8(w[r, so + 2 * s]), i8(w[r, so + 2 * s + 1])))
        acc = fma_i(acc, isum, ld_f16(o + Q6_K_D) * xd[j, b])
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
def rows(t, w, x, xq, xd, xbs, xs, xoff, out, col0, r0, r1):
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
        rows4(t, w, xq, xd, xbs, xs, out, col0, r0, r1)
        j0 = n - n % 4
    else:
        j0 = 0
    nbx = xd.shape[1]
    for r in range(r0, r1):
        wa = wbase + r * rb
        for j in range(j0, n):
            xa = xqa + j * k
            xda = xd.ctypes.data + 4 * nbx * j
            if t == 2:
                s = dot1_q4_0(wa, rb // Q4_0_BB, xa, xda, xoff.ctypes.data + 32 * nbx * j)
            elif t == 3:
                s = dot1_q4_1(wa, rb // Q4_1_BB, xa, xda, xs.ctypes.data + 4 * nbx * j)
            elif t == 6:
                s = dot1_q5_0(wa, rb // Q5_0_BB, xa, xda, xoff.ctypes.data + 32 * nbx * j)
            elif t == 8:
                s = dot1_q8_0(wa, rb // Q8_0_BB, xa, xda)
            elif t == 12:
                s = dot1_q4_k(w, r, wa, rb // Q4_K_BB, xa, xd, xbs, j)
            elif t == 13:
                s = dot1_q5_k(w, r, wa, rb // Q5_K_BB, xa, xd, xbs, j)
            else:
                s = dot1_q6_k(w, r, wa, rb // Q6_K_BB, xa, xd, j)
            out[j, col0 + r] = s


# ---- four columns at once (prefill): each weight block unpacked once ----

@njit(nogil=True, cache=True)
def dot4_legacy(t, wa, nb, xa, k, xd, xbs, xs, j, out, col0, r):
    """Q4_0 / Q4_1 / Q5_0 / Q8_0 row at wa against activation rows j..j+3 -> out[j..j+3, col0 + r]."""
    a0 = zero_f32x8()
    a1 = zero_f32x8()
    a2 = zero_f32x8()
    a3 = zero_f32x8()
    m0 = np.float32(0.0)
    m1 = np.float32(0.0)
    m2 = np.float32(0.0)
    m3 = np.float32(0.0)
    for b in range(nb):
        xo = xa + b * QK
        if t == 8:
            o = wa + b * Q8_0_BB
            u = ld_i8x32(o + Q8_0_QS)
            d = ld_f16(o + Q8_0_D)
            a0 = fma_i(a0, dot_ss(u, xo), d * xd[j, b])
            a1 = fma_i(a1, dot_ss(u, xo + k), d * xd[j + 1, b])
            a2 = fma_i(a2, dot_ss(u, xo + 2 * k), d * xd[j + 2, b])
            a3 = fma_i(a3, dot_ss(u, xo + 3 * k), d * xd[j + 3, b])
        elif t == 3:
            o = wa + b * Q4_1_BB
            u = ld_nibbles16(o + Q4_1_QS)
            d = ld_f16(o + Q4_1_D)
            mw = ld_f16(o + Q4_1_M)
            a0 = fma_i(a0, dot_us(u, xo), d * xd[j, b])
            a1 = fma_i(a1, dot_us(u, xo + k), d * xd[j + 1, b])
            a2 = fma_i(a2, dot_us(u, xo + 2 * k), d * xd[j + 2, b])
            a3 = fma_i(a3, dot_us(u, xo + 3 * k), d * xd[j + 3, b])
            m0 += mw * xs[j, b]
            m1 += mw * xs[j + 1, b]
            m2 += mw * xs[j + 2, b]
            m3 += mw * xs[j + 3, b]
        else:
            if t == 2:
                o = wa + b * Q4_0_BB
                u = w_q4_0(o)
                d = ld_f16(o + Q4_0_D)
                off = -8
            else:
                o = wa + b * Q5_0_BB
                u = w_q5_0(o)
                d = ld_f16(o + Q5_0_D)
                off = -16
            g = 2 * b
            a0 = fma_i(a0, add_lane0(dot_us(u, xo), off * (xbs[j, g] + xbs[j, g + 1])), d * xd[j, b])
            a1 = fma_i(a1, add_lane0(dot_us(u, xo + k), off * (xbs[j + 1, g] + xbs[j + 1, g + 1])), d * xd[j + 1, b])
            a2 = fma_i(a2, add_lane0(dot_us(u, xo + 2 * k), off * (xbs[j + 2, g] + xbs[j + 2, g + 1])), d * xd[j + 2, b])
            a3 = fma_i(a3, add_lane0(dot_us(u, xo + 3 * k), off * (xbs[j + 3, g] + xbs[j + 3, g + 1])), d * xd[j + 3, b])
    out[j, col0 + r] = hsum_f32x8(a0) + m0
    out[j + 1, col0 + r] = hsum_f32x8(a1) + m1
    out[j + 2, col0 + r] = hsum_f32x8(a2) + m2
    out[j + 3, col0 + r] = hsum_f32x8(a3) + m3


@njit(nogil=True, cache=True)
def dot4_k(t, w, r, wa, nb, xa, k, xd, xbs, j, out, col0):
    """Q4_K / Q5_K / Q6_K row r against activation rows j..j+3 -> out[j..j+3, col0 + r]."""
    a0 = zero_f32x8()
    a1 = zero_f32x8()
    a2 = zero_f32x8()
    a3 = zero_f32x8()
    mc0 = np.float32(0.0)
    mc1 = np.float32(0.0)
    mc2 = np.float32(0.0)
    mc3 = np.float32(0.0)
    for b in range(nb):
        i0 = zero_i32x8()
        i1 = zero_i32x8()
        i2 = zero_i32x8()
        i3 = zero_i32x8()
        if t == 14:
            o = wa + b * Q6_K_BB
            so = b * Q6_K_BB + Q6_K_SC
            for s in range(8):
                u = w_q6_k(o, s >> 2, s & 3)
                slo = i8(w[r, so + 2 * s])
                shi = i8(w[r, so + 2 * s + 1])
                xo = xa + b * QK_K + 32 * s
                i0 = add_i32x8(i0, dot_us_off_scaled(u, xo, 32, slo, shi))
                i1 = add_i32x8(i1, dot_us_off_scaled(u, xo + k, 32, slo, shi))
                i2 = add_i32x8(i2, dot_us_off_scaled(u, xo + 2 * k, 32, slo, shi))
                i3 = add_i32x8(i3, dot_us_off_scaled(u, xo + 3 * k, 32, slo, shi))
            d = ld_f16(o + Q6_K_D)
        else:
            if t == 12:
                o = wa + b * Q4_K_BB
                bo = b * Q4_K_BB + Q4_K_SC
                qso = o + Q4_K_QS
                d = ld_f16(o + Q4_K_D)
                dmin = ld_f16(o + Q4_K_DMIN)
            else:
                o = wa + b * Q5_K_BB
                bo = b * Q5_K_BB + Q5_K_SC
                qso = o + Q5_K_QS
                qh = ld_i8x32(o + Q5_K_QH)
                d = ld_f16(o + Q5_K_D)
                dmin = ld_f16(o + Q5_K_DMIN)
            ms0 = 0
            ms1 = 0
            ms2 = 0
            ms3 = 0
            for sb in range(8):
                c = sb >> 1
                q = ld_i8x32(qso + 32 * c)
                u = and_i8(srl_i8(q, 4 * (sb & 1)), 15)
                if t == 13:
                    u = or_i8(u, select_bit(qh, 1 << sb, 16))
                sc, m = k_scale_min(w, r, bo, sb)
                xo = xa + b * QK_K + 32 * sb
                i0 = add_i32x8(i0, dot_us_scaled(u, xo, sc, sc))
                i1 = add_i32x8(i1, dot_us_scaled(u, xo + k, sc, sc))
                i2 = add_i32x8(i2, dot_us_scaled(u, xo + 2 * k, sc, sc))
                i3 = add_i32x8(i3, dot_us_scaled(u, xo + 3 * k, sc, sc))
                g = 16 * b + 2 * sb
                ms0 += m * (xbs[j, g] + xbs[j, g + 1])
                ms1 += m * (xbs[j + 1, g] + xbs[j + 1, g + 1])
                ms2 += m * (xbs[j + 2, g] + xbs[j + 2, g + 1])
                ms3 += m * (xbs[j + 3, g] + xbs[j + 3, g + 1])
            mc0 += (dmin * xd[j, b]) * np.float32(ms0)
            mc1 += (dmin * xd[j + 1, b]) * np.float32(ms1)
            mc2 += (dmin * xd[j + 2, b]) * np.float32(ms2)
            mc3 += (dmin * xd[j + 3, b]) * np.float32(ms3)
        a0 = fma_i(a0, i0, d * xd[j, b])
        a1 = fma_i(a1, i1, d * xd[j + 1, b])
        a2 = fma_i(a2, i2, d * xd[j + 2, b])
        a3 = fma_i(a3, i3, d * xd[j + 3, b])
    out[j, col0 + r] = hsum_f32x8(a0) - mc0
    out[j + 1, col0 + r] = hsum_f32x8(a1) - mc1
    out[j + 2, col0 + r] = hsum_f32x8(a2) - mc2
    out[j + 3, col0 + r] = hsum_f32x8(a3) - mc3


@njit(nogil=True, cache=True)
def rows4(t, w, xq, xd, xbs, xs, out, col0, r0, r1):
    """Columns 0 .. n - n%4 in groups of 4, rows r0..r1."""
    n, k = xq.shape
    rb = w.shape[1]
    wbase = w.ctypes.data
    xqa = xq.ctypes.data
    for r in range(r0, r1):
        wa = wbase + r * rb
        for j in range(0, n - 3, 4):
            if t == 12 or t == 13 or t == 14:
                dot4_k(t, w, r, wa, rb // (Q6_K_BB if t == 14 else (Q4_K_BB if t == 12 else Q5_K_BB)), xqa + j * k, k,
                       xd, xbs, j, out, col0)
            else:
                bb = Q4_0_BB if t == 2 else (Q4_1_BB if t == 3 else (Q5_0_BB if t == 6 else Q8_0_BB))
                dot4_legacy(t, wa, rb // bb, xqa + j * k, k, xd, xbs, xs, j, out, col0, r)


# ---- drivers ----

@njit(nogil=True, cache=True)
def x_offsets(t, xbs):
    """Q4_0 / Q5_0: per activation block, 8 x i32 lanes (off * sum(q), 0, ..., 0), off = -8 / -16.

    Added to the block's integer dot in one vpaddd, this makes it the dot with (nibble - off).
    """
    n = xbs.shape[0]
    if t != 2 and t != 6:
        return np.zeros((n, 0, 8), np.int32)
    off = -8 if t == 2 else -16
    nb = xbs.shape[1] // 2
    xo = np.zeros((n, nb, 8), np.int32)
    for j in range(n):
        for b in range(nb):
            xo[j, b, 0] = off * (xbs[j, 2 * b] + xbs[j, 2 * b + 1])
    return xo


@njit(nogil=True, cache=True)
def matmul_serial(w, t, x, out, col0, tab):
    check(w, t, x, out, col0)
    xq, xd, xbs, xs = quantize_x(t, x)
    xoff = x_offsets(t, xbs)
    rows(t, w, x, xq, xd, xbs, xs, xoff, out, col0, 0, w.shape[0])


@njit(nogil=True, cache=True, parallel=True)
def matmul_parallel(w, t, x, out, col0, tab):
    check(w, t, x, out, col0)
    xq, xd, xbs, xs = quantize_x(t, x)
    xoff = x_offsets(t, xbs)
    nrows = w.shape[0]
    # numba's static schedule gives each thread one contiguous run of chunks (a sequential
    # stream for the prefetcher); get_num_threads() here would defeat cache=True
    for c in prange((nrows + ROW_CHUNK - 1) // ROW_CHUNK):
        rows(t, w, x, xq, xd, xbs, xs, xoff, out, col0, c * ROW_CHUNK, min(nrows, (c + 1) * ROW_CHUNK))
