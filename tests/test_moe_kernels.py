"""The router's one-token logits: the threaded kernel gives, bit for bit, the one-thread loop of ggml_vec_dot_f32's
order (4 x 8 accumulators with FMA, the 4 x 8 reduction, leftovers in f32), for every expert."""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from flexio_kernels.moe import router_logits_one
from flexio_kernels.ops import fmaf, reduce_4x8


@njit(cache=True)
def vec_dot_f32_rows(w, x, out):
    n_expert, d = w.shape
    main = d - d % 32
    acc = np.zeros(32, np.float32)
    for e in range(n_expert):
        acc[:] = 0.0
        for i in range(0, main, 32):
            for lane in range(32):
                acc[lane] = fmaf(w[e, i + lane], x[i + lane], acc[lane])
        s = reduce_4x8(acc)
        for i in range(main, d):
            s = fmaf(w[e, i], x[i], s)
        out[e] = s


@pytest.mark.parametrize("n_expert, d", [(128, 2048), (8, 4096), (3, 100), (5, 31)])
def test_router_logits_one_is_vec_dot_f32(n_expert, d):
    rng = np.random.default_rng(d)
    w = rng.standard_normal((n_expert, d), dtype=np.float32)
    x = rng.standard_normal(d, dtype=np.float32) * np.float32(3)
    got, want = np.empty(n_expert, np.float32), np.empty(n_expert, np.float32)
    router_logits_one(w, x, got)
    vec_dot_f32_rows(w, x, want)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    assert np.allclose(got, w.astype(np.float64) @ x.astype(np.float64), rtol=1e-4, atol=1e-3)
