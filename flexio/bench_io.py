"""GGUF file → I/O benchmark table/JSON: io_uring O_DIRECT vs thread-pool pread vs buffered vs mmap (plain, cgroup) vs fio.

`python -m flexio bench-io MODEL.gguf [--reps 3] [--json]` reads every tensor of
every layer in layer order (the bytes a layer-by-layer streamer moves: each
tensor's 4096-aligned span, merged where spans touch) with each method, cold
cache, and reports GB/s medians over interleaved repetitions.

Facts the measurement relies on
-------------------------------
* Cold cache: `sync; echo 3 > /proc/sys/vm/drop_caches` (root only) empties the
  page cache before every timed pass; without root the figures are warm and
  the header says so. On a VM the host may still cache the disk image, so
  "cold" is cold inside the guest only, and single passes are noisy: methods
  run interleaved (A B C A B C ...) and ratios come from medians of one run.
* mmap page-touch reads one byte per 4096-byte page in tensor order, which is
  what faulting weights in costs llama.cpp; MADV_SEQUENTIAL doubles readahead
  and frees pages behind; MADV_WILLNEED (llama.cpp's prefetch) starts readahead
  of the whole mapping up front.
* Under a cgroup v1 memory limit the page cache of a mapped file is charged to
  the cgroup, so a model larger than the limit is reclaimed while it is read.
  The child process joins `/sys/fs/cgroup/memory/<name>` (limit = 50 % of the
  file) *after* importing numpy, because pages charged before joining stay
  with the old cgroup; the cgroup is removed afterwards.
* fio (`ioengine=io_uring, direct=1, bs=4M, iodepth=64`) over the same file
  gives the device ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import mmap
import os
import platform
import shutil
import statistics as stats
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

from .arena import Arena, fmt_bytes
from .errors import FlexioError
from .gguf import open_gguf
from .reader import DEFAULT_CHUNK_SIZE, DEFAULT_QUEUE_DEPTH, Reader, aligned_span

PAGE = 4096
CGROUP_V1_MEMORY = "/sys/fs/cgroup/memory"


def _size_arg(text: str) -> int:
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    return int(t[:-1] if t[-1:] in "KMG" else t) * mult


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="GGUF file to read")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions of every method (default 3)")
    p.add_argument("--qd", default="8,32,64", help="io_uring queue depths to sweep (default 8,32,64)")
    p.add_argument("--chunk", default="1M,4M", help="io_uring chunk sizes to sweep (default 1M,4M)")
    p.add_argument("--threads", default="1,2,4", help="thread-pool pread sizes (default 1,2,4)")
    p.add_argument("--only", default="", help="comma list of method families to run: uring,pread,buffered,mmap,cgroup,fio")
    p.add_argument("--no-drop", action="store_true", help="do not drop the page cache (warm figures)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


# --- what to read ----------------------------------------------------------------------


def layer_extents(path: str) -> tuple[list[tuple[int, int]], int, int]:
    """(aligned extents in layer order, their total bytes, the tensors' own bytes)."""
    g = open_gguf(path)
    tensors = sorted((t for t in g.tensors if t.layer is not None), key=lambda t: (t.layer, t.offset))
    if not tensors:
        raise FlexioError(f"{path}: no per-layer tensors (blk.N.*) to read")
    extents: list[list[int]] = []
    for t in tensors:
        start, n = aligned_span(t.offset, t.nbytes)
        end = min(start + n, g.size)
        if extents and extents[-1][0] <= start <= extents[-1][1]:
            extents[-1][1] = max(extents[-1][1], end)
        else:
            extents.append([start, end])
    ext = [(s, e - s) for s, e in extents]
    return ext, sum(n for _, n in ext), sum(t.nbytes for t in tensors)


def _pieces(extents, piece: int):
    for start, n in extents:
        for o in range(0, n, piece):
            yield start + o, min(piece, n - o)


# --- methods: each returns (seconds, cpu seconds) for one pass ---------------------------------


def _run_async(coro):
    try:
        import uvloop  # the default loop when installed
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def m_reader(path, extents, arena: Arena, *, backend, qd, chunk, threads=4, fixed=False):
    """One pass through flexio.reader; dest slots of `chunk` bytes cycle through the arena."""
    nslots = arena.size // chunk
    if nslots < qd:
        raise FlexioError(f"bench arena {fmt_bytes(arena.size)} too small for QD {qd} x {fmt_bytes(chunk)}")
    buf = arena.alloc(nslots * chunk, tag="bench-slots")
    view = buf.view
    ranges = [(o, n, view[(k % nslots) * chunk : (k % nslots + 1) * chunk]) for k, (o, n) in enumerate(_pieces(extents, chunk))]
    with buf, Reader(path, backend=backend, direct=True, queue_depth=qd, chunk_size=chunk, threads=threads,
                fixed_buffers=arena if fixed else None) as r:
        if backend == "io_uring" and fixed and not r.statistics().fixed_buffers:
            raise FlexioError("registered buffers refused")

        async def go():
            t0, c0 = time.perf_counter(), time.process_time()
            await r.read_ranges(ranges)
            return time.perf_counter() - t0, time.process_time() - c0

        res = _run_async(go())
        backend_name = r.backend
        del ranges, view
    if not backend_name.startswith(backend):
        raise FlexioError(f"wanted backend {backend}, got {backend_name}")
    return res


def m_buffered(path, extents, _arena):
    buf = bytearray(4 << 20)
    mv = memoryview(buf)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        t0, c0 = time.perf_counter(), time.process_time()
        for o, n in _pieces(extents, len(buf)):
            os.preadv(fd, [mv[:n]], o)
        return time.perf_counter() - t0, time.process_time() - c0
    finally:
        os.close(fd)


def touch(mm, extents) -> int:
    """Fault in every page of the extents, in order (one byte per page)."""
    total = 0
    for o, n in extents:
        total += int(np.frombuffer(mm, np.uint8, n, o)[::PAGE].sum())
    return total


def m_mmap(path, extents, _arena, *, advice=None):
    with open(path, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ)
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        if advice is not None:
            mm.madvise(advice)
        touch(mm, extents)
        return time.perf_counter() - t0, time.process_time() - c0
    finally:
        mm.close()


_CHILD = r"""
import json, mmap, os, sys, time
import numpy as np
from flexio.bench_io import touch
path, procs = sys.argv[1], sys.argv[2]
extents = json.load(sys.stdin)
with open(path, "rb") as fh:
    mm = mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ)
with open(procs, "w") as fh:  # join the memory cgroup only now: earlier pages stay charged elsewhere
    fh.write(str(os.getpid()))
t0, c0 = time.perf_counter(), time.process_time()
touch(mm, extents)
print(json.dumps([time.perf_counter() - t0, time.process_time() - c0]))
"""


def cgroup_unavailable() -> str | None:
    if not os.path.isdir(CGROUP_V1_MEMORY):
        return f"no cgroup v1 memory hierarchy at {CGROUP_V1_MEMORY}"
    if not os.access(CGROUP_V1_MEMORY, os.W_OK):
        return f"{CGROUP_V1_MEMORY} is not writable (needs root)"
    return None


def m_mmap_cgroup(path, extents, _arena, *, limit: int):
    cg = os.path.join(CGROUP_V1_MEMORY, f"flexio-bench-{os.getpid()}")
    os.mkdir(cg)
    try:
        with open(os.path.join(cg, "memory.limit_in_bytes"), "w") as fh:
            fh.write(str(limit))
        p = subprocess.run(
            [sys.executable, "-c", _CHILD, path, os.path.join(cg, "cgroup.procs")],
            input=json.dumps(extents), capture_output=True, text=True, timeout=3600,
        )
        if p.returncode != 0:
            raise FlexioError(f"mmap-in-cgroup child failed (exit {p.returncode}): {p.stderr.strip()[-400:]}")
        secs, cpu = json.loads(p.stdout.strip().splitlines()[-1])
        return secs, cpu
    finally:
        for _ in range(50):  # the exited child may take a moment to leave the cgroup
            try:
                os.rmdir(cg)
                break
            except OSError:
                time.sleep(0.1)


def m_fio(path, extents, _arena, *, nbytes: int):
    size = max(nbytes // PAGE * PAGE, PAGE)  # the same byte count as the other methods
    bs = min(4 << 20, size)
    cmd = [
        "fio", "--name=ceiling", f"--filename={path}", "--readonly", "--rw=read", "--ioengine=io_uring",
        "--direct=1", f"--bs={bs}", "--iodepth=64", f"--size={size}", "--output-format=json",
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if p.returncode != 0:
        raise FlexioError(f"fio failed (exit {p.returncode}): {p.stderr.strip()[-400:]}")
    job = json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0]
    read = job["read"]
    secs = read["io_bytes"] / read["bw_bytes"]
    cpu = (job.get("usr_cpu", 0) + job.get("sys_cpu", 0)) / 100 * secs
    return secs, cpu, read["io_bytes"]


# --- the run -------------------------------------------------------------------------


@dataclass
class Method:
    family: str
    name: str
    params: dict
    fn: object
    secs: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    nbytes: int = 0
    error: str | None = None

    def gbps(self) -> list[float]:
        return [self.nbytes / s / 1e9 for s in self.secs]


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3")
        return True
    except OSError:
        return False


def _csv(text: str, conv=int) -> list:
    return [conv(x) for x in text.split(",") if x.strip()]


def build_methods(args, path, nbytes, file_size) -> tuple[list[Method], dict[str, str]]:
    only = set(_csv(args.only, str)) if args.only else {"uring", "pread", "buffered", "mmap", "cgroup", "fio"}
    skipped: dict[str, str] = {}
    ms: list[Method] = []
    if "uring" in only:
        combos = {(qd, ch) for qd in _csv(args.qd) for ch in _csv(args.chunk, _size_arg)} | {(DEFAULT_QUEUE_DEPTH, DEFAULT_CHUNK_SIZE)}
        for qd, ch in sorted(combos):
            ms.append(Method("uring", f"io_uring qd={qd} chunk={fmt_bytes(ch)}", {"queue_depth": qd, "chunk_size": ch, "fixed_buffers": False},
                             lambda p, e, a, qd=qd, ch=ch: m_reader(p, e, a, backend="io_uring", qd=qd, chunk=ch)))
        qd, ch = DEFAULT_QUEUE_DEPTH, DEFAULT_CHUNK_SIZE
        ms.append(Method("uring", f"io_uring qd={qd} chunk={fmt_bytes(ch)} fixed-bufs", {"queue_depth": qd, "chunk_size": ch, "fixed_buffers": True},
                         lambda p, e, a, qd=qd, ch=ch: m_reader(p, e, a, backend="io_uring", qd=qd, chunk=ch, fixed=True)))
    if "pread" in only:
        for t in _csv(args.threads):
            ms.append(Method("pread", f"pread O_DIRECT {t} thread{'s' * (t > 1)}", {"threads": t, "chunk_size": 4 << 20},
                             lambda p, e, a, t=t: m_reader(p, e, a, backend="threads", qd=t, chunk=4 << 20, threads=t)))
    if "buffered" in only:
        ms.append(Method("buffered", "buffered read (FADV_SEQUENTIAL)", {"chunk_size": 4 << 20}, m_buffered))
    if "mmap" in only:
        for label, adv in (("plain", None), ("MADV_SEQUENTIAL", mmap.MADV_SEQUENTIAL), ("MADV_WILLNEED", mmap.MADV_WILLNEED)):
            ms.append(Method("mmap", f"mmap touch {label}", {"madvise": label}, lambda p, e, a, adv=adv: m_mmap(p, e, a, advice=adv)))
    if "cgroup" in only:
        why = cgroup_unavailable()
        if why:
            skipped["mmap_cgroup"] = why
        else:
            limit = file_size // 2
            ms.append(Method("mmap_cgroup", f"mmap touch in cgroup (limit {fmt_bytes(limit)})", {"memory_limit": limit, "madvise": "plain"},
                             lambda p, e, a, limit=limit: m_mmap_cgroup(p, e, a, limit=limit)))
    if "fio" in only:
        if shutil.which("fio") is None:
            skipped["fio"] = "fio is not installed"
        else:
            ms.append(Method("fio", "fio io_uring direct qd=64 bs=4M", {"queue_depth": 64, "block_size": 4 << 20}, None))
    for m in ms:
        m.nbytes = nbytes
    return ms, skipped


def _median(xs):
    return stats.median(xs) if xs else None


def run(args) -> int:
    path = args.model
    extents, nbytes, tensor_bytes = layer_extents(path)
    file_size = os.path.getsize(path)
    methods, skipped = build_methods(args, path, nbytes, file_size)
    is_root = os.geteuid() == 0
    cold = not args.no_drop and drop_caches()
    cache = "cold" if cold else ("warm (--no-drop)" if args.no_drop else "warm (not root: page cache not dropped)")
    max_window = max([m.params.get("queue_depth", 1) * m.params.get("chunk_size", 0) for m in methods if m.family in ("uring", "pread")] + [1 << 20])
    arena = Arena(min(max(2 * max_window, 64 << 20), 1 << 30), name="bench-io") if any(m.family in ("uring", "pread") for m in methods) else None
    log = (lambda *a: print(*a, file=sys.stderr, flush=True))
    log(f"bench-io: {path}: {len(extents)} extents, {fmt_bytes(nbytes)} per pass, {args.reps} interleaved reps, cache {cache}")
    try:
        for rep in range(args.reps):
            for m in methods:
                if m.error:
                    continue
                if cold:
                    drop_caches()
                try:
                    if m.family == "fio":
                        secs, cpu, io_bytes = m_fio(path, extents, arena, nbytes=nbytes)
                        m.nbytes = io_bytes
                    else:
                        secs, cpu = m.fn(path, extents, arena)
                except (FlexioError, OSError, subprocess.SubprocessError, ValueError) as e:
                    m.error = str(e)
                    if m.family == "mmap_cgroup":
                        skipped["mmap_cgroup"] = m.error
                    log(f"  {m.name}: failed: {e}")
                    continue
                m.secs.append(secs)
                m.cpu.append(cpu)
                log(f"  rep {rep + 1} {m.name:<44} {m.nbytes / secs / 1e9:6.2f} GB/s  cpu {cpu:5.2f} s")
    finally:
        if arena is not None:
            arena.close()
    report = make_report(path, methods, skipped, nbytes, tensor_bytes, cache, args.reps)
    if args.json:
        print(json.dumps(report, indent=None))
    else:
        print_table(report)
    return 0


def make_report(path, methods, skipped, nbytes, tensor_bytes, cache, reps) -> dict:
    results = []
    by_family: dict[str, list[dict]] = {}
    for m in methods:
        if not m.secs:
            continue
        g = m.gbps()
        r = {"method": m.family, "name": m.name, **m.params, "gbps": round(_median(g), 3), "gbps_min": round(min(g), 3),
             "gbps_max": round(max(g), 3), "spread": round((max(g) - min(g)) / _median(g), 3), "cpu_s": round(_median(m.cpu), 3),
             "runs": [round(x, 3) for x in g]}
        results.append(r)
        by_family.setdefault(m.family, []).append(r)
    default = next((r for r in by_family.get("uring", []) if r["queue_depth"] == DEFAULT_QUEUE_DEPTH
                    and r["chunk_size"] == DEFAULT_CHUNK_SIZE and not r["fixed_buffers"]), None)
    best = max(by_family.get("uring", []), key=lambda r: r["gbps"], default=None)
    for r in results:
        r["default"] = r is default
        r["best"] = r is best

    def top(fam):
        return max((r["gbps"] for r in by_family.get(fam, [])), default=None)

    ratios = {}
    if default:
        u = default["gbps"]
        for key, fam in (("uring_vs_fio", "fio"), ("uring_vs_mmap", "mmap"), ("uring_vs_mmap_cgroup", "mmap_cgroup"),
                         ("uring_vs_pread", "pread"), ("uring_vs_buffered", "buffered")):
            if top(fam):
                ratios[key] = round(u / top(fam), 3)
        if best and top("fio"):
            ratios["uring_best_vs_fio"] = round(best["gbps"] / top("fio"), 3)
        for r in by_family.get("mmap", []):
            ratios[f"uring_vs_mmap_{r['madvise'].lower()}"] = round(u / r["gbps"], 3)
    return {
        "file": os.path.abspath(path),
        "bytes": nbytes,
        "tensor_bytes": tensor_bytes,
        "cache": cache,
        "reps": reps,
        "machine": {"kernel": platform.release(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "default": {"queue_depth": DEFAULT_QUEUE_DEPTH, "chunk_size": DEFAULT_CHUNK_SIZE},
        "results": results,
        "ratios": ratios,
        "skipped": skipped,
        "errors": {m.name: m.error for m in methods if m.error},
        "notes": "GB/s = bytes / wall time, median of interleaved reps; ratios use the default io_uring config "
                 "against the best variant of each other family",
    }


def print_table(rep: dict) -> None:
    print(f"flexio bench-io  {rep['file']}")
    print(f"  {fmt_bytes(rep['bytes'])} per pass (layer tensors {fmt_bytes(rep['tensor_bytes'])}), cache {rep['cache']}, "
          f"{rep['reps']} interleaved reps, kernel {rep['machine']['kernel']}, {rep['machine']['cpus']} CPUs")
    print(f"  {'method':<46} {'median GB/s':>11} {'min':>6} {'max':>6} {'spread':>7} {'cpu s':>6}")
    for r in rep["results"]:
        tag = " *default" if r["default"] else (" *best" if r["best"] else "")
        print(f"  {r['name'] + tag:<46} {r['gbps']:>11.2f} {r['gbps_min']:>6.2f} {r['gbps_max']:>6.2f} {r['spread']:>6.0%} {r['cpu_s']:>6.2f}")
    for k, why in rep["skipped"].items():
        print(f"  {k}: skipped ({why})")
    for k, why in rep["errors"].items():
        print(f"  {k}: error ({why})")
    print("  ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in rep["ratios"].items()))
