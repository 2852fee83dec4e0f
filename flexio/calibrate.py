"""Model file + this machine -> CostModel: measured disk bandwidth, per-request cost and kernel speed.

The planner's `auto` policy picks what to keep resident by predicting seconds per
token from these figures. They are measured, not assumed: a few O_DIRECT reads of
the model file itself (bandwidth from 4 MiB reads in flight together, per-request
cost from a batch of small reads), and the matmul kernels timed on zero-filled
weights of the model's own largest layer tensor (a pass costs the same whatever the
weight values). About 0.1-0.3 s; cached per device, thread count and kernel backend
in the user cache directory.
"""

from __future__ import annotations

import json
import os
import time

import numba
import numpy as np

import flexio_kernels

from .arena import Arena
from .fetch import cache_dir
from .gguf import GGUFFile
from .plan import CostModel
from .reader import Reader

CHUNK = 4 << 20
SMALL = 64 << 10


def _cache_key(path: str, threads: int) -> str:
    return f"dev{os.stat(path).st_dev}-t{threads}-{flexio_kernels.backend()}"


def _measure_disk(path: str) -> tuple[float, float]:
    """(bytes/s, seconds per request) from O_DIRECT reads spread over the file."""
    size = os.path.getsize(path)
    n_big = max(1, min(8, size // CHUNK - 1))
    step = max(CHUNK, (size - CHUNK) // n_big // 4096 * 4096)
    big = [(i * step, CHUNK) for i in range(n_big)]
    small = [(((i * 7919) % max(1, size // SMALL - 1)) * SMALL, SMALL) for i in range(32)]
    with Arena(n_big * CHUNK + len(small) * SMALL, name="calibrate", lock=False) as arena:
        buf = arena.alloc(n_big * CHUNK + len(small) * SMALL)
        with Reader(path) as r:
            v = buf.view
            t0 = time.perf_counter()
            r.read_ranges_sync([(off, n, v[i * CHUNK : (i + 1) * CHUNK]) for i, (off, n) in enumerate(big)])
            t_big = time.perf_counter() - t0
            base = n_big * CHUNK
            t0 = time.perf_counter()
            r.read_ranges_sync([(off, n, v[base + i * SMALL : base + (i + 1) * SMALL]) for i, (off, n) in enumerate(small)])
            t_small = time.perf_counter() - t0
        del v
        buf.release()
    bps = n_big * CHUNK / t_big
    per_request = max(1e-6, (t_small - len(small) * SMALL / bps) / len(small))
    return bps, per_request


def _measure_compute(gf: GGUFFile, threads: int) -> tuple[float, float]:
    """(weight bytes/s of the matmul kernels, fixed seconds per matmul call) on this model's types."""
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    layer = [t for t in gf.layer_tensors(0) if len(t.shape) > 1]
    t = max(layer, key=lambda t: t.nbytes)
    w = np.zeros((t.n_rows, t.row_bytes), np.uint8)
    x = np.zeros((1, t.row_len), np.float32)
    out = np.zeros((1, t.n_rows), np.float32)
    small = w[:8]
    for _ in range(3):  # compile / load from Numba's cache, start the thread pool
        flexio_kernels.matmul(w, t.ggml_type, x, out)
        flexio_kernels.matmul(small, t.ggml_type, x, out)
    best = min(_timed(lambda: flexio_kernels.matmul(w, t.ggml_type, x, out)) for _ in range(20))
    tiny = min(_timed(lambda: flexio_kernels.matmul(small, t.ggml_type, x, out)) for _ in range(20))
    return t.nbytes / best, tiny


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def calibrate(gf: GGUFFile, threads: int, *, use_cache: bool = True) -> CostModel:
    """Measure (or load from the cache) the CostModel for this model file's device and `threads`."""
    cache = os.path.join(cache_dir(), "calibration.json")
    key = _cache_key(gf.path, threads)
    known = {}
    if use_cache:
        try:
            with open(cache) as f:
                known = json.load(f)
        except (OSError, ValueError):
            known = {}
        if key in known:
            return CostModel(**known[key])
    disk_bps, request_s = _measure_disk(gf.path)
    compute_bps, op_s = _measure_compute(gf, threads)
    cm = CostModel(disk_bps=disk_bps, request_s=request_s, compute_bps=compute_bps, op_s=op_s)
    known[key] = cm.__dict__
    tmp = cache + ".part"
    with open(tmp, "w") as f:
        json.dump(known, f, indent=1)
    os.replace(tmp, cache)
    return cm
