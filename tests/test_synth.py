"""Synthetic GGUF writer: tiny presets per quant reopen with flexio.gguf, dequantize sanely, load in llama.cpp."""

from __future__ import annotations

import os

import gguf
import numpy as np
import pytest

from flexio.errors import FlexioError
from flexio.gguf import open_gguf
from flexio_bench.synth import PRESETS, QUANTS, _use_more_bits, plan_tensors, random_blocks, synthesize

QT = gguf.GGMLQuantizationType



def _values(g, t, max_rows: int = 1024) -> np.ndarray:
    raw = g.read_tensor_bytes(t)[:max_rows]  # embeddings have 49152 rows: a sample keeps the test fast
    if t.type_name == "F32":
        return raw.view(np.float32)
    if t.type_name == "F16":
        return raw.view(np.float16).astype(np.float32)
    return gguf.quants.dequantize(raw, QT(t.ggml_type))


@pytest.mark.parametrize("like", ["tiny-llama", "tiny-qwen2"])
@pytest.mark.parametrize("quant", list(QUANTS))
def test_tiny_presets(tmp_path, smollm2_path, like, quant):
    out = synthesize(like, quant, str(tmp_path / f"{like}-{quant}.gguf"), tokenizer_from=smollm2_path)
    g = open_gguf(out)
    p = PRESETS[like]
    c = g.config
    assert (c.arch, c.n_layer, c.n_embd, c.n_ff, c.n_head, c.n_head_kv) == (
        p.arch, p.n_layer, p.n_embd, p.n_ff, p.n_head, p.n_head_kv
    )
    assert c.vocab_size == 49152 and c.tied_output == p.tied_output
    assert c.rope_base == p.rope_base and c.rope_dim == p.head_dim and c.n_ctx_train == p.n_ctx
    assert g.metadata["general.file_type"] == QUANTS[quant][1]
    assert g.metadata["tokenizer.ggml.pre"] == "smollm"

    specs = {s.name: s for s in plan_tensors(p, quant, 49152)}
    assert set(g.by_name) == set(specs)  # open_gguf already checked every expected shape
    for t in g.tensors:
        s = specs[t.name]
        assert t.type_name == s.ggml_type, t.name
        if len(t.shape) == 1:
            assert t.type_name == "F32", t.name  # norms and biases
        v = _values(g, t)
        assert np.isfinite(v).all(), t.name
        if s.kind == "norm":
            assert abs(v.mean() - 1) < 0.05 and v.std() < 0.2, t.name
        else:
            assert abs(v.mean()) < 0.005, t.name
            assert 0.01 < v.std() < 0.04, (t.name, v.std())
            assert np.abs(v).max() < 0.5, t.name


def test_q4_k_m_mix(tmp_path, smollm2_path):
    g = open_gguf(synthesize("tiny-llama", "q4_k_m", str(tmp_path / "m.gguf"), tokenizer_from=smollm2_path, n_layer=8))
    types = {t.name: t.type_name for t in g.tensors}
    assert types["output.weight"] == "Q6_K"
    assert types["token_embd.weight"] == "Q4_K"
    bumped = [i for i in range(8) if types[f"blk.{i}.attn_v.weight"] == "Q6_K"]
    assert bumped == [i for i in range(8) if _use_more_bits(i, 8)] == [0, 3, 6, 7]
    assert all(types[f"blk.{i}.ffn_down.weight"] == ("Q6_K" if i in bumped else "Q4_K") for i in range(8))
    assert all(types[f"blk.{i}.attn_q.weight"] == "Q4_K" for i in range(8))


def test_k_quant_fallback_for_short_rows():
    # qwen2-0.5b rows are 896 long: not a multiple of 256, so K-quants fall back like llama.cpp
    specs = {s.name: s for s in plan_tensors(PRESETS["qwen2-0.5b"], "q4_k_m", 49152)}
    assert specs["blk.0.attn_q.weight"].ggml_type == "Q5_0"
    assert specs["blk.0.ffn_down.weight"].ggml_type == "Q6_K"  # rows of 4864 = 19 * 256
    assert specs["blk.0.attn_q.bias"].ggml_type == "F32"
    assert "output.weight" not in specs  # tied, as in the real model


def test_big_preset_sizes():
    """Shapes of the big presets match the real models (checked via total parameter count)."""
    def n_params(like):
        return sum(int(np.prod(s.shape)) for s in plan_tensors(PRESETS[like], "f32", 32000))

    assert abs(n_params("llama2-7b") - 6.74e9) < 0.01e9  # Llama-2-7B with its own 32000 vocab
    assert abs(n_params("llama2-13b") - 13.0e9) < 0.05e9


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K"])
def test_random_blocks_dequantize(qtype):
    rng = np.random.Generator(np.random.SFC64(1))
    blocks = random_blocks(rng, qtype, 256 * 64)
    block, size = gguf.GGML_QUANT_SIZES[QT[qtype]]
    assert blocks.shape == (256 * 64 // block, size)
    v = gguf.quants.dequantize(blocks, QT[qtype])
    assert np.isfinite(v).all()
    assert abs(v.mean()) < 0.003 and 0.015 < v.std() < 0.025  # Q4_0 and Q5_0 are centred at -d/2


def test_deterministic(tmp_path, smollm2_path):
    a = synthesize("tiny-llama", "q4_0", str(tmp_path / "a.gguf"), seed=3, tokenizer_from=smollm2_path)
    b = synthesize("tiny-llama", "q4_0", str(tmp_path / "b.gguf"), seed=3, tokenizer_from=smollm2_path)
    assert open(a, "rb").read() == open(b, "rb").read()


def test_bad_arguments(tmp_path, smollm2_path):
    with pytest.raises(FlexioError, match="unknown preset 'llama9'"):
        synthesize("llama9", "q4_0", str(tmp_path / "x.gguf"), tokenizer_from=smollm2_path)
    with pytest.raises(FlexioError, match="unknown quant 'q3_k'"):
        synthesize("tiny-llama", "q3_k", str(tmp_path / "x.gguf"), tokenizer_from=smollm2_path)
    with pytest.raises(FlexioError, match="no-such.gguf"):
        synthesize("tiny-llama", "q4_0", str(tmp_path / "x.gguf"), tokenizer_from=str(tmp_path / "no-such.gguf"))
    assert not os.path.exists(tmp_path / "x.gguf") and not os.path.exists(tmp_path / "x.gguf.part")


def test_cli(tmp_path, smollm2_path):
    from flexio.cli import main

    out = tmp_path / "cli.gguf"
    assert main(["synth", "--like", "tiny-qwen2", "--quant", "q8_0", "--out", str(out),
                 "--tokenizer-from", smollm2_path]) == 0
    assert open_gguf(out).config.qkv_bias


@pytest.mark.peer
@pytest.mark.parametrize("like,quant", [("tiny-llama", "q4_0"), ("tiny-llama", "q4_k_m"), ("tiny-qwen2", "q6_k"),
                                        ("tiny-qwen2", "f16")])
def test_llama_cpp_loads(tmp_path, smollm2_path, like, quant):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install .[peer])")
    out = synthesize(like, quant, str(tmp_path / "t.gguf"), tokenizer_from=smollm2_path)
    llm = llama_cpp.Llama(model_path=out, n_ctx=64, n_threads=2, verbose=False, logits_all=True)
    ids = llm.tokenize(b"The capital of France is", add_bos=False)
    llm.eval(ids)
    logits = np.asarray(llm.scores[: len(ids)])  # (n_tokens, n_vocab)
    assert logits.shape == (len(ids), 49152) and np.isfinite(logits).all()
    # random weights still give informative logits: O(0.1..1) spread, different per position
    assert (0.05 < logits.std(axis=1)).all() and (logits.std(axis=1) < 5).all()
    assert not np.allclose(logits[0], logits[-1])


# --- the families' presets: real shapes, vocabularies, llama.cpp's Q4_0 / Q4_K_M type rules ---------------

# parameters (billions) and published llama.cpp GGUF sizes (GB: Q4_0, Q4_K_M) of the models the presets copy
PUBLISHED = {
    "llama3-8b": (8.03, 4.66, 4.92),  # Meta-Llama-3.1-8B-Instruct
    "llama3-70b": (70.55, 40.0, 42.5),  # Llama-3.3-70B-Instruct
    "qwen3-8b": (8.19, 4.77, 5.03),
    "qwen3-32b": (32.76, 18.6, 19.8),
    "gemma3-12b": (11.77, 6.89, 7.30),  # the text model (llama.cpp keeps the vision tower in an mmproj file)
    "gemma3-27b": (27.01, 15.6, 16.5),
    "phi3-mini": (3.82, 2.18, 2.39),  # Phi-3-mini-128k-instruct
}


def _bytes(specs) -> int:
    sizes = {name: gguf.GGML_QUANT_SIZES[QT[name]] for name in {s.ggml_type for s in specs}}
    return sum(int(np.prod(s.shape)) // sizes[s.ggml_type][0] * sizes[s.ggml_type][1] for s in specs)


@pytest.mark.parametrize("like", sorted(PUBLISHED))
def test_family_presets_are_the_published_models(like):
    from flexio_bench.vocab import REAL_SIZE

    p = PRESETS[like]
    vocab = REAL_SIZE[p.vocab]
    params, q4_0, q4_k_m = PUBLISHED[like]
    assert abs(sum(int(np.prod(s.shape)) for s in plan_tensors(p, "f32", vocab)) / 1e9 - params) < 0.01 * params
    for quant, gb in (("q4_0", q4_0), ("q4_k_m", q4_k_m)):
        got = _bytes(plan_tensors(p, quant, vocab)) / 1e9
        assert abs(got - gb) < 0.01 * gb, (like, quant, got, gb)


# families.md §5: llama.cpp's Q4_K_M per family (token_embd, output, attn_q/k, attn_v or attn_qkv bumped /
# not, attn_output, ffn_gate/up, ffn_down bumped / not)
Q4_K_M_TABLE = {
    "llama3-8b": ("Q4_K", "Q6_K", "Q4_K", ("Q6_K", "Q4_K"), "Q4_K", "Q4_K", ("Q6_K", "Q4_K")),
    "llama3-70b": ("Q4_K", "Q6_K", "Q4_K", ("Q6_K", "Q5_K"), "Q4_K", "Q4_K", ("Q6_K", "Q4_K")),
    "qwen3-8b": ("Q4_K", "Q6_K", "Q4_K", ("Q6_K", "Q4_K"), "Q4_K", "Q4_K", ("Q6_K", "Q4_K")),
    "qwen3-32b": ("Q4_K", "Q6_K", "Q4_K", ("Q6_K", "Q4_K"), "Q4_K", "Q4_K", ("Q6_K", "Q4_K")),
    "gemma3-12b": ("Q6_K", None, "Q4_K", ("Q6_K", "Q4_K"), "Q4_K", "Q4_K", ("Q6_K", "Q4_K")),
    "gemma3-27b": ("Q6_K", None, "Q4_K", ("Q6_K", "Q4_K"), "Q4_K", "Q4_K", ("Q6_K", "Q4_K")),
    "phi3-mini": ("Q4_K", "Q6_K", None, ("Q6_K", "Q4_K"), "Q4_K", "Q4_K", ("Q6_K", "Q4_K")),
}


@pytest.mark.parametrize("like", sorted(Q4_K_M_TABLE))
def test_q4_k_m_rules_per_family(like):
    p = PRESETS[like]
    types = {s.name: s.ggml_type for s in plan_tensors(p, "q4_k_m", 1024)}
    emb, out, qk, (v_more, v_other), o, gate_up, (down_more, down_other) = Q4_K_M_TABLE[like]
    assert types["token_embd.weight"] == emb and types.get("output.weight") == out
    v_role = "attn_qkv" if p.qkv_fused else "attn_v"
    n = p.n_layer
    more = [i for i in range(n) if _use_more_bits(i, n)]
    assert {types[f"blk.{i}.{v_role}.weight"] for i in more} == {v_more}
    assert {types[f"blk.{i}.{v_role}.weight"] for i in range(n) if i not in more} == {v_other}
    assert {types[f"blk.{i}.ffn_down.weight"] for i in more} == {down_more}
    assert {types[f"blk.{i}.ffn_down.weight"] for i in range(n) if i not in more} == {down_other}
    for i in range(n):
        assert types[f"blk.{i}.attn_output.weight"] == o and types[f"blk.{i}.ffn_up.weight"] == gate_up
        if qk is not None:
            assert types[f"blk.{i}.attn_q.weight"] == types[f"blk.{i}.attn_k.weight"] == qk
    assert all(t == "F32" for name, t in types.items() if "norm" in name or name.startswith("rope_"))
    if like == "qwen3-8b":  # n = 36: the layers families.md lists
        assert more == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 31, 32, 33, 34, 35]


def test_q4_0_mix_has_a_q6_k_output():
    """llama.cpp's Q4_0 files keep output.weight (or a tied embedding) in Q6_K."""
    untied = {s.name: s.ggml_type for s in plan_tensors(PRESETS["llama3-8b"], "q4_0", 1024)}
    tied = {s.name: s.ggml_type for s in plan_tensors(PRESETS["gemma3-12b"], "q4_0", 1024)}
    assert untied["output.weight"] == "Q6_K" and untied["token_embd.weight"] == "Q4_0"
    assert tied["token_embd.weight"] == "Q6_K" and "output.weight" not in tied
    assert {t for n, t in untied.items() if n.startswith("blk.") and not n.endswith("norm.weight")} == {"Q4_0"}


@pytest.mark.parametrize("like", ["tiny-llama3", "tiny-mistral", "tiny-qwen3", "tiny-gemma3", "tiny-phi3"])
def test_tiny_family_presets(tmp_path, smollm2_path, like):
    from flexio.tokenizer import Tokenizer

    p = PRESETS[like]
    g = open_gguf(synthesize(like, "q4_k_m", str(tmp_path / "t.gguf"), tokenizer_from=smollm2_path))
    c = g.config
    assert (c.arch, c.n_layer, c.n_embd, c.n_head, c.head_dim, c.tied_output) == (
        p.arch, p.n_layer, p.n_embd, p.n_head, p.head_dim, p.tied_output)
    assert c.n_embd >= 512 and c.vocab_size == p.n_vocab
    assert c.qkv_fused == p.qkv_fused and bool(c.swa_window) == bool(p.swa)
    assert set(c.rope_factors) == ({"rope_freqs.weight"} if p.rope_freqs else set()) | (
        {"rope_factors_long.weight", "rope_factors_short.weight"} if p.longrope else set())
    tok = Tokenizer.from_gguf(g)
    assert tok.vocab.model == ("gpt2" if p.vocab in ("llama3", "qwen3") else "llama")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]).count("hi") == 1
