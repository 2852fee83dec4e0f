"""`python -m flexio bench-peer MODEL` -> JSON: flexio vs llama.cpp prefill and decode tok/s on one GGUF file.

Both engines get the same file, the same thread count, the same prompt tokens and
greedy decoding, and run alternately (flexio, llama.cpp, flexio, ...) in one
process so that a noisy shared machine affects both alike; medians are reported.
GenerationStats time ours (wall clock around the same calls on both sides). Without
llama-cpp-python only flexio is measured.

llama.cpp runs twice over: as it is by default, and with its weight repacking off
(`use_extra_bufts=False`, reported as "llama_cpp_no_repack"). By default its AVX2 build copies
Q4_0 / Q4_K weights into an interleaved layout whose kernels sum in another order; without
it, llama.cpp does the arithmetic flexio replays bit for bit, so that ratio compares the same
work done two ways.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext

from flexio.fetch import DEFAULT_MODEL, model_path

HELP = "decode/prefill tok/s of flexio vs llama.cpp on one GGUF file"  # one line for `flexio --help`

FILLER = (
    "The history of computing is a story of machines that got smaller, faster and cheaper, "
    "and of people who found new things to do with each generation of them. "
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="a .gguf path or a known model name")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=128, help="prefill length (default: %(default)s)")
    p.add_argument("-n", "--decode-tokens", type=int, default=64, help="tokens decoded per run (default: %(default)s)")
    p.add_argument("--reps", type=int, default=3, help="alternating repetitions per engine (default: %(default)s)")
    p.add_argument("--ctx", type=int, default=1024)


def _llama_cpp_run(llm, llama_cpp, tokens: list[int], n: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of llama.cpp on `tokens` then n - 1 greedy decode steps."""
    import numpy as np

    def logits():
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),))

    llm.reset()
    if hasattr(llm._ctx, "kv_cache_clear"):
        llm._ctx.kv_cache_clear()
    t0 = time.perf_counter()
    llm.eval(tokens)
    t1 = time.perf_counter()
    for _ in range(n - 1):
        llm.eval([int(np.argmax(logits()))])
    t2 = time.perf_counter()
    return len(tokens) / (t1 - t0), (n - 1) / (t2 - t1) if n > 1 else 0.0


@contextmanager
def repacking_off():
    """llama.cpp's CPU weight repacking (the use_extra_bufts model parameter, which llama-cpp-python does not
    expose) off for the models loaded inside: its defaults function is wrapped meanwhile."""
    import llama_cpp
    import llama_cpp.llama_cpp as low

    defaults = low.llama_model_default_params

    def params():
        p = defaults()
        p.use_extra_bufts = False
        return p

    low.llama_model_default_params = llama_cpp.llama_model_default_params = params
    try:
        yield
    finally:
        low.llama_model_default_params = llama_cpp.llama_model_default_params = defaults


def _llama(llama_cpp, path: str, args: argparse.Namespace, repack: bool):
    """A llama_cpp.Llama on path; repack=False turns its CPU weight repacking off."""
    with nullcontext() if repack else repacking_off():
        return llama_cpp.Llama(path, n_threads=args.threads, n_threads_batch=args.threads, n_ctx=args.ctx,
                               n_batch=512, logits_all=False, verbose=False)


async def _bench(args: argparse.Namespace) -> dict:
    from flexio.engine import Engine

    path = model_path(args.model)
    try:
        import llama_cpp
    except ImportError:
        llama_cpp = None
    async with Engine(path, threads=args.threads, n_ctx=args.ctx) as e:
        ids = e.tokenizer.encode(FILLER * (args.prompt_tokens // 20 + 2))[: args.prompt_tokens]
        # warm-up: JIT compile / cache load of every kernel this model uses, prefill and decode shapes
        _ = [t async for t in e.generate_tokens(ids[:8], 2)]
        peers = {}  # result key -> Llama
        if llama_cpp is not None:
            peers = {"llama_cpp": _llama(llama_cpp, path, args, repack=True),
                     "llama_cpp_no_repack": _llama(llama_cpp, path, args, repack=False)}
            for llm in peers.values():
                _llama_cpp_run(llm, llama_cpp, ids[:8], 2)
        ours_p, ours_d = [], []
        peer_p = {name: [] for name in peers}
        peer_d = {name: [] for name in peers}
        for _ in range(args.reps):
            _ = [t async for t in e.generate_tokens(ids, args.decode_tokens)]
            ours_p.append(e.stats.prompt_tok_s)
            ours_d.append(e.stats.decode_tok_s)
            for name, llm in peers.items():
                p, d = _llama_cpp_run(llm, llama_cpp, ids, args.decode_tokens)
                peer_p[name].append(p)
                peer_d[name].append(d)
        med = statistics.median
        result = {
            "model": path,
            "threads": args.threads,
            "prompt_tokens": len(ids),
            "decode_tokens": args.decode_tokens,
            "reps": args.reps,
            "machine": platform.processor() or platform.machine(),
            "flexio": {"prefill_tok_s": round(med(ours_p), 2), "decode_tok_s": round(med(ours_d), 2),
                       "decode_runs": [round(x, 2) for x in ours_d]},
        }
        for name, llm in peers.items():
            result[name] = {"version": llama_cpp.__version__, "prefill_tok_s": round(med(peer_p[name]), 2),
                            "decode_tok_s": round(med(peer_d[name]), 2),
                            "decode_runs": [round(x, 2) for x in peer_d[name]]}
            key = "ratio" if name == "llama_cpp" else "ratio_no_repack"
            result[key] = {"decode": round(med(ours_d) / med(peer_d[name]), 3),
                           "prefill": round(med(ours_p) / med(peer_p[name]), 3)}
            llm.close()
        if not peers:
            result["llama_cpp"] = None
            result["note"] = "llama-cpp-python is not installed (pip install -e .[peer]): no ratio"
        return result


def run(args: argparse.Namespace) -> int:
    print(json.dumps(asyncio.run(_bench(args))))
    sys.stdout.flush()
    return 0
