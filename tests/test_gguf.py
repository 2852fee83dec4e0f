"""GGUF validation: every malformed input gets a GGUFError naming the problem, never a numpy traceback."""

import struct

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFWriter

from flexio.errors import GGUFError, UnsupportedError
from flexio.gguf import SUPPORTED_TYPES, open_gguf
from flexio_bench.synth import synthesize


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_path):
    out = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return synthesize("tiny-llama", "q4_0", str(out), tokenizer_from=smollm2_path)


def test_valid_file_opens(tiny):
    g = open_gguf(tiny)
    c = g.config
    assert c.arch == "llama" and c.n_layer == len({t.layer for t in g.tensors if t.layer is not None})
    assert g.tensors[0].offset >= g.data_offset
    assert all(t.offset + t.nbytes <= g.size for t in g.tensors)


def test_supported_types_match_the_kernels():
    from flexio_kernels import LAYOUTS

    assert set(LAYOUTS) == set(SUPPORTED_TYPES)


def _copy(src, dst, n=None, patch=None):
    data = bytearray(open(src, "rb").read())
    if patch:
        for off, b in patch.items():
            data[off : off + len(b)] = b
    open(dst, "wb").write(bytes(data[:n] if n is not None else data))
    return str(dst)


def test_truncated_names_the_tensor(tiny, tmp_path):
    g = open_gguf(tiny)
    last = g.tensors[-1]
    bad = _copy(tiny, tmp_path / "t.gguf", n=last.offset + last.nbytes // 2)
    with pytest.raises(GGUFError, match=rf"tensor '{last.name}' data is not within the file bounds.*truncated"):
        open_gguf(bad)


def test_truncated_inside_metadata(tiny, tmp_path):
    bad = _copy(tiny, tmp_path / "t.gguf", n=4000)
    with pytest.raises(GGUFError, match="malformed or truncated"):
        open_gguf(bad)


def test_bad_magic_and_version(tiny, tmp_path):
    with pytest.raises(GGUFError, match="not a GGUF file"):
        open_gguf(_copy(tiny, tmp_path / "m.gguf", patch={0: b"GGML"}))
    with pytest.raises(GGUFError, match="version 7 is not supported"):
        open_gguf(_copy(tiny, tmp_path / "v.gguf", patch={4: struct.pack("<I", 7)}))
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(GGUFError, match="too short"):
        open_gguf(tmp_path / "empty.gguf")
    with pytest.raises(GGUFError, match="cannot open"):
        open_gguf(tmp_path / "missing.gguf")


def _write(path, tensors: dict, arch="llama", extra=None):
    w = GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    for k, v in (extra or {}).items():
        v(w)
    for name, (arr, qtype) in tensors.items():
        if qtype is None:
            w.add_tensor(name, arr)
        else:
            w.add_tensor(name, arr, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def _tiny_tensors(d=32, ff=64, vocab=16):
    f = lambda *s: np.zeros(s, np.float32)  # noqa: E731
    t = {"token_embd.weight": (f(vocab, d), None), "output_norm.weight": (f(d), None)}
    p = "blk.0."
    t.update({p + "attn_norm.weight": (f(d), None), p + "attn_q.weight": (f(d, d), None),
              p + "attn_k.weight": (f(d, d), None), p + "attn_v.weight": (f(d, d), None),
              p + "attn_output.weight": (f(d, d), None), p + "ffn_norm.weight": (f(d), None),
              p + "ffn_gate.weight": (f(ff, d), None), p + "ffn_up.weight": (f(ff, d), None),
              p + "ffn_down.weight": (f(d, ff), None)})
    return t


def test_minimal_float_model_opens(tmp_path):
    g = open_gguf(_write(tmp_path / "ok.gguf", _tiny_tensors()))
    assert g.config.tied_output and g.config.n_head_kv == 4


def test_unsupported_tensor_type_is_named(tmp_path):
    t = _tiny_tensors()
    # Q2_K: a real GGML type flexio has no kernel for (84 bytes per 256 weights)
    t["blk.0.attn_q.weight"] = (np.zeros((32, 84), np.uint8), GGMLQuantizationType.Q2_K)  # 32 rows of 256
    bad = _write(tmp_path / "q2k.gguf", t)
    with pytest.raises(UnsupportedError, match=r"'blk.0.attn_q.weight'.*Q2_K.*not support"):
        open_gguf(bad)


def test_wrong_shape_and_missing_tensor(tmp_path):
    t = _tiny_tensors()
    t["blk.0.ffn_up.weight"] = (np.zeros((60, 32), np.float32), None)
    with pytest.raises(GGUFError, match=r"'blk.0.ffn_up.weight' has wrong shape; expected \[32, 64\], got \[32, 60\]"):
        open_gguf(_write(tmp_path / "shape.gguf", t))
    t = _tiny_tensors()
    del t["blk.0.attn_v.weight"]
    with pytest.raises(GGUFError, match="'blk.0.attn_v.weight' is missing"):
        open_gguf(_write(tmp_path / "missing.gguf", t))


def test_unsupported_architecture_and_bad_key(tmp_path):
    with pytest.raises(UnsupportedError, match="architecture 'gpt2'"):
        open_gguf(_write(tmp_path / "arch.gguf", _tiny_tensors(), arch="gpt2"))
    bad = _write(tmp_path / "key.gguf", _tiny_tensors(), extra={"k": lambda w: w.add_string("llama.context_length", "x")})
    with pytest.raises(GGUFError, match="'llama.context_length' has wrong type str, expected int"):
        open_gguf(bad)
