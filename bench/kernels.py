"""Matmul kernels vs a plain memory-read loop over the same bytes: one JSON line per (type, shape, threads, backend).

    python bench/kernels.py [--types Q4_0 Q6_K ...] [--threads 1 2] [--backend avx2 portable]
                            [--shapes 4096x4096 11008x4096 32000x4096] [--prefill 32] [--reps 9]

Decode (n = 1) is memory-bound, so each figure is compared with the ceiling: summing the
weight bytes as uint64 words with the same thread count, measured in the same run,
interleaved with the kernel (the machine is shared): gbps and ceiling_gbps are medians of
--reps, ratio is the median of back-to-back (ceiling time / kernel time) pairs.  Weights are
cycled through enough copies to exceed twice the L3, so both read from DRAM.  Prefill
lines time n columns at once against n single-column calls on the same (warm, in-L3 for
4096 x 4096) weight, so the speed-up is a lower bound.  JIT warm-up is excluded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numba
import numpy as np
from numba import njit, prange

import flexio_kernels as fk
from flexio_kernels import LAYOUTS

NAMES = {L.name: t for t, L in LAYOUTS.items()}
COLD_BYTES = 96 << 20  # > 2 x the 32 MiB L3


@njit(nogil=True, parallel=True, cache=True)
def read_ceiling(words):
    """Sum of all uint64 words: the plain memory-read loop the kernels are measured against."""
    n = words.shape[0]
    chunk = 1 << 14
    nchunks = (n + chunk - 1) // chunk
    total = np.uint64(0)
    for c in prange(nchunks):
        s = np.uint64(0)
        for i in range(c * chunk, min(n, (c + 1) * chunk)):
            s += words[i]
        total += s
    return total


def random_weights(rng, t, rows, k):
    L = LAYOUTS[t]
    raw = rng.integers(0, 256, size=(rows, L.row_bytes(k)), dtype=np.uint8)
    if L.name in ("F32", "F16"):
        vals = rng.standard_normal((rows, k)).astype(np.float32 if L.name == "F32" else np.float16)
        return vals.view(np.uint8)
    blocks = raw.reshape(-1, L.block_bytes)
    for name, off, _ in L.fields:
        if name in ("d", "dmin", "m"):
            blocks[:, off:off + 2] = np.array([0.01], np.float16).view(np.uint8).reshape(1, 2)
    return raw


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_decode(t, rows, k, threads, backends, reps, rng):
    copies = [random_weights(rng, t, rows, k)]
    while sum(c.nbytes for c in copies) < COLD_BYTES:
        copies.append(copies[0].copy())
    nbytes = copies[0].nbytes
    x = rng.standard_normal((1, k)).astype(np.float32)
    out = np.empty((1, rows), np.float32)
    lines = []
    for nth in threads:
        numba.set_num_threads(nth)
        times = {b: [] for b in backends}
        ceil_times = []
        for b in backends:  # warm-up: JIT and page faults
            fk.set_backend(b)
            for c in copies:
                fk.matmul(c, t, x, out)
        for c in copies:
            read_ceiling(c.reshape(-1).view(np.uint64))
        pair_ratios = {b: [] for b in backends}
        i = 0
        for _ in range(reps):
            for b in backends:  # kernel and ceiling back to back: the pair sees the same machine load
                fk.set_backend(b)
                c = copies[i % len(copies)]
                i += 1
                tk = timed(lambda: fk.matmul(c, t, x, out))
                c = copies[i % len(copies)].reshape(-1).view(np.uint64)
                i += 1
                tc = timed(lambda: read_ceiling(c))
                times[b].append(tk)
                ceil_times.append(tc)
                pair_ratios[b].append(tc / tk)
        ceil = statistics.median(ceil_times)
        for b in backends:
            ms = statistics.median(times[b])
            lines.append(dict(kind="decode", type=LAYOUTS[t].name, rows=rows, k=k, n=1, threads=nth, backend=b,
                              ms=round(ms * 1e3, 4), gbps=round(nbytes / ms / 1e9, 2),
                              ceiling_gbps=round(nbytes / ceil / 1e9, 2),
                              ratio=round(statistics.median(pair_ratios[b]), 3)))
    return lines


def bench_prefill(t, rows, k, n, threads, backends, reps, rng):
    w = random_weights(rng, t, rows, k)
    x = rng.standard_normal((n, k)).astype(np.float32)
    out = np.empty((n, rows), np.float32)
    lines = []
    for nth in threads:
        numba.set_num_threads(nth)
        for b in backends:
            fk.set_backend(b)
            fk.matmul(w, t, x, out)
            fk.matmul(w, t, x[:1], out[:1])
            batched = statistics.median(timed(lambda: fk.matmul(w, t, x, out)) for _ in range(reps))
            single = statistics.median(timed(lambda: fk.matmul(w, t, x[:1], out[:1])) for _ in range(reps))
            lines.append(dict(kind="prefill", type=LAYOUTS[t].name, rows=rows, k=k, n=n, threads=nth, backend=b,
                              ms=round(batched * 1e3, 3), ms_n_matvecs=round(single * n * 1e3, 3),
                              speedup=round(single * n / batched, 2),
                              gflops=round(2 * rows * k * n / batched / 1e9, 2)))
    return lines


def bench_threshold(backends, reps):
    """Serial vs threaded kernel on small Q4_1 / Q4_0 matrices: where PARALLEL_MIN_BYTES should sit."""
    from flexio_kernels import portable

    rng = np.random.default_rng(2)
    lines = []
    for b in backends:
        fk.set_backend(b)
        for t, rows, k in [(3, 48, 576), (3, 96, 576), (3, 192, 576), (3, 288, 576), (3, 576, 576), (2, 576, 1536),
                           (2, 1536, 576), (2, 2048, 2048)]:
            w = random_weights(rng, t, rows, k)
            x = rng.standard_normal((1, k)).astype(np.float32)
            out = np.empty((1, rows), np.float32)
            best = {}
            for _ in range(reps):
                for name, fn in (("serial", fk._serial), ("parallel", fk._parallel)):
                    fn(w, t, x, out, 0, portable.F16_TO_F32)
                    t0 = time.perf_counter()
                    for _ in range(20):
                        fn(w, t, x, out, 0, portable.F16_TO_F32)
                    best[name] = min(best.get(name, 1e9), (time.perf_counter() - t0) / 20)
            lines.append(dict(kind="threshold", type=LAYOUTS[t].name, rows=rows, k=k, bytes=w.nbytes, backend=b,
                              threads=numba.get_num_threads(), serial_us=round(best["serial"] * 1e6, 2),
                              parallel_us=round(best["parallel"] * 1e6, 2)))
    return lines


def bench_overhead(backends, reps):
    """Per-call cost of a tiny matvec (576 x 576 Q4_0, as SmolLM2's attention): Python wrapper + launch."""
    rng = np.random.default_rng(1)
    w = random_weights(rng, 2, 576, 576)
    x = rng.standard_normal((1, 576)).astype(np.float32)
    out = np.empty((1, 576), np.float32)
    lines = []
    for b in backends:
        fk.set_backend(b)
        fk.matmul(w, 2, x, out)
        per = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(200):
                fk.matmul(w, 2, x, out)
            per.append((time.perf_counter() - t0) / 200)
        lines.append(dict(kind="call", type="Q4_0", rows=576, k=576, n=1, threads=numba.get_num_threads(), backend=b,
                          us_per_call=round(statistics.median(per) * 1e6, 2)))
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", nargs="+", default=["Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--backend", nargs="+", default=None, help="default: the auto-selected backend")
    ap.add_argument("--shapes", nargs="+", default=["4096x4096", "11008x4096", "32000x4096"])
    ap.add_argument("--prefill", type=int, default=32, help="columns for the prefill lines (0: none)")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--threshold", action="store_true", help="only time serial vs threaded kernels on small matrices")
    args = ap.parse_args(argv)
    backends = args.backend or [fk.backend()]
    rng = np.random.default_rng(0)
    print(json.dumps(dict(kind="header", machine=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
                          avx2=fk.cpu_has_avx2(), numba=numba.__version__, python=sys.version.split()[0],
                          cache="weights cycled through > 96 MiB (cold L3)")), flush=True)
    if args.threshold:
        for line in bench_threshold(backends, args.reps):
            print(json.dumps(line), flush=True)
        return
    for line in bench_overhead(backends, args.reps):
        print(json.dumps(line), flush=True)
    for name in args.types:
        t = NAMES[name]
        for shape in args.shapes:
            rows, k = map(int, shape.split("x"))
            for line in bench_decode(t, rows, k, args.threads, backends, args.reps, rng):
                print(json.dumps(line), flush=True)
        if args.prefill:
            for line in bench_prefill(t, 4096, 4096, args.prefill, args.threads, backends, max(3, args.reps // 3), rng):
                print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
