"""Token ids + per-layer weight views -> logits: the forward pass of every supported family.

One layer for all families (llama, qwen2, qwen3, gemma3, phi3): pre-norm attention then a
gated FFN, each added to the residual stream, with the per-family options read from
ModelConfig (flexio/arch.py sets them): Q/K biases, per-head Q/K RMSNorm before RoPE (qwen3,
gemma3), RoPE pairing, base, scale, frequency factors and attention factor, Q pre-scaled
before attention (gemma3, phi3), sliding-window layers (gemma3), post-attention and post-FFN
norms (gemma3), SiLU or GELU-table gating, scaled embeddings (gemma3), soft-capped logits.

The model owns no weight storage. Whoever runs it (the engine) hands it one layer's
weights at a time as `LayerWeights` (views into resident memory or into prefetch buffers)
and may recycle those buffers as soon as `layer()` returns. A weight may arrive split in
row ranges (some rows resident, the rest streamed): `Weight.parts` lists them and each
part's matmul writes its own output columns. A fused matrix (attn_qkv; phi3's gate+up
ffn_up) is one tensor in the file and in the plan, and several Weights here: its row ranges
(`Weight.rows`), whose outputs are exactly the fused matmul's (each output is one row's dot).

Shapes: d = n_embd, q = n_head * head_dim, kv = n_head_kv * head_dim, ff = n_ff, n = tokens
in this call, hd = head_dim.
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
from .moe import MoEWeights, moe_ffn, predict_first

F32, F16 = int(GGMLQuantizationType.F32), int(GGMLQuantizationType.F16)
KEEP_SCRATCH_ROWS = 64  # scratch buffers of batches up to this many rows are kept between passes
# A sliding-window layer's KV cache is a ring of window + SWA_RING_SLACK positions: a chunk of queries
# needs the window before its first query plus the chunk itself, so a chunk of up to SWA_RING_SLACK + 1
# rows is attended at once (longer segments are cut, never leaving one row alone: see _pieces).
SWA_RING_SLACK = 256


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

    def rows_view(self, r0: int, r1: int) -> Weight:
        """Rows r0..r1-1 as a Weight of their own (views of the same parts, renumbered from 0)."""
        parts = []
        for row0, raw in self.parts:
            a, b = max(r0, row0), min(r1, row0 + raw.shape[0])
            if a < b:
                parts.append((a - r0, raw[a - row0 : b - row0]))
        return Weight(self.name, self.ggml_type, r1 - r0, self.k, parts)


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
    """One block's weights by role. Optional fields are None when the file (family) has no such tensor."""

    attn_norm: np.ndarray  # (d,)
    wq: Weight  # (q, d)
    wk: Weight  # (kv, d)
    wv: Weight  # (kv, d)
    wo: Weight  # (d, q)
    ffn_norm: np.ndarray  # (d,)
    wg: Weight | None = None  # (ff, d)   a dense FFN (None in a mixture-of-experts block)
    wu: Weight | None = None  # (ff, d)
    wd: Weight | None = None  # (d, ff)
    bq: np.ndarray | None = None  # (q,)   biases: qwen2, and any family's file that has them
    bk: np.ndarray | None = None  # (kv,)
    bv: np.ndarray | None = None  # (kv,)
    bo: np.ndarray | None = None  # (d,)   llama
    bg: np.ndarray | None = None  # (ff,)  llama
    bu: np.ndarray | None = None  # (ff,)  llama
    bd: np.ndarray | None = None  # (d,)   llama
    q_norm: np.ndarray | None = None  # (hd,) qwen3, gemma3
    k_norm: np.ndarray | None = None  # (hd,)
    post_attn_norm: np.ndarray | None = None  # (d,) gemma3
    post_ffn_norm: np.ndarray | None = None  # (d,) gemma3
    moe: MoEWeights | None = None  # a mixture-of-experts FFN (router, experts) instead of wg/wu/wd

    @classmethod
    def build(cls, cfg: ModelConfig, mats: list[tuple[TensorInfo, list[tuple[int, np.ndarray]]]],
              vectors: list[tuple[TensorInfo, np.ndarray]], moe: MoEWeights | None = None) -> LayerWeights:
        """One block's tensors -> its weights: each GGUF role to its field (LAYER_FIELDS), fused tensors
        cut by rows into their parts' fields (FUSED_ROWS). mats: (tensor, row parts) of the matrices;
        vectors: (tensor, raw bytes) of the 1-D tensors."""
        out: dict[str, object] = {}
        made = [(t, weight(t, parts), True) for t, parts in mats] + [(t, vector(t, raw), False) for t, raw in vectors]
        for t, x, matrix in made:
            split = fused_rows(cfg, t.role)
            if split is None:
                out[LAYER_FIELDS[t.role]] = x
                continue
            r0 = 0
            for name, n in split:  # a fused matrix's rows, or a fused bias's elements
                out[name] = x.rows_view(r0, r0 + n) if matrix else x[r0 : r0 + n]
                r0 += n
        return cls(**out, moe=moe)


# GGUF role -> LayerWeights field: the one map from a file's block tensors to the forward pass.
LAYER_FIELDS = {
    "attn_norm.weight": "attn_norm", "attn_q.weight": "wq", "attn_k.weight": "wk", "attn_v.weight": "wv",
    "attn_output.weight": "wo", "ffn_norm.weight": "ffn_norm", "ffn_gate.weight": "wg",
    "ffn_up.weight": "wu", "ffn_down.weight": "wd", "attn_q.bias": "bq", "attn_k.bias": "bk", "attn_v.bias": "bv",
    "attn_output.bias": "bo", "ffn_gate.bias": "bg", "ffn_up.bias": "bu", "ffn_down.bias": "bd",
    "attn_q_norm.weight": "q_norm", "attn_k_norm.weight": "k_norm",
    "post_attention_norm.weight": "post_attn_norm", "post_ffw_norm.weight": "post_ffn_norm",
}
# Fused roles: their output rows (and bias entries) in order, field by field.
FUSED_ROWS = {
    "attn_qkv.weight": (("wq", "q_dim"), ("wk", "kv_dim"), ("wv", "kv_dim")),
    "attn_qkv.bias": (("bq", "q_dim"), ("bk", "kv_dim"), ("bv", "kv_dim")),
    "ffn_up.weight": (("wg", "n_ff"), ("wu", "n_ff")),  # phi3 (cfg.fused_gate_up): the gate's rows first
}


def fused_rows(cfg: ModelConfig, role: str) -> list[tuple[str, int]] | None:
    """[(LayerWeights field, rows)] of a fused role in this config, None for a plain one."""
    split = FUSED_ROWS.get(role)
    if split is None or (role == "ffn_up.weight" and not cfg.fused_gate_up):
        return None
    size = {"q_dim": cfg.q_dim, "kv_dim": cfg.kv_dim, "n_ff": cfg.n_ff}
    return [(name, size[dim]) for name, dim in split]


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
        ops.scale(x, 1.0)
        q = np.zeros((n, nh * hd), np.float32)
        ops.rmsnorm_heads(q, hd, np.ones(hd, np.float32), cfg.norm_eps)
        cos, sin = ops.rope_tables(8, cfg.rope_dim, cfg.rope_base)
        ops.rope(q, nh, hd, 0, cos, sin, cfg.rope_neox)
        kv = np.zeros((8, nkv * hd), np.uint16)
        for attend in (ops.attention, ops.attention_serial):
            attend(q, kv, kv, 0, nh, nkv, hd, ops.F16_TO_F32, cfg.kq_scale, 0,
                   np.zeros((n * nh, 8), np.float32), np.empty_like(q))
        g = np.zeros((n, 16), np.float32)
        ops.swiglu(g, g.copy())
        ops.geglu(g, g.copy(), ops.GELU_F16)
        ops.softcap(g, 30.0)


# --- the KV cache -------------------------------------------------------------------------


def ring_rows(cfg: ModelConfig, layer: int, n_ctx: int) -> int:
    """Rows of a layer's cache: n_ctx, or for a sliding-window layer at most window + SWA_RING_SLACK."""
    if cfg.is_swa(layer):
        return min(n_ctx, cfg.swa_window + SWA_RING_SLACK)
    return n_ctx


class KVCache:
    """Per-layer float16 keys and values: (rows, kv) each, position t at row t % rows.

    Full-attention layers hold every position (rows grow up to n_ctx, so t % rows = t); a
    sliding-window layer holds at most its window + SWA_RING_SLACK positions, a ring reused as
    the sequence grows, so a long context costs full-size caches only for the global layers.
    preallocate=True commits the whole cache at once (a sequence slot of the engine: its memory is
    counted and taken when the engine opens); otherwise it grows on demand (tests, one-off passes).
    """

    def __init__(self, cfg: ModelConfig, n_ctx: int, preallocate: bool = False):
        self.cfg, self.n_ctx = cfg, n_ctx
        self.capacity = 0  # positions the full layers can hold now
        self.k: list[np.ndarray] = []  # n_layer x (rows, kv) float16
        self.v: list[np.ndarray] = []
        self.pos = 0  # tokens already in the cache
        self._ring = [ring_rows(cfg, i, n_ctx) for i in range(cfg.n_layer)]
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
        for lst in (self.k, self.v):
            for i in range(self.cfg.n_layer):
                # a ring never wraps before it has its final size: rows below the old size are positions
                rows = min(cap, self._ring[i])
                if i < len(lst) and lst[i].shape[0] == rows:
                    continue
                new = np.zeros((rows, self.cfg.kv_dim), dtype=np.float16)
                if i < len(lst):
                    old = lst[i].shape[0]
                    new[:old] = lst[i]
                    lst[i] = new
                else:
                    lst.append(new)
        self.capacity = cap

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)

    @staticmethod
    def bytes_for(cfg: ModelConfig, n_ctx: int) -> int:
        """Bytes of a full cache of n_ctx tokens: keys and values, float16, every layer (rings for sliding ones)."""
        return 2 * sum(ring_rows(cfg, i, n_ctx) for i in range(cfg.n_layer)) * cfg.kv_dim * 2


def _store(cache: np.ndarray, pos0: int, rows: np.ndarray) -> None:
    """rows (m, kv) f32 -> cache rows of positions pos0.. (t at row t % len(cache)), rounded to f16."""
    cap = cache.shape[0]
    m = rows.shape[0]
    r = pos0 % cap
    first = min(m, cap - r)
    np.copyto(cache[r : r + first], rows[:first])
    if first < m:
        np.copyto(cache[: m - first], rows[first:])


def _pieces(m: int, most: int) -> list[int]:
    """m rows in near-equal pieces of at most `most` (>= 3) rows; no piece of 1 row unless m == 1
    (a single query's attention is computed in another float order than a chunk's)."""
    k = -(-m // most)
    base, extra = divmod(m, k)
    return [base + 1] * extra + [base] * (k - extra)


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
        d, q, kv, ff = cfg.n_embd, cfg.q_dim, cfg.kv_dim, cfg.n_ff
        f = np.float32
        self.n = n
        self.h = np.empty((n, d), f)
        self.q = np.empty((n, q), f)
        self.k = np.empty((n, kv), f)
        self.v = np.empty((n, kv), f)
        self.att = np.empty((n, q), f)
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
    """The forward pass of one architecture config; stateless apart from scratch buffers and rope tables.

    rope_factors: the per-pair frequency factors the config's file has for this context
    (cfg.rope_factor_tensor(n_ctx)), (rope_dim / 2,) f32, or None.
    """

    def __init__(self, cfg: ModelConfig, n_ctx: int, rope_factors: np.ndarray | None = None):
        self.cfg = cfg
        self.n_ctx = n_ctx
        # one cos/sin table per (base, scale): gemma3's sliding layers have their own
        self._rope: dict[tuple[float, float], tuple[np.ndarray, np.ndarray]] = {}
        for i in range(cfg.n_layer):
            key = cfg.rope_for(i)
            if key not in self._rope:
                self._rope[key] = ops.rope_tables(n_ctx, cfg.rope_dim, key[0], key[1], rope_factors,
                                                  cfg.rope_attn_factor)
        self._scratch: dict[int, Scratch] = {}

    def scratch(self, n: int) -> Scratch:
        s = self._scratch.get(n)
        if s is None:
            if n > KEEP_SCRATCH_ROWS:  # keep the (small) buffers of every decode batch size and the latest prefill
                self._scratch = {k: v for k, v in self._scratch.items() if k <= KEEP_SCRATCH_ROWS}
            s = self._scratch[n] = Scratch(self.cfg, n, self.n_ctx)
        return s

    def embed(self, emb: Weight, ids: np.ndarray) -> np.ndarray:
        """Row ids (n,) of the embedding weight -> x (n, d) f32 (a new array), scaled for gemma3."""
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
        if self.cfg.embed_scale:
            ops.scale(x, self.cfg.embed_scale)  # gemma3: ggml_scale(inpL, sqrtf(n_embd))
        return x

    def layer(self, i: int, w: LayerWeights, x: np.ndarray, segments: list[Segment]) -> None:
        """Run block i on x (n, d) in place: the rows of several sequences (`segments`), each at its own
        positions in its own KV cache. Matmuls take every row at once (the weights are read once);
        RoPE, the cache writes and attention go sequence by sequence. Every row's arithmetic is the
        same as if its sequence ran alone."""
        c = self.cfg
        s = self.scratch(x.shape[0])
        if w.moe is not None:  # start reading the experts this layer and the next will probably want
            predict_first(w.moe, x)
        ops.rmsnorm(x, w.attn_norm, c.norm_eps, s.h)
        self._attention(i, w, s, segments)  # s.h -> s.o
        if w.post_attn_norm is not None:
            ops.rmsnorm(s.o, w.post_attn_norm, c.norm_eps, s.o)
        ops.add_inplace(x, s.o)
        ops.rmsnorm(x, w.ffn_norm, c.norm_eps, s.h)
        self._ffn(i, w, s.h, s.o, segments, x)
        if w.post_ffn_norm is not None:
            ops.rmsnorm(s.o, w.post_ffn_norm, c.norm_eps, s.o)
        ops.add_inplace(x, s.o)

    def _attention(self, i: int, w: LayerWeights, s: Scratch, segments: list[Segment]) -> None:
        """Self-attention of block i: s.h (n, d), the normalised input -> s.o (n, d), before the residual."""
        c = self.cfg
        w.wq.matmul(s.h, s.q)
        w.wk.matmul(s.h, s.k)
        w.wv.matmul(s.h, s.v)
        for b, y in ((w.bq, s.q), (w.bk, s.k), (w.bv, s.v)):
            if b is not None:
                ops.add_bias(y, b)
        if c.qk_norm:
            ops.rmsnorm_heads(s.q, c.head_dim, w.q_norm, c.norm_eps)
            ops.rmsnorm_heads(s.k, c.head_dim, w.k_norm, c.norm_eps)
        cos, sin = self._rope[c.rope_for(i)]
        window = c.swa_window if c.is_swa(i) else 0
        for seg in segments:
            r0, m, pos0 = seg.row0, seg.n, seg.pos0
            q, k = s.q[r0 : r0 + m], s.k[r0 : r0 + m]
            ops.rope(q, c.n_head, c.head_dim, pos0, cos, sin, c.rope_neox)
            ops.rope(k, c.n_head_kv, c.head_dim, pos0, cos, sin, c.rope_neox)
            if c.q_scale:
                ops.scale(q, c.q_scale)  # gemma3, phi3: Q scaled in f32 before attention rounds it to f16
            kc, vc = seg.cache.k[i], seg.cache.v[i]
            # a ring holds `rows` positions: a piece of queries needs its window before it as well
            most = m if kc.shape[0] >= pos0 + m else kc.shape[0] - window + 1
            a = 0
            for p in _pieces(m, most):
                _store(kc, pos0 + a, k[a : a + p])  # rounds to f16
                _store(vc, pos0 + a, s.v[r0 + a : r0 + a + p])
                T = pos0 + a + p
                # work ~ tokens x heads x keys: below ~64k head-positions one thread beats a parallel launch
                keys = min(T, window) if window else T
                attend = ops.attention if p * c.n_head * keys > 65536 else ops.attention_serial
                scores = s.scores_for(T)[: p * c.n_head]
                attend(q[a : a + p], kc.view(np.uint16), vc.view(np.uint16), pos0 + a, c.n_head, c.n_head_kv,
                       c.head_dim, ops.F16_TO_F32, c.kq_scale, window, scores, s.att[r0 + a : r0 + a + p])
                a += p
        w.wo.matmul(s.att, s.o)
        if w.bo is not None:
            ops.add_bias(s.o, w.bo)

    def _ffn(self, i: int, w: LayerWeights, h: np.ndarray, out: np.ndarray, segments: list[Segment],
             x: np.ndarray | None = None) -> None:
        """The FFN of block i: h (n, d), the normalised input -> out (n, d), before any post-norm and the
        residual add. The one place an FFN variant is chosen: a mixture of experts (flexio/moe.py) when
        the block has one, else `_dense_ffn`."""
        if w.moe is None:
            self._dense_ffn(w, h, out)
            return
        # llama.cpp computes a token alone one way and a batch another (the router's F32 matmul); its last
        # layer runs only the rows whose logits are wanted, each alone
        single = np.zeros(h.shape[0], np.bool_)
        for seg in segments:
            if seg.n == 1 or i == self.cfg.n_layer - 1:
                single[seg.row0 : seg.row0 + seg.n] = True
        moe_ffn(w.moe, h, single, out, x)

    def _dense_ffn(self, w: LayerWeights, h: np.ndarray, out: np.ndarray) -> None:
        """out = W_down . act(W_gate . h) * (W_up . h), act = SiLU (SwiGLU) or GELU-tanh (GeGLU), as
        llama.cpp's build_ffn with LLM_FFN_PAR (phi3's fused gate+up arrives as two row ranges)."""
        s = self.scratch(h.shape[0])
        w.wg.matmul(h, s.g)
        if w.bg is not None:
            ops.add_bias(s.g, w.bg)
        w.wu.matmul(h, s.u)
        if w.bu is not None:
            ops.add_bias(s.u, w.bu)
        if self.cfg.ffn_act == "gelu":
            ops.geglu(s.g, s.u, ops.GELU_F16)
        else:
            ops.swiglu(s.g, s.u)
        w.wd.matmul(s.g, out)
        if w.bd is not None:
            ops.add_bias(out, w.bd)

    def final_norm(self, norm: np.ndarray, x_last: np.ndarray) -> np.ndarray:
        """x_last (k, d) -> the normalised hidden states (k, d) the output head multiplies."""
        h = np.empty_like(x_last)
        ops.rmsnorm(x_last, norm, self.cfg.norm_eps, h)
        return h

    def finish_logits(self, logits: np.ndarray) -> None:
        """The output head's (k, vocab) result -> logits, in place (gemma's final soft-capping when set)."""
        if self.cfg.logit_softcap:
            ops.softcap(logits, self.cfg.logit_softcap)

