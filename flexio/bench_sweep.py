"""`python -m flexio bench-sweep MODEL` -> JSON lines + PNG: decode tok/s vs memory budget, per mode, with the bound.

Each point (mode, budget) runs `flexio generate --json` in a fresh child process,
cold: the page cache is dropped first when we are root, and the child is placed in a
cgroup v1 memory cgroup whose limit is the budget plus a stated fixed overhead
(Python, Numba, tokenizer, KV cache, scratch) when cgroups are writable — the
paper's setting, so `mmap` mode gets exactly the budget of page cache. Weights are
read with O_DIRECT, so the page cache cannot hold them behind the budget's back;
peak memory is read from the cgroup (or the child's rusage).

The bound of a point is 1 / max(T_io, T_cpu): T_io = streamed bytes per token /
disk bandwidth (fio when installed, else the best raw io_uring O_DIRECT read of the
file, measured in the same run), T_cpu = the in-memory decode time per token
(mode `memory`, measured in the same run).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from .bench_io import drop_caches
from .fetch import model_path
from .gguf import open_gguf
from .plan import MODES, fmt_bytes, parse_size, plan_budget

CGROUP_V1 = "/sys/fs/cgroup/memory"
OVERHEAD = 768 << 20  # Python + Numba + numpy + tokenizer + KV cache + scratch (measured RSS of memory mode minus weights)
PROMPT = "The history of computing"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a .gguf path or a known model name")
    p.add_argument("--budgets", default="10%,25%,50%,75%,90%,100%",
                   help="comma-separated budgets: percentages of the model or sizes (default: %(default)s)")
    p.add_argument("--modes", default="flexinfer,no-balance,prefetch-only,sync,mmap",
                   help=f"comma-separated modes among {', '.join(MODES)} (default: %(default)s)")
    p.add_argument("-n", "--decode-tokens", type=int, default=8, help="tokens decoded per point (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--overhead", default=str(OVERHEAD), help="memory added to the budget for the cgroup limit")
    p.add_argument("--no-cgroup", action="store_true", help="do not confine the children in a memory cgroup")
    p.add_argument("--llama-cpp", action="store_true", help="also run llama.cpp (mmap) in the same cgroup limit")
    p.add_argument("--out", default=None, help="PNG path (default: bench/results/sweep-<model>.png)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per point before it is recorded as failed")


def _cold() -> bool:
    """Drop the page cache when we are root; False when the figures will be warm."""
    return os.geteuid() == 0 and drop_caches()


class MemCgroup:
    """A cgroup v1 memory cgroup for one child; removed on exit."""

    def __init__(self, limit: int):
        self.path = os.path.join(CGROUP_V1, f"flexio-sweep-{os.getpid()}-{time.monotonic_ns()}")
        os.mkdir(self.path)
        try:
            with open(os.path.join(self.path, "memory.limit_in_bytes"), "w") as f:
                f.write(str(limit))
        except OSError:
            os.rmdir(self.path)
            raise

    def join_fn(self):
        procs = os.path.join(self.path, "cgroup.procs")

        def join() -> None:  # runs in the child between fork and exec
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        return join

    def peak(self) -> int | None:
        try:
            return int(open(os.path.join(self.path, "memory.max_usage_in_bytes")).read())
        except OSError:
            return None

    def close(self) -> None:
        for _ in range(50):
            try:
                os.rmdir(self.path)
                return
            except OSError:
                time.sleep(0.1)


def cgroups_usable() -> tuple[bool, str]:
    if not os.path.isdir(CGROUP_V1):
        return False, f"{CGROUP_V1} is not mounted (no cgroup v1 memory controller)"
    if not os.access(CGROUP_V1, os.W_OK):
        return False, f"{CGROUP_V1} is not writable (needs root)"
    return True, ""


def _child(cmd: list[str], limit: int | None, timeout: float) -> dict:
    cg = None
    if limit is not None:
        cg = MemCgroup(limit)
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
        res["peak_bytes"] = cg.peak() if cg else None
        return res
    finally:
        if cg:
            cg.close()


def _disk_ceiling(path: str, reps: int = 2) -> tuple[float, str]:
    """Bytes/s of the best cold read of the file's layers: fio (io_uring, O_DIRECT, registered
    buffers) when installed, else flexio's own io_uring reader; best of `reps` cold runs."""
    from .arena import Arena
    from .bench_io import layer_extents, m_fio, m_reader

    extents, nbytes, _ = layer_extents(path)
    best, how = 0.0, ""
    for _ in range(reps):
        _cold()
        if shutil.which("fio"):
            run, how = m_fio(path, extents, None, fixedbufs=True, nbytes=nbytes), "fio"
        else:
            with Arena(32 * (4 << 20), name="ceiling", lock=False) as arena:
                run, how = m_reader(path, extents, arena, backend="io_uring", qd=32, chunk=4 << 20, nbytes=nbytes), "io_uring"
        best = max(best, run.nbytes / run.secs[0])
    return best, how


def _fit_r2(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 3:
        return None
    import numpy as np

    x, y = np.asarray(xs, float), np.asarray(ys, float)
    a, b = np.polyfit(x, y, 1)
    ss_res = float(((y - (a * x + b)) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else None


def _plot(points: list[dict], bound: list[tuple[float, float]], title: str, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    modes = sorted({p["mode"] for p in points})
    for m in modes:
        pts = sorted((p["budget_frac"], p["decode_tok_s"]) for p in points if p["mode"] == m and p.get("decode_tok_s"))
        if pts:
            ax.plot([100 * a for a, _ in pts], [b for _, b in pts], marker="o", label=m)
    if bound:
        bound = sorted(bound)
        ax.plot([100 * a for a, _ in bound], [b for _, b in bound], "k--", label="bound 1/max(T_io, T_cpu)")
    ax.set_xlabel("memory budget (% of model weights)")
    ax.set_ylabel("decode tokens/s")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    path = model_path(args.model)
    gf = open_gguf(path)
    total = sum(t.nbytes for t in gf.tensors)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"flexio bench-sweep: unknown mode {m!r}")
    budgets = [parse_size(b.strip(), total) for b in args.budgets.split(",") if b.strip()]
    overhead = parse_size(args.overhead)
    use_cg, why = (False, "--no-cgroup") if args.no_cgroup else cgroups_usable()
    root = os.geteuid() == 0
    header = {"model": path, "model_bytes": total, "threads": args.threads, "decode_tokens": args.decode_tokens,
              "cold": root, "cgroup": use_cg, "cgroup_overhead_bytes": overhead if use_cg else None}
    if not use_cg:
        header["cgroup_skipped"] = why
    if not root:
        header["note"] = "not root: caches not dropped, figures are warm"
    ceiling, how = _disk_ceiling(path)
    header.update(disk_bps=round(ceiling), disk_ceiling_by=how)
    gen = [sys.executable, "-m", "flexio", "generate", "--model", path, "--prompt", PROMPT,
           "-n", str(args.decode_tokens), "--threads", str(args.threads), "--json"]
    # in-memory compute time per token, warm (the compute side of the bound)
    mem = _child(gen + ["--mode", "memory"], None, args.timeout)
    mem = _child(gen + ["--mode", "memory"], None, args.timeout) if "error" not in mem else mem
    t_cpu = 1.0 / mem["decode_tok_s"] if mem.get("decode_tok_s") else None
    header.update(memory_decode_tok_s=mem.get("decode_tok_s"), t_cpu_s=t_cpu, memory_error=mem.get("error"))
    print(json.dumps({"header": header}), flush=True)
    points, bound = [], []
    for budget in budgets:
        frac = budget / total
        for mode in modes:
            try:
                plan = plan_budget(gf, budget, mode=mode) if mode != "mmap" else None
            except Exception as e:  # below the minimum for this mode
                rec = {"mode": mode, "budget_bytes": budget, "budget_frac": round(frac, 4), "error": str(e)}
                print(json.dumps(rec), flush=True)
                points.append(rec)
                continue
            streamed = plan.streamed_bytes_per_token if plan else max(0, total - budget)
            t_io = streamed / ceiling
            bound_tok_s = 1.0 / max(t_io, t_cpu or 0.0) if max(t_io, t_cpu or 0.0) > 0 else None
            _cold()
            limit = budget + overhead if use_cg else None
            res = _child(gen + ["--mode", mode, "--budget", str(budget)], limit, args.timeout)
            rec = {"mode": mode, "budget_bytes": budget, "budget_frac": round(frac, 4),
                   "streamed_bytes_per_token": streamed, "decode_tok_s": res.get("decode_tok_s"),
                   "bound_tok_s": round(bound_tok_s, 3) if bound_tok_s else None,
                   "peak_rss_bytes": res.get("peak_bytes"), "cgroup_limit_bytes": limit,
                   "policy": res.get("policy"), "io_backend": res.get("io_backend")}
            if rec["decode_tok_s"] and bound_tok_s:
                rec["ratio_to_bound"] = round(rec["decode_tok_s"] / bound_tok_s, 3)
            if "error" in res:
                rec["error"] = res["error"]
            print(json.dumps(rec), flush=True)
            points.append(rec)
            if mode == modes[0] and bound_tok_s:
                bound.append((frac, bound_tok_s))
        if args.llama_cpp:
            _cold()
            res = _llama_cpp_point(path, args, budget + overhead if use_cg else None)
            rec = {"mode": "llama.cpp-mmap", "budget_bytes": budget, "budget_frac": round(frac, 4), **res}
            print(json.dumps(rec), flush=True)
            points.append(rec)
    summary = {"summary": True}
    fx = [p for p in points if p["mode"] == "flexinfer" and p.get("decode_tok_s")]
    if fx:
        summary["flexinfer_min_ratio_to_bound"] = min(p.get("ratio_to_bound", 0) for p in fx)
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


def _llama_cpp_point(path: str, args, limit: int | None) -> dict:
    """llama.cpp decoding with mmap (its default) in the same cgroup limit, in a child process.

    Its weight repacking for AVX2 (CPU_REPACK extra buffers) is turned off: it copies Q4_0/Q4_K
    weights into anonymous memory at load, which is not the mmap baseline and is OOM-killed under
    a limit below the model size."""
    code = (
        "import json,sys,time,llama_cpp,llama_cpp.llama_cpp as low\n"
        # no CPU_REPACK copies of Q4_0/Q4_K weights: they would live in anonymous memory, not the page cache
        "_defaults=low.llama_model_default_params\n"
        "def _params():\n"
        "    p=_defaults(); p.use_extra_bufts=False; return p\n"
        "low.llama_model_default_params=_params\n"
        "llama_cpp.llama_model_default_params=_params\n"
        f"llm=llama_cpp.Llama({path!r},n_threads={args.threads},n_ctx=256,verbose=False)\n"
        f"toks=llm.tokenize({PROMPT!r}.encode(),add_bos=False)\n"
        "llm.eval(toks)\n"
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
