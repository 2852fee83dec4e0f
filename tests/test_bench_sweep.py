"""bench-sweep: the reads a plan makes, the per-point disk ceiling (fio and without), the JSON lines and the plot."""

from __future__ import annotations

import json
import shutil

import pytest

from flexio_bench import sweep as bench_sweep
from flexio.cli import main
from flexio.gguf import open_gguf
from flexio.plan import plan_budget
from flexio.units import aligned_span
from flexio.reader import DEFAULT_CHUNK_SIZE
from flexio_bench.synth import synthesize


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_path) -> str:
    out = tmp_path_factory.mktemp("sweep") / "tiny-llama-q4_0.gguf"
    return synthesize("tiny-llama", "q4_0", str(out), tokenizer_from=smollm2_path)


@pytest.mark.parametrize("budget", ["20%", "45%"])
def test_plan_reads_are_the_streamed_bytes(tiny, budget):
    gf = open_gguf(tiny)
    plan = plan_budget(gf, budget, policy="ffn")
    reads = bench_sweep.plan_reads(plan, gf.size)
    assert reads and all(0 < n <= DEFAULT_CHUNK_SIZE and off % 4096 == 0 for off, n in reads)
    assert all(off + n <= gf.size for off, n in reads)
    # every streamed segment is covered, in stage order, by its aligned span and nothing else
    spans = [aligned_span(off, n) for s in plan.stages for _, off, n in s.segments]
    assert sum(n for _, n in reads) == sum(min(n, gf.size - o) for o, n in spans)
    assert sum(n for s in plan.stages for _, _, n in s.segments) == plan.streamed_bytes_per_token
    assert [off for off, _ in reads][:1] == [spans[0][0]]


def test_read_rate(tiny, monkeypatch):
    gf = open_gguf(tiny)
    reads = bench_sweep.plan_reads(plan_budget(gf, "40%", policy="attn"), gf.size)
    secs = bench_sweep._raw_reads(tiny, reads, 2, 4)  # the real reader: one timing per pass
    assert len(secs) == 2 and all(0 < t < 60 for t in secs)
    # the rate is the bytes of every pass over their summed time
    monkeypatch.setattr(bench_sweep, "_raw_reads", lambda path, ext, passes, depth: [0.25] * passes)
    assert bench_sweep.read_rate(tiny, reads, passes=2, depth=4) == pytest.approx(sum(n for _, n in reads) / 0.25)
    assert bench_sweep.read_rate(tiny, [], passes=1) == 0.0


@pytest.mark.parametrize("with_fio", [True, False])
def test_header_ceiling(tiny, monkeypatch, with_fio):
    if with_fio and not shutil.which("fio"):
        pytest.skip("fio is not installed")
    if not with_fio:
        real = shutil.which
        monkeypatch.setattr(bench_sweep.shutil, "which", lambda name: None if name == "fio" else real(name))
    c = bench_sweep._disk_ceiling(tiny, reps=1)
    assert c["disk_bps_raw_io_uring"] > 1e6
    assert ("disk_bps_fio" in c and c["raw_io_uring_vs_fio"] > 0) == with_fio


@pytest.mark.slow  # a dozen child processes, each loading the kernels: ~1 min on 2 cores
def test_sweep_lines_and_plot(tiny, tmp_path, capsys):
    png = tmp_path / "sweep.png"
    assert main(["bench-sweep", tiny, "--budgets", "30%", "--modes", "flexinfer,mmap", "-n", "3", "--warmup", "2",
                 "--reps", "2", "--no-cgroup", "--threads", "1", "--out", str(png)]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    header = lines[0]["header"]
    assert header["reps"] == 2 and header["memory_decode_tok_s"] > 0 and header["disk_bps_raw_io_uring"] > 0
    assert header["warmup_tokens"] == 2
    assert header["disk_bps_cpus_busy"] > 0 and header["disk_busy_vs_idle"] > 0
    assert isinstance(header["steal_s_per_gb_while_reading"], float)
    runs = [x for x in lines if x.get("run")]
    assert sorted((r["mode"], r["rep"]) for r in runs) == [("flexinfer", 0), ("flexinfer", 1), ("mmap", 0), ("mmap", 1)]
    points = {x["mode"]: x for x in lines if "mode" in x and not x.get("run")}
    assert set(points) == {"flexinfer", "mmap"}
    for mode, p in points.items():
        for key in ("budget_bytes", "streamed_bytes_per_token", "decode_tok_s", "bound_tok_s", "peak_rss_bytes",
                    "disk_bps_before", "disk_bps_after", "ratio_to_bound"):
            assert p.get(key), (mode, key, p)
        assert len(p["runs_decode_tok_s"]) == 2
        assert min(p["runs_decode_tok_s"]) <= p["decode_tok_s"] <= max(p["runs_decode_tok_s"])
    fx = points["flexinfer"]
    assert 0 < fx["streamed_bytes_per_token"] < open_gguf(tiny).size and fx["decode_io_wait_s"] is not None
    assert isinstance(fx["steal_s_per_token"], float)  # measured by the point's child around decode only
    assert fx["shared_cpu_bound_tok_s"] <= fx["bound_tok_s"] * 1.001  # it only adds the steal
    summary = next(x for x in lines if x.get("summary"))
    assert summary["flexinfer_ratio_to_bound"] == {"30%": fx["ratio_to_bound"]}
    assert summary["flexinfer_vs_mmap"]["30%"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_per_token_counts_decode_passes_only():
    from flexio_bench.sweep import _per_token

    assert _per_token(0.9, 4) == 0.3  # 4 tokens: the first from prefill, 3 decode passes
    assert _per_token(0.5, 1) is None and _per_token(None, 8) is None


def test_cpu_steal_seconds_is_a_counter():
    from flexio_bench.point import cpu_steal_seconds

    a = cpu_steal_seconds()
    assert 0 <= a <= cpu_steal_seconds()


def test_shared_cpu_bound():
    from flexio_bench.sweep import shared_cpu_bound

    bare = {"disk_busy_vs_idle": 1.0, "steal_s_per_gb_while_reading": 0.0}
    # bare metal: the plain bound, 1 / max(2 GB / 4 GB/s, 0.1 s)
    assert shared_cpu_bound(2_000_000_000, 4e9, 0.1, 2, bare) == pytest.approx(2.0)
    vm = {"disk_busy_vs_idle": 0.5, "steal_s_per_gb_while_reading": 0.2}
    # I/O-bound: the disk's own rate decides, 2 GB / 4 GB/s (0.1 s + 0.2 s/GB x 2 GB / 2 = 0.3 s < 0.5 s)
    assert shared_cpu_bound(2_000_000_000, 4e9, 0.1, 2, vm) == pytest.approx(2.0)
    # compute-bound (0.5 GB at 8 GB/s takes 0.0625 s): 0.1 s + 0.2 s/GB x 0.5 GB stolen, over 2 threads
    assert shared_cpu_bound(500_000_000, 8e9, 0.1, 2, vm) == pytest.approx(1 / 0.15)
    assert shared_cpu_bound(0, 4e9, 0.1, 2, vm) == pytest.approx(10.0)  # nothing streamed: nothing stolen
    assert shared_cpu_bound(10, 4e9, None, 2, vm) is None
