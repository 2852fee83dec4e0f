"""Token ids + per-layer weight views -> logits: the llama / qwen2 forward pass.

The model owns no weight storage. Whoever runs it (the engine) hands it one
layer's weights at a time as `LayerWeights` (views into resident memory or into
prefetch buffers) and may recycle those buffers as soon as `layer()` returns.
A weight may arrive split in row ranges (some rows resident, the rest streamed):
`Weight.parts` lists them and each part's matmul writes its own output columns.

Shapes: d = n_embd, kv = n_head_kv * head_dim, ff = n_ff, n = tokens in this call.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType

# flexio_kernels is the top-level kernels/ folder (Numba kernels only: one layout table, one kernel per
# quant format, a portable twin beside each SIMD one), installed under that import name (pyproject.toml).
from flexio_kernels import dequantize_rows, matmul
from flexio_kernels import ops

from .gguf import ModelConfig, TensorInfo

F32, F16 = int(GGMLQuantizationType.F32), int(GGMLQuantizationType.F16)
KEEP_SCRATCH_ROWS = 64  # scratch buffers of batches up to this many rows are kept between passes


@dataclass
class Weight:
    """A (rows x k) weight matrix as row ranges of raw GGUF blocks."""

    name: str
    ggml_type: int
    rows: int
    k: int
    parts: list[tuple[int, np.ndarray]]  # (first row, uint8 (rows_i, row_bytes)) covering rows 0..rows-1

    def matmul(self, x: np.ndarray, out: np.ndarray) -> None:
        """out (n, rows) = x (n, k) @ W^T."""
        for row0, raw in self.parts:
            matmul(raw, self.ggml_type, x, out, row0)


def vector(t: TensorInfo, raw: np.ndarray) -> np.ndarray:
    """An F32/F16 1-D tensor's bytes -> float32 (d,)."""
    flat = raw.reshape(-1)
    if t.ggml_type == F32:
        return flat.view(np.float32)
    return flat.view(np.float16).astype(np.float32)


def weight(t: TensorInfo, parts: list[tuple[int, np.ndarray]]) -> Weight:
    return Weight(t.name, t.ggml_type, t.n_rows, t.row_len, parts)


@dataclass
class LayerWeights:
    attn_norm: np.ndarray  # (d,)
    wq: Weight  # (d, d)
    wk: Weight  # (kv, d)
    wv: Weight  # (kv, d)
    wo: Weight  # (d, d)
    ffn_norm: np.ndarray  # (d,)
    wg: Weight  # (ff, d)
    wu: Weight  # (ff, d)
    wd: Weight  # (d, ff)
    bq: np.ndarray | None = None  # (d,)   qwen2 only
    bk: np.ndarray | None = None  # (kv,)
    bv: np.ndarray | None = None  # (kv,)


LAYER_FIELDS = {
    "attn_norm.weight": "attn_norm", "attn_q.weight": "wq", "attn_k.weight": "wk", "attn_v.weight": "wv",
    "attn_output.weight": "wo", "ffn_norm.weight": "ffn_norm", "ffn_gate.weight": "wg",
    "ffn_up.weight": "wu", "ffn_down.weight": "wd", "attn_q.bias": "bq", "attn_k.bias": "bk", "attn_v.bias": "bv",
}


def warmup_kernels(ggml_types: set[int], cfg: ModelConfig) -> None:
    """Compile (or load from Numba's cache) every kernel a forward pass will call, on tiny inputs,
    so that the first token is not charged with JIT time. Both the serial and the threaded matmul
    variants, decode (n = 1) and prefill (n > 1) shapes."""
    from flexio_kernels import LAYOUTS

    for t in sorted(ggml_types):
        L = LAYOUTS[t]
        k = L.block_elems * max(1, 256 // L.block_elems)
        for rows in (8, 4096):
            w = np.zeros((rows, k // L.block_elems * L.block_bytes), np.uint8)
            for n in (1, 5):
                x = np.zeros((n, k), np.float32)
                matmul(w, t, x, np.zeros((n, rows), np.float32), 0)
        dequantize_rows(w[:2], t, np.zeros(1, np.int64), np.zeros((1, k), np.float32))
    hd, nh, nkv = cfg.head_dim, cfg.n_head, cfg.n_head_kv
    for n in (1, 5):
        x = np.zeros((n, cfg.n_embd), np.float32)
        ops.rmsnorm(x, np.ones(cfg.n_embd, np.float32), cfg.norm_eps, np.empty_like(x))
        ops.add_inplace(x, x)
        ops.add_bias(x, np.zeros(cfg.n_embd, np.float32))
        q = np.zeros((n, nh * hd), np.float32)
        cos, sin = ops.rope_tables(8, cfg.rope_dim, cfg.rope_base)
        ops.rope(q, nh, hd, 0, cos, sin, cfg.rope_neox)
        kv = np.zeros((8, nkv * hd), np.uint16)
        for attend in (ops.attention, ops.attention_serial):
            attend(q, kv, kv, 0, nh, nkv, hd, ops.F16_TO_F32, np.zeros((n * nh, 8), np.float32), np.empty_like(q))
        g = np.zeros((n, 16), np.float32)
        ops.swiglu(g, g.copy())


class KVCache:
    """Per-layer float16 keys and values, (n_ctx, kv) each.

    preallocate=True commits the whole cache at once (a sequence slot of the engine: its memory is
    counted and taken when the engine opens); otherwise it grows on demand (tests, one-off passes).
    """

    def __init__(self, cfg: ModelConfig, n_ctx: int, preallocate: bool = False):
        self.cfg, self.n_ctx = cfg, n_ctx
        self.capacity = 0
        self.k: list[np.ndarray] = []  # n_layer x (capacity, kv) float16
        self.v: list[np.ndarray] = []
        self.pos = 0  # tokens already in the cache
        if preallocate:
            self.reserve(n_ctx)
            for a in self.k + self.v:
                a.fill(0)  # touch every page now, not in the middle of a generation

    def reserve(self, n: int) -> None:
        if n > self.n_ctx:
            raise ValueError(f"context of {n} tokens exceeds n_ctx={self.n_ctx}")
        if n <= self.capacity:
            return
        cap = min(self.n_ctx, max(n, 2 * self.capacity, 256))
        shape = (cap, self.cfg.kv_dim)
        for lst in (self.k, self.v):
            for i in range(self.cfg.n_layer):
                new = np.zeros(shape, dtype=np.float16)
                if i < len(lst):
                    new[: self.capacity] = lst[i][: self.capacity]
                    lst[i] = new
                else:
                    lst.append(new)
        self.capacity = cap

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)

    @staticmethod
    def bytes_for(cfg: ModelConfig, n_ctx: int) -> int:
        """Bytes of a full cache of n_ctx tokens: keys and values, float16, every layer."""
        return 2 * cfg.n_layer * n_ctx * cfg.kv_dim * 2


@dataclass(frozen=True)
class Segment:
    """One sequence's rows of a batch: x[row0 : row0 + n] are its tokens at positions pos0.. of `cache`."""

    row0: int
    n: int
    cache: KVCache
    pos0: int


class Scratch:
    """Activation buffers for n tokens at once (reused across layers and tokens)."""

    def __init__(self, cfg: ModelConfig, n: int, n_ctx: int):
        d, kv, ff = cfg.n_embd, cfg.kv_dim, cfg.n_ff
        f = np.float32
        self.n = n
        self.h = np.empty((n, d), f)
        self.q = np.empty((n, d), f)
        self.k = np.empty((n, kv), f)
        self.v = np.empty((n, kv), f)
        self.att = np.empty((n, d), f)
        self.o = np.empty((n, d), f)
        self.g = np.empty((n, ff), f)
        self.u = np.empty((n, ff), f)
        self.scores = np.empty((n * cfg.n_head, min(n_ctx, 256)), f)  # grown by scores_for()
        self.n_ctx = n_ctx

    def scores_for(self, t: int) -> np.ndarray:
        """Attention-score scratch with at least t columns."""
        if self.scores.shape[1] < t:
            self.scores = np.empty((self.scores.shape[0], min(self.n_ctx, max(t, 2 * self.scores.shape[1]))), np.float32)
        return self.scores


class Model:
    """The forward pass of one architecture config; stateless apart from scratch buffers."""

    def __init__(self, cfg: ModelConfig, n_ctx: int):
        self.cfg = cfg
        self.n_ctx = n_ctx
        self.cos, self.sin = ops.rope_tables(n_ctx, cfg.rope_dim, cfg.rope_base)
        self._scratch: dict[int, Scratch] = {}

    def scratch(self, n: int) -> Scratch:
        s = self._scratch.get(n)
        if s is None:
            if n > KEEP_SCRATCH_ROWS:  # keep the (small) buffers of every decode batch size and the latest prefill
                self._scratch = {k: v for k, v in self._scratch.items() if k <= KEEP_SCRATCH_ROWS}
            s = self._scratch[n] = Scratch(self.cfg, n, self.n_ctx)
        return s

    def embed(self, emb: Weight, ids: np.ndarray) -> np.ndarray:
        """Row ids (n,) of the embedding weight -> x (n, d) f32 (a new array)."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        x = np.empty((ids.size, self.cfg.n_embd), np.float32)
        for row0, raw in emb.parts:
            sel = np.nonzero((ids >= row0) & (ids < row0 + raw.shape[0]))[0]
            if sel.size == ids.size:
                dequantize_rows(raw, emb.ggml_type, ids - row0, x)
            elif sel.size:
                out = np.empty((sel.size, self.cfg.n_embd), np.float32)
                dequantize_rows(raw, emb.ggml_type, ids[sel] - row0, out)
                x[sel] = out
        return x

    def layer(self, i: int, w: LayerWeights, x: np.ndarray, segments: list[Segment]) -> None:
        """Run block i on x (n, d) in place: the rows of several sequences (`segments`), each at its own
        positions in its own KV cache. Matmuls take every row at once (the weights are read once);
        RoPE, the cache writes and attention go sequence by sequence. Every row's arithmetic is the
        same as if its sequence ran alone."""
        c = self.cfg
        n = x.shape[0]
        s = self.scratch(n)
        ops.rmsnorm(x, w.attn_norm, c.norm_eps, s.h)
        w.wq.matmul(s.h, s.q)
        w.wk.matmul(s.h, s.k)
        w.wv.matmul(s.h, s.v)
        if w.bq is not None:
            ops.add_bias(s.q, w.bq)
            ops.add_bias(s.k, w.bk)
            ops.add_bias(s.v, w.bv)
        for seg in segments:
            r0, m, pos0 = seg.row0, seg.n, seg.pos0
            q, k = s.q[r0 : r0 + m], s.k[r0 : r0 + m]
            ops.rope(q, c.n_head, c.head_dim, pos0, self.cos, self.sin, c.rope_neox)
            ops.rope(k, c.n_head_kv, c.head_dim, pos0, self.cos, self.sin, c.rope_neox)
            kc, vc = seg.cache.k[i], seg.cache.v[i]
            np.copyto(kc[pos0 : pos0 + m], k)  # rounds to f16
            np.copyto(vc[pos0 : pos0 + m], s.v[r0 : r0 + m])
            # work ~ tokens x heads x context: below ~64k head-positions one thread beats a parallel launch
            attend = ops.attention if m * c.n_head * (pos0 + m) > 65536 else ops.attention_serial
            scores = s.scores_for(pos0 + m)[: m * c.n_head]
            attend(q, kc.view(np.uint16), vc.view(np.uint16), pos0, c.n_head, c.n_head_kv, c.head_dim,
                   ops.F16_TO_F32, scores, s.att[r0 : r0 + m])
        w.wo.matmul(s.att, s.o)
        ops.add_inplace(x, s.o)
        ops.rmsnorm(x, w.ffn_norm, c.norm_eps, s.h)
        w.wg.matmul(s.h, s.g)
        w.wu.matmul(s.h, s.u)
        ops.swiglu(s.g, s.u)
        w.wd.matmul(s.g, s.o)
        ops.add_inplace(x, s.o)

    def final_norm(self, norm: np.ndarray, x_last: np.ndarray) -> np.ndarray:
        """x_last (k, d) -> the normalised hidden states (k, d) the output head multiplies."""
        h = np.empty_like(x_last)
        ops.rmsnorm(x_last, norm, self.cfg.norm_eps, h)
        return h
