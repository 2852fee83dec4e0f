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


def _write(path, tensors: dict, arch="llama", extra=None, required=True):
    w = GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    keys = dict(extra or {})
    if required:  # llama.cpp requires these two of every family flexio runs
        keys = {f"{arch}.context_length": lambda w: w.add_context_length(64),
                f"{arch}.attention.layer_norm_rms_epsilon": lambda w: w.add_layer_norm_rms_eps(1e-5)} | keys
    for k, v in keys.items():
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


# --- hyper-parameters checked against each other and the tensors -----------------------------


def _key(name, kind, value):
    return {name: lambda w: getattr(w, f"add_{kind}")(name, value)}


@pytest.mark.parametrize("extra,match", [
    (_key("llama.attention.head_count", "uint32", 5),
     r"key 'llama.embedding_length' = 32 is not divisible by key 'llama.attention.head_count' = 5"),
    (_key("llama.attention.head_count", "uint32", 32), r"head size 1 \(llama.embedding_length 32 / llama.attention"
                                                       r".head_count 32\) is odd"),
    (_key("llama.attention.head_count", "uint32", 0), r"key 'llama.attention.head_count' = 0 is invalid: expected at least 1"),
    (_key("llama.attention.head_count_kv", "uint32", 3),
     r"key 'llama.attention.head_count_kv' = 3 does not divide key 'llama.attention.head_count' = 4"),
    (_key("llama.rope.dimension_count", "uint32", 16), r"key 'llama.rope.dimension_count' = 16 is larger than the head "
                                                       r"size 8 \(llama.embedding_length 32 / llama.attention.head_count 4\)"),
    (_key("llama.rope.dimension_count", "uint32", 3), r"'llama.rope.dimension_count' = 3 is invalid: expected an even number"),
    (_key("llama.context_length", "uint32", 0), r"'llama.context_length' = 0 is invalid: expected at least 1"),
    (_key("llama.attention.layer_norm_rms_epsilon", "float32", float("nan")),
     r"'llama.attention.layer_norm_rms_epsilon' = nan is invalid: expected a finite number > 0"),
    (_key("llama.rope.freq_base", "float32", 0.0), r"'llama.rope.freq_base' = 0.0 is invalid: expected a finite number > 0"),
    (_key("llama.rope.freq_base", "float32", float("inf")), r"'llama.rope.freq_base' = inf is invalid"),
    (_key("llama.block_count", "uint32", 2), r"key 'llama.block_count' = 2 does not match the tensor table: it has 1 "
                                             r"blocks numbered up to blk.0 \(expected llama.block_count = 1\)"),
    (_key("llama.block_count", "uint32", 0), r"'llama.block_count' = 0 is invalid: expected at least 1"),
    (_key("llama.vocab_size", "uint32", 17), r"key 'llama.vocab_size' = 17 but tensor 'token_embd.weight' has 16 rows"),
    (_key("tokenizer.ggml.tokens", "array", [f"t{i}" for i in range(15)]),
     r"the vocabulary has 15 tokens \('tokenizer.ggml.tokens'\) but tensor 'token_embd.weight' has 16 rows"),
    (_key("llama.feed_forward_length", "uint32", 60), r"'blk.0.ffn_gate.weight' has wrong shape; expected \[32, 60\], "
                                                      r"got \[32, 64\] \(from llama.embedding_length, llama.feed_forward_length\)"),
    (_key("general.alignment", "uint32", 24), r"key 'general.alignment' = 24 is invalid: expected a power of two"),
    (_key("general.alignment", "string", "32"), r"'general.alignment' has wrong type STRING, expected an integer"),
])
def test_hyper_parameters_are_checked(tmp_path, extra, match):
    with pytest.raises(GGUFError, match=match):
        open_gguf(_write(tmp_path / "h.gguf", _tiny_tensors(), extra=extra))


def test_block_count_against_a_gap_in_the_blocks(tmp_path):
    t = _tiny_tensors()
    t.update({k.replace("blk.0.", "blk.2."): v for k, v in t.items() if k.startswith("blk.0.")})
    bad = _write(tmp_path / "gap.gguf", t, extra=_key("llama.block_count", "uint32", 3))
    with pytest.raises(GGUFError, match=r"'llama.block_count' = 3 does not match the tensor table: it has 2 blocks numbered "
                                        r"up to blk.2 \(expected llama.block_count = 3, and block\(s\) blk.1 have no tensors\)"):
        open_gguf(bad)


def test_vector_of_a_quantized_type_is_refused(tmp_path):
    t = _tiny_tensors()
    t["output_norm.weight"] = (np.zeros(18, np.uint8), GGMLQuantizationType.Q4_0)  # 32 weights as one Q4_0 block
    with pytest.raises(UnsupportedError, match=r"'output_norm.weight' is a vector of type Q4_0; expected F32 or F16"):
        open_gguf(_write(tmp_path / "v.gguf", t))


# --- the reader's own checks: records that must be refused before anything is allocated -----


def _patched(tmp_path, src, old: bytes, new: bytes, count=1):
    data = open(src, "rb").read()
    assert len(old) == len(new) and data.count(old) >= count
    return _copy(src, tmp_path / "p.gguf", patch={data.index(old): new})


def test_duplicate_key_and_tensor_name(tmp_path):
    src = _write(tmp_path / "d.gguf", _tiny_tensors(), extra=_key("llama.zz_a", "uint32", 1) | _key("llama.zz_b", "uint32", 2))
    with pytest.raises(GGUFError, match=r"duplicate metadata key 'llama.zz_a'"):
        open_gguf(_patched(tmp_path, src, b"llama.zz_b", b"llama.zz_a"))
    with pytest.raises(GGUFError, match=r"duplicate tensor name 'blk.0.attn_k.weight'"):
        open_gguf(_patched(tmp_path, src, b"blk.0.attn_v.weight", b"blk.0.attn_k.weight"))


def _tensor_field(path, name: str, after_name: int, size: int, value: int, dst):
    """Overwrite a field of tensor `name`'s info, `after_name` bytes after the name."""
    data = open(path, "rb").read()
    at = data.index(name.encode() + struct.pack("<I", 1 if "norm" in name else 2)) + len(name) + after_name
    return _copy(path, dst, patch={at: value.to_bytes(size, "little")})


def test_tensor_info_fields(tmp_path):
    src = _write(tmp_path / "t.gguf", _tiny_tensors())
    g = open_gguf(src)
    # n_dims (u32 right after the name)
    with pytest.raises(GGUFError, match=r"'blk.0.ffn_up.weight' has 5 dimensions; expected 1 to 4 \(GGML_MAX_DIMS\)"):
        open_gguf(_tensor_field(src, "blk.0.ffn_up.weight", 0, 4, 5, tmp_path / "a.gguf"))
    # dims[1] = 0
    with pytest.raises(GGUFError, match=r"'blk.0.ffn_up.weight' has invalid shape \[32, 0\]"):
        open_gguf(_tensor_field(src, "blk.0.ffn_up.weight", 12, 8, 0, tmp_path / "b.gguf"))
    # type, then offset: unaligned, overlapping, past the end
    with pytest.raises(UnsupportedError, match=r"'blk.0.ffn_up.weight' has unknown GGML type id 99"):
        open_gguf(_tensor_field(src, "blk.0.ffn_up.weight", 20, 4, 99, tmp_path / "c.gguf"))
    up = g.by_name["blk.0.ffn_up.weight"]
    rel = up.offset - g.data_offset
    with pytest.raises(GGUFError, match=r"'blk.0.ffn_up.weight' offset [\d,]+ is not aligned to 32 bytes"):
        open_gguf(_tensor_field(src, "blk.0.ffn_up.weight", 24, 8, rel + 4, tmp_path / "d.gguf"))
    with pytest.raises(GGUFError, match=r"tensors .* overlap: the tensor table is corrupt"):
        open_gguf(_tensor_field(src, "blk.0.ffn_up.weight", 24, 8, rel + 32, tmp_path / "e.gguf"))
    with pytest.raises(GGUFError, match=r"'blk.0.ffn_up.weight' data is not within the file bounds"):
        open_gguf(_tensor_field(src, "blk.0.ffn_up.weight", 24, 8, 2**63, tmp_path / "f.gguf"))


def test_header_counts_are_bounded_by_the_file(tmp_path, tiny):
    with pytest.raises(GGUFError, match=r"n_kv = 4,294,967,295 metadata pairs, but the [\d,]+ bytes after the header hold"):
        open_gguf(_copy(tiny, tmp_path / "kv.gguf", patch={16: struct.pack("<Q", 2**32 - 1)}))
    with pytest.raises(GGUFError, match=r"n_tensors = 18,446,744,073,709,551,615 tensors"):
        open_gguf(_copy(tiny, tmp_path / "nt.gguf", patch={8: struct.pack("<Q", 2**64 - 1)}))


# --- unused tensors, metadata types, read_metadata ------------------------------------------


def test_unused_tensors_are_refused_naming_them(tmp_path):
    # A llama 3.1 rope_freqs tensor used to be ignored with a warning (and the output differed from
    # llama.cpp's); any tensor the forward pass does not use now refuses the file, as llama.cpp does.
    t = _tiny_tensors()
    t["rope_factors_long.weight"] = (np.zeros(4, np.float32), None)  # LongRoPE without rope.scaling.type longrope
    for i in range(11):
        t[f"extra.{i:02d}.weight"] = (np.zeros(8, np.float32), None)
    with pytest.raises(UnsupportedError) as e:
        open_gguf(_write(tmp_path / "u.gguf", t))
    msg = str(e.value)
    assert msg.startswith("12 tensor(s) are not used by flexio's llama model: extra.00.weight (F32, 32 bytes)")
    assert msg.count("extra.") == 10 and "and 2 more; refused rather than ignored" in msg


def test_required_keys_are_named(tmp_path):
    for key in ("llama.context_length", "llama.attention.layer_norm_rms_epsilon"):
        extra = {"llama.context_length": lambda w: w.add_context_length(64),
                 "llama.attention.layer_norm_rms_epsilon": lambda w: w.add_layer_norm_rms_eps(1e-5)}
        del extra[key]
        with pytest.raises(GGUFError, match=rf"required metadata key '{key}' is missing"):
            open_gguf(_write(tmp_path / "k.gguf", _tiny_tensors(), extra=extra, required=False))


def test_kv_types_and_read_metadata_copy_exactly(smollm2_path, tmp_path):
    from gguf import GGUFValueType

    from flexio.gguf import read_metadata

    g = open_gguf(smollm2_path)
    md, types = read_metadata(smollm2_path)
    assert md.keys() == g.metadata.keys() == types.keys() == g.kv_types.keys()
    assert types["tokenizer.ggml.tokens"] == (GGUFValueType.ARRAY, GGUFValueType.STRING)
    assert types["tokenizer.ggml.token_type"] == (GGUFValueType.ARRAY, GGUFValueType.INT32)
    assert types["llama.rope.freq_base"] == (GGUFValueType.FLOAT32, None)
    assert md["tokenizer.ggml.token_type"].dtype == np.int32 and len(md["tokenizer.ggml.tokens"]) == 49152
    # copy the tokenizer to a new file, as the synthesis tool does, and read it back unchanged
    w = GGUFWriter(str(tmp_path / "copy.gguf"), "llama")
    for k, v in md.items():
        if k.startswith("tokenizer."):
            t, sub = types[k]
            w.add_key_value(k, v.tolist() if isinstance(v, np.ndarray) else v, t, sub_type=sub)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    md2, types2 = read_metadata(tmp_path / "copy.gguf")
    for k in (k for k in md if k.startswith("tokenizer.")):
        assert types2[k] == types[k], k
        assert np.array_equal(md2[k], md[k]) if isinstance(md[k], np.ndarray) else md2[k] == md[k], k


def test_invalid_utf8_is_kept_byte_exact(tmp_path):
    from flexio.gguf import read_metadata

    w = GGUFWriter(str(tmp_path / "b.gguf"), "llama")
    w.add_string("general.name", b"caf\xe9 \xff")  # bytes are written as they are
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    md, _ = read_metadata(tmp_path / "b.gguf")
    assert md["general.name"].encode("utf-8", "surrogateescape") == b"caf\xe9 \xff"
