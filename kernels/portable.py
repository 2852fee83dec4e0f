"""Raw GGUF rows x float32 activations -> float32 outputs, in plain @njit (any CPU).

The integer math is llama.cpp's: activations become int8 blocks (actq.py), each weight
block gives an exact integer dot with its activation block, and float32 only enters as
(weight scale * activation scale) * integer sum.  The AVX2 backend (avx2.py) does the same
integers with explicit SIMD; this module is the fallback and the arbiter in tests.

f16 fields are read through a 65536-entry f16 -> f32 table (Numba has no float16 on CPU).
"""

from __future__ import annotations

import numpy as np
from numba import carray, njit, prange

from .actq import f16round_inplace, quantize_q8_32, quantize_q8_k
from .simd import fma32, u8_ptr
from .layouts import LAYOUTS, QK, QK_K

ROW_CHUNK = 16  # rows per parallel work item

F16_TO_F32 = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)  # (65536,)

# byte offsets, from the layouts (kernels never hard-code them)
Q4_0_BB, Q4_0_D, Q4_0_QS = LAYOUTS[2].block_bytes, LAYOUTS[2].offset("d"), LAYOUTS[2].offset("qs")
Q4_1_BB, Q4_1_D, Q4_1_M, Q4_1_QS = LAYOUTS[3].block_bytes, LAYOUTS[3].offset("d"), LAYOUTS[3].offset("m"), LAYOUTS[3].offset("qs")
Q5_0_BB, Q5_0_D, Q5_0_QH, Q5_0_QS = LAYOUTS[6].block_bytes, LAYOUTS[6].offset("d"), LAYOUTS[6].offset("qh"), LAYOUTS[6].offset("qs")
Q8_0_BB, Q8_0_D, Q8_0_QS = LAYOUTS[8].block_bytes, LAYOUTS[8].offset("d"), LAYOUTS[8].offset("qs")
Q4_K_BB, Q4_K_D, Q4_K_DMIN, Q4_K_SC, Q4_K_QS = (LAYOUTS[12].block_bytes, LAYOUTS[12].offset("d"), LAYOUTS[12].offset("dmin"),
                                               LAYOUTS[12].offset("scales"), LAYOUTS[12].offset("qs"))
Q5_K_BB, Q5_K_D, Q5_K_DMIN, Q5_K_SC, Q5_K_QH, Q5_K_QS = (LAYOUTS[13].block_bytes, LAYOUTS[13].offset("d"), LAYOUTS[13].offset("dmin"),
                                                        LAYOUTS[13].offset("scales"), LAYOUTS[13].offset("qh"), LAYOUTS[13].offset("qs"))
Q6_K_BB, Q6_K_QL, Q6_K_QH, Q6_K_SC, Q6_K_D = (LAYOUTS[14].block_bytes, LAYOUTS[14].offset("ql"), LAYOUTS[14].offset("qh"),
                                             LAYOUTS[14].offset("scales"), LAYOUTS[14].offset("d"))


@njit(nogil=True, cache=True, inline="always")
def half(w, r, o, tab):
    return tab[np.int32(w[r, o]) | (np.int32(w[r, o + 1]) << 8)]


@njit(nogil=True, cache=True, inline="always")
def k_scale_min(w, r, o, i):
    """Q4_K/Q5_K: 6-bit (scale, min) of sub-block i from the 12 bytes at w[r, o:o+12] (ggml get_scale_min_k4)."""
    if i < 4:
        return np.int32(w[r, o + i]) & 63, np.int32(w[r, o + i + 4]) & 63
    sc = (np.int32(w[r, o + i + 4]) & 15) | ((np.int32(w[r, o + i - 4]) >> 6) << 4)
    m = (np.int32(w[r, o + i + 4]) >> 4) | ((np.int32(w[r, o + i]) >> 6) << 4)
    return sc, m


@njit(nogil=True, cache=True, inline="always")
def i8(v):
    return np.int32(v) - 256 if v > 127 else np.int32(v)


# ---- one output per (row, column): integer block dots, float32 accumulation ----
# The float order is llama.cpp's AVX2 one (ggml_vec_dot_*_q8_* / tinyBLAS), emulated lane by lane
# so that both backends give the same bits: 8 float32 lane accumulators, per block
# lane[l] = fma(d_w * d_x, float(int32 sum of the products of elements 4l..4l+3), lane[l]) in
# block order, then ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7)).  fma32 rounds once (llvm.fma.f32).


@njit(nogil=True, cache=True, inline="always")
def hsum8(a):
    """llama.cpp's hsum_float_8 order."""
    return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))


@njit(nogil=True, cache=True, inline="always")
def fma_lanes(acc, d, lanes):
    for l in range(8):
        acc[l] = fma32(d, np.float32(lanes[l]), acc[l])


@njit(nogil=True, cache=True)
def rows_q4_0(w, xq, xd, xbs, out, col0, r0, r1, tab):
    n = xq.shape[0]
    nb = w.shape[1] // Q4_0_BB
    acc = np.empty(8, np.float32)
    lanes = np.empty(8, np.int32)
    for r in range(r0, r1):
        for j in range(n):
            acc[:] = 0
            for b in range(nb):
                o = b * Q4_0_BB
                e = b * QK
                lanes[:] = 0
                for i in range(16):
                    v = np.int32(w[r, o + Q4_0_QS + i])
                    lanes[i // 4] += ((v & 15) - 8) * np.int32(xq[j, e + i])
                    lanes[4 + i // 4] += ((v >> 4) - 8) * np.int32(xq[j, e + 16 + i])
                fma_lanes(acc, half(w, r, o + Q4_0_D, tab) * xd[j, b], lanes)
            out[j, col0 + r] = hsum8(acc)


@njit(nogil=True, cache=True)
def rows_q4_1(w, xq, xd, xs, out, col0, r0, r1, tab):
    """As Q4_0 with unsigned nibbles, plus llama.cpp's scalar summs = fma(m, s_x, summs) added last."""
    n = xq.shape[0]
    nb = w.shape[1] // Q4_1_BB
    acc = np.empty(8, np.float32)
    lanes = np.empty(8, np.int32)
    for r in range(r0, r1):
        for j in range(n):
            acc[:] = 0
            summs = np.float32(0.0)
            for b in range(nb):
                o = b * Q4_1_BB
                e = b * QK
                lanes[:] = 0
                for i in range(16):
                    v = np.int32(w[r, o + Q4_1_QS + i])
                    lanes[i // 4] += (v & 15) * np.int32(xq[j, e + i])
                    lanes[4 + i // 4] += (v >> 4) * np.int32(xq[j, e + 16 + i])
                summs = fma32(half(w, r, o + Q4_1_M, tab), xs[j, b], summs)
                fma_lanes(acc, half(w, r, o + Q4_1_D, tab) * xd[j, b], lanes)
            out[j, col0 + r] = hsum8(acc) + summs


@njit(nogil=True, cache=True)
def rows_q5_0(w, xq, xd, xbs, out, col0, r0, r1, tab):
    n = xq.shape[0]
    nb = w.shape[1] // Q5_0_BB
    acc = np.empty(8, np.float32)
    lanes = np.empty(8, np.int32)
    for r in range(r0, r1):
        for j in range(n):
            acc[:] = 0
            for b in range(nb):
                o = b * Q5_0_BB
                e = b * QK
                qh = (np.int64(w[r, o + Q5_0_QH]) | (np.int64(w[r, o + Q5_0_QH + 1]) << 8)
                      | (np.int64(w[r, o + Q5_0_QH + 2]) << 16) | (np.int64(w[r, o + Q5_0_QH + 3]) << 24))
                lanes[:] = 0
                for i in range(16):
                    v = np.int32(w[r, o + Q5_0_QS + i])
                    lo = (v & 15) | np.int32(((qh >> i) & 1) << 4)
                    hi = (v >> 4) | np.int32(((qh >> (i + 16)) & 1) << 4)
                    lanes[i // 4] += (lo - 16) * np.int32(xq[j, e + i])
                    lanes[4 + i // 4] += (hi - 16) * np.int32(xq[j, e + 16 + i])
                fma_lanes(acc, half(w, r, o + Q5_0_D, tab) * xd[j, b], lanes)
            out[j, col0 + r] = hsum8(acc)


@njit(nogil=True, cache=True)
def rows_q8_0(w, xq, xd, xbs, out, col0, r0, r1, tab):
    n = xq.shape[0]
    nb = w.shape[1] // Q8_0_BB
    acc = np.empty(8, np.float32)
    lanes = np.empty(8, np.int32)
    for r in range(r0, r1):
        for j in range(n):
            acc[:] = 0
            for b in range(nb):
                o = b * Q8_0_BB
                e = b * QK
                lanes[:] = 0
                for i in range(QK):
                    lanes[i // 4] += i8(w[r, o + Q8_0_QS + i]) * np.int32(xq[j, e + i])
                fma_lanes(acc, half(w, r, o + Q8_0_D, tab) * xd[j, b], lanes)
            out[j, col0 + r] = hsum8(acc)


@njit(nogil=True, cache=True)
def rows_q45_k(w, xq, xd, xbs, out, col0, r0, r1, tab, five):
    """Q4_K (five=False) / Q5_K (five=True), llama.cpp's order: acc (8 lanes) += d float(lanes of
    sc-weighted sums); the mins -dmin * sum(m * bsum pairs): Q4_K in 4 lanes (lane p: sub-blocks
    2p, 2p+1) reduced (m0+m2)+(m1+m3), Q5_K as a scalar fma chain; result hsum8(acc) + mins."""
    n = xq.shape[0]
    bb = Q5_K_BB if five else Q4_K_BB
    od, odm, osc, oqs = (Q5_K_D, Q5_K_DMIN, Q5_K_SC, Q5_K_QS) if five else (Q4_K_D, Q4_K_DMIN, Q4_K_SC, Q4_K_QS)
    nb = w.shape[1] // bb
    acc = np.empty(8, np.float32)
    accm = np.empty(4, np.float32)
    lanes = np.empty(8, np.int32)
    mlanes = np.empty(4, np.int32)
    for r in range(r0, r1):
        for j in range(n):
            acc[:] = 0
            accm[:] = 0
            summs = np.float32(0.0)
            for b in range(nb):
                o = b * bb
                e = b * QK_K
                lanes[:] = 0
                mlanes[:] = 0
                for i in range(8):
                    sc, m = k_scale_min(w, r, o + osc, i)
                    qo = o + oqs + 32 * (i // 2)
                    sh = 4 * (i & 1)
                    for l in range(32):
                        q = (np.int32(w[r, qo + l]) >> sh) & 15
                        if five:
                            q |= ((np.int32(w[r, o + Q5_K_QH + l]) >> i) & 1) << 4
                        lanes[l // 4] += sc * q * np.int32(xq[j, e + 32 * i + l])
                    mlanes[i // 2] += m * (xbs[j, b * 16 + 2 * i] + xbs[j, b * 16 + 2 * i + 1])
                dx = xd[j, b]
                fma_lanes(acc, half(w, r, o + od, tab) * dx, lanes)
                dmin = -(half(w, r, o + odm, tab) * dx)
                if five:
                    summs = fma32(np.float32(mlanes[0] + mlanes[1] + mlanes[2] + mlanes[3]), dmin, summs)
                else:
                    for p in range(4):
                        accm[p] = fma32(dmin, np.float32(mlanes[p]), accm[p])
            if five:
                out[j, col0 + r] = hsum8(acc) + summs
            else:
                out[j, col0 + r] = hsum8(acc) + ((accm[0] + accm[2]) + (accm[1] + accm[3]))


@njit(nogil=True, cache=True)
def rows_q6_k(w, xq, xd, xbs, out, col0, r0, r1, tab):
    n = xq.shape[0]
    nb = w.shape[1] // Q6_K_BB
    acc = np.empty(8, np.float32)
    lanes = np.empty(8, np.int32)
    for r in range(r0, r1):
        for j in range(n):
            acc[:] = 0
            for b in range(nb):
                o = b * Q6_K_BB
                e = b * QK_K
                lanes[:] = 0
                for g in range(16):  # 16 groups of 16 weights, one int8 scale each
                    sc = i8(w[r, o + Q6_K_SC + g])
                    for i in range(16):
                        rr = (16 * g + i) % 128
                        h = (16 * g + i) // 128
                        lo = (np.int32(w[r, o + Q6_K_QL + 64 * h + rr % 64]) >> (4 * (rr // 64))) & 15
                        hi = (np.int32(w[r, o + Q6_K_QH + 32 * h + rr % 32]) >> (2 * (rr // 32))) & 3
                        lanes[((16 * g + i) % 32) // 4] += sc * (lo | (hi << 4)) * np.int32(xq[j, e + 16 * g + i])
                    # llama.cpp's -32 offset: lane l loses 32 * sc * bsum of groups 2l and 2l + 1
                    lanes[g // 2] -= 32 * sc * xbs[j, b * 16 + g]
                fma_lanes(acc, half(w, r, o + Q6_K_D, tab) * xd[j, b], lanes)
            out[j, col0 + r] = hsum8(acc)


@njit(nogil=True, cache=True)
def rows_f32(w, x, out, col0, r0, r1):
    """llama.cpp's tinyBLAS order: lane i % 8 accumulates element i by fma, hsum8; a k % 8 tail by scalar fma."""
    n, k = x.shape
    k8 = k - k % 8
    wf = w.view(np.float32)  # (rows, k)
    acc = np.empty(8, np.float32)
    for r in range(r0, r1):
        for j in range(n):
            acc[:] = 0
            for i in range(0, k8, 8):
                for l in range(8):
                    acc[l] = fma32(wf[r, i + l], x[j, i + l], acc[l])
            s = hsum8(acc)
            for i in range(k8, k):
                s = fma32(wf[r, i], x[j, i], s)
            out[j, col0 + r] = s


@njit(nogil=True, cache=True)
def rows_f16(w, x, out, col0, r0, r1, tab):
    """As rows_f32; x must already be rounded to f16 values (llama.cpp converts it to f16)."""
    n, k = x.shape
    k8 = k - k % 8
    wh = w.view(np.uint16)  # (rows, k)
    acc = np.empty(8, np.float32)
    for r in range(r0, r1):
        for j in range(n):
            acc[:] = 0
            for i in range(0, k8, 8):
                for l in range(8):
                    acc[l] = fma32(tab[wh[r, i + l]], x[j, i + l], acc[l])
            s = hsum8(acc)
            for i in range(k8, k):
                s = fma32(tab[wh[r, i]], x[j, i], s)
            out[j, col0 + r] = s


# ---- drivers: check shapes, quantize x once, then split rows over threads ----

_ELEMS = np.array([LAYOUTS[t].block_elems if t in LAYOUTS else 0 for t in range(16)], np.int64)
_BYTES = np.array([LAYOUTS[t].block_bytes if t in LAYOUTS else 0 for t in range(16)], np.int64)


@njit(nogil=True, cache=True)
def check(w, t, x, out, col0):
    """Raise unless w (rows, row_bytes), x (n, k), out (n, >= col0 + rows) fit type t and are C-contiguous."""
    if t < 0 or t >= 16 or _BYTES[t] == 0:
        raise ValueError("matmul: unsupported GGML type")
    if w.shape[1] % _BYTES[t] != 0 or w.shape[1] // _BYTES[t] * _ELEMS[t] != x.shape[1]:
        raise ValueError("matmul: w row bytes do not match x's row length k for this type")
    if out.shape[0] != x.shape[0] or col0 < 0 or col0 + w.shape[0] > out.shape[1]:
        raise ValueError("matmul: out must be (n, >= out_col0 + rows)")
    if (w.strides[1] != 1 or w.strides[0] != w.shape[1] or x.strides[1] != 4 or x.strides[0] != 4 * x.shape[1]
            or out.strides[1] != 4 or out.strides[0] != 4 * out.shape[1]):
        raise ValueError("matmul: w, x and out must be C-contiguous")


@njit(nogil=True, cache=True)
def quantize_x(t, x):
    """The activation blocks weight type t consumes: (q, d, bsums, s); s is unused except by Q4_1."""
    if t == 12 or t == 13 or t == 14:
        q, d, bs = quantize_q8_k(x)
        return q, d, bs, d
    if t == 0 or t == 1:  # float weights take x as it is
        return np.empty((0, 0), np.int8), np.empty((0, 0), np.float32), np.empty((0, 0), np.int32), np.empty((0, 0), np.float32)
    return quantize_q8_32(x)


@njit(nogil=True, cache=True)
def rows(t, w, x, xq, xd, xbs, xs, out, col0, r0, r1, tab):
    if t == 2:
        rows_q4_0(w, xq, xd, xbs, out, col0, r0, r1, tab)
    elif t == 3:
        rows_q4_1(w, xq, xd, xs, out, col0, r0, r1, tab)
    elif t == 6:
        rows_q5_0(w, xq, xd, xbs, out, col0, r0, r1, tab)
    elif t == 8:
        rows_q8_0(w, xq, xd, xbs, out, col0, r0, r1, tab)
    elif t == 12:
        rows_q45_k(w, xq, xd, xbs, out, col0, r0, r1, tab, False)
    elif t == 13:
        rows_q45_k(w, xq, xd, xbs, out, col0, r0, r1, tab, True)
    elif t == 14:
        rows_q6_k(w, xq, xd, xbs, out, col0, r0, r1, tab)
    elif t == 0:
        rows_f32(w, x, out, col0, r0, r1)
    elif t == 1:
        rows_f16(w, x, out, col0, r0, r1, tab)


@njit(nogil=True, cache=True)
def prepare_x(t, x):
    """x (n, k) f32 -> x as the rows read it (llama.cpp rounds x to f16 for F16 weights: a rounded copy) and
    quantize_x's (xq, xd, xbs, xs), from x as it came."""
    xq, xd, xbs, xs = quantize_x(t, x)
    if t == 1:
        x = x.copy()
        f16round_inplace(x)
    return x, xq, xd, xbs, xs


@njit(nogil=True, cache=True)
def matmul_serial(w, t, x, out, col0, tab):
    check(w, t, x, out, col0)
    x, xq, xd, xbs, xs = prepare_x(t, x)
    rows(t, w, x, xq, xd, xbs, xs, out, col0, 0, w.shape[0], tab)


@njit(nogil=True, cache=True, parallel=True)
def matmul_parallel(w, t, x, out, col0, tab):
    check(w, t, x, out, col0)
    x, xq, xd, xbs, xs = prepare_x(t, x)
    nrows = w.shape[0]
    # numba's static schedule gives each thread one contiguous run of chunks (a sequential
    # stream for the prefetcher); get_num_threads() here would defeat cache=True
    for c in prange((nrows + ROW_CHUNK - 1) // ROW_CHUNK):
        rows(t, w, x, xq, xd, xbs, xs, out, col0, c * ROW_CHUNK, min(nrows, (c + 1) * ROW_CHUNK), tab)


# Parts of a matrix per job in matmul_many: each job gathers its rows of x once (the avx2 backend's x_groups,
# x_sums16), so a matrix is cut in a few parts, enough to keep both threads busy with 1 matrix.
MANY_PARTS = 4


@njit(nogil=True, cache=True, inline="always")
def many_job(job, nrows, spans):
    """matmul_many's job -> (matrix e, its rows a:b of x, its weight rows r0:r1); nothing to do unless a < b, r0 < r1."""
    part = (nrows + MANY_PARTS - 1) // MANY_PARTS
    e = job // MANY_PARTS
    r0 = min(nrows, (job - e * MANY_PARTS) * part)
    return e, spans[e], spans[e + 1], r0, min(nrows, r0 + part)


@njit(nogil=True, cache=True, parallel=True)
def matmul_many(addrs, nrows, rb, t, x, spans, out, tab):
    """Several weight matrices of one shape (nrows, rb bytes) of type t, at the addresses addrs:
    matrix e times rows spans[e]:spans[e+1] of x -> the same rows of out[:, :nrows] (avx2.matmul_many)."""
    x, xq, xd, xbs, xs = prepare_x(t, x)
    for job in prange(addrs.shape[0] * MANY_PARTS):
        e, a, b, r0, r1 = many_job(job, nrows, spans)
        if a < b and r0 < r1:
            w = carray(u8_ptr(addrs[e]), (nrows, rb))
            rows(t, w, x[a:b], xq[a:b], xd[a:b], xbs[a:b], xs[a:b], out[a:b], 0, r0, r1, tab)
