"""Fuzz worker: GGUF paths on stdin -> one JSON verdict per line on stdout, under a memory cap.

Started by tests/test_fuzz_gguf.py as `python fuzz_worker.py MEM_CAP_BYTES`. It caps its
address space (RLIMIT_AS), loads every kernel once, prints {"ready": ...}, then for each
request {"path", "gen", "temperature", "tokenizer"} opens the file and replies with one of
  {"outcome": "refused", "error": "GGUFError", "message": ...}   a clean FlexioError
  {"outcome": "opened", "generated": [...]}                      opened; checks held
  {"failure": ...}                                               anything else
The parent enforces the time limit and notices a worker that dies (signal, abort).
The checks on an opened file are written here again, independently of flexio.arch:
every tensor inside the file, and the hyper-parameters the kernels index with consistent.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import traceback


def invariants(g) -> list[str]:
    """What must hold for every file open_gguf accepts (recomputed from the raw table)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    bad = []
    size = os.path.getsize(g.path)
    spans = []
    for t in g.tensors:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(t.ggml_type)]
        n = math.prod(t.shape)
        if not 1 <= len(t.shape) <= 4 or min(t.shape) < 1 or t.shape[0] % block:
            bad.append(f"tensor {t.name!r} has shape {t.shape}")
        if t.nbytes != n // block * type_size:
            bad.append(f"tensor {t.name!r}: nbytes {t.nbytes} != {n // block * type_size}")
        if t.offset < g.data_offset or t.offset + t.nbytes > size or (t.offset - g.data_offset) % g.alignment:
            bad.append(f"tensor {t.name!r} at {t.offset}+{t.nbytes} is outside the data section (file {size})")
        spans.append((t.offset, t.offset + t.nbytes, t.name))
    spans.sort()
    bad += [f"tensors {a[2]!r} and {b[2]!r} overlap" for a, b in zip(spans, spans[1:]) if a[1] > b[0]]
    c = g.config
    hd = c.head_dim
    if c.n_head < 1 or hd < 2 or hd % 2:
        bad.append(f"head size {hd}, n_head {c.n_head}")
    if c.n_head_kv < 1 or c.n_head % c.n_head_kv:
        bad.append(f"n_head_kv {c.n_head_kv} vs n_head {c.n_head}")
    if not (2 <= c.rope_dim <= hd and c.rope_dim % 2 == 0):
        bad.append(f"rope_dim {c.rope_dim} vs head size {hd}")
    if c.n_ctx_train < 1 or c.n_ff < 1 or c.n_layer < 1:
        bad.append(f"n_ctx_train {c.n_ctx_train}, n_ff {c.n_ff}, n_layer {c.n_layer}")
    for v in (c.norm_eps, c.rope_base, c.rope_base_swa):
        if not (math.isfinite(v) and v > 0):
            bad.append(f"eps {c.norm_eps}, rope bases {c.rope_base}, {c.rope_base_swa}")
    if not (math.isfinite(c.rope_scale) and c.rope_scale > 0 and math.isfinite(c.rope_attn_factor)):
        bad.append(f"rope scale {c.rope_scale}, attn factor {c.rope_attn_factor}")
    if c.swa_window < 0 or len(c.swa_layers) != c.n_layer:
        bad.append(f"sliding window {c.swa_window}, {len(c.swa_layers)} layer flags")
    emb = g.by_name["token_embd.weight"]
    tokens = g.metadata.get("tokenizer.ggml.tokens")
    if emb.shape != (c.n_embd, c.vocab_size) or (tokens is not None and len(tokens) != c.vocab_size):
        bad.append(f"vocab: embedding {emb.shape}, vocab {c.vocab_size}")
    layers = {t.layer for t in g.tensors if t.layer is not None}
    if layers != set(range(c.n_layer)):
        bad.append(f"block_count {c.n_layer} vs blocks {sorted(layers)[:5]}...")
    for name in c.rope_factors:
        if g.by_name[name].shape != (c.rope_dim // 2,):
            bad.append(f"{name}: {g.by_name[name].shape}")
    d, q, kv, ff = c.n_embd, c.n_head * hd, c.n_head_kv * hd, c.n_ff
    for i in range(c.n_layer):
        want = {"attn_output.weight": (q, d), "ffn_down.weight": (ff, d), "attn_norm.weight": (d,),
                "ffn_norm.weight": (d,)}
        if f"blk.{i}.attn_qkv.weight" in g.by_name:
            want["attn_qkv.weight"] = (d, q + 2 * kv)
        else:
            want.update({"attn_q.weight": (d, q), "attn_k.weight": (d, kv), "attn_v.weight": (d, kv)})
        if c.arch == "phi3":
            want["ffn_up.weight"] = (d, 2 * ff)
        else:
            want.update({"ffn_gate.weight": (d, ff), "ffn_up.weight": (d, ff)})
        if c.arch in ("qwen3", "gemma3"):
            want.update({"attn_q_norm.weight": (hd,), "attn_k_norm.weight": (hd,)})
        for role, shape in want.items():
            t = g.by_name.get(f"blk.{i}.{role}")
            if t is None or t.shape != shape:
                bad.append(f"blk.{i}.{role}: {t.shape if t else None} != {shape}")
        for role, n in (("attn_q.bias", q), ("attn_k.bias", kv), ("attn_v.bias", kv)):
            t = g.by_name.get(f"blk.{i}.{role}")
            if t is not None and t.shape != (n,):
                bad.append(f"blk.{i}.{role}: {t.shape} != {(n,)}")
    return bad


def generate(path: str, temperature: float) -> list[int]:
    """Two tokens through the engine (memory mode, one thread), adapted to the file's context."""
    import asyncio

    from flexio.engine import Engine
    from flexio.sampling import SamplingParams

    async def main() -> list[int]:
        async with Engine(path, mode="memory", threads=1, lock=False) as e:
            ids = e.tokenizer.encode("The capital of France is", add_bos=False) or [0]
            ids = ids[: max(1, e.n_ctx - 2)]
            n = min(2, e.n_ctx - len(ids))
            params = SamplingParams(temperature=temperature, seed=0)
            return [t async for t in e.generate_tokens(ids, n, params)]

    return asyncio.run(main())


def run_case(req: dict) -> dict:
    from flexio.errors import FlexioError
    from flexio.gguf import open_gguf
    from flexio.tokenizer import Tokenizer

    step = "open_gguf"
    try:
        selftest = req.get("selftest")  # the harness's own tests: each way a case can go wrong
        if selftest == "abort":
            os.abort()
        elif selftest == "hang":
            while True:
                pass
        elif selftest == "raise":
            raise ValueError("a raw library error")
        elif selftest == "allocate":
            return {"failure": f"allocated {len(bytearray(2 * int(sys.argv[1])))} bytes under the cap"}
        g = open_gguf(req["path"])
        bad = invariants(g)
        if bad:
            return {"failure": "opened, but: " + "; ".join(bad[:5])}
        step = "Tokenizer.from_gguf"
        if req.get("tokenizer", True):
            Tokenizer.from_gguf(g)
        generated = None
        if req.get("gen"):
            step = "Engine.generate_tokens"
            generated = generate(req["path"], req.get("temperature", 0.0))
        return {"outcome": "opened", "generated": generated}
    except FlexioError as e:
        return {"outcome": "refused", "step": step, "error": type(e).__name__, "message": str(e)[:400]}
    except BaseException as e:  # MemoryError, RecursionError, a raw library exception: all failures
        tb = traceback.format_exception(e, limit=-3)
        return {"failure": f"{step} raised {type(e).__name__}: {str(e)[:300]}", "traceback": "".join(tb)[-1500:]}


def main() -> None:
    cap = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    sys.setrecursionlimit(1000)  # the default; a reader that recursed on nested arrays would hit it
    # Load every kernel now (from Numba's cache), so no case is charged with it.
    from flexio.gguf import SUPPORTED_TYPES, ModelConfig
    from flexio.model import warmup_kernels

    warmup_kernels(set(SUPPORTED_TYPES), ModelConfig("llama", 1, 64, 128, 2, 1, 16, 32, 1e4, 32, 1e-5, True))
    import flexio.engine  # noqa: F401

    out = sys.stdout
    out.write(json.dumps({"ready": os.getpid()}) + "\n")
    out.flush()
    for line in sys.stdin:
        res = run_case(json.loads(line))
        with open("/proc/self/status") as f:
            res["vm_peak_kb"] = next(int(x.split()[1]) for x in f if x.startswith("VmPeak:"))
        out.write(json.dumps(res) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
