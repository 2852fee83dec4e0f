"""Float32 activations x (n, k) -> int8 blocks + scales: what the integer block dots consume.

Both backends call these, so they do the same integer math.  They mirror llama.cpp:
- q8_0 / q8_1 (legacy weight types): blocks of 32, d = max|x| / 127 stored f16-rounded,
  q = rint(x * 127 / max|x|); q8_1 adds s = f16(d * sum(q)) for Q4_1's min term.
- q8_K (K-quant weight types): blocks of 256, iscale = -127 / x[argmax|x|], q = min(127, rint(iscale * x)),
  d = 1 / iscale (float32), plus integer sums of every 16 q's (`bsums`) for the min/offset terms.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .layouts import QK, QK_K

# (v + 1.5 * 2**23) - 1.5 * 2**23 rounds a float32 |v| < 2**22 to the nearest integer, ties to
# even, as vroundps / llama.cpp's nearest_int; inline, unlike a libm rint call per element.
RNE = np.float32(12582912.0)


@njit(nogil=True, cache=True)
def f16round_inplace(a):
    """Round every float32 of a (C-contiguous) to the nearest-even IEEE half, kept as float32.

    What F16C's vcvtps2ph does, written with integer ops on the bits so it runs on any CPU
    (a libm frexp/ldexp version cost 6 calls per block, most of quantize_q8_32's time).
    """
    f = a.reshape(-1)
    u = f.view(np.uint32)
    for i in range(u.shape[0]):
        x = u[i]
        ax = x & np.uint32(0x7FFFFFFF)
        if ax >= np.uint32(0x7F800000):  # inf / nan stay
            continue
        if ax >= np.uint32(0x38800000):  # >= 2**-14: a normal half keeps 10 of the 23 mantissa bits
            r = (ax + np.uint32(0x0FFF) + ((ax >> np.uint32(13)) & np.uint32(1))) & np.uint32(0xFFFFE000)
            if r > np.uint32(0x477FE000):  # past 65504
                r = np.uint32(0x7F800000)
            u[i] = (x & np.uint32(0x80000000)) | r
        else:  # half subnormals are multiples of 2**-24 (exact float32 arithmetic)
            v = np.float32(np.rint(abs(f[i]) * np.float32(16777216.0))) * np.float32(5.9604644775390625e-08)
            f[i] = v if f[i] >= 0 else -v


@njit(nogil=True, cache=True)
def quantize_q8_32(x):
    """x (n, k) f32 -> q (n, k) int8, d (n, k/32) f32, bs (n, k/16) int32 sums of 16 q's, s (n, k/32) f32."""
    n, k = x.shape
    nb = k // QK
    q = np.empty((n, k), np.int8)
    d = np.empty((n, nb), np.float32)
    bs = np.empty((n, k // 16), np.int32)
    s = np.empty((n, nb), np.float32)
    for j in range(n):
        xr = x[j]
        qr = q[j]
        for b in range(nb):
            xb = xr[b * QK:(b + 1) * QK]
            qb = qr[b * QK:(b + 1) * QK]
            amax = np.float32(0.0)
            for i in range(QK):
                amax = max(amax, abs(xb[i]))
            db = amax / np.float32(127.0)
            inv = np.float32(127.0) / amax if amax != 0 else np.float32(0.0)
            s0 = 0
            for i in range(16):
                v = np.int32((xb[i] * inv + RNE) - RNE)
                qb[i] = v
                s0 += v
            s1 = 0
            for i in range(16, QK):
                v = np.int32((xb[i] * inv + RNE) - RNE)
                qb[i] = v
                s1 += v
            bs[j, 2 * b] = s0
            bs[j, 2 * b + 1] = s1
            d[j, b] = db
            s[j, b] = db * np.float32(s0 + s1)
    f16round_inplace(d)  # llama.cpp stores both as f16
    f16round_inplace(s)
    return q, d, bs, s


@njit(nogil=True, cache=True)
def quantize_q8_k(x):
    """x (n, k) f32 -> q (n, k) int8, d (n, k/256) f32, bs (n, k/16) int32 sums of 16 q's."""
    n, k = x.shape
    nb = k // QK_K
    q = np.empty((n, k), np.int8)
    d = np.empty((n, nb), np.float32)
    bs = np.empty((n, k // 16), np.int32)
    for j in range(n):
        for b in range(nb):
            o = b * QK_K
            amax = np.float32(0.0)
            mx = np.float32(0.0)
            for i in range(QK_K):
                a = abs(x[j, o + i])
                if a > amax:
                    amax = a
                    mx = x[j, o + i]
            if amax == 0:
                d[j, b] = 0.0
                for i in range(QK_K):
                    q[j, o + i] = 0
                for g in range(16):
                    bs[j, b * 16 + g] = 0
                continue
            iscale = np.float32(-127.0) / mx
            for g in range(16):
                sg = 0
                for i in range(16):
                    v = np.int32((iscale * x[j, o + 16 * g + i] + RNE) - RNE)
                    if v > 127:
                        v = 127
                    q[j, o + 16 * g + i] = v
                    sg += v
                bs[j, b * 16 + g] = sg
            d[j, b] = np.float32(1.0) / iscale
    return q, d, bs
