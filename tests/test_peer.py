"""Differential tests against llama.cpp (llama-cpp-python) on small synthetic GGUF files.

Every supported architecture x tensor type: the same file through llama.cpp and flexio,
prefill of a short prompt then a few greedy decode steps; logits must agree. Skipped
with a reason when llama_cpp is not importable (`pip install -e .[peer]`).
"""

import asyncio

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e .[peer])")

from flexio.engine import Engine  # noqa: E402
from flexio.model import KVCache  # noqa: E402
from flexio_bench.synth import synthesize  # noqa: E402

pytestmark = pytest.mark.peer

PROMPT = [504, 3575, 282, 4649, 314]
QUANTS = ["f32", "f16", "q4_0", "q4_1", "q5_0", "q8_0", "q4_k", "q5_k", "q6_k", "q4_k_m"]


def _llama_logits(path: str, steps: int) -> list[np.ndarray]:
    llm = llama_cpp.Llama(path, n_threads=2, n_ctx=256, verbose=False, flash_attn=False)
    ctx = llm._ctx.ctx

    def last():
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(llm.n_vocab(),)).copy()

    out = []
    llm.eval(PROMPT)
    out.append(last())
    for _ in range(steps):
        llm.eval([int(np.argmax(out[-1]))])
        out.append(last())
    llm.close()
    return out


def _flexio_logits(path: str, steps: int) -> list[np.ndarray]:
    async def main():
        async with Engine(path, threads=2, n_ctx=256) as e:
            cache = KVCache(e.config, e.n_ctx)
            out = [e.forward(PROMPT, cache).copy()]
            for _ in range(steps):
                out.append(e.forward([int(np.argmax(out[-1]))], cache).copy())
            return out

    return asyncio.run(main())


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen2"])
def test_logits_match_llama_cpp(tmp_path, smollm2_path, arch, quant):
    path = synthesize(arch, quant, str(tmp_path / f"{arch}-{quant}.gguf"), tokenizer_from=smollm2_path)
    ref = _llama_logits(path, 3)
    ours = _flexio_logits(path, 3)
    for step, (a, b) in enumerate(zip(ref, ours)):
        scale = float(np.abs(a).max())
        err = float(np.abs(a - b).max())
        assert err <= 1e-3 * scale, f"step {step}: max |diff| {err:.3g} vs max |logit| {scale:.3g}"
        assert int(np.argmax(a)) == int(np.argmax(b)), f"step {step}: greedy pick differs"
