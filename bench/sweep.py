"""`python -m flexio bench-sweep MODEL` -> JSON lines + PNG: decode tok/s vs memory budget, per mode, with the bound.

Each point (mode, budget) runs `python -m flexio_bench.point` in a fresh child process,
cold: the page cache is dropped first when we are root, and the child is placed in a
cgroup v1 memory cgroup whose limit is the budget plus a stated fixed overhead
(Python, Numba, tokenizer, KV cache, scratch) when cgroups are writable — the
paper's setting, so `mmap` mode gets exactly the budget of page cache. Weights are
read with O_DIRECT, so the page cache cannot hold them behind the budget's back;
peak memory is read from the cgroup (or the child's rusage).

The bound of a point is 1 / max(T_io, T_cpu): T_io = streamed bytes per token /
disk bandwidth, T_cpu = the in-memory decode time per token (mode `memory`, same
run). The disk bandwidth is measured for each point, right before and right after
it: the raw io_uring reader (O_DIRECT, depth 64, no engine, no compute) reads the
very reads the point's plan issues per token (same offsets, same 4 MiB pieces)
twice over, after one unmeasured pass, as decode re-reads them. (fio cannot
replay them: its iolog replay under-counts bytes. The header compares the raw
reader with fio on the whole file, in the same run.) On a virtual disk whose speed swings from minute
to minute (and whose host caches what was read recently), a single ceiling for
the whole sweep would make the ratios noise. With --reps N every point runs N
times, the points interleaved, and the lines give medians.

The bound takes I/O to cost no CPU, as DMA from an SSD does. On a VM whose host
serves the virtual disk from its page cache, the host's copy runs on the physical
cores behind our vCPUs: while they compute, the disk is slower and the hypervisor
steals CPU time from the compute. The header measures both (a cold read with the
CPUs kept busy vs idle, and the steal per GB read); each point reports its
decode's steal (`steal_s_per_token`) and a second bound that charges the steal of
its streamed bytes to the compute, `shared_cpu_bound_tok_s` (see shared_cpu_bound). `bound_tok_s` stays the
paper's bound, the one the ratios are judged by.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from flexio.errors import ParameterError
from flexio.experts import POLICIES as EXPERT_POLICIES
from flexio.fetch import model_path
from flexio.gguf import open_gguf
from flexio.modes import MODES
from flexio.plan import Plan, model_footprint, plan_budget
from flexio.prefetch import stage_reads
from flexio.reader import DEFAULT_CHUNK_SIZE
from flexio.units import aligned_span, fmt_bytes, parse_size

from .cgroup import MemCgroup, cgroup_unavailable, drop_caches
from .disk import pieces
from .plot import figure, save
from .point import cpu_steal_seconds

HELP = "decode tok/s vs memory budget for each mode, with a PNG plot"  # one line for `flexio --help`

OVERHEAD = 768 << 20  # Python + Numba + numpy + tokenizer + KV cache + scratch (measured RSS of memory mode minus weights)
PROMPT = "The history of computing"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a .gguf path or a known model name")
    p.add_argument("--budgets", default="10%,25%,50%,75%,90%,100%",
                   help="comma-separated budgets: percentages of the model or sizes (default: %(default)s)")
    p.add_argument("--modes", default="flexinfer,no-balance,prefetch-only,sync,mmap",
                   help=f"comma-separated modes among {', '.join(MODES)} (default: %(default)s)")
    p.add_argument("-n", "--decode-tokens", type=int, default=8, help="tokens decoded per point (default: %(default)s)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="compute threads (default: all cores)")
    p.add_argument("--reps", type=int, default=1, help="runs of every point, interleaved; lines give medians")
    p.add_argument("--warmup", type=int, default=0,
                   help="tokens each point generates before the measured run (a mixture of experts' cache, or "
                        "llama.cpp's page cache, then holds what decode uses: the steady state of a server; "
                        "default: %(default)s, a cold start)")
    p.add_argument("--overhead", default=str(OVERHEAD), help="memory added to the budget for the cgroup limit")
    p.add_argument("--no-cgroup", action="store_true", help="do not confine the children in a memory cgroup")
    p.add_argument("--llama-cpp", action="store_true", help="also run llama.cpp (mmap) in the same cgroup limit")
    p.add_argument("--out", default=None, help="PNG path (default: bench/results/sweep-<model>.png)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per point before it is recorded as failed")
    p.add_argument("--expert-policy", default="lfu", choices=EXPERT_POLICIES,
                   help="a mixture of experts' cache policy (default: %(default)s)")


def _cold() -> bool:
    """Drop the page cache when we are root; False when the figures will be warm."""
    return os.geteuid() == 0 and drop_caches()


def _child(cmd: list[str], limit: int | None, timeout: float) -> dict:
    cg = MemCgroup(f"flexio-sweep-{os.getpid()}-{time.monotonic_ns()}", limit) if limit is not None else None
    t0 = time.perf_counter()
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=cg.join_fn() if cg else None)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            return {"error": f"timed out after {timeout:.0f} s"}
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            tail = err.strip().splitlines()[-3:]
            return {"error": f"exit {proc.returncode}: {' | '.join(tail)}"}
        res = json.loads(out.strip().splitlines()[-1])
        res["wall_s"] = round(wall, 2)
        res["peak_bytes"] = cg.read_int("memory.max_usage_in_bytes") if cg else res.get("peak_rss_bytes")  # the cgroup's count includes page cache
        return res
    finally:
        if cg:
            cg.close()


def _disk_ceiling(path: str, threads: int = 1, reps: int = 2) -> dict:
    """The sweep's reference figures, best of `reps` interleaved cold reads of the file's layers:
    fio (io_uring, O_DIRECT, registered buffers) when installed; flexio's raw io_uring reader, which
    measures each point's own ceiling (their ratio shows that ceiling is fio's); and the raw reader
    again with `threads` CPUs kept busy by spinning processes (the decode's compute, without its
    memory traffic), with the hypervisor's steal during it. Does reading cost this machine CPU
    time? On bare metal the busy and idle rates match and nothing is stolen; on a VM whose host
    serves the disk from its page cache, the host's copy runs on the cores behind our vCPUs."""
    from .disk import layer_extents, m_fio

    extents, nbytes, _ = layer_extents(path)
    fio = raw = busy = 0.0
    steal = []
    for _ in range(reps):
        if shutil.which("fio"):
            _cold()
            run = m_fio(path, extents, None, fixedbufs=True, nbytes=nbytes)
            fio = max(fio, run.nbytes / run.secs[0])
        _cold()
        raw = max(raw, read_rate(path, extents, passes=1))
        _cold()
        spin = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(threads)]
        try:
            time.sleep(0.2)  # let them start
            s0 = cpu_steal_seconds()
            busy = max(busy, read_rate(path, extents, passes=1))
            steal.append((cpu_steal_seconds() - s0) / nbytes)
        finally:
            for q in spin:
                q.kill()
                q.wait()
    out = {"disk_bps_raw_io_uring": round(raw)}
    if fio:
        out.update(disk_bps_fio=round(fio), raw_io_uring_vs_fio=round(raw / fio, 3))
    out.update(disk_bps_cpus_busy=round(busy), disk_busy_vs_idle=round(busy / raw, 3) if raw else None,
               steal_s_per_gb_while_reading=round(1e9 * statistics.median(steal), 4))
    return out


def shared_cpu_bound(streamed: int, disk_bps: float, t_cpu: float, threads: int, shared: dict) -> float | None:
    """tok/s of 1/max(T_io, T_cpu') on a machine whose reads cost its own CPUs (`_disk_ceiling`):
    the host's copy of the streamed bytes (steal per GB x GB) and the compute share the compute
    threads' cores, so T_cpu' = T_cpu + that steal / threads; T_io is the disk's own rate (the
    point's ceiling, measured with the CPUs idle, so it already includes the copy)."""
    steal = shared.get("steal_s_per_gb_while_reading")
    if not t_cpu or steal is None:
        return None
    t_io = streamed / disk_bps if streamed and disk_bps else 0.0
    return 1.0 / max(t_io, t_cpu + steal * streamed / 1e9 / max(threads, 1))


def plan_reads(plan: Plan, size: int) -> list[tuple[int, int]]:
    """The (offset, nbytes) reads one decode pass of `plan` issues, in order, cut into the
    reader's chunks: what the engine asks of the disk per token (the spans StageStream reads,
    clipped at EOF as it clips them)."""
    spans = [(start, min(nbytes, size - start)) for s in plan.stages for start, nbytes, _, _ in stage_reads(s)]
    return list(pieces(spans + expert_reads(plan, size), DEFAULT_CHUNK_SIZE))


def expert_reads(plan: Plan, size: int) -> list[tuple[int, int]]:
    """A mixture of experts' cache misses of one pass, as the expert cache reads them (each tensor's
    slice of an expert, widened to DIRECT_ALIGN): in each layer, as many experts as the plan expects
    to miss (rounded up), different ones from layer to layer."""
    ex = plan.experts
    if ex is None or ex.where != "cache":
        return []
    miss = math.ceil(ex.n_used * (1.0 - ex.hit_rate))
    out = []
    for L in ex.layers:
        for j in range(miss):
            for off, n in L.ranges((7 * L.layer + j) % ex.n_expert):
                start, span = aligned_span(off, n)
                out.append((start, min(span, size - start)))
    return out


def _raw_reads(path: str, extents: list[tuple[int, int]], passes: int, depth: int) -> list[float]:
    """Seconds of each of `passes` passes over `extents` by flexio's reader (O_DIRECT, io_uring
    unless it falls back) at `depth`, into a ring of unlocked buffers: nothing else going on."""
    from flexio.arena import Arena

    from .disk import m_reader

    qd = max(1, min(depth, sum(-(-n // DEFAULT_CHUNK_SIZE) for _, n in extents)))
    with Arena(qd * DEFAULT_CHUNK_SIZE, name="ceiling", lock=False) as arena:
        return m_reader(path, extents, arena, backend="auto", qd=qd, chunk=DEFAULT_CHUNK_SIZE, passes=passes).secs


def read_rate(path: str, extents: list[tuple[int, int]], passes: int, depth: int = 64) -> float:
    """Bytes/s of reading `extents` `passes` times over (see _raw_reads)."""
    if not extents:
        return 0.0
    return passes * sum(n for _, n in extents) / sum(_raw_reads(path, extents, passes, depth))


def point_ceiling(path: str, reads: list[tuple[int, int]]) -> float:
    """The disk's rate for this point's reads as decode sees them: three passes, the first
    unmeasured (decode re-reads the same bytes every token)."""
    return 2 * sum(n for _, n in reads) / sum(_raw_reads(path, reads, 3, 64)[1:])


def _fit_r2(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 3:
        return None
    import numpy as np

    x, y = np.asarray(xs, float), np.asarray(ys, float)
    a, b = np.polyfit(x, y, 1)
    ss_res = float(((y - (a * x + b)) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else None


def _plot(points: list[dict], bound: dict[str, list[tuple[float, float]]], title: str, out: str) -> None:
    fig, ax = figure()
    modes = sorted({p["mode"] for p in points})
    for m in modes:
        pts = sorted((p["budget_frac"], p["decode_tok_s"]) for p in points if p["mode"] == m and p.get("decode_tok_s"))
        if pts:
            ax.plot([100 * a for a, _ in pts], [b for _, b in pts], marker="o", label=m)
    for key, style, label in (("bound_tok_s", "k--", "bound 1/max(T_io, T_cpu)"),
                              ("shared_cpu_bound_tok_s", "k:", "bound if reads cost CPU (steal)")):
        if bound.get(key):
            ax.plot([100 * a for a, _ in bound[key]], [b for _, b in bound[key]], style, label=label)
    ax.set_xlabel("memory budget (% of model weights)")
    ax.set_ylabel("decode tokens/s")
    ax.set_yscale("log")
    save(fig, ax, title, out)


def run(args: argparse.Namespace) -> int:
    path = model_path(args.model)
    gf = open_gguf(path)
    total = model_footprint(gf)  # what a percentage budget is of (the planner's base too)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            raise ParameterError(f"--modes: unknown mode {m!r} (one of: {', '.join(MODES)})", param="--modes")
    budgets = [parse_size(b.strip(), total, what="--budgets") for b in args.budgets.split(",") if b.strip()]
    overhead = parse_size(args.overhead, what="--overhead")
    why = "--no-cgroup" if args.no_cgroup else cgroup_unavailable()
    use_cg = why is None
    root = os.geteuid() == 0
    header = {"model": path, "model_bytes": total, "threads": args.threads, "decode_tokens": args.decode_tokens,
              "warmup_tokens": args.warmup,
              "cold": root, "cgroup": use_cg, "cgroup_overhead_bytes": overhead if use_cg else None}
    if not use_cg:
        header["cgroup_skipped"] = why
    if not root:
        header["note"] = "not root: caches not dropped, figures are warm"
    shared = _disk_ceiling(path, args.threads)
    header.update(shared, reps=args.reps)
    gen = [sys.executable, "-m", "flexio_bench.point", "--model", path, "--prompt", PROMPT,
           "-n", str(args.decode_tokens), "--threads", str(args.threads), "--expert-policy", args.expert_policy,
           "--warmup", str(args.warmup)]
    # in-memory compute time per token, warm (the compute side of the bound): best of two
    mems = [_child(gen + ["--mode", "memory"], None, args.timeout) for _ in range(2)]
    mem_tok_s = max((m.get("decode_tok_s") or 0.0 for m in mems), default=0.0)
    t_cpu = 1.0 / mem_tok_s if mem_tok_s else None
    header.update(memory_decode_tok_s=mem_tok_s or None, t_cpu_s=t_cpu,
                  memory_error=next((m["error"] for m in mems if "error" in m), None))
    print(json.dumps({"header": header}), flush=True)
    cost = None
    if any(MODES[m].policy is None and MODES[m].reads for m in modes):  # modes whose auto policy uses the cost model
        from flexio.calibrate import calibrate

        cost = calibrate(gf, args.threads)  # the cost model the children's auto policy uses (cached)
    runs: dict[tuple[str, int], list[dict]] = {}

    def emit(rec: dict, rep: int) -> None:  # one run: a line now (marked as a run when medians follow)
        rec["rep"] = rep
        print(json.dumps({"run": True, **rec}) if args.reps > 1 else json.dumps(rec), flush=True)
        runs.setdefault((rec["mode"], rec["budget_bytes"]), []).append(rec)
    for rep in range(args.reps):
        for budget in budgets:
            for mode in modes:
                emit(_flexio_point(path, gf, gen, mode, budget, total, cost, t_cpu, use_cg, overhead, shared, args),
                     rep)
            if args.llama_cpp:
                _cold()
                res = _llama_cpp_point(path, args, budget + overhead if use_cg else None)
                emit({"mode": "llama.cpp-mmap", "budget_bytes": budget, "budget_frac": round(budget / total, 4), **res}, rep)
    points = [_median_point(rs) for rs in runs.values()]
    if args.reps > 1:
        for p in points:
            print(json.dumps(p), flush=True)
    bound = {key: sorted((p["budget_frac"], p[key]) for p in points if p["mode"] == modes[0] and p.get(key))
             for key in ("bound_tok_s", "shared_cpu_bound_tok_s")}
    summary = {"summary": True}
    fx = [p for p in points if p["mode"] == "flexinfer" and p.get("decode_tok_s")]
    if fx:
        summary["flexinfer_min_ratio_to_bound"] = min(p.get("ratio_to_bound", 0) for p in fx)
        summary["flexinfer_ratio_to_bound"] = {f"{100 * p['budget_frac']:.0f}%": p.get("ratio_to_bound") for p in fx}
        summary["flexinfer_ratio_to_shared_cpu_bound"] = {
            f"{100 * p['budget_frac']:.0f}%": p.get("ratio_to_shared_cpu_bound") for p in fx}
        summary["r2_seconds_per_token_vs_streamed"] = _fit_r2(
            [p["streamed_bytes_per_token"] for p in fx], [1 / p["decode_tok_s"] for p in fx])
    for base in ("mmap", "llama.cpp-mmap"):
        ratios = {}
        for p in fx:
            q = next((q for q in points if q["mode"] == base and q["budget_bytes"] == p["budget_bytes"]
                      and q.get("decode_tok_s")), None)
            if q:
                ratios[f"{100 * p['budget_frac']:.0f}%"] = round(p["decode_tok_s"] / q["decode_tok_s"], 2)
        if ratios:
            summary[f"flexinfer_vs_{base}"] = ratios
    print(json.dumps(summary), flush=True)
    out = args.out or os.path.join("bench", "results", f"sweep-{os.path.splitext(os.path.basename(path))[0]}.png")
    _plot(points, bound, f"{os.path.basename(path)} ({fmt_bytes(total)}), {args.threads} threads", out)
    print(json.dumps({"plot": out}), flush=True)
    return 0


def _flexio_point(path, gf, gen, mode, budget, total, cost, t_cpu, use_cg, overhead, shared, args) -> dict:
    """One cold run of the engine (bench/point.py) at (mode, budget), between two measurements of the disk
    on the reads its plan makes."""
    frac = round(budget / total, 4)
    try:
        plan = plan_budget(gf, budget, mode=mode, cost=cost) if not MODES[mode].page_cache else None
    except Exception as e:  # below the minimum for this mode
        return {"mode": mode, "budget_bytes": budget, "budget_frac": frac, "error": str(e)}
    if plan is not None:
        reads = plan_reads(plan, gf.size)
    else:  # mmap: the page cache misses are the part of the layers the budget cannot hold
        reads = plan_reads(plan_budget(gf, budget, mode="flexinfer", policy="ffn"), gf.size)
    streamed = plan.streamed_bytes_per_token if plan else max(0, total - budget)
    before = point_ceiling(path, reads) if reads else None
    _cold()
    limit = budget + overhead if use_cg else None
    res = _child(gen + ["--mode", mode, "--budget", str(budget)], limit, args.timeout)
    after = point_ceiling(path, reads) if reads else None
    if plan is not None and res.get("streamed_bytes_per_token") is not None:
        streamed = res["streamed_bytes_per_token"]  # the child's own plan (the same cost model: the same plan)
    disk = (before + after) / 2 if reads else None
    t_io = streamed / disk if disk else 0.0
    slowest = max(t_io, t_cpu or 0.0)
    bound_tok_s = 1.0 / slowest if slowest > 0 else None
    rec = {"mode": mode, "budget_bytes": budget, "budget_frac": frac,
           "streamed_bytes_per_token": streamed,
           "decode_tok_s": res.get("decode_tok_s"),
           "bound_tok_s": round(bound_tok_s, 3) if bound_tok_s else None,
           "disk_bps_before": round(before) if before else None, "disk_bps_after": round(after) if after else None,
           "decode_stream_bps": round(res["decode_stream_gbps"] * 1e9) if res.get("decode_stream_gbps") else None,
           "decode_io_wait_s": res.get("decode_io_wait_s"),
           "steal_s_per_token": _per_token(res.get("decode_steal_s"), res.get("generated_tokens")),
           "peak_rss_bytes": res.get("peak_bytes"), "cgroup_limit_bytes": limit,
           "policy": res.get("policy"), "threads": res.get("threads"), "io_backend": res.get("io_backend")}
    if res.get("experts"):  # a mixture of experts: what its cache did, and the bytes read vs the plan's
        rec["experts"] = res["experts"]
        if res.get("decode_bytes_per_token") and streamed:
            rec["decode_bytes_per_token"] = res["decode_bytes_per_token"]
            rec["bytes_per_token_vs_expected"] = round(res["decode_bytes_per_token"] / streamed, 3)
    if rec["decode_tok_s"] and bound_tok_s:
        rec["ratio_to_bound"] = round(rec["decode_tok_s"] / bound_tok_s, 3)
    shared_bound = shared_cpu_bound(streamed, disk, t_cpu, args.threads, shared)
    if shared_bound:
        rec["shared_cpu_bound_tok_s"] = round(shared_bound, 3)
        if rec["decode_tok_s"]:
            rec["ratio_to_shared_cpu_bound"] = round(rec["decode_tok_s"] / shared_bound, 3)
    if "error" in res:
        rec["error"] = res["error"]
    return rec


def _per_token(seconds, generated) -> float | None:
    """A decode total over the decode passes (the first generated token comes from prefill)."""
    if seconds is None or not generated or generated < 2:
        return None
    return round(seconds / (generated - 1), 4)


def _median_point(rs: list[dict]) -> dict:
    """The median run of a point (by decode tok/s), with every run's tok/s and ratio beside it."""
    ok = sorted((r for r in rs if r.get("decode_tok_s")), key=lambda r: r["decode_tok_s"])
    if not ok:
        return rs[-1]
    p = dict(ok[(len(ok) - 1) // 2])
    p.pop("rep", None)
    if len(rs) > 1:
        p["decode_tok_s"] = round(statistics.median(r["decode_tok_s"] for r in ok), 3)
        for key in ("ratio_to_bound", "ratio_to_shared_cpu_bound"):
            ratios = [r[key] for r in ok if r.get(key)]
            if ratios:
                p[key] = round(statistics.median(ratios), 3)
        p["runs_decode_tok_s"] = [r.get("decode_tok_s") for r in rs]
        p["runs_ratio_to_bound"] = [r.get("ratio_to_bound") for r in rs]
    return p


def _llama_cpp_point(path: str, args, limit: int | None) -> dict:
    """llama.cpp decoding with mmap (its default) in the same cgroup limit, in a child process.

    Its weight repacking for AVX2 (CPU_REPACK extra buffers) is turned off: it copies Q4_0/Q4_K
    weights into anonymous memory at load, which is not the mmap baseline and is OOM-killed under
    a limit below the model size."""
    code = (
        "import json,sys,time,llama_cpp\n"
        "from flexio_bench.peer import repacking_off\n"
        # no CPU_REPACK copies of Q4_0/Q4_K weights: they would live in anonymous memory, not the page cache
        "with repacking_off():\n"
        f"    llm=llama_cpp.Llama({path!r},n_threads={args.threads},n_ctx=256,verbose=False)\n"
        f"toks=llm.tokenize({PROMPT!r}.encode(),add_bos=False)\n"
        "llm.eval(toks)\n"
        f"for _ in range({args.warmup}):\n"  # --warmup: decode passes before the measured ones
        "    llm.eval(toks[-1:])\n"
        "t0=time.perf_counter()\n"
        f"for _ in range({args.decode_tokens - 1}):\n"
        "    llm.eval(toks[-1:])  # the time of a pass does not depend on which token it is\n"
        "dt=time.perf_counter()-t0\n"
        f"print(json.dumps({{'decode_tok_s': round({args.decode_tokens - 1}/dt, 3)}}))\n"
    )
    if importlib.util.find_spec("llama_cpp") is None:
        return {"error": "llama-cpp-python is not installed (pip install -e .[peer])"}
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(code)
    try:
        return _child([sys.executable, f.name], limit, args.timeout)
    finally:
        os.unlink(f.name)
