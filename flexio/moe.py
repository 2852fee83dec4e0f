"""FFN input rows + router + a layer's experts -> the mixture-of-experts FFN output (llama.cpp's build_moe_ffn).

The router picks k experts per token (flexio_kernels.moe: softmax over all of them, top-k,
renormalised weights); each picked expert is a SwiGLU FFN of its own (gate, up, down row
ranges of the layer's `*_exps` tensors, or up and down without a gate); their outputs are
scaled by the weights and added largest-first. Every expert the rows of a pass picked is
computed once for all the rows that picked it (its weights are read once), in whatever
order the experts arrive from the ExpertSource (cached ones first, reads as they land):
each output element is a single dot product, so the order changes nothing. The experts in
memory at a time go through the kernels together (matmul_many: one threaded call for all of
their gate, up or down matrices), not one call per expert.

Prediction (pre-gating): once layer i has asked for its experts, layer i + 1's router applied to
layer i's state after attention tells which experts the next layer will probably want; the source
starts reading them early (behind layer i's own reads), and skips the guess for a layer that has
found its experts cached lately (ExpertSource.wants_prediction).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from flexio_kernels import matmul, matmul_many, ops
from flexio_kernels.moe import route, router_logits_one, weighted_sum

from .plan import ExpertPlan

F32 = 0
PREDICT_ROWS_ONE = 8  # a prediction for up to this many rows (decode) takes the one-row router kernel row by row


class ExpertSource(Protocol):
    """Where a layer's experts come from (flexio.experts.ExpertCache, or ResidentExperts)."""

    def want(self, layer: int, ids: Sequence[int]) -> None: ...
    def next(self, layer: int) -> tuple[int, list[np.ndarray]]: ...
    def ready(self, layer: int) -> list[tuple[int, list[np.ndarray]]]: ...
    def done(self, layer: int, e: int) -> None: ...
    def finish(self, layer: int) -> None: ...
    def wants_prediction(self, layer: int) -> bool: ...
    def predict(self, layer: int, ids: Sequence[int]) -> None: ...


class ResidentExperts:
    """Every expert in memory (the arena in memory mode, the page cache in mmap mode): nothing to wait for.

    tensors: per layer, one uint8 (n_expert * rows, row_bytes) array per expert tensor (gate, up, down).
    """

    def __init__(self, plan: ExpertPlan, tensors: dict[int, list[np.ndarray]]):
        self.plan, self.tensors = plan, tensors
        self.out: dict[int, deque[int]] = {}

    def want(self, layer: int, ids: Sequence[int]) -> None:
        self.out[layer] = deque(int(i) for i in ids)

    def next(self, layer: int) -> tuple[int, list[np.ndarray]]:
        e = self.out[layer].popleft()
        parts = []
        for t in self.tensors[layer]:
            rows = t.shape[0] // self.plan.n_expert
            parts.append(t[e * rows : (e + 1) * rows])
        return e, parts

    def ready(self, layer: int) -> list[tuple[int, list[np.ndarray]]]:
        return [self.next(layer) for _ in range(len(self.out[layer]))]

    def done(self, layer: int, e: int) -> None:
        pass

    def finish(self, layer: int) -> None:
        self.out.pop(layer, None)

    def wants_prediction(self, layer: int) -> bool:
        return False

    def predict(self, layer: int, ids: Sequence[int]) -> None:
        pass


@dataclass
class MoEWeights:
    """A layer's mixture-of-experts FFN: its router, its experts and, for prediction, the next layer's."""

    layer: int
    router: np.ndarray  # (n_expert, d) f32
    types: tuple[int, ...]  # ggml types of the expert tensors: (gate, up, down) or (up, down)
    experts: ExpertSource
    n_used: int
    norm: np.ndarray | None = None  # (d,): this layer's ffn_norm (to predict layer 0 from its input)
    next_router: np.ndarray | None = None  # (n_expert, d) f32: layer + 1's router
    next_norm: np.ndarray | None = None  # (d,): layer + 1's ffn_norm
    predict: bool = True
    eps: float = 1e-6  # the norms' epsilon (the prediction normalises with the next layer's ffn_norm)

    @property
    def has_gate(self) -> bool:
        return len(self.types) == 3


def router_logits(router: np.ndarray, h: np.ndarray, single: np.ndarray) -> np.ndarray:
    """router (n_expert, d) f32, h (n, d) -> logits (n, n_expert). Rows of one-token sequences (`single`, bool (n,))
    take ggml_vec_dot_f32's order, the others the F32 matmul's (tinyBLAS), as llama.cpp computes a token alone vs a
    batch (the matmul takes the kernels' own threads: numpy's BLAS has another pool)."""
    n = h.shape[0]
    logits = np.empty((n, router.shape[0]), np.float32)
    if not single.all():
        matmul(router.view(np.uint8), F32, h, logits, 0)
    for r in np.flatnonzero(single):
        router_logits_one(router, h[r], logits[r])
    return logits


def predict_first(mw: MoEWeights, x: np.ndarray) -> None:
    """Before the first MoE layer runs: start reading the experts it will probably want, by applying its router to
    its input x (n, d). A hint: its rounding does not matter."""
    if mw.predict and mw.layer == 0:
        _predict(mw, 0, mw.router, mw.norm, x)


def predict_next(mw: MoEWeights, x: np.ndarray) -> None:
    """Once layer i's own reads are queued: start reading the experts layer i + 1 will probably want, by applying
    its router to x (n, d), layer i's state after its attention (the input of its FFN before the norm). That state
    is closer to layer i + 1's than layer i's input is (Qwen3-30B-A3B, random weights: 77 % of the next layer's
    experts guessed against 68 %), and guesses queued behind the layer's own misses do not delay them."""
    if mw.predict and mw.next_router is not None:
        _predict(mw, mw.layer + 1, mw.next_router, mw.next_norm, x)


def _predict(mw: MoEWeights, layer: int, router: np.ndarray, norm: np.ndarray, x: np.ndarray) -> None:
    if not mw.experts.wants_prediction(layer):  # it found its experts cached lately: nothing to read early
        return
    h = np.empty_like(x)
    ops.rmsnorm(x, norm, mw.eps, h)
    logits = router_logits(router, h, np.full(x.shape[0], x.shape[0] <= PREDICT_ROWS_ONE))
    best = np.argsort(-logits, axis=1, kind="stable")[:, : mw.n_used]  # each row's k likeliest, best first
    mw.experts.predict(layer, list(dict.fromkeys(best.T.reshape(-1).tolist())))  # rank by rank over the rows


def moe_ffn(mw: MoEWeights, h: np.ndarray, single: np.ndarray, out: np.ndarray, x: np.ndarray | None = None) -> None:
    """out (n, d) = the MoE FFN of h (n, d) (the normalised FFN input), every row with its own experts.
    x (n, d): the FFN's input before the norm, to guess the next layer's experts from (None: no guess)."""
    n, d = h.shape
    k = mw.n_used
    logits = router_logits(mw.router, h, single)
    sel = np.empty((n, k), np.int64)
    weights = np.empty((n, k), np.float32)
    route(logits, k, sel, weights)
    users: dict[int, list[tuple[int, int]]] = {}  # expert -> [(row, slot)], experts in order of first use
    for r in range(n):
        for i in range(k):
            users.setdefault(int(sel[r, i]), []).append((r, i))
    ys = np.empty((n, k, d), np.float32)
    src = mw.experts
    src.want(mw.layer, list(users))
    if x is not None:
        predict_next(mw, x)
    try:
        left = len(users)
        while left:
            batch = src.ready(mw.layer)  # the experts in memory now: one kernel call for all of them
            left -= len(batch)
            rows = [users[e] for e, _ in batch]
            spans = np.cumsum([0] + [len(u) for u in rows])
            x = h[[r for u in rows for r, _ in u]]  # (m, d): each expert's rows, expert after expert
            parts = [p for _, p in batch]
            if mw.has_gate:
                gate_t, up_t, down_t = mw.types
                gate_w, up_w, down_w = zip(*parts)
            else:
                (up_t, down_t), (up_w, down_w) = mw.types, zip(*parts)
            m, ff = x.shape[0], up_w[0].shape[0]
            up = np.empty((m, ff), np.float32)
            matmul_many(up_w, up_t, x, spans, up)
            if mw.has_gate:
                gate = np.empty((m, ff), np.float32)
                matmul_many(gate_w, gate_t, x, spans, gate)
                ops.swiglu(gate, up)
                act = gate
            else:  # no gate tensor: silu(up), as llama.cpp (swiglu with a gate of ones: x * 1 is x)
                act = up
                ops.swiglu(act, np.ones_like(act))
            y = np.empty((m, d), np.float32)
            matmul_many(down_w, down_t, act, spans, y)
            for e, _ in batch:
                src.done(mw.layer, e)
            j = 0
            for u in rows:
                for r, i in u:
                    ys[r, i] = y[j]
                    j += 1
    finally:
        src.finish(mw.layer)
    weighted_sum(ys, weights, out)
