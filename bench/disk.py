"""GGUF file → I/O benchmark table/JSON: io_uring O_DIRECT vs thread-pool pread vs buffered vs mmap (plain, cgroup) vs fio.

`python -m flexio bench-io MODEL.gguf [--reps 3] [--passes 3] [--json]` reads
every tensor of every layer in layer order (the bytes a layer-by-layer streamer
moves: each tensor's 4096-aligned span, merged where spans touch) with each
method, starting from a cold cache, and reports GB/s medians over interleaved
repetitions.

Facts the measurement relies on
-------------------------------
* Cold cache: `sync; echo 3 > /proc/sys/vm/drop_caches` (root only) empties the
  page cache before every measurement (before pass 1, never between passes);
  without root the figures are warm and the header says so. On a VM the host
  may still cache the disk image, so "cold" is cold inside the guest only, and
  single measurements are noisy: methods run interleaved (A B C A B C ...) and
  ratios come from medians of one run.
* Passes: a decoder re-reads the whole model for every token, so what matters
  for an mmap-based engine is the steady state, not one cold pass. Page-cache
  methods (buffered, mmap, mmap in a cgroup) read all layers `--passes` times
  (default 3) in a row in the same process (and cgroup) without dropping the
  cache in between; their headline figure is the bandwidth of passes 2..N, and
  pass 1 (cold) is reported beside it. O_DIRECT methods and fio bypass the page
  cache, so every pass is a cold read: they do `--direct-passes` (default 1).
* mmap page-touch loads the first byte of every 4096-byte page of every extent
  in tensor order and sums them (the checksum is compared across methods and
  with the buffered read, so no page can be skipped); that is what faulting
  weights in costs llama.cpp. MADV_SEQUENTIAL doubles readahead; MADV_WILLNEED
  (llama.cpp's prefetch) starts readahead of the whole mapping up front.
* Without a memory limit the file fits in RAM, so mmap passes 2..N are page
  cache hits (`uring_vs_mmap_warm`); `uring_vs_mmap` compares the cold pass 1.
* Under a cgroup v1 memory limit the page cache of a mapped file is charged to
  the cgroup, so a model larger than the limit is reclaimed while it is read
  and every later pass re-reads it from the disk (the per-pass device read
  bytes are in the JSON). The child process imports numpy, then joins
  `/sys/fs/cgroup/memory/<name>` (limit = 50 % of the file, at least 16 MiB),
  checks /proc/self/cgroup, and only then maps and touches the file (pages
  charged before joining stay with the old cgroup); the cgroup is removed
  afterwards. `uring_vs_mmap_cgroup` uses passes 2..N (the paper's setting).
* fio (`ioengine=io_uring, direct=1, bs=4M`, QD 64, with and without
  registered buffers, reading the same byte range of the same file, never
  creating or laying out a file, size-based not time-based) gives the device
  ceiling: the best fio variant's median, with seconds = fio's read runtime.
* On this kind of VM the first guest access to a page the guest has not used
  recently can cost a host-side fault; page-cache methods show it as CPU time
  (>1 CPU-s per pass) and it makes their cold pass noisy. O_DIRECT reads into a
  reused, locked arena and does not pay it.
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
import time
from dataclasses import dataclass, field

import numpy as np

from flexio.arena import Arena
from flexio.errors import FlexioError, ParameterError
from flexio.gguf import open_gguf
from flexio.reader import DEFAULT_CHUNK_SIZE, DEFAULT_QUEUE_DEPTH, Reader
from flexio.units import DIRECT_ALIGN, PAGE, SIZE_HELP, aligned_span, fmt_bytes, parse_size

from .cgroup import MemCgroup, cgroup_unavailable, drop_caches

HELP = "I/O microbenchmark: io_uring O_DIRECT vs pread vs mmap vs fio"  # one line for `flexio --help`

CGROUP_PREFIX = "flexio-bench-"
CGROUP_MIN_LIMIT = 16 << 20  # the child's own allocations after joining must fit
FIO_VARIANTS = ((64, True), (64, False))  # (iodepth, registered buffers); bs 4M
PAGE_CACHE_FAMILIES = ("buffered", "mmap", "mmap_cgroup")


def _chunk_arg(text: str) -> int:
    """A reader chunk size: parse_size's units, a positive multiple of O_DIRECT's alignment."""
    n = parse_size(text, what="--chunk")
    if n <= 0 or n % DIRECT_ALIGN:
        raise ParameterError(f"--chunk: expected a positive multiple of {DIRECT_ALIGN} bytes, got {text!r} = {n:,}",
                             param="--chunk")
    return n


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="GGUF file to read")
    p.add_argument("--reps", type=_positive, default=3, help="interleaved repetitions of every method (default 3)")
    p.add_argument("--passes", type=_positive, default=3,
                   help="passes over all layers per measurement for page-cache methods (buffered, mmap, mmap in cgroup), "
                        "in one process without dropping the cache; the headline figure is passes 2..N (default 3)")
    p.add_argument("--direct-passes", type=_positive, default=1,
                   help="passes per measurement for O_DIRECT methods and fio (every pass is cold; default 1)")
    p.add_argument("--qd", default="8,32,64", help="io_uring queue depths to sweep (default 8,32,64)")
    p.add_argument("--chunk", default="1M,4M", help=f"io_uring chunk sizes to sweep ({SIZE_HELP}; default 1M,4M)")
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


def pieces(extents, piece: int):
    """(offset, nbytes) extents cut into reads of at most `piece` bytes, in order."""
    for start, n in extents:
        for o in range(0, n, piece):
            yield start + o, min(piece, n - o)


def expected_pages(extents) -> int:
    """Pages a page-touch of `extents` must load (every extent starts on a page boundary)."""
    return sum(-(-n // PAGE) for _, n in extents)


def page_checksum(path: str, extents, piece: int = 4 << 20) -> tuple[int, int]:
    """Reference (checksum, pages) of `touch`, computed with plain pread: sum of the first byte of every page."""
    total = pages = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        for o, n in pieces(extents, piece):
            v = np.frombuffer(os.pread(fd, n, o), np.uint8)[::PAGE]
            total += int(v.sum(dtype=np.uint64))
            pages += v.size
    finally:
        os.close(fd)
    return total, pages


def disk_stat_path(path: str) -> str | None:
    """/sys file whose 3rd field counts 512-byte sectors read from the block device holding `path`."""
    st = os.stat(path)
    p = f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/stat"
    return p if os.path.exists(p) else None


def disk_read_bytes(stat_path: str | None) -> int | None:
    """Bytes read so far from the device (device-wide: other processes' reads count too)."""
    if not stat_path:
        return None
    try:
        with open(stat_path) as fh:
            return int(fh.read().split()[2]) * 512
    except (OSError, IndexError, ValueError):
        return None


# --- methods: each returns a PassRun for one measurement (`passes` passes in a row) --------


@dataclass
class PassRun:
    secs: list[float]  # wall seconds of each pass
    cpu: list[float]  # CPU seconds of each pass (process time, user + sys)
    nbytes: int  # bytes per pass
    info: dict = field(default_factory=dict)  # method-specific evidence (checksum, pages, device reads, cgroup stats)


def _run_async(coro):
    try:
        import uvloop  # the default loop when installed
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def m_reader(path, extents, arena: Arena, *, backend, qd, chunk, threads=4, fixed=False, passes=1, nbytes=0):
    """`passes` passes through flexio.reader; dest slots of `chunk` bytes cycle through the arena."""
    nslots = arena.size // chunk
    if nslots < qd:
        raise FlexioError(f"bench arena {fmt_bytes(arena.size)} too small for QD {qd} x {fmt_bytes(chunk)}")
    buf = arena.alloc(nslots * chunk, tag="bench-slots")
    view = buf.view
    ranges = [(o, n, view[(k % nslots) * chunk : (k % nslots + 1) * chunk]) for k, (o, n) in enumerate(pieces(extents, chunk))]
    with buf, Reader(path, backend=backend, direct=True, queue_depth=qd, chunk_size=chunk, threads=threads,
                fixed_buffers=arena if fixed else None) as r:
        if backend == "io_uring" and fixed and not r.statistics().fixed_buffers:
            raise FlexioError("registered buffers refused")

        async def go():
            out = []
            for _ in range(passes):
                t0, c0 = time.perf_counter(), time.process_time()
                await r.read_ranges(ranges)
                out.append((time.perf_counter() - t0, time.process_time() - c0))
            return out

        res = _run_async(go())
        backend_name = r.backend
        del ranges, view
    if backend != "auto" and not backend_name.startswith(backend):
        raise FlexioError(f"wanted backend {backend}, got {backend_name}")
    return PassRun([s for s, _ in res], [c for _, c in res], nbytes)


def m_buffered(path, extents, _arena, *, passes=1, nbytes=0):
    """Buffered preadv of 4 MiB pieces (FADV_SEQUENTIAL); also sums the first byte of each page (= touch's checksum)."""
    buf = bytearray(4 << 20)
    mv = memoryview(buf)
    arr = np.frombuffer(buf, np.uint8)
    dev = disk_stat_path(path)
    run = PassRun([], [], nbytes, {"checksums": [], "disk_read": []})
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        for _ in range(passes):
            d0 = disk_read_bytes(dev)
            t0, c0 = time.perf_counter(), time.process_time()
            total = 0
            for o, n in pieces(extents, len(buf)):
                got = os.preadv(fd, [mv[:n]], o)
                if got != n:
                    raise FlexioError(f"short read at {o}: {got} of {n} bytes")
                total += int(arr[:n:PAGE].sum(dtype=np.uint64))
            run.secs.append(time.perf_counter() - t0)
            run.cpu.append(time.process_time() - c0)
            d1 = disk_read_bytes(dev)
            run.info["checksums"].append(total)
            run.info["disk_read"].append(None if d0 is None or d1 is None else d1 - d0)
        return run
    finally:
        os.close(fd)


def touch(mm, extents) -> tuple[int, int]:
    """Fault in every page of the extents, in order: load the first byte of each 4096-byte page and sum them.

    Returns (checksum, pages loaded). The checksum equals `page_checksum` (a plain
    read) only if every page was really read.
    """
    total = pages = 0
    for o, n in extents:
        v = np.frombuffer(mm, np.uint8, n, o)[::PAGE]
        total += int(v.sum(dtype=np.uint64))
        pages += v.size
    return total, pages


def touch_passes(mm, extents, passes: int, dev: str | None, advice=None) -> dict:
    """`passes` timed page-touch passes over one mapping; per-pass seconds, CPU, checksum, pages, faults, device reads."""
    import resource

    out = {"secs": [], "cpu": [], "checksums": [], "pages": [], "majflt": [], "minflt": [], "disk_read": []}
    t0, c0 = time.perf_counter(), time.process_time()
    if advice is not None:
        mm.madvise(advice)  # inside the first pass: WILLNEED starts its readahead here
    for _ in range(passes):
        r0, d0 = resource.getrusage(resource.RUSAGE_SELF), disk_read_bytes(dev)
        checksum, pages = touch(mm, extents)
        t1, c1 = time.perf_counter(), time.process_time()
        r1, d1 = resource.getrusage(resource.RUSAGE_SELF), disk_read_bytes(dev)
        out["secs"].append(t1 - t0)
        out["cpu"].append(c1 - c0)
        out["checksums"].append(checksum)
        out["pages"].append(pages)
        out["majflt"].append(r1.ru_majflt - r0.ru_majflt)
        out["minflt"].append(r1.ru_minflt - r0.ru_minflt)
        out["disk_read"].append(None if d0 is None or d1 is None else d1 - d0)
        t0, c0 = time.perf_counter(), time.process_time()
    return out


def _touch_run(out: dict, extents, nbytes: int, extra: dict | None = None) -> PassRun:
    want = expected_pages(extents)
    if any(p != want for p in out["pages"]):
        raise FlexioError(f"page-touch loaded {out['pages']} pages per pass, expected {want}")
    if len(set(out["checksums"])) != 1:
        raise FlexioError(f"page-touch checksums differ between passes: {out['checksums']}")
    info = {k: out[k] for k in ("checksums", "pages", "majflt", "minflt", "disk_read")}
    info.update(extra or {})
    return PassRun(out["secs"], out["cpu"], nbytes, info)


def m_mmap(path, extents, _arena, *, advice=None, passes=1, nbytes=0):
    with open(path, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ)
    try:
        return _touch_run(touch_passes(mm, extents, passes, disk_stat_path(path), advice), extents, nbytes)
    finally:
        mm.close()


_CHILD = r"""
import json, mmap, os, sys
import numpy as np  # imported (its pages charged) before joining the cgroup
from flexio_bench.disk import touch_passes
cfg = json.load(sys.stdin)
with open(cfg["procs"], "w") as fh:  # join the memory cgroup before the model is opened or mapped
    fh.write(str(os.getpid()))
with open("/proc/self/cgroup") as fh:
    mine = [ln.strip().split(":", 2)[2] for ln in fh if ln.split(":", 2)[1] == "memory"]
if mine != [cfg["cgroup"]]:
    sys.exit(f"child is not in memory cgroup {cfg['cgroup']}: /proc/self/cgroup says {mine}")
with open(cfg["path"], "rb") as fh:
    mm = mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ)
out = touch_passes(mm, cfg["extents"], cfg["passes"], cfg["diskstat"])
mm.close()
out["cgroup"] = mine[0]
print(json.dumps(out))
"""


def cgroup_limit(file_size: int) -> int:
    return max(file_size // 2 // PAGE * PAGE, CGROUP_MIN_LIMIT)


def m_mmap_cgroup(path, extents, _arena, *, limit: int, passes=1, nbytes=0):
    """Page-touch `passes` times in a child process confined to a fresh cgroup v1 memory limit."""
    with MemCgroup(f"{CGROUP_PREFIX}{os.getpid()}", limit) as cg:
        cfg = {"path": os.path.abspath(path), "procs": cg.file("cgroup.procs"), "cgroup": "/" + cg.name,
               "extents": [list(e) for e in extents], "passes": passes, "diskstat": disk_stat_path(path)}
        p = subprocess.run([sys.executable, "-c", _CHILD], input=json.dumps(cfg), capture_output=True, text=True, timeout=3600)
        if p.returncode != 0:
            raise FlexioError(f"mmap-in-cgroup child failed (exit {p.returncode}): {p.stderr.strip()[-400:]}")
        out = json.loads(p.stdout.strip().splitlines()[-1])
        stat = {}
        try:
            with open(cg.file("memory.stat")) as fh:
                stat = dict((k, int(v)) for k, v in (ln.split() for ln in fh))
        except (OSError, ValueError):
            pass
        extra = {"cgroup": out["cgroup"], "memory_limit": limit,
                 "max_usage": cg.read_int("memory.max_usage_in_bytes"), "failcnt": cg.read_int("memory.failcnt"),
                 "cgroup_pgmajfault": stat.get("pgmajfault"), "cgroup_pgpgin": stat.get("pgpgin")}
        return _touch_run(out, extents, nbytes, extra)


def fio_command(path: str, offset: int, size: int, *, qd: int = 64, bs: int = 4 << 20, fixedbufs: bool = True) -> list[str]:
    """fio reading [offset, offset+size) of the existing file once, O_DIRECT through io_uring, size-based (not time_based)."""
    cmd = [
        "fio", "--name=ceiling", "--filename=" + path.replace(":", "\\:"), "--readonly", "--allow_file_create=0",
        "--rw=read", "--ioengine=io_uring", "--direct=1", "--invalidate=1", f"--bs={bs}", f"--iodepth={qd}",
        f"--offset={offset}", f"--size={size}", "--numjobs=1", "--loops=1", "--output-format=json",
    ]
    if fixedbufs:
        cmd.append("--fixedbufs")  # registered buffers: pinned once at setup, like flexio's fixed-bufs variant
    return cmd


def parse_fio(stdout: str, size: int) -> tuple[float, float, int]:
    """(seconds, CPU seconds, bytes read) of fio's read phase: seconds = read.runtime (ms), not job setup."""
    job = json.loads(stdout[stdout.index("{"):])["jobs"][0]
    if job.get("error"):
        raise FlexioError(f"fio job error {job['error']}")
    read = job["read"]
    io_bytes, runtime_ms = read["io_bytes"], read["runtime"]
    secs = max(runtime_ms / 1000, read.get("lat_ns", {}).get("max", 0) / 1e9)  # runtime has 1 ms resolution
    if io_bytes < size or secs <= 0:
        raise FlexioError(f"fio read {io_bytes} of {size} bytes in {runtime_ms} ms")
    cpu = (job.get("usr_cpu", 0) + job.get("sys_cpu", 0)) / 100 * job.get("job_runtime", runtime_ms) / 1000
    return secs, cpu, io_bytes


def m_fio(path, extents, _arena, *, qd=64, fixedbufs=True, passes=1, nbytes=0):
    offset = extents[0][0]
    # the same bytes as the other methods, from the first extent, in whole blocks (fio reads only whole blocks):
    # rounded up to a block if that stays inside the file, else down
    room = (os.path.getsize(path) - offset) // PAGE * PAGE
    want = max(min(-(-nbytes // PAGE) * PAGE, room), PAGE)
    bs = min(4 << 20, want)
    size = -(-want // bs) * bs
    if size > room:
        size = want // bs * bs
    run = PassRun([], [], 0, {"command": " ".join(fio_command(path, offset, size, qd=qd, bs=bs, fixedbufs=fixedbufs))})
    for _ in range(passes):
        p = subprocess.run(fio_command(path, offset, size, qd=qd, bs=bs, fixedbufs=fixedbufs),
                           capture_output=True, text=True, timeout=3600)
        if p.returncode != 0:
            raise FlexioError(f"fio failed (exit {p.returncode}): {p.stderr.strip()[-400:]}")
        secs, cpu, io_bytes = parse_fio(p.stdout, size)
        run.secs.append(secs)
        run.cpu.append(cpu)
        run.nbytes = io_bytes  # fio rounds the size up to whole blocks
    return run


# --- the run -------------------------------------------------------------------------


@dataclass
class Method:
    family: str
    name: str
    params: dict
    fn: object  # fn(path, extents, arena, passes=, nbytes=) -> PassRun
    passes: int = 1
    runs: list[PassRun] = field(default_factory=list)
    nbytes: int = 0
    error: str | None = None

    def _gbps(self, r: PassRun, passes) -> float:
        return r.nbytes * len(passes) / sum(passes) / 1e9

    def gbps(self) -> list[float]:
        """Headline GB/s per rep: passes 2..N when there are several passes (steady state), else pass 1."""
        return [self._gbps(r, r.secs[1:] if len(r.secs) > 1 else r.secs) for r in self.runs]

    def gbps_first(self) -> list[float]:
        return [self._gbps(r, r.secs[:1]) for r in self.runs]

    def cpu(self) -> list[float]:
        """CPU seconds per pass of the headline passes, per rep."""
        return [stats.mean(r.cpu[1:] if len(r.cpu) > 1 else r.cpu) for r in self.runs]


def _csv(text: str, conv=int) -> list:
    return [conv(x) for x in text.split(",") if x.strip()]


def build_methods(args, path, nbytes, file_size) -> tuple[list[Method], dict[str, str]]:
    only = set(_csv(args.only, str)) if args.only else {"uring", "pread", "buffered", "mmap", "cgroup", "fio"}
    pc, dp = getattr(args, "passes", 3), getattr(args, "direct_passes", 1)
    skipped: dict[str, str] = {}
    ms: list[Method] = []
    if "uring" in only:
        combos = {(qd, ch) for qd in _csv(args.qd) for ch in _csv(args.chunk, _chunk_arg)} | {(DEFAULT_QUEUE_DEPTH, DEFAULT_CHUNK_SIZE)}
        for qd, ch in sorted(combos):
            ms.append(Method("uring", f"io_uring qd={qd} chunk={fmt_bytes(ch)}", {"queue_depth": qd, "chunk_size": ch, "fixed_buffers": False},
                             lambda p, e, a, qd=qd, ch=ch, **kw: m_reader(p, e, a, backend="io_uring", qd=qd, chunk=ch, **kw), dp))
        qd, ch = DEFAULT_QUEUE_DEPTH, DEFAULT_CHUNK_SIZE
        ms.append(Method("uring", f"io_uring qd={qd} chunk={fmt_bytes(ch)} fixed-bufs", {"queue_depth": qd, "chunk_size": ch, "fixed_buffers": True},
                         lambda p, e, a, qd=qd, ch=ch, **kw: m_reader(p, e, a, backend="io_uring", qd=qd, chunk=ch, fixed=True, **kw), dp))
    if "pread" in only:
        for t in _csv(args.threads):
            ms.append(Method("pread", f"pread O_DIRECT {t} thread{'s' * (t > 1)}", {"threads": t, "chunk_size": 4 << 20},
                             lambda p, e, a, t=t, **kw: m_reader(p, e, a, backend="threads", qd=t, chunk=4 << 20, threads=t, **kw), dp))
    if "buffered" in only:
        ms.append(Method("buffered", "buffered read (FADV_SEQUENTIAL)", {"chunk_size": 4 << 20}, m_buffered, pc))
    if "mmap" in only:
        for label, adv in (("plain", None), ("MADV_SEQUENTIAL", mmap.MADV_SEQUENTIAL), ("MADV_WILLNEED", mmap.MADV_WILLNEED)):
            ms.append(Method("mmap", f"mmap touch {label}", {"madvise": label},
                             lambda p, e, a, adv=adv, **kw: m_mmap(p, e, a, advice=adv, **kw), pc))
    if "cgroup" in only:
        why = cgroup_unavailable()
        if why:
            skipped["mmap_cgroup"] = why
        else:
            limit = cgroup_limit(file_size)
            ms.append(Method("mmap_cgroup", f"mmap touch in cgroup (limit {fmt_bytes(limit)})", {"memory_limit": limit, "madvise": "plain"},
                             lambda p, e, a, limit=limit, **kw: m_mmap_cgroup(p, e, a, limit=limit, **kw), pc))
    if "fio" in only:
        if shutil.which("fio") is None:
            skipped["fio"] = "fio is not installed"
        else:
            for qd, fixed in FIO_VARIANTS:
                ms.append(Method("fio", f"fio io_uring direct qd={qd} bs=4M{' fixedbufs' if fixed else ''}",
                                 {"queue_depth": qd, "block_size": 4 << 20, "fixed_buffers": fixed},
                                 lambda p, e, a, qd=qd, fixed=fixed, **kw: m_fio(p, e, a, qd=qd, fixedbufs=fixed, **kw), dp))
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
    cold = not args.no_drop and drop_caches()
    cache = "cold" if cold else ("warm (--no-drop)" if args.no_drop else "warm (not root: page cache not dropped)")
    max_window = max([m.params.get("queue_depth", 1) * m.params.get("chunk_size", 0) for m in methods if m.family in ("uring", "pread")] + [1 << 20])
    arena = Arena(min(max(2 * max_window, 64 << 20), 1 << 30), name="bench-io") if any(m.family in ("uring", "pread") for m in methods) else None
    log = (lambda *a: print(*a, file=sys.stderr, flush=True))
    log(f"bench-io: {path}: {len(extents)} extents, {fmt_bytes(nbytes)} per pass, {args.reps} interleaved reps, "
        f"{getattr(args, 'passes', 3)} passes (page cache) / {getattr(args, 'direct_passes', 1)} (O_DIRECT, fio), cache {cache}")
    try:
        for rep in range(args.reps):
            for m in methods:
                if m.error:
                    continue
                if cold:
                    drop_caches()
                try:
                    r = m.fn(path, extents, arena, passes=m.passes, nbytes=nbytes)
                except (FlexioError, OSError, subprocess.SubprocessError, ValueError, KeyError) as e:
                    m.error = str(e)
                    if m.family == "mmap_cgroup":
                        skipped["mmap_cgroup"] = m.error
                    log(f"  {m.name}: failed: {e}")
                    continue
                m.runs.append(r)
                m.nbytes = r.nbytes
                per_pass = " ".join(f"{r.nbytes / s / 1e9:.2f}" for s in r.secs)
                log(f"  rep {rep + 1} {m.name:<44} {m.gbps()[-1]:6.2f} GB/s  cpu/pass {m.cpu()[-1]:5.2f} s  passes [{per_pass}]")
    finally:
        if arena is not None:
            arena.close()
    report = make_report(path, methods, skipped, nbytes, tensor_bytes, cache, args)
    if args.json:
        print(json.dumps(report, indent=None))
    else:
        print_table(report)
    return 0


def _stats(g: list[float]) -> dict:
    med = _median(g)
    return {"gbps": round(med, 3), "gbps_min": round(min(g), 3), "gbps_max": round(max(g), 3),
            "spread": round((max(g) - min(g)) / med, 3), "runs": [round(x, 3) for x in g]}


def _evidence(m: Method) -> dict:
    """Per-method proof of what was read: checksum/pages of page-touch, device read bytes per pass, cgroup stats."""
    ev: dict = {}
    infos = [r.info for r in m.runs]
    sums = {c for i in infos for c in i.get("checksums", [])}
    if sums:
        ev["checksum"] = sums.pop() if len(sums) == 1 else sorted(sums)
    if any("pages" in i for i in infos):
        ev["pages_per_pass"] = infos[0]["pages"][0]
    disk = [i.get("disk_read") for i in infos if i.get("disk_read")]
    if disk and all(d is not None for row in disk for d in row):
        ev["device_read_gb_per_pass"] = [round(_median([row[k] for row in disk]) / 1e9, 3) for k in range(len(disk[0]))]
    for k in ("majflt", "minflt"):
        rows = [i[k] for i in infos if k in i]
        if rows:
            ev[f"{k}_per_pass"] = [int(_median([row[j] for row in rows])) for j in range(len(rows[0]))]
    if m.family == "mmap_cgroup":
        for k in ("cgroup", "max_usage", "failcnt", "cgroup_pgmajfault", "cgroup_pgpgin"):
            vals = [i.get(k) for i in infos if i.get(k) is not None]
            if vals:
                ev[k] = vals[-1] if k == "cgroup" else int(_median(vals))
    if m.family == "fio" and infos:
        ev["command"] = infos[0].get("command")
    return ev


RATIO_BASIS = {
    "uring_vs_fio": "default io_uring median / best fio variant median (both O_DIRECT, every pass cold)",
    "uring_best_vs_fio": "best io_uring variant median / best fio variant median",
    "uring_vs_pread": "default io_uring / best thread-pool pread O_DIRECT",
    "uring_vs_buffered": "default io_uring / buffered read, pass 1 (cold)",
    "uring_vs_mmap": "default io_uring / best mmap page-touch variant, pass 1 (cold; no memory limit)",
    "uring_vs_mmap_warm": "default io_uring / best mmap page-touch, passes 2..N (no memory limit: the file stays in the page cache)",
    "uring_vs_mmap_cgroup": "default io_uring / mmap page-touch inside a cgroup memory limit of 50 % of the file, passes 2..N "
                            "(steady state of an mmap engine re-reading the model every token under memory pressure)",
    "uring_vs_mmap_cgroup_first_pass": "default io_uring / mmap page-touch in the cgroup, pass 1 (cold)",
}


def make_report(path, methods, skipped, nbytes, tensor_bytes, cache, args) -> dict:
    reps = args.reps
    results = []
    by_family: dict[str, list[dict]] = {}
    for m in methods:
        if not m.runs:
            continue
        passes = len(m.runs[0].secs)
        g, g1 = m.gbps(), m.gbps_first()
        r = {"method": m.family, "name": m.name, **m.params, "passes": passes,
             "basis": f"passes 2..{passes} (steady state)" if passes > 1 else "single pass (cold)",
             **_stats(g), "cpu_s": round(_median(m.cpu()), 3),
             "gbps_first_pass": round(_median(g1), 3), "runs_first_pass": [round(x, 3) for x in g1],
             "cpu_s_first_pass": round(_median([x.cpu[0] for x in m.runs]), 3)}
        if passes > 1:
            r["gbps_later_passes"] = r["gbps"]
        r.update(_evidence(m))
        results.append(r)
        by_family.setdefault(m.family, []).append(r)
    default = next((r for r in by_family.get("uring", []) if r["queue_depth"] == DEFAULT_QUEUE_DEPTH
                    and r["chunk_size"] == DEFAULT_CHUNK_SIZE and not r["fixed_buffers"]), None)
    best = max(by_family.get("uring", []), key=lambda r: r["gbps"], default=None)
    for r in results:
        r["default"] = r is default
        r["best"] = r is best

    def top(fam, key="gbps", later=False):
        rs = [r for r in by_family.get(fam, []) if not later or r["passes"] > 1]
        return max((r[key] for r in rs), default=None)

    ratios, basis = {}, {}

    def put(key, den, u=None):
        num = u if u is not None else (default["gbps"] if default else None)
        if num and den:
            ratios[key] = round(num / den, 3)
            basis[key] = RATIO_BASIS.get(key, "")

    if default:
        put("uring_vs_fio", top("fio"))
        if best:
            put("uring_best_vs_fio", top("fio"), best["gbps"])
        put("uring_vs_pread", top("pread"))
        put("uring_vs_buffered", top("buffered", "gbps_first_pass"))
        put("uring_vs_mmap", top("mmap", "gbps_first_pass"))
        put("uring_vs_mmap_warm", top("mmap", "gbps_later_passes", later=True))
        cg = top("mmap_cgroup", "gbps_later_passes", later=True)
        if cg:
            put("uring_vs_mmap_cgroup", cg)
        else:  # --passes 1: only the cold pass exists
            put("uring_vs_mmap_cgroup", top("mmap_cgroup", "gbps_first_pass"))
            if "uring_vs_mmap_cgroup" in ratios:
                basis["uring_vs_mmap_cgroup"] = "default io_uring / mmap page-touch in the cgroup, pass 1 only (--passes 1)"
        put("uring_vs_mmap_cgroup_first_pass", top("mmap_cgroup", "gbps_first_pass"))
        for r in by_family.get("mmap", []):
            put(f"uring_vs_mmap_{r['madvise'].lower()}", r["gbps_first_pass"])
            basis[f"uring_vs_mmap_{r['madvise'].lower()}"] = f"default io_uring / mmap {r['madvise']}, pass 1 (cold)"
    sums = {r["checksum"] for r in results if isinstance(r.get("checksum"), int)}
    checks = {"page_checksums_agree": len(sums) <= 1 and not any(isinstance(r.get("checksum"), list) for r in results)}
    return {
        "file": os.path.abspath(path),
        "bytes": nbytes,
        "tensor_bytes": tensor_bytes,
        "cache": cache,
        "reps": reps,
        "passes": {"page_cache_methods": getattr(args, "passes", 3), "direct_methods": getattr(args, "direct_passes", 1)},
        "machine": {"kernel": platform.release(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "default": {"queue_depth": DEFAULT_QUEUE_DEPTH, "chunk_size": DEFAULT_CHUNK_SIZE},
        "results": results,
        "ratios": ratios,
        "ratio_basis": basis,
        "checks": checks,
        "skipped": skipped,
        "errors": {m.name: m.error for m in methods if m.error},
        "notes": "GB/s = bytes per pass / wall seconds, median of interleaved reps. Page-cache methods run several passes "
                 "in one process without dropping the cache; their 'gbps' is passes 2..N (steady state) and "
                 "'gbps_first_pass' the cold pass. O_DIRECT methods and fio read cold on every pass. "
                 "Ratios use the default io_uring config; see ratio_basis for what each compares.",
    }


def print_table(rep: dict) -> None:
    print(f"flexio bench-io  {rep['file']}")
    print(f"  {fmt_bytes(rep['bytes'])} per pass (layer tensors {fmt_bytes(rep['tensor_bytes'])}), cache {rep['cache']}, "
          f"{rep['reps']} interleaved reps, kernel {rep['machine']['kernel']}, {rep['machine']['cpus']} CPUs")
    print("  GB/s: passes 2..N for multi-pass methods (steady state), else the single cold pass; 'pass 1' = cold first pass")
    print(f"  {'method':<46} {'passes':>6} {'median GB/s':>11} {'min':>6} {'max':>6} {'spread':>7} {'pass 1':>7} {'cpu s/pass':>10}")
    for r in rep["results"]:
        tag = " *default" if r["default"] else (" *best" if r["best"] else "")
        print(f"  {r['name'] + tag:<46} {r['passes']:>6} {r['gbps']:>11.2f} {r['gbps_min']:>6.2f} {r['gbps_max']:>6.2f} "
              f"{r['spread']:>6.0%} {r['gbps_first_pass']:>7.2f} {r['cpu_s']:>10.2f}")
    for k, why in rep["skipped"].items():
        print(f"  {k}: skipped ({why})")
    for k, why in rep["errors"].items():
        print(f"  {k}: error ({why})")
    if not rep["checks"]["page_checksums_agree"]:
        print("  WARNING: page-touch checksums differ between methods")
    print("  ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in rep["ratios"].items()))
