"""bench-io: extents cover every layer tensor, JSON has bytes/results/ratios, fio and cgroup absent or present."""

import argparse
import json
import os
import subprocess

import numpy as np
import pytest

from flexio.gguf import open_gguf
from flexio_bench import cgroup, disk as bench_io


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A valid 2-layer llama GGUF of F32 random weights (~0.5 MiB)."""
    import gguf

    path = str(tmp_path_factory.mktemp("bench") / "tiny.gguf")
    d, ff, nh, vocab, n_layer = 64, 128, 4, 32, 2
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(n_layer)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ff)
    w.add_head_count(nh)
    w.add_head_count_kv(nh)
    w.add_context_length(128)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    rng = np.random.default_rng(0)

    def f32(*shape):  # numpy shape is GGUF dims reversed
        return rng.standard_normal(shape).astype(np.float32)

    w.add_tensor("token_embd.weight", f32(vocab, d))
    w.add_tensor("output_norm.weight", f32(d))
    for i in range(n_layer):
        p = f"blk.{i}."
        for name, shape in [("attn_norm", (d,)), ("attn_q", (d, d)), ("attn_k", (d, d)), ("attn_v", (d, d)),
                            ("attn_output", (d, d)), ("ffn_norm", (d,)), ("ffn_gate", (ff, d)),
                            ("ffn_up", (ff, d)), ("ffn_down", (d, ff))]:
            w.add_tensor(p + name + ".weight", f32(*shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _args(path, **kw):
    p = argparse.ArgumentParser()
    bench_io.add_arguments(p)
    argv = [path, "--reps", "2", "--qd", "4", "--chunk", "64K", "--threads", "1", "--no-drop", "--json"]
    for k, v in kw.items():
        argv += [f"--{k}", v]
    return p.parse_args(argv)


def test_extents_cover_layer_tensors_in_order(tiny_gguf):
    g = open_gguf(tiny_gguf)
    extents, nbytes, tensor_bytes = bench_io.layer_extents(tiny_gguf)
    assert all(s % 4096 == 0 for s, _ in extents)
    assert nbytes == sum(n for _, n in extents) >= tensor_bytes
    for t in g.tensors:
        if t.layer is not None:
            assert any(s <= t.offset and t.offset + t.nbytes <= s + n for s, n in extents), t.name
    assert tensor_bytes == sum(t.nbytes for t in g.tensors if t.layer is not None)


def test_json_report(tiny_gguf, capsys, monkeypatch):
    monkeypatch.setattr(bench_io.shutil, "which", lambda name: None)  # as if fio were not installed
    assert bench_io.run(_args(tiny_gguf, only="uring,pread,buffered,mmap,fio")) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["bytes"] > 0 and rep["cache"].startswith("warm")
    methods = {r["method"] for r in rep["results"]}
    assert {"uring", "pread", "buffered", "mmap"} <= methods
    for r in rep["results"]:
        assert r["gbps"] > 0 and len(r["runs"]) == 2
    assert sum(r["default"] for r in rep["results"]) == 1
    assert {"uring_vs_mmap", "uring_vs_pread"} <= rep["ratios"].keys()
    assert "uring_vs_fio" not in rep["ratios"] and "fio" in rep["skipped"]
    assert "uring_vs_mmap_cgroup" not in rep["ratios"]


def test_table_output(tiny_gguf, capsys):
    args = _args(tiny_gguf, only="uring,mmap")
    args.json = False
    assert bench_io.run(args) == 0
    out = capsys.readouterr().out
    assert "median GB/s" in out and "uring_vs_mmap" in out and "*default" in out


@pytest.mark.root
def test_cgroup_and_fio(tiny_gguf, capsys):
    why = cgroup.cgroup_unavailable()
    if why:
        pytest.skip(f"cgroup measurement unavailable: {why}")
    before = set(os.listdir(cgroup.CGROUP_V1_MEMORY))
    assert bench_io.run(_args(tiny_gguf, only="uring,cgroup,fio")) == 0
    rep = json.loads(capsys.readouterr().out)
    assert "uring_vs_mmap_cgroup" in rep["ratios"], rep
    cg = next(r for r in rep["results"] if r["method"] == "mmap_cgroup")
    assert cg["passes"] == 3 and "gbps_later_passes" in cg and rep["checks"]["page_checksums_agree"]
    if bench_io.shutil.which("fio"):
        assert "uring_vs_fio" in rep["ratios"], rep
    assert set(os.listdir(cgroup.CGROUP_V1_MEMORY)) == before, "the bench cgroup must be removed"


@pytest.mark.root
def test_cgroups_left_by_dead_runs_are_removed():
    why = cgroup.cgroup_unavailable()
    if why:
        pytest.skip(f"cgroup measurement unavailable: {why}")
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer exists
    stale = os.path.join(cgroup.CGROUP_V1_MEMORY, f"flexio-sweep-{dead.pid}-1")
    os.mkdir(stale)
    mine = os.path.join(cgroup.CGROUP_V1_MEMORY, f"flexio-sweep-{os.getpid()}-1")  # a live run's
    os.mkdir(mine)
    try:
        with cgroup.MemCgroup(f"flexio-test-{os.getpid()}", 64 << 20) as cg:
            assert os.path.isdir(cg.path) and not os.path.exists(stale) and os.path.isdir(mine)
        assert not os.path.exists(cg.path)
    finally:
        for d in (stale, mine):
            if os.path.isdir(d):
                os.rmdir(d)


# --- page-touch really reads every page; passes; fio command; ratio bases -------------------------

PAGE = 4096  # what the page-touch methods step by (flexio.units.PAGE on x86-64)


@pytest.fixture(scope="module")
def paged_file(tmp_path_factory):
    """(path, extents, reference checksum, pages): 48 pages of random bytes whose first byte per page is nonzero.

    Extents start on page boundaries and some end mid-page, like layer_extents' spans.
    """
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, 48 * PAGE + 123, dtype=np.uint8)
    data[::PAGE] = rng.integers(1, 256, data[::PAGE].size, dtype=np.uint8)  # skipping any page changes the sum
    path = str(tmp_path_factory.mktemp("pages") / "pages.bin")
    data.tofile(path)
    extents = [(0, 5 * PAGE + 100), (8 * PAGE, 3 * PAGE), (20 * PAGE, 28 * PAGE + 123)]
    ref = sum(int(data[o : o + n : PAGE].sum()) for o, n in extents)
    pages = sum(len(range(0, n, PAGE)) for _, n in extents)
    return path, extents, ref, pages


def test_touch_reads_every_page(paged_file):
    import mmap

    path, extents, ref, pages = paged_file
    assert bench_io.expected_pages(extents) == pages == 6 + 3 + 29
    assert bench_io.page_checksum(path, extents) == (ref, pages)
    with open(path, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ)
    try:
        assert bench_io.touch(mm, extents) == (ref, pages)
        assert bench_io.touch(mm, extents[:2] + [(20 * PAGE, 27 * PAGE)]) != (ref, pages)  # one page fewer shows
    finally:
        mm.close()
    r = bench_io.m_mmap(path, extents, None, passes=3, nbytes=123)
    assert len(r.secs) == len(r.cpu) == 3 and r.nbytes == 123
    assert r.info["checksums"] == [ref] * 3 and r.info["pages"] == [pages] * 3
    b = bench_io.m_buffered(path, extents, None, passes=2, nbytes=123)
    assert b.info["checksums"] == [ref] * 2


@pytest.mark.root
def test_cgroup_child_touches_every_page_inside_the_limit(tmp_path):
    """The child joins the cgroup before mapping, touches every page each pass, and its page cache is charged there."""
    why = cgroup.cgroup_unavailable()
    if why:
        pytest.skip(f"cgroup measurement unavailable: {why}")
    limit = bench_io.CGROUP_MIN_LIMIT
    rng = np.random.default_rng(2)
    data = rng.integers(0, 256, 3 * limit, dtype=np.uint8)
    path = str(tmp_path / "big.bin")
    data.tofile(path)
    fd = os.open(path, os.O_RDONLY)
    try:  # evict it (only this file) so the child's reads are charged to the child's cgroup
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    extents = [(0, data.size)]
    ref = int(data[::PAGE].sum())
    before = set(os.listdir(cgroup.CGROUP_V1_MEMORY))
    r = bench_io.m_mmap_cgroup(path, extents, None, limit=limit, passes=2, nbytes=data.size)
    assert set(os.listdir(cgroup.CGROUP_V1_MEMORY)) == before, "the bench cgroup must be removed"
    assert r.info["cgroup"] == f"/{bench_io.CGROUP_PREFIX}{os.getpid()}"
    assert r.info["checksums"] == [ref, ref] and r.info["pages"] == [data.size // PAGE] * 2
    assert r.info["max_usage"] <= limit and r.info["failcnt"] > 0  # the file (3x the limit) was reclaimed while read


def _fake(family, name, secs_per_rep, nbytes=int(1e9), **params):
    m = bench_io.Method(family, name, params, None, len(secs_per_rep[0]))
    m.runs = [bench_io.PassRun(list(s), [0.1] * len(s), nbytes) for s in secs_per_rep]
    m.nbytes = nbytes
    return m


def test_passes_headline_is_later_passes_and_cgroup_ratio_uses_it():
    assert _fake("mmap", "x", [[2.0, 1.0, 0.5]]).gbps() == [pytest.approx(1e9 * 2 / 1.5 / 1e9)]
    assert _fake("mmap", "x", [[2.0, 1.0, 0.5]]).gbps_first() == [0.5]
    assert _fake("uring", "u", [[0.5]]).gbps() == [2.0]
    d = bench_io.DEFAULT_QUEUE_DEPTH, bench_io.DEFAULT_CHUNK_SIZE
    ms = [
        _fake("uring", "u", [[0.5], [0.5], [0.5]], queue_depth=d[0], chunk_size=d[1], fixed_buffers=False),  # 2 GB/s
        _fake("mmap_cgroup", "cg", [[1.0, 4.0, 4.0]] * 3, memory_limit=1, madvise="plain"),  # 1 GB/s cold, 0.25 steady
        _fake("mmap", "m", [[2.0, 0.1, 0.1]] * 3, madvise="plain"),  # 0.5 GB/s cold, 10 warm
        _fake("fio", "f", [[0.4]] * 3, queue_depth=64, block_size=4 << 20, fixed_buffers=True),  # 2.5
    ]
    args = argparse.Namespace(reps=3, passes=3, direct_passes=1)
    rep = bench_io.make_report("x.gguf", ms, {}, int(1e9), int(1e9), "cold", args)
    assert rep["ratios"]["uring_vs_mmap_cgroup"] == 8.0 and rep["ratios"]["uring_vs_mmap_cgroup_first_pass"] == 2.0
    assert "passes 2..N" in rep["ratio_basis"]["uring_vs_mmap_cgroup"]
    assert rep["ratios"]["uring_vs_mmap"] == 4.0 and rep["ratios"]["uring_vs_mmap_warm"] == 0.2
    assert rep["ratios"]["uring_vs_fio"] == 0.8
    cg = next(r for r in rep["results"] if r["method"] == "mmap_cgroup")
    assert cg["passes"] == 3 and cg["gbps"] == cg["gbps_later_passes"] == 0.25 and cg["gbps_first_pass"] == 1.0
    assert rep["passes"] == {"page_cache_methods": 3, "direct_methods": 1}


def test_fio_command_and_parse():
    cmd = bench_io.fio_command("/m/x.gguf", 8192, 1 << 30, qd=64, fixedbufs=True)
    for flag in ("--direct=1", "--ioengine=io_uring", "--iodepth=64", f"--bs={4 << 20}", "--rw=read", "--readonly",
                 "--allow_file_create=0", "--invalidate=1", "--numjobs=1", "--offset=8192", f"--size={1 << 30}",
                 "--filename=/m/x.gguf", "--fixedbufs"):
        assert flag in cmd
    assert not any("time_based" in c or "runtime" in c for c in cmd)
    out = "note: both iodepth >= 1 and iodepth_low\n" + json.dumps(
        {"jobs": [{"error": 0, "usr_cpu": 1.0, "sys_cpu": 9.0, "job_runtime": 2000,
                   "read": {"io_bytes": 4 << 30, "runtime": 2000, "bw_bytes": 2147483648, "lat_ns": {"max": 5e7}}}]})
    secs, cpu, nbytes = bench_io.parse_fio(out, 4 << 30)
    assert secs == 2.0 and cpu == pytest.approx(0.2) and nbytes == 4 << 30
    with pytest.raises(bench_io.FlexioError):
        bench_io.parse_fio(out, 5 << 30)  # fio read less than asked


def test_json_report_checksums_agree_across_methods(tiny_gguf, capsys):
    assert bench_io.run(_args(tiny_gguf, only="buffered,mmap", passes="2")) == 0
    rep = json.loads(capsys.readouterr().out)
    extents, _, _ = bench_io.layer_extents(tiny_gguf)
    ref, pages = bench_io.page_checksum(tiny_gguf, extents)
    assert rep["checks"]["page_checksums_agree"]
    for r in rep["results"]:
        assert r["passes"] == 2 and len(r["runs_first_pass"]) == 2 and r["checksum"] == ref
        if r["method"] == "mmap":
            assert r["pages_per_pass"] == pages
