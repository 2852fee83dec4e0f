"""Regenerate a llama.cpp reference file for the golden tests on this machine's ISA.

    python tests/data/make_reference.py MODEL.gguf OUT.json

Same format as smollm2-135m-q4_1.json (made with llama.cpp 0.3.36 on an AVX-512 machine):
prompt tokens, first-step top-5 logits, greedy tokens (argmax of raw logits, fresh context per
prompt, flash attention off), the margin between the two largest logits at each step. llama.cpp's
SIMD code differs between AVX2 and AVX-512 builds (exp approximation, reduction widths), which is
enough to flip a greedy pick at a margin of ~0.08, so each ISA gets its own reference.
"""

import hashlib
import json
import sys

import llama_cpp
import numpy as np

PROMPTS = ["The capital of France is", "Once upon a time,", "def fibonacci(n):"]
STEPS = 64


def main(model: str, out: str) -> None:
    cases = []
    for prompt in PROMPTS:
        llm = llama_cpp.Llama(model, n_threads=2, n_ctx=512, verbose=False, flash_attn=False)
        ctx = llm._ctx.ctx

        def logits():
            return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(llm.n_vocab(),)).copy()

        toks = llm.tokenize(prompt.encode(), add_bos=True, special=False)
        llm.eval(toks)
        lg = logits()
        top5 = [[int(i), float(lg[i])] for i in np.argsort(-lg)[:5]]
        greedy, margins = [], []
        for _ in range(STEPS):
            t = int(np.argmax(lg))
            if t == llm.token_eos():
                break
            a, b = np.sort(lg)[-2:][::-1]
            greedy.append(t)
            margins.append(round(float(a - b), 4))
            llm.eval([t])
            lg = logits()
        cases.append({"prompt": prompt, "prompt_tokens": toks, "top5": top5, "greedy_tokens": greedy,
                      "greedy_margins": margins,
                      "greedy_text": llm.detokenize(greedy).decode("utf-8", errors="replace")})
        llm.close()
    isa = "avx512" if "avx512f" in open("/proc/cpuinfo").read() else "avx2"
    doc = {"model": model.rsplit("/", 1)[-1], "sha256": hashlib.sha256(open(model, "rb").read()).hexdigest(),
           "engine": f"llama.cpp via llama-cpp-python {llama_cpp.__version__}", "isa": isa, "add_bos": True,
           "greedy": "argmax of raw logits, no penalties", "cases": cases}
    json.dump(doc, open(out, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
