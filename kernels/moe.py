"""Router weights x activations -> which experts each token uses, with which weights; expert outputs -> the FFN's.

llama.cpp's `build_moe_ffn` (src/llama-graph.cpp) for softmax gating with renormalised
top-k weights (Mixtral, Qwen3-MoE), replayed operation by operation on the CPU:

  logits   one token alone: ggml_vec_dot_f32 per expert (4 accumulators x 8 lanes with FMA, the
           4 x 8 reduction of GGML_F32x8_REDUCE, leftovers in f32); several tokens at once go
           through the F32 matmul kernel (tinyBLAS's order) instead, as in llama.cpp.
  softmax  over all experts: max (sequential), exp by ggml_v_expf in chunks of 8 summed as
           hsum_float_8 into a double (leftovers with libm expf), p = e * (float)(1 / sum).
  top-k    the k largest probabilities, largest first; equal ones keep the lower expert first
           (libstdc++'s insertion sort for the <= 16 experts where ties can be checked).
  weights  w_i = p_i / max(sum of the k (summed in double, in slot order, rounded), 2^-14).
  combine  out = ((y_0 * w_0 + y_1 * w_1) + y_2 * w_2) + ...: each expert output scaled by its
           weight (f32), then added left to right in slot order (largest probability first).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .ops import fmaf, hsum8, reduce_4x8, v_expf

_MIN_NORM = np.float32(6.103515625e-5)  # the clamp of the renormalisation's denominator


@njit(nogil=True, cache=True, parallel=True)
def router_logits_one(w, x, out):
    """out[e] = ggml_vec_dot_f32(w[e], x) for every expert e.   w: (n_expert, d) f32; x: (d,) f32; out: (n_expert,).
    Experts are shared among the threads; each has its accumulators of its own (which LLVM then keeps in
    vector registers: 8x faster than one array reused for every expert, on 128 x 2048)."""
    n_expert, d = w.shape
    main = d - d % 32
    for e in prange(n_expert):
        acc = np.zeros(32, np.float32)
        for i in range(0, main, 32):
            for lane in range(32):
                acc[lane] = fmaf(w[e, i + lane], x[i + lane], acc[lane])
        s = reduce_4x8(acc)
        for i in range(main, d):
            s = fmaf(w[e, i], x[i], s)
        out[e] = s


@njit(nogil=True, cache=True)
def route(logits, k, sel, weights):
    """Softmax over each row of logits (T, n_expert), its top k (sel (T, k) int64, largest first) and
    their renormalised weights (weights (T, k) f32), as llama.cpp's build_moe_ffn."""
    T, n = logits.shape
    p = np.empty(n, np.float32)
    acc = np.zeros(8, np.float32)
    main = n - n % 8
    for t in range(T):
        mx = np.float32(-np.inf)
        for e in range(n):
            v = logits[t, e]
            mx = mx if mx > v else v
        total = 0.0
        for c0 in range(0, main, 8):
            for lane in range(8):
                ev = v_expf(logits[t, c0 + lane] - mx)
                acc[lane] = ev
                p[c0 + lane] = ev
            total += np.float64(hsum8(acc, 0))
        for e in range(main, n):
            ev = np.float32(math.exp(logits[t, e] - mx))
            p[e] = ev
            total += np.float64(ev)
        inv = np.float32(1.0 / total)
        for e in range(n):
            p[e] = p[e] * inv
        order = np.argsort(-p, kind="mergesort")  # stable: equal probabilities keep the lower expert first
        s = 0.0
        for i in range(k):
            sel[t, i] = order[i]
            weights[t, i] = p[order[i]]
            s += np.float64(weights[t, i])
        den = np.float32(s)
        if den < _MIN_NORM:
            den = _MIN_NORM
        for i in range(k):
            weights[t, i] = weights[t, i] / den


@njit(nogil=True, cache=True)
def weighted_sum(ys, weights, out):
    """out[t] = ((ys[t, 0] * w[t, 0] + ys[t, 1] * w[t, 1]) + ...) in slot order.
    ys: (T, k, d) f32 expert outputs; weights: (T, k) f32; out: (T, d) f32."""
    T, k, d = ys.shape
    for t in range(T):
        w0 = weights[t, 0]
        for j in range(d):
            out[t, j] = ys[t, 0, j] * w0
        for i in range(1, k):
            wi = weights[t, i]
            for j in range(d):
                out[t, j] = out[t, j] + ys[t, i, j] * wi
