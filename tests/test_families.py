"""Every supported family on its tiny synthetic model (`synth --like tiny-<family>`), against llama.cpp.

The bar: the same greedy tokens for 32 steps (a different pick only at a near-tie, llama.cpp's top-2
margin < 0.05, after which the runs are not compared) and first-token logits within 1e-2 of the largest
(in practice they are bit-identical). Prompts shorter than 8 tokens keep llama.cpp's prefill off its
tiled K-quant kernel (flexio does not replay it yet), so the real Q4_K_M mix is tested with them; a
40-token prompt is tested with Q4_0, Q8_0 and F32 weights, where that kernel is not involved. llama.cpp
runs with llama-cpp-python (peer tests, skipped without it). Then flexio alone: the streamed modes and
batched sequences give the tokens of the in-memory run, and the sliding-window ring gives the tokens of
a full cache.
"""

from __future__ import annotations

import asyncio
import importlib.util

import numpy as np
import pytest

from flexio.engine import Engine
from flexio.gguf import open_gguf
from flexio_bench.synth import TensorSpec, synthesize
from peer_util import Run, compare, flexio_greedy, llama_greedy

FAMILIES = ["tiny-llama3", "tiny-mistral", "tiny-qwen3", "tiny-gemma3", "tiny-phi3"]
SHORT = [1203, 4511, 877, 20031, 3456]  # 5 tokens: below llama.cpp's tiled-prefill threshold (8)
LONG = [int(x) for x in np.random.default_rng(11).integers(300, 20000, size=40)]  # beyond gemma's window of 16
N = 32

needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama-cpp-python is not installed (pip install -e .[peer])")
NOTES: dict[str, str] = {}  # test id -> what compare() said (printed at the end with -s)


@pytest.fixture(scope="module")
def model(tmp_path_factory, smollm2_path):
    """(preset, quant, variant) -> a synthesized file, made once per module."""
    d = tmp_path_factory.mktemp("families")
    made: dict[tuple, str] = {}

    def get(like: str, quant: str, variant: str = "", **kw) -> str:
        key = (like, quant, variant)
        if key not in made:
            made[key] = synthesize(like, quant, str(d / f"{like}-{quant}{variant}.gguf"), tokenizer_from=smollm2_path,
                                   **kw)
        return made[key]

    return get


def _check(request, ref: Run, ours: Run) -> None:
    NOTES[request.node.name] = compare(ref, ours)


@pytest.mark.peer
@needs_llama_cpp
@pytest.mark.parametrize("like", FAMILIES)
def test_short_prompt_real_mix(request, model, like):
    path = model(like, "q4_k_m")
    _check(request, llama_greedy(path, SHORT, N), flexio_greedy(path, SHORT, N))


@pytest.mark.peer
@needs_llama_cpp
@pytest.mark.parametrize("like,quant", [(f, q) for f in FAMILIES for q in ("q4_0", "q8_0")]
                         + [("tiny-gemma3", "f32"), ("tiny-phi3", "f16")])
def test_long_prompt(request, model, like, quant):
    path = model(like, quant)
    _check(request, llama_greedy(path, LONG, N), flexio_greedy(path, LONG, N))


@pytest.mark.peer
@needs_llama_cpp
@pytest.mark.parametrize("n_ctx", [256, 512], ids=["short-factors", "long-factors"])
def test_phi3_longrope_factors_by_context(request, model, n_ctx):
    """tiny-phi3's original context is 256: a context of 512 takes the long factors, as llama.cpp decides."""
    path = model("tiny-phi3", "q8_0")
    c = open_gguf(path).config
    assert c.rope_factor_tensor(n_ctx) == ("rope_factors_long.weight" if n_ctx > 256 else "rope_factors_short.weight")
    assert abs(c.rope_attn_factor - 1.2247449) < 1e-6
    _check(request, llama_greedy(path, LONG, N, n_ctx=n_ctx), flexio_greedy(path, LONG, N, n_ctx=n_ctx))


@pytest.mark.peer
@needs_llama_cpp
def test_gemma3_window_ring_wraps(request, model, monkeypatch):
    """A ring of window + 4 positions (instead of + 256): it wraps many times within the run, the 40-token
    prompt is attended in pieces of at most 5 queries, and the tokens are still llama.cpp's."""
    import flexio.model

    monkeypatch.setattr(flexio.model, "SWA_RING_SLACK", 4)
    path = model("tiny-gemma3", "q8_0")
    ours = flexio_greedy(path, LONG, N)
    _check(request, llama_greedy(path, LONG, N), ours)


@pytest.mark.peer
@needs_llama_cpp
def test_gemma3_softcap_and_27b_query_scale(request, model):
    """final_logit_softcapping (Gemma 2-style, read by llama.cpp's gemma3) and the 62-layer (27B) query scale
    1/sqrt(n_embd / n_head), which differs from 1/sqrt(head_dim) here (512 / 4 = 128 vs 192)."""
    path = model("tiny-gemma3", "q8_0", "-62", n_layer=62, extra_keys={"gemma3.final_logit_softcapping": 3.0})
    c = open_gguf(path).config
    assert c.logit_softcap == 3.0 and c.q_scale == float(np.float32(1) / np.sqrt(np.float32(128)))
    ref, ours = llama_greedy(path, SHORT, 8), flexio_greedy(path, SHORT, 8)
    assert np.abs(ref.first).max() <= 3.0
    _check(request, ref, ours)


@pytest.mark.peer
@needs_llama_cpp
def test_llama_optional_biases(request, model):
    """llama's graph applies attn_output, ffn_gate/up/down and Q/K/V biases when a file has them."""
    d, ff, q, kv = 512, 1536, 512, 128
    biases = tuple(TensorSpec(f"blk.{i}.{role}.bias", (n,), "F32", "bias") for i in range(3)
                   for role, n in (("attn_q", q), ("attn_k", kv), ("attn_v", kv), ("attn_output", d),
                                   ("ffn_gate", ff), ("ffn_up", ff), ("ffn_down", d)))
    path = model("tiny-llama3", "q8_0", "-biases", extra_tensors=biases)
    assert open_gguf(path).config.qkv_bias
    _check(request, llama_greedy(path, SHORT, N), flexio_greedy(path, SHORT, N))


# --- flexio alone: every residency mode and batching give the in-memory tokens -----------------------


def _generate(path: str, prompts: list[list[int]], n: int, **kw) -> list[list[int]]:
    """Greedy tokens of each prompt, all submitted at once (batched when parallel > 1)."""

    async def main():
        async with Engine(path, threads=2, n_ctx=256 * kw.get("parallel", 1), **kw) as e:
            async def one(p):
                return [t async for t in e.generate_tokens(p, n, ignore_eos=True)]

            return list(await asyncio.gather(*(one(p) for p in prompts)))

    return asyncio.run(main())


@pytest.mark.parametrize("like", FAMILIES)
def test_streamed_and_batched_give_the_in_memory_tokens(model, like):
    """8 layers so that a 30 % budget can stream (window 2); `mixed` cuts every tensor by rows, fused
    attn_qkv and gate+up included, and flexinfer and sync stream the rest. Two prompts batched (the
    sliding-window ring of each sequence too) give what each gives alone."""
    path = model(like, "q4_k_m", "-8", n_layer=8)
    alone = [_generate(path, [p], 12)[0] for p in (SHORT, LONG[:9])]
    for mode in ("flexinfer", "sync"):
        got = _generate(path, [SHORT], 12, budget="30%", mode=mode, policy="mixed", window=2)
        assert got[0] == alone[0], mode
    assert _generate(path, [SHORT, LONG[:9]], 12, parallel=2) == alone


def teardown_module():
    if NOTES:
        print("\nfamilies vs llama.cpp:")
        for k, v in sorted(NOTES.items()):
            print(f"  {k}: {v}")
