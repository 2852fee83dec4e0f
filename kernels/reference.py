"""Raw GGUF blocks (rows, row_bytes) uint8 -> float32 weights (rows, k): the NumPy scalar reference.

Written from `layouts.py` only, independent of the Numba kernels, for tests.  Float32
operations are done in the same order as ggml's dequantize_row_* so results are exact.
Also the reference activation quantizers (q8_0, q8_1, q8_K) and the integer dot they feed.
"""

from __future__ import annotations

import numpy as np

from .layouts import LAYOUTS, QK, QK_K


def _field(blocks: np.ndarray, layout, name: str, nbytes: int | None = None) -> np.ndarray:
    off = layout.offset(name)
    size = dict((f[0], f[2]) for f in layout.fields)[name] if nbytes is None else nbytes
    return blocks[:, off:off + size]


def _half(b: np.ndarray) -> np.ndarray:  # (nb, 2) uint8 -> (nb, 1) f32
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:  # (nb, m) bytes -> (nb, 2m): low nibbles then high nibbles
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K 12 packed bytes -> 6-bit (sc, m), each (nb, 8) int32.

    Sub-blocks 0-3: low 6 bits of bytes 0-3 (sc) and 4-7 (m).  Sub-blocks 4-7: low nibble
    (sc) / high nibble (m) of bytes 8-11, plus the top 2 bits of bytes 0-3 / 4-7 as bits 4-5.
    """
    s = scales.astype(np.int32)
    sc = np.empty((s.shape[0], 8), np.int32)
    m = np.empty((s.shape[0], 8), np.int32)
    sc[:, :4] = s[:, 0:4] & 63
    m[:, :4] = s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)
    m[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc, m


def quant_values(blocks: np.ndarray, ggml_type: int) -> np.ndarray:
    """(nb, block_bytes) -> (nb, block_elems) integer quant q of each weight (before offset/scale)."""
    L = LAYOUTS[ggml_type]
    if L.name in ("Q4_0", "Q4_1"):
        return _nibbles(_field(blocks, L, "qs")).astype(np.int32)
    if L.name == "Q5_0":
        qh = np.ascontiguousarray(_field(blocks, L, "qh")).view("<u4").astype(np.int64)  # (nb, 1)
        hi = (qh >> np.arange(32)) & 1
        return (_nibbles(_field(blocks, L, "qs")) | (hi << 4)).astype(np.int32)
    if L.name == "Q8_0":
        return _field(blocks, L, "qs").view(np.int8).astype(np.int32)
    if L.name in ("Q4_K", "Q5_K"):
        qs = _field(blocks, L, "qs").reshape(-1, 4, 32)  # chunk c: sub-blocks 2c (low), 2c+1 (high)
        q = np.stack([qs & 15, qs >> 4], axis=2).reshape(-1, 256).astype(np.int32)
        if L.name == "Q5_K":
            qh = _field(blocks, L, "qh").astype(np.int32)  # (nb, 32)
            q |= (((qh[:, None, :] >> np.arange(8)[None, :, None]) & 1) << 4).reshape(-1, 256)
        return q
    if L.name == "Q6_K":
        ql = _field(blocks, L, "ql").astype(np.int32).reshape(-1, 2, 64)
        qh = _field(blocks, L, "qh").astype(np.int32).reshape(-1, 2, 32)
        r = np.arange(128)
        lo = (ql[:, :, r % 64] >> (4 * (r // 64))) & 15
        hi = (qh[:, :, r % 32] >> (2 * (r // 32))) & 3
        return (lo | (hi << 4)).reshape(-1, 256)
    raise KeyError(f"no quant values for {L.name}")


def dequantize(raw: np.ndarray, ggml_type: int) -> np.ndarray:
    """(rows, row_bytes) uint8 raw GGUF blocks -> (rows, k) float32, exact as ggml."""
    if ggml_type not in LAYOUTS:
        raise KeyError(f"GGML type {ggml_type} is not supported; supported: {sorted(LAYOUTS)}")
    L = LAYOUTS[ggml_type]
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    rows = raw.shape[0]
    if raw.shape[1] % L.block_bytes:
        raise ValueError(f"{L.name}: row of {raw.shape[1]} bytes is not a whole number of {L.block_bytes}-byte blocks")
    if L.name == "F32":
        return raw.view(np.float32).reshape(rows, -1).copy()
    if L.name == "F16":
        return raw.view(np.float16).astype(np.float32).reshape(rows, -1)
    blocks = raw.reshape(-1, L.block_bytes)
    q = quant_values(blocks, ggml_type).astype(np.float32)
    if L.name in ("Q4_0", "Q5_0", "Q8_0"):
        off = {"Q4_0": 8, "Q5_0": 16, "Q8_0": 0}[L.name]
        out = _half(_field(blocks, L, "d")) * (q - np.float32(off))
    elif L.name == "Q4_1":
        out = _half(_field(blocks, L, "d")) * q + _half(_field(blocks, L, "m"))
    elif L.name in ("Q4_K", "Q5_K"):
        sc, m = k_scales(_field(blocks, L, "scales"))
        d = (_half(_field(blocks, L, "d")) * sc.astype(np.float32))[:, :, None]  # (nb, 8, 1)
        dm = (_half(_field(blocks, L, "dmin")) * m.astype(np.float32))[:, :, None]
        out = d * q.reshape(-1, 8, 32) - dm
    elif L.name == "Q6_K":
        sc = _field(blocks, L, "scales").view(np.int8).astype(np.float32)  # (nb, 16)
        d = (_half(_field(blocks, L, "d")) * sc)[:, :, None]
        out = d * (q - np.float32(32)).reshape(-1, 16, 16)
    else:
        raise KeyError(L.name)
    return out.reshape(rows, -1).astype(np.float32)


# ---- activations: the integer forms llama.cpp's vec_dot functions consume ----

def _f16round(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16).astype(np.float32)


def quantize_q8_32(x: np.ndarray):
    """(n, k) f32 -> q (n, k) int8, d (n, k/32) f32 (f16-rounded), s (n, k/32) f32 = f16(d*sum(q)).

    As llama.cpp's AVX2 quantize_row_q8_0/q8_1: d = max|x|/127, q = rint(x * 127/max|x|).
    """
    n, k = x.shape
    xb = x.reshape(n, k // QK, QK).astype(np.float32)
    amax = np.abs(xb).max(axis=2)
    d = amax / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.rint(xb * inv[:, :, None]).astype(np.int32)
    s = _f16round(d * q.sum(axis=2).astype(np.float32))
    return q.reshape(n, k).astype(np.int8), _f16round(d), s


def quantize_q8_k(x: np.ndarray):
    """(n, k) f32 -> q (n, k) int8, d (n, k/256) f32, bsums (n, k/16) int32, as quantize_row_q8_K_ref."""
    n, k = x.shape
    xb = x.reshape(n, k // QK_K, QK_K).astype(np.float32)
    idx = np.abs(xb).argmax(axis=2)
    mx = np.take_along_axis(xb, idx[:, :, None], axis=2)[:, :, 0]
    with np.errstate(divide="ignore"):
        iscale = np.where(mx != 0, np.float32(-127) / mx, np.float32(0)).astype(np.float32)
    q = np.minimum(np.rint(xb * iscale[:, :, None]), 127).astype(np.int32)
    with np.errstate(divide="ignore"):
        d = np.where(iscale != 0, np.float32(1) / iscale, np.float32(0)).astype(np.float32)
    bsums = q.reshape(n, k // 16, 16).sum(axis=2)
    return q.reshape(n, k).astype(np.int8), d, bsums
