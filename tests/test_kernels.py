"""flexio_kernels against gguf-py and the NumPy scalar reference, on random valid blocks, both backends."""

import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import flexio_kernels as fk
from flexio_kernels import LAYOUTS, reference

TYPES = sorted(LAYOUTS)
NAMES = [LAYOUTS[t].name for t in TYPES]
QUANT_TYPES = [t for t in TYPES if t not in (0, 1)]
BACKENDS = ["portable", "avx2"]
SHAPES = [(7, 256, 1), (33, 512, 3), (9, 768, 17)]  # (rows, k, n)


def random_weights(rng, t, rows, k):
    """(rows, row_bytes) uint8: random quant bytes with finite, sane f16 scales (d > 0, dmin > 0, m < 0)."""
    L = LAYOUTS[t]
    if L.name == "F32":
        return rng.standard_normal((rows, k)).astype(np.float32).view(np.uint8)
    if L.name == "F16":
        return rng.standard_normal((rows, k)).astype(np.float16).view(np.uint8)
    raw = rng.integers(0, 256, size=(rows, L.row_bytes(k)), dtype=np.uint8)
    blocks = raw.reshape(-1, L.block_bytes)
    for name, off, _ in L.fields:
        if name in ("d", "dmin", "m"):
            h = (rng.random(blocks.shape[0]) * 0.1 + 0.001).astype(np.float16)
            blocks[:, off:off + 2] = (-h if name == "m" else h).view(np.uint8).reshape(-1, 2)
    return raw


def gguf_dequantize(w, t):
    return gguf.quants.dequantize(w, gguf.GGMLQuantizationType(t)).reshape(w.shape[0], -1)


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param == "avx2" and not fk.cpu_has_avx2():
        pytest.skip("this CPU lacks AVX2/FMA/F16C")
    before = fk.backend()
    fk.set_backend(request.param)
    yield request.param
    fk.set_backend(before)


def int_reference(w, t, x):
    """(n, rows) float64: the kernels' integer math done in float64 from reference.py.

    Dequantized weights times dequantized int8 activations; for Q4_1 the min term uses
    llama.cpp's f16-rounded s = f16(d * sum(q)) as the kernels do.
    """
    W = reference.dequantize(w, t).astype(np.float64)
    if t == 1:  # llama.cpp (so flexio) rounds x to f16 for F16 weights
        return x.astype(np.float16).astype(np.float64) @ W.T
    if t == 0:
        return x.astype(np.float64) @ W.T
    L = LAYOUTS[t]
    n, k = x.shape
    if L.block_elems == 256:
        q, d, _ = reference.quantize_q8_k(x)
        X = q.astype(np.float64).reshape(n, -1, 256) * d[:, :, None]
        return X.reshape(n, k) @ W.T
    q, d, s = reference.quantize_q8_32(x)
    X = (q.astype(np.float64).reshape(n, -1, 32) * d[:, :, None]).reshape(n, k)
    out = X @ W.T
    if L.name == "Q4_1":  # replace m * d * sum(q) by m * s
        off = L.offset("m")
        m = w.reshape(-1, L.block_bytes)[:, off:off + 2].copy().view(np.float16).astype(np.float64).reshape(w.shape[0], -1)
        qsum = q.astype(np.float64).reshape(n, -1, 32).sum(axis=2)
        out += (s.astype(np.float64) - d * qsum) @ m.T
    return out


def norms(w, t, x):
    return np.linalg.norm(x.astype(np.float64), axis=1)[:, None] * np.linalg.norm(reference.dequantize(w, t).astype(np.float64), axis=1)[None, :]


# ---- layouts and references ----

def test_layouts_match_ggml_sizes():
    for t, L in LAYOUTS.items():
        assert (L.block_elems, L.block_bytes) == gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t)], L.name
        assert sum(f[2] for f in L.fields) == L.block_bytes, L.name


@pytest.mark.parametrize("t", TYPES, ids=NAMES)
def test_reference_dequantize_is_exact(t):
    w = random_weights(np.random.default_rng(t), t, 5, 512)
    np.testing.assert_array_equal(reference.dequantize(w, t), gguf_dequantize(w, t))


def test_pinned_blocks():
    """Hand-made blocks decoded from the format description alone."""
    j = np.arange(16)
    q4 = np.concatenate([np.frombuffer(np.float16(0.5).tobytes(), np.uint8), (j | ((15 - j) << 4)).astype(np.uint8)])
    want = np.concatenate([0.5 * (j - 8), 0.5 * (7 - j)]).astype(np.float32)
    q8 = np.concatenate([np.frombuffer(np.float16(-0.25).tobytes(), np.uint8), np.arange(-16, 16, dtype=np.int8).view(np.uint8)])
    for t, block, expect in ((2, q4, want), (8, q8, -0.25 * np.arange(-16, 16, dtype=np.float32))):
        w = block[None, :]
        np.testing.assert_array_equal(reference.dequantize(w, t)[0], expect)
        out = np.empty((1, 32), np.float32)
        fk.dequantize_rows(w, t, np.array([0]), out)
        np.testing.assert_array_equal(out[0], expect)


def test_activation_quantizers_match_reference():
    from flexio_kernels import actq

    x = np.random.default_rng(1).standard_normal((3, 512)).astype(np.float32) * 3
    x[1, :32] = 0  # an all-zero block
    q, d, bs, s = actq.quantize_q8_32(x)  # bs: sums of 16 q's, for the -8 / -16 offsets
    for got, want in zip((q, d, s), reference.quantize_q8_32(x)):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(bs, q.astype(np.int32).reshape(3, -1, 16).sum(axis=2))
    for got, want in zip(actq.quantize_q8_k(x), reference.quantize_q8_k(x)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("t", TYPES, ids=NAMES)
def test_dequantize_rows_is_exact(t):
    w = random_weights(np.random.default_rng(10 + t), t, 33, 768)
    ids = np.array([32, 0, 5, 5])
    out = np.empty((4, 768), np.float32)
    fk.dequantize_rows(w, t, ids, out)
    np.testing.assert_array_equal(out, gguf_dequantize(w, t)[ids])


# ---- matmul ----

@pytest.mark.parametrize("rows,k,n", SHAPES)
@pytest.mark.parametrize("t", TYPES, ids=NAMES)
def test_matmul(backend, t, rows, k, n):
    rng = np.random.default_rng(rows * k + n + t)
    w = random_weights(rng, t, rows, k)
    x = rng.standard_normal((n, k)).astype(np.float32)
    out = np.full((n, rows + 3), np.nan, np.float32)
    fk.matmul(w, t, x, out, out_col0=2)
    got = out[:, 2:2 + rows].astype(np.float64)
    assert np.isnan(out[:, :2]).all() and np.isnan(out[:, 2 + rows:]).all(), "wrote outside its columns"
    scale = norms(w, t, x)
    # vs float64 on float weights and float x: int8 activations cost ~1e-3 of ||w|| ||x||
    exact = x.astype(np.float64) @ gguf_dequantize(w, t).astype(np.float64).T
    # (F16: x is rounded to f16 as llama.cpp does, ~2^-11 relative per element)
    assert (np.abs(got - exact) / scale).max() < (1e-5 if t == 0 else 1e-3 if t == 1 else 4e-3)
    # vs the same integer math in float64: only float32 rounding is left
    assert (np.abs(got - int_reference(w, t, x)) / scale).max() < 2e-6


def _both_backends(w, t, x):
    outs = {}
    before = fk.backend()
    try:
        for b in BACKENDS:
            fk.set_backend(b)
            outs[b] = np.full((x.shape[0], w.shape[0]), np.nan, np.float32)
            fk.matmul(w, t, x, outs[b])
    finally:
        fk.set_backend(before)
    return outs


@pytest.mark.parametrize("n", [1, 3, 6, 13])
@pytest.mark.parametrize("t", TYPES, ids=NAMES)
def test_backends_bitwise_equal(t, n):
    """Both backends follow llama.cpp's float order, so they give the same bits (odd row count:
    the AVX2 kernel's lone last row; n = 3: the legacy tile's 4-wide form, or 3 single K-quant
    columns; n = 6: one 8-column legacy tile with 2 columns repeated, or one 4-column K-quant
    tile plus 2 single columns; n = 13: a full and a padded legacy tile, or 3 K-quant tiles and
    a single column)."""
    if not fk.cpu_has_avx2():
        pytest.skip("this CPU lacks AVX2/FMA/F16C")
    rng = np.random.default_rng(100 + t + n)
    k = 768 if LAYOUTS[t].block_elems == 256 else 544  # 17 legacy blocks: the unrolled loops' tails
    w = random_weights(rng, t, 65, k)
    x = rng.standard_normal((n, k)).astype(np.float32)
    outs = _both_backends(w, t, x)
    assert np.array_equal(outs["portable"], outs["avx2"])


@pytest.mark.parametrize("t", TYPES, ids=NAMES)
def test_prefill_equals_decode(backend, t):
    """Column j of an n-column matmul has the same bits as a matmul of column j alone (llama.cpp
    computes the same per-(row, column) value in prefill as in decode)."""
    rng = np.random.default_rng(200 + t)
    k = 512 if LAYOUTS[t].block_elems == 256 else 320
    w = random_weights(rng, t, 21, k)
    x = rng.standard_normal((15, k)).astype(np.float32)  # 8 + 7 columns: tiles, padded tiles, single columns
    full = np.empty((15, 21), np.float32)
    fk.matmul(w, t, x, full)
    for j in range(15):
        one = np.empty((1, 21), np.float32)
        fk.matmul(w, t, x[j:j + 1], one)
        assert np.array_equal(one[0], full[j]), f"column {j}"


# ---- llama.cpp's float order, modelled in NumPy ----

def _fma32(a, b, c):
    """float32 fma via float64: the product of two float32 is exact in float64 and the sum rounds
    (twice, 53 then 24 bits: in rare cases not fmaf's single rounding; fine as a test oracle)."""
    return (np.float64(1) * a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(np.float32)


def _hsum8(a):  # llama.cpp's hsum_float_8 over the last axis
    return ((a[..., 0] + a[..., 4]) + (a[..., 2] + a[..., 6])) + ((a[..., 1] + a[..., 5]) + (a[..., 3] + a[..., 7]))


def llama_order_legacy(w, t, x):
    """(n, rows) float32: ggml_vec_dot_{q4_0_q8_0, q4_1_q8_1, q8_0_q8_0} (AVX2) step by step.

    acc (8 float32 lanes) = fma(f16(d_w) * d_x, float(lane l: sum of the 4 products of elements
    4l..4l+3), acc) block after block; Q4_1: summs = fma(m, s_x, summs); result hsum8(acc) (+ summs).
    """
    L = LAYOUTS[t]
    rows = w.shape[0]
    n, k = x.shape
    nb = k // 32
    blocks = w.reshape(rows * nb, L.block_bytes)
    vals = reference.quant_values(blocks, t).reshape(rows, nb, 32).astype(np.int64)
    if L.name == "Q4_0":
        vals -= 8
    dw = blocks[:, :2].copy().view(np.float16).astype(np.float32).reshape(rows, nb)
    q, d, s = reference.quantize_q8_32(x)
    q = q.astype(np.int64).reshape(n, nb, 32)
    lanes = (vals[:, None] * q[None]).reshape(rows, n, nb, 8, 4).sum(axis=-1).astype(np.float32)  # exact
    acc = np.zeros((rows, n, 8), np.float32)
    summs = np.zeros((rows, n), np.float32)
    for b in range(nb):
        dd = dw[:, None, b] * d[None, :, b]  # float32 product
        acc = _fma32(np.broadcast_to(dd[..., None], acc.shape), lanes[:, :, b], acc)
        if L.name == "Q4_1":
            off = L.offset("m")
            m = blocks[:, off:off + 2].copy().view(np.float16).astype(np.float32).reshape(rows, nb)
            summs = _fma32(np.broadcast_to(m[:, None, b], summs.shape), np.broadcast_to(s[None, :, b], summs.shape), summs)
    out = _hsum8(acc)
    if L.name == "Q4_1":
        out = out + summs
    return out.T


@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("t", [2, 3, 8], ids=["Q4_0", "Q4_1", "Q8_0"])
def test_matmul_is_llama_order(backend, t, n):
    rng = np.random.default_rng(300 + t + n)
    w = random_weights(rng, t, 19, 640)
    x = rng.standard_normal((n, 640)).astype(np.float32)
    out = np.empty((n, 19), np.float32)
    fk.matmul(w, t, x, out)
    assert np.array_equal(out, llama_order_legacy(w, t, x))


# ---- against llama.cpp's own vec_dot kernels (the installed llama-cpp-python's libggml-cpu) ----

_VEC_DOT = {2: ("q4_0_q8_0", "q8_0", 34, 32), 3: ("q4_1_q8_1", "q8_1", 36, 32), 6: ("q5_0_q8_0", "q8_0", 34, 32),
            8: ("q8_0_q8_0", "q8_0", 34, 32), 12: ("q4_K_q8_K", "q8_K", 292, 256), 13: ("q5_K_q8_K", "q8_K", 292, 256),
            14: ("q6_K_q8_K", "q8_K", 292, 256)}


def _ggml_cpu():
    """libggml-cpu of the installed llama-cpp-python, or None (not installed, not loadable, no AVX2:
    without AVX2 its kernels take another order)."""
    import ctypes
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not fk.cpu_has_avx2():
        return None
    lib = os.path.join(os.path.dirname(spec.origin), "lib")
    try:
        ctypes.CDLL(os.path.join(lib, "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
        cpu = ctypes.CDLL(os.path.join(lib, "libggml-cpu.so"), mode=ctypes.RTLD_GLOBAL)
        cpu.ggml_cpu_init()
        if not cpu.ggml_cpu_has_avx2():
            return None
    except OSError:
        return None
    return cpu


def ggml_matmul(cpu, w, t, x):
    """(n, rows) float32 from ggml's quantize_row_q8_* and ggml_vec_dot_*_q8_* (one row . one column)."""
    import ctypes

    name, yq, yb, be = _VEC_DOT[t]
    vec_dot, quant = getattr(cpu, "ggml_vec_dot_" + name), getattr(cpu, "quantize_row_" + yq)
    n, k = x.shape
    out = np.empty((n, w.shape[0]), np.float32)
    s = ctypes.c_float()
    vp = ctypes.c_void_p
    for j in range(n):
        xj = np.ascontiguousarray(x[j])
        y = np.zeros(k // be * yb, np.uint8)
        quant(xj.ctypes.data_as(vp), y.ctypes.data_as(vp), ctypes.c_int64(k))
        for r in range(w.shape[0]):
            vec_dot(ctypes.c_int(k), ctypes.byref(s), ctypes.c_size_t(0), w[r].ctypes.data_as(vp), ctypes.c_size_t(0),
                    y.ctypes.data_as(vp), ctypes.c_size_t(0), ctypes.c_int(1))
            out[j, r] = s.value
    return out


@pytest.mark.parametrize("t", sorted(_VEC_DOT), ids=[LAYOUTS[t].name for t in sorted(_VEC_DOT)])
def test_matmul_equals_ggml_vec_dot(backend, t):
    """Bit for bit what llama.cpp's AVX2 vec_dot gives (its decode path for every type it does not
    repack; its prefill tile keeps the same per-(row, column) order)."""
    cpu = _ggml_cpu()
    if cpu is None:
        pytest.skip("llama-cpp-python's libggml-cpu (AVX2) is not available")
    rng = np.random.default_rng(400 + t)
    k = 768 if LAYOUTS[t].block_elems == 256 else 544
    w = random_weights(rng, t, 13, k)
    x = rng.standard_normal((5, k)).astype(np.float32)
    out = np.empty((5, 13), np.float32)
    fk.matmul(w, t, x, out)
    assert np.array_equal(out, ggml_matmul(cpu, w, t, x))


@pytest.mark.parametrize("n", [2, 9])
def test_parallel_path(backend, n):
    """Large enough to take the threaded kernel; rows split across threads must all be written
    (n = 9: a column tile and a single column in every row chunk)."""
    rng = np.random.default_rng(7)
    rows = fk.PARALLEL_MIN_BYTES // LAYOUTS[2].row_bytes(512) + 37
    w = random_weights(rng, 2, rows, 512)
    x = rng.standard_normal((n, 512)).astype(np.float32)
    out = np.full((n, rows), np.nan, np.float32)
    fk.matmul(w, 2, x, out)
    assert (np.abs(out - int_reference(w, 2, x)) / norms(w, 2, x)).max() < 2e-6


def test_readonly_weights(backend):
    """Weights straight from a read-only mmap of the GGUF file."""
    rng = np.random.default_rng(8)
    w = random_weights(rng, 2, 9, 256)
    w.flags.writeable = False
    x = rng.standard_normal((1, 256)).astype(np.float32)
    out = np.empty((1, 9), np.float32)
    fk.matmul(w, 2, x, out)
    assert (np.abs(out - int_reference(w, 2, x)) / norms(w, 2, x)).max() < 2e-6


@settings(max_examples=30, deadline=None)
@given(t=st.sampled_from([2, 3, 8, 12, 14]), rows=st.integers(1, 40), blocks=st.integers(1, 3),
       n=st.integers(1, 9), seed=st.integers(0, 2**32 - 1), x_scale=st.sampled_from([1e-3, 1.0, 50.0]))
def test_matmul_property(t, rows, blocks, n, seed, x_scale):
    """Any shape and activation scale: the kernel is the integer math up to float32 rounding."""
    rng = np.random.default_rng(seed)
    k = blocks * LAYOUTS[t].block_elems
    w = random_weights(rng, t, rows, k)
    x = (rng.standard_normal((n, k)) * x_scale).astype(np.float32)
    x[0, : min(k, 32)] = 0  # an all-zero activation block must not divide by zero
    out = np.empty((n, rows), np.float32)
    fk.matmul(w, t, x, out)
    assert np.isfinite(out).all()
    assert (np.abs(out - int_reference(w, t, x)) / np.maximum(norms(w, t, x), 1e-30)).max() < 2e-6


def test_bad_inputs():
    w = random_weights(np.random.default_rng(0), 2, 4, 256)
    x = np.zeros((1, 256), np.float32)
    with pytest.raises(ValueError):
        fk.matmul(w, 2, np.zeros((1, 512), np.float32), np.zeros((1, 4), np.float32))  # k mismatch
    with pytest.raises(ValueError):
        fk.matmul(w, 2, x, np.zeros((1, 4), np.float32), out_col0=1)  # out too narrow
    with pytest.raises(ValueError):
        fk.matmul(w, 5, x, np.zeros((1, 4), np.float32))  # Q4_2: unsupported
    with pytest.raises(TypeError):
        fk.matmul(w, 2, x.astype(np.float64), np.zeros((1, 4), np.float32))
    with pytest.raises(ValueError):
        fk.set_backend("cuda")


def test_set_backend_and_env():
    before = fk.backend()
    fk.set_backend("portable")
    assert fk.backend() == "portable"
    fk.set_backend("auto")
    assert fk.backend() == ("avx2" if fk.cpu_has_avx2() else "portable")
    fk.set_backend(before)
    env = dict(os.environ, FLEXIO_KERNELS="portable")
    got = subprocess.run([sys.executable, "-c", "import flexio_kernels as k; print(k.backend())"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert got == "portable"


@pytest.mark.parametrize("t", TYPES, ids=NAMES)
def test_matmul_many_equals_matmul(backend, t):
    """Several matrices, each with its own rows of x (a mixture of experts' layer), in one call: every
    output has the bits of a matmul of that matrix and those rows alone; a matrix with no rows is skipped."""
    rng = np.random.default_rng(300 + t)
    k = 512 if LAYOUTS[t].block_elems == 256 else 320
    ws = [random_weights(rng, t, 37, k) for _ in range(5)]
    spans = np.array([0, 1, 1, 4, 13, 14])  # 1, 0, 3, 9 and 1 rows
    x = rng.standard_normal((14, k)).astype(np.float32)
    out = np.full((14, 40), np.nan, np.float32)  # wider than the matrices: only the first 37 columns written
    fk.matmul_many(ws, t, x, spans, out)
    for e in range(5):
        a, b = spans[e], spans[e + 1]
        if a < b:
            one = np.empty((b - a, 37), np.float32)
            fk.matmul(ws[e], t, x[a:b], one)
            assert np.array_equal(out[a:b, :37], one), f"matrix {e}"
    assert np.isnan(out[:, 37:]).all()


def test_matmul_many_refuses_bad_input():
    rng = np.random.default_rng(9)
    w = random_weights(rng, 2, 8, 256)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    out = np.empty((3, 8), np.float32)
    with pytest.raises(ValueError, match="spans"):
        fk.matmul_many([w, w], 2, x, np.array([0, 2, 4]), out)  # ends past x's 3 rows
    with pytest.raises(ValueError, match="spans"):
        fk.matmul_many([w, w], 2, x, np.array([0, 3]), out)  # one span for two matrices
    with pytest.raises(ValueError, match=r"ws\[1\]"):
        fk.matmul_many([w, w[:4]], 2, x, np.array([0, 1, 3]), out)
    with pytest.raises(ValueError, match="no weight"):
        fk.matmul_many([], 2, x, np.array([0]), out)
    with pytest.raises(ValueError, match="k = 256"):
        fk.matmul_many([w], 8, x, np.array([0, 3]), out)  # Q4_0 rows read as Q8_0
