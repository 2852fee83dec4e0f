"""llama.cpp (llama-cpp-python's low-level API) and flexio side by side on one GGUF file: greedy runs.

llama.cpp is set up as the oracle flexio replays: no flash attention, no weight repacking
(`use_extra_bufts = False`: flexio does not replay the repacked kernels), F16 KV cache, one
sequence whose cells are its positions (`swa_full`, llama.cpp's default), ubatches of 512.
Greedy picks are the argmax of the raw logits of the last position of each decode call.
"""

from __future__ import annotations

import asyncio
import ctypes
from dataclasses import dataclass

import numpy as np

NEAR_TIE = 0.05  # a different greedy pick is accepted only where llama.cpp's top-2 margin is below this


@dataclass
class Run:
    first: np.ndarray  # (n_vocab,) f32: the logits after the prompt
    tokens: list[int]  # greedy picks: tokens[0] from `first`, then one per decode step
    margins: list[float]  # top-1 minus top-2 logit at each pick


def _pick(logits: np.ndarray) -> tuple[int, float]:
    top2 = np.partition(logits, -2)[-2:]
    return int(np.argmax(logits)), float(top2[1] - top2[0])


_quiet = None


def llama_greedy(path: str, prompt: list[int], n: int, n_ctx: int = 256, threads: int = 1) -> Run:
    """llama.cpp: prompt in one decode call, then n - 1 greedy steps.

    One thread: llama.cpp's results do not depend on the thread count (each output element is computed
    by one thread in a fixed order), and its spinning worker threads crawl on a shared 2-core machine."""
    global _quiet
    import llama_cpp.llama_cpp as C

    if _quiet is None:
        _quiet = C.llama_log_callback(lambda level, text, user: None)
        C.llama_log_set(_quiet, ctypes.c_void_p())
    C.llama_backend_init()
    mp = C.llama_model_default_params()
    mp.use_extra_bufts = False
    model = C.llama_model_load_from_file(path.encode(), mp)
    assert model, f"llama.cpp could not load {path}"
    nv = C.llama_vocab_n_tokens(C.llama_model_get_vocab(model))
    cp = C.llama_context_default_params()
    cp.n_ctx = n_ctx
    cp.n_batch = cp.n_ubatch = 512
    cp.n_threads = cp.n_threads_batch = threads
    cp.flash_attn_type = C.LLAMA_FLASH_ATTN_TYPE_DISABLED
    cp.swa_full = True
    ctx = C.llama_init_from_model(model, cp)
    assert ctx

    def decode(tokens: list[int], pos0: int) -> np.ndarray:
        b = C.llama_batch_init(len(tokens), 0, 1)
        for i, t in enumerate(tokens):
            b.token[i], b.pos[i], b.n_seq_id[i] = t, pos0 + i, 1
            b.seq_id[i][0] = 0
            b.logits[i] = i == len(tokens) - 1
        b.n_tokens = len(tokens)
        rc = C.llama_decode(ctx, b)
        C.llama_batch_free(b)
        assert rc == 0, f"llama_decode returned {rc}"
        return np.ctypeslib.as_array(C.llama_get_logits_ith(ctx, -1), shape=(nv,)).copy()

    try:
        first = decode(list(prompt), 0)
        tok, m = _pick(first)
        run = Run(first, [tok], [m])
        pos = len(prompt)
        for _ in range(n - 1):
            tok, m = _pick(decode([tok], pos))
            pos += 1
            run.tokens.append(tok)
            run.margins.append(m)
        return run
    finally:
        C.llama_free(ctx)
        C.llama_model_free(model)


def flexio_greedy(path: str, prompt: list[int], n: int, n_ctx: int = 256, threads: int = 2, **engine_kw) -> Run:
    """flexio through the engine's batched generation (the server's path), first logits through forward()."""
    from flexio.engine import Engine
    from flexio.model import KVCache

    async def main() -> Run:
        async with Engine(path, threads=threads, n_ctx=n_ctx, **engine_kw) as e:
            first = e.forward(list(prompt), KVCache(e.config, e.n_ctx_seq)).copy()
            tokens = [t async for t in e.generate_tokens(list(prompt), n, ignore_eos=True)]
        return Run(first, tokens, [])

    return asyncio.run(main())


def compare(ref: Run, ours: Run, rel: float = 1e-2) -> str:
    """Check `ours` against llama.cpp's `ref`: first logits within `rel` of the largest, greedy tokens identical
    up to a near-tie. Returns a note: "identical", or where a near-tie was accepted (with its margin)."""
    scale = float(np.abs(ref.first).max())
    err = float(np.abs(ref.first - ours.first).max())
    assert err <= rel * scale, f"first-token logits: max |diff| {err:.3g} vs max |logit| {scale:.3g}"
    for i, (a, b) in enumerate(zip(ref.tokens, ours.tokens)):
        if a != b:
            assert ref.margins[i] < NEAR_TIE, (f"step {i}: flexio {b}, llama.cpp {a} at margin {ref.margins[i]:.4f} "
                                               f"(not a near-tie); tokens so far {ref.tokens[:i]}")
            return f"near-tie at step {i} (llama.cpp margin {ref.margins[i]:.4f})"
    assert len(ours.tokens) == len(ref.tokens), (len(ours.tokens), len(ref.tokens))
    return (f"identical ({len(ref.tokens)} tokens, {len(set(ref.tokens))} distinct, smallest margin "
            f"{min(ref.margins):.3g}; max first-logit diff {err:.2g} of {scale:.3g})")
