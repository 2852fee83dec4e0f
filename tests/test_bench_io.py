"""bench-io: extents cover every layer tensor, JSON has bytes/results/ratios, fio and cgroup absent or present."""

import argparse
import json
import os

import numpy as np
import pytest

from flexio import bench_io
from flexio.gguf import open_gguf


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
    why = bench_io.cgroup_unavailable()
    if why:
        pytest.skip(f"cgroup measurement unavailable: {why}")
    before = set(os.listdir(bench_io.CGROUP_V1_MEMORY))
    assert bench_io.run(_args(tiny_gguf, only="uring,cgroup,fio")) == 0
    rep = json.loads(capsys.readouterr().out)
    assert "uring_vs_mmap_cgroup" in rep["ratios"], rep
    if bench_io.shutil.which("fio"):
        assert "uring_vs_fio" in rep["ratios"], rep
    assert set(os.listdir(bench_io.CGROUP_V1_MEMORY)) == before, "the bench cgroup must be removed"
