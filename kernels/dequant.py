"""Raw GGUF rows (rows, row_bytes) uint8 + row ids -> float32 rows: the embedding lookup.

Float32 operations in ggml's order (e.g. Q4_K: (d * sc) * q - (dmin * m)), so the output is
bit-identical to gguf.quants.dequantize and reference.dequantize.  Not on the hot path:
one call per token for a handful of rows.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .layouts import QK, QK_K
from .portable import (
    Q4_0_BB, Q4_0_D, Q4_0_QS, Q4_1_BB, Q4_1_D, Q4_1_M, Q4_1_QS, Q4_K_BB, Q4_K_D, Q4_K_DMIN, Q4_K_QS, Q4_K_SC,
    Q5_0_BB, Q5_0_D, Q5_0_QH, Q5_0_QS, Q5_K_BB, Q5_K_D, Q5_K_DMIN, Q5_K_QH, Q5_K_QS, Q5_K_SC, Q6_K_BB, Q6_K_D,
    Q6_K_QH, Q6_K_QL, Q6_K_SC, Q8_0_BB, Q8_0_D, Q8_0_QS, half, i8, k_scale_min,
)


@njit(nogil=True, cache=True)
def dequantize_rows(w, t, row_ids, out, tab):
    """out[i, :k] = row row_ids[i] of w (type t) as float32."""
    for ii in range(row_ids.shape[0]):
        r = row_ids[ii]
        if t == 0:
            wf = w.view(np.float32)
            for e in range(out.shape[1]):
                out[ii, e] = wf[r, e]
        elif t == 1:
            wh = w.view(np.uint16)
            for e in range(out.shape[1]):
                out[ii, e] = tab[wh[r, e]]
        elif t == 2:
            for b in range(w.shape[1] // Q4_0_BB):
                o = b * Q4_0_BB
                d = half(w, r, o + Q4_0_D, tab)
                for i in range(16):
                    v = np.int32(w[r, o + Q4_0_QS + i])
                    out[ii, b * QK + i] = d * np.float32((v & 15) - 8)
                    out[ii, b * QK + 16 + i] = d * np.float32((v >> 4) - 8)
        elif t == 3:
            for b in range(w.shape[1] // Q4_1_BB):
                o = b * Q4_1_BB
                d = half(w, r, o + Q4_1_D, tab)
                m = half(w, r, o + Q4_1_M, tab)
                for i in range(16):
                    v = np.int32(w[r, o + Q4_1_QS + i])
                    out[ii, b * QK + i] = d * np.float32(v & 15) + m
                    out[ii, b * QK + 16 + i] = d * np.float32(v >> 4) + m
        elif t == 6:
            for b in range(w.shape[1] // Q5_0_BB):
                o = b * Q5_0_BB
                d = half(w, r, o + Q5_0_D, tab)
                qh = (np.int64(w[r, o + Q5_0_QH]) | (np.int64(w[r, o + Q5_0_QH + 1]) << 8)
                      | (np.int64(w[r, o + Q5_0_QH + 2]) << 16) | (np.int64(w[r, o + Q5_0_QH + 3]) << 24))
                for i in range(16):
                    v = np.int64(w[r, o + Q5_0_QS + i])
                    out[ii, b * QK + i] = d * np.float32(((v & 15) | (((qh >> i) & 1) << 4)) - 16)
                    out[ii, b * QK + 16 + i] = d * np.float32(((v >> 4) | (((qh >> (i + 16)) & 1) << 4)) - 16)
        elif t == 8:
            for b in range(w.shape[1] // Q8_0_BB):
                o = b * Q8_0_BB
                d = half(w, r, o + Q8_0_D, tab)
                for i in range(QK):
                    out[ii, b * QK + i] = np.float32(i8(w[r, o + Q8_0_QS + i])) * d
        elif t == 12 or t == 13:
            bb = Q4_K_BB if t == 12 else Q5_K_BB
            for b in range(w.shape[1] // bb):
                o = b * bb
                d = half(w, r, o + (Q4_K_D if t == 12 else Q5_K_D), tab)
                dmin = half(w, r, o + (Q4_K_DMIN if t == 12 else Q5_K_DMIN), tab)
                for i in range(8):
                    sc, m = k_scale_min(w, r, o + (Q4_K_SC if t == 12 else Q5_K_SC), i)
                    ds = d * np.float32(sc)
                    dm = dmin * np.float32(m)
                    qo = o + (Q4_K_QS if t == 12 else Q5_K_QS) + 32 * (i // 2)
                    sh = 4 * (i & 1)
                    for l in range(32):
                        q = (np.int32(w[r, qo + l]) >> sh) & 15
                        if t == 13:
                            q |= ((np.int32(w[r, o + Q5_K_QH + l]) >> i) & 1) << 4
                        out[ii, b * QK_K + 32 * i + l] = ds * np.float32(q) - dm
        elif t == 14:
            for b in range(w.shape[1] // Q6_K_BB):
                o = b * Q6_K_BB
                d = half(w, r, o + Q6_K_D, tab)
                for e in range(QK_K):
                    h = e // 128
                    rr = e % 128
                    lo = (np.int32(w[r, o + Q6_K_QL + 64 * h + rr % 64]) >> (4 * (rr // 64))) & 15
                    hi = (np.int32(w[r, o + Q6_K_QH + 32 * h + rr % 32]) >> (2 * (rr // 32))) & 3
                    ds = d * np.float32(i8(w[r, o + Q6_K_SC + e // 16]))
                    out[ii, b * QK_K + e] = ds * np.float32((lo | (hi << 4)) - 32)
