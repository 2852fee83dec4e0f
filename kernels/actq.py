"""Float32 activations x (n, k) -> int8 blocks + scales: what the integer block dots consume.

Both backends call these, so they do the same integer math.  They mirror llama.cpp:
- q8_0 / q8_1 (legacy weight types): blocks of 32, d = max|x| / 127 stored f16-rounded,
  q = rint(x * 127 / max|x|); q8_1 adds s = f16(d * sum(q)) for Q4_1's min term.
- q8_K (K-quant weight types): blocks of 256, iscale = -127 / x[argmax|x|], q = min(127, rint(iscale * x)),
  d = 1 / iscale (float32), plus integer sums of every 16 q's (`bsums`) for the min/offset terms.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from .layouts import QK, QK_K


@njit(nogil=True, cache=True, inline="always")
def f16round(v):
    """float32 -> the float32 value of its nearest-even IEEE half (as F16C's vcvtps2ph)."""
    a = abs(np.float64(v))
    if a == 0.0 or not math.isfinite(a):
        return np.float32(v)
    _, e = math.frexp(a)  # a = m * 2**e, 0.5 <= m < 1; a half keeps 11 significant bits
    qe = e - 11
    if qe < -24:  # half subnormals are multiples of 2**-24
        qe = -24
    r = math.ldexp(np.rint(math.ldexp(a, -qe)), qe)
    if r > 65504.0:
        r = np.inf
    return np.float32(r if v > 0 else -r)


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
        for b in range(nb):
            o = b * QK
            amax = np.float32(0.0)
            for i in range(QK):
                a = abs(x[j, o + i])
                if a > amax:
                    amax = a
            db = amax / np.float32(127.0)
            inv = np.float32(127.0) / amax if amax != 0 else np.float32(0.0)
            s0 = 0
            s1 = 0
            for i in range(16):
                v = np.int32(np.rint(x[j, o + i] * inv))
                q[j, o + i] = v
                s0 += v
            for i in range(16, QK):
                v = np.int32(np.rint(x[j, o + i] * inv))
                q[j, o + i] = v
                s1 += v
            bs[j, 2 * b] = s0
            bs[j, 2 * b + 1] = s1
            d[j, b] = f16round(db)
            s[j, b] = f16round(db * np.float32(s0 + s1))
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
                    v = np.int32(np.rint(iscale * x[j, o + 16 * g + i]))
                    if v > 127:
                        v = 127
                    q[j, o + 16 * g + i] = v
                    sg += v
                bs[j, b * 16 + g] = sg
            d[j, b] = np.float32(1.0) / iscale
    return q, d, bs
