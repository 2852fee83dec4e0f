"""Raw GGUF weight blocks x float32 activations -> float32 outputs: flexio's quantized matrix kernels.

A leaf package (imports nothing from flexio).  Modules, in the order data moves:
  layouts.py   GGML type id -> block byte map (LAYOUTS)
  reference.py NumPy scalar reference: dequantize, activation quantizers (tests only)
  actq.py      x -> int8 blocks + scales, as llama.cpp's q8_0 / q8_1 / q8_K
  portable.py  plain @njit integer block dots (any CPU)
  simd.py      LLVM vector IR intrinsics (AVX2 vpmaddubsw / vpmaddwd, vcvtph2ps)
  avx2.py      the same integer math with those intrinsics
  dequant.py   dequantize_rows (embedding lookup), exact

The backend is chosen at import from the CPU's features ("avx2" needs AVX2 + FMA + F16C);
FLEXIO_KERNELS=portable forces the plain path.  Kernels compile lazily on first use per
type and are cached on disk (cache=True).
"""

from __future__ import annotations

import os

import numpy as np

from . import portable, reference
from .dequant import dequantize_rows as _dequantize_rows
from .layouts import LAYOUTS, QK, QK_K, Layout
from .portable import F16_TO_F32

__all__ = ["LAYOUTS", "Layout", "matmul", "matmul_many", "dequantize_rows", "backend", "set_backend", "cpu_has_avx2", "reference"]

# weights of at least this many bytes go to the threaded kernel; below it a parallel launch
# costs more than the work (measured with bench/kernels.py --threshold)
PARALLEL_MIN_BYTES = 96 * 1024

_U8 = np.dtype(np.uint8)
_F32 = np.dtype(np.float32)


def cpu_has_avx2() -> bool:
    """True when the host has AVX2, FMA and F16C (what avx2.py emits)."""
    try:
        import llvmlite.binding as llvm

        feats = llvm.get_host_cpu_features()
        return all(feats.get(f, False) for f in ("avx2", "fma", "f16c"))
    except Exception:
        try:
            flags = open("/proc/cpuinfo").read().split()
        except OSError:
            return False
        return all(f in flags for f in ("avx2", "fma", "f16c"))


def _load_backend(name: str):
    if name == "portable":
        return portable.matmul_serial, portable.matmul_parallel, portable.matmul_many
    if name == "avx2":
        if not cpu_has_avx2():
            raise RuntimeError("backend 'avx2' needs a CPU with AVX2, FMA and F16C; this one lacks them")
        from . import avx2

        return avx2.matmul_serial, avx2.matmul_parallel, avx2.matmul_many
    raise ValueError(f"unknown kernel backend {name!r}; expected 'auto', 'avx2' or 'portable'")


_backend = "portable"
_serial, _parallel, _many = portable.matmul_serial, portable.matmul_parallel, portable.matmul_many


def set_backend(name: str) -> None:
    """Select "auto" (avx2 when the CPU has it, else portable), "avx2" or "portable"."""
    global _backend, _serial, _parallel, _many
    if name == "auto":
        name = "avx2" if cpu_has_avx2() else "portable"
    _serial, _parallel, _many = _load_backend(name)
    _backend = name


def backend() -> str:
    """The active backend: "avx2" or "portable"."""
    return _backend


def matmul(w: np.ndarray, ggml_type: int, x: np.ndarray, out: np.ndarray, out_col0: int = 0) -> None:
    """out[j, out_col0 + r] = dot(row r of w, x[j]) for every row r of w.

    w: (rows, row_bytes) uint8 C-contiguous raw GGUF blocks of type ggml_type, row length k;
    x: (n, k) float32 C-contiguous; out: (n, ncols) float32 C-contiguous.  Releases the GIL.
    """
    if w.dtype != _U8 or x.dtype != _F32 or out.dtype != _F32:
        raise TypeError(f"matmul wants w uint8, x float32, out float32; got {w.dtype}, {x.dtype}, {out.dtype}")
    if ggml_type not in LAYOUTS:
        raise ValueError(f"GGML type {ggml_type} is not supported; supported: {sorted(LAYOUTS)}")
    (_parallel if w.size >= PARALLEL_MIN_BYTES else _serial)(w, ggml_type, x, out, out_col0, F16_TO_F32)


def matmul_many(ws, ggml_type: int, x: np.ndarray, spans: np.ndarray, out: np.ndarray) -> None:
    """Several weight matrices of one shape, each with its own rows of x, in one threaded call:
    out[spans[e]:spans[e+1], r] = dot(row r of ws[e], x[j]) for j in spans[e]:spans[e+1].

    ws: a sequence of (rows, row_bytes) uint8 C-contiguous raw GGUF blocks of type ggml_type (a mixture of
    experts' gate, up or down matrices); x: (n, k) float32 C-contiguous; spans: int64 (len(ws) + 1,) from 0
    to n, non-decreasing; out: (n, >= rows) float32 C-contiguous.  Each output has the bits `matmul` gives
    it.  Releases the GIL.
    """
    if ggml_type not in LAYOUTS:
        raise ValueError(f"GGML type {ggml_type} is not supported; supported: {sorted(LAYOUTS)}")
    if not ws:
        raise ValueError("matmul_many: no weight matrices")
    shape = ws[0].shape
    for i, w in enumerate(ws):
        if w.dtype != _U8 or w.ndim != 2 or w.shape != shape or not w.flags.c_contiguous:
            raise ValueError(f"matmul_many: ws[{i}] must be a C-contiguous uint8 matrix of shape {shape}, "
                             f"got {w.dtype} {w.shape}")
    L = LAYOUTS[ggml_type]
    rows, rb = shape
    if x.dtype != _F32 or out.dtype != _F32 or x.ndim != 2 or out.ndim != 2:
        raise TypeError(f"matmul_many wants x and out float32 matrices; got {x.dtype}, {out.dtype}")
    if rb % L.block_bytes or rb // L.block_bytes * L.block_elems != x.shape[1]:
        raise ValueError(f"matmul_many: rows of {rb} bytes of {L.name} do not give x's k = {x.shape[1]}")
    if not (x.flags.c_contiguous and out.flags.c_contiguous) or out.shape[0] != x.shape[0] or out.shape[1] < rows:
        raise ValueError(f"matmul_many: x {x.shape} and out {out.shape} must be C-contiguous, out (n, >= {rows})")
    spans = np.ascontiguousarray(spans, dtype=np.int64)
    if spans.shape != (len(ws) + 1,) or spans[0] != 0 or spans[-1] != x.shape[0] or (np.diff(spans) < 0).any():
        raise ValueError(f"matmul_many: spans must rise from 0 to {x.shape[0]} in {len(ws) + 1} steps, got {spans}")
    addrs = np.array([w.ctypes.data for w in ws], np.int64)  # ws stays referenced by the caller for the call
    _many(addrs, rows, rb, ggml_type, x, spans, out, F16_TO_F32)


def dequantize_rows(w: np.ndarray, ggml_type: int, row_ids: np.ndarray, out: np.ndarray) -> None:
    """out[i, :] = row row_ids[i] of w, dequantized to float32 (bit-exact with ggml)."""
    L = LAYOUTS.get(ggml_type)
    if L is None:
        raise ValueError(f"GGML type {ggml_type} is not supported; supported: {sorted(LAYOUTS)}")
    row_ids = np.asarray(row_ids)
    k = w.shape[1] // L.block_bytes * L.block_elems
    if w.dtype != _U8 or out.dtype != _F32:
        raise TypeError(f"dequantize_rows wants w uint8 and out float32; got {w.dtype}, {out.dtype}")
    if w.shape[1] % L.block_bytes or out.shape != (row_ids.shape[0], k):
        raise ValueError(f"{L.name}: w rows of {w.shape[1]} bytes give k={k}; out must be {(row_ids.shape[0], k)}, got {out.shape}")
    if row_ids.size and (row_ids.min() < 0 or row_ids.max() >= w.shape[0]):
        raise IndexError(f"row ids must be in [0, {w.shape[0]}); got {row_ids.min()}..{row_ids.max()}")
    _dequantize_rows(w, ggml_type, row_ids, out, F16_TO_F32)


set_backend("portable" if os.environ.get("FLEXIO_KERNELS", "auto") == "portable" else "auto")
