"""LLVM vector IR, callable from @njit: 256-bit vector types and the few AVX2 operations the kernels need.

Plain Numba cannot produce `vpmaddubsw` (it widens small integers to 64 bits and unrolls
block loops before the vectorizer sees them), so each operation here is an
`numba.extending.intrinsic` emitting LLVM IR directly.  Vectors are first-class Numba
values (I8x32 = <32 x i8>, I32x8 = <8 x i32>, F32x8 = <8 x float>) kept in registers;
memory is addressed by integer byte addresses (`arr.ctypes.data + offset`).

The integer dot of 32 unsigned weights u with 32 signed int8 activations s is llama.cpp's
AVX2 `mul_sum_us8_pairs`: vpmaddubsw (u*s pairs -> 16 x i16, no saturation for |u| < 128 or
u <= 63 as used here) then vpmaddwd with ones (or per-16 scales) -> 8 x i32.

Importing this module compiles nothing; only functions that use the AVX2 intrinsics need an
AVX2 CPU, and __init__ selects them only on one.
"""

from __future__ import annotations

import llvmlite.binding as _llvm
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic, models, register_model


class Vec(types.Type):
    def __init__(self, elem, count):
        self.elem = elem
        self.count = count
        super().__init__(name=f"Vec({elem}x{count})")


I8x32 = Vec(types.int8, 32)
I32x8 = Vec(types.int32, 8)
F32x8 = Vec(types.float32, 8)


@register_model(Vec)
class VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, ir.VectorType(dmm.lookup(fe_type.elem).get_value_type(), fe_type.count))


_llvm.initialize_native_asmparser()  # for the inline asm in ld_f16
PREFETCH_LOCALITY = 3  # prefetcht0; T1/T2/NTA measured no better

_i8, _i16, _i32, _i64, _f32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
_v32i8 = ir.VectorType(_i8, 32)
_v16i8 = ir.VectorType(_i8, 16)
_v16i16 = ir.VectorType(_i16, 16)
_v8i32 = ir.VectorType(_i32, 8)
_v8f32 = ir.VectorType(_f32, 8)
_v8f16 = ir.VectorType(ir.HalfType(), 8)


def _fn(builder, name, ret, args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


def _ptr(builder, addr, ty):
    return builder.inttoptr(addr, ty.as_pointer())


def _load(builder, addr, ty, align=1):
    return builder.load(_ptr(builder, addr, ty), align=align)


def _splat(builder, val, vty):
    v = builder.insert_element(ir.Constant(vty, None), val, ir.Constant(_i32, 0))
    return builder.shuffle_vector(v, ir.Constant(vty, None), ir.Constant(ir.VectorType(_i32, vty.count), [0] * vty.count))


def _as(context, builder, val, fromty, toty):
    return context.cast(builder, val, fromty, toty)


def _maddubs(builder, u, s):  # (32 x u8, 32 x i8) -> 16 x i16 pair sums
    return builder.call(_fn(builder, "llvm.x86.avx2.pmadd.ub.sw", _v16i16, [_v32i8, _v32i8]), [u, s])


def _maddwd(builder, a, b):  # (16 x i16, 16 x i16) -> 8 x i32 pair sums
    return builder.call(_fn(builder, "llvm.x86.avx2.pmadd.wd", _v8i32, [_v16i16, _v16i16]), [a, b])


def _madd1(builder, p):  # 16 x i16 -> 8 x i32: vpmaddwd with ones, lane l = p[2l] + p[2l+1]
    return _maddwd(builder, p, ir.Constant(_v16i16, [1] * 16))


def _byte_splat(context, builder, val, ty):  # an integer argument in all 32 bytes
    return _splat(builder, builder.trunc(_as(context, builder, val, ty, types.int64), _i8), _v32i8)


def _off16(context, builder, off, ty, x):  # off * (x[2i] + x[2i+1]): the activation half of an offset dot
    return _maddubs(builder, _byte_splat(context, builder, off, ty), x)


def _abs8(builder, v):  # |v| per byte (vpabsb)
    return builder.call(_fn(builder, "llvm.abs.v32i8", _v32i8, [_v32i8, ir.IntType(1)]), [v, ir.Constant(ir.IntType(1), 0)])


def _sign_dot(builder, absw, w, x):  # signed w . signed x (|x| <= 127) -> 8 x i32: |w| . sign(x, w)
    sx = builder.call(_fn(builder, "llvm.x86.avx2.psign.b", _v32i8, [_v32i8, _v32i8]), [x, w])
    return _madd1(builder, _maddubs(builder, absw, sx))


# ---- loads ----

@intrinsic
def ld_i8x32(typingctx, addr):
    """32 bytes at addr."""
    def codegen(context, builder, sig, args):
        return _load(builder, args[0], _v32i8)
    return I8x32(types.intp), codegen


@intrinsic
def ld_nibbles16(typingctx, addr):
    """16 bytes at addr -> 32 x u8: the 16 low nibbles, then the 16 high nibbles (Q4_0/Q4_1/Q5_0 order).

    vbroadcasti128 + vpsrlvd (0 / 4 bits by 128-bit half) + vpand.
    """
    def codegen(context, builder, sig, args):
        v = _load(builder, args[0], _v16i8)
        both = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_i32, 32), list(range(16)) * 2))
        sh = builder.lshr(builder.bitcast(both, _v8i32), ir.Constant(_v8i32, [0, 0, 0, 0, 4, 4, 4, 4]))
        return builder.and_(builder.bitcast(sh, _v32i8), ir.Constant(_v32i8, [15] * 32))
    return I8x32(types.intp), codegen


@intrinsic
def ld_f16(typingctx, addr):
    """The IEEE half at addr as float32: movzwl + vmovd + vcvtph2ps, as inline asm.

    A plain `load half; fpext` (and any vector form whose other lanes are unused) becomes
    `vpinsrw $0, mem, %xmmN, %xmmM`, merging into a register LLVM picks freely, sometimes a
    loop accumulator: every block then waits for the previous FMA (measured 2x slower).
    vmovd zeroes the register instead, so there is no false dependency.
    """
    def codegen(context, builder, sig, args):
        h = builder.zext(_load(builder, args[0], _i16, align=1), _i32)
        return builder.asm(ir.FunctionType(_f32, [_i32]), "vmovd $1, $0\n\tvcvtph2ps $0, $0", "=x,r", [h], False)
    return types.float32(types.intp), codegen


@intrinsic
def ld_f16x8(typingctx, addr):
    """8 halves at addr -> 8 x float32."""
    def codegen(context, builder, sig, args):
        return builder.fpext(_load(builder, args[0], _v8f16), _v8f32)
    return F32x8(types.intp), codegen


@intrinsic
def ld_f32x8(typingctx, addr):
    def codegen(context, builder, sig, args):
        return _load(builder, args[0], _v8f32)
    return F32x8(types.intp), codegen


@intrinsic
def prefetch(typingctx, addr):
    """Software prefetch of the cache line at addr into all levels (prefetcht0)."""
    def codegen(context, builder, sig, args):
        p = builder.inttoptr(args[0], _i8.as_pointer())
        fn = _fn(builder, "llvm.prefetch.p0", ir.VoidType(), [_i8.as_pointer(), _i32, _i32, _i32])
        builder.call(fn, [p, ir.Constant(_i32, 0), ir.Constant(_i32, PREFETCH_LOCALITY), ir.Constant(_i32, 1)])
        return context.get_dummy_value()
    return types.none(types.intp), codegen


# ---- byte ops ----

@intrinsic
def and_i8(typingctx, v, mask):
    """v & mask (mask an integer splat to every byte)."""
    def codegen(context, builder, sig, args):
        m = _byte_splat(context, builder, args[1], sig.args[1])
        return builder.and_(args[0], m)
    return I8x32(I8x32, types.int64), codegen


@intrinsic
def or_i8(typingctx, a, b):
    def codegen(context, builder, sig, args):
        return builder.or_(args[0], args[1])
    return I8x32(I8x32, I8x32), codegen


@intrinsic
def srl_i8(typingctx, v, n):
    """Every byte of v shifted right by n (done on 16-bit lanes: the caller masks away the neighbour's bits)."""
    def codegen(context, builder, sig, args):
        w = builder.bitcast(args[0], _v16i16)
        sh = _splat(builder, builder.trunc(_as(context, builder, args[1], sig.args[1], types.int64), _i16), _v16i16)
        return builder.bitcast(builder.lshr(w, sh), _v32i8)
    return I8x32(I8x32, types.int64), codegen


@intrinsic
def sll_i8(typingctx, v, n):
    """Every byte of v shifted left by n (on 16-bit lanes: the caller makes sure no bit crosses a byte)."""
    def codegen(context, builder, sig, args):
        w = builder.bitcast(args[0], _v16i16)
        sh = _splat(builder, builder.trunc(_as(context, builder, args[1], sig.args[1], types.int64), _i16), _v16i16)
        return builder.bitcast(builder.shl(w, sh), _v32i8)
    return I8x32(I8x32, types.int64), codegen


@intrinsic
def bits32_to_bytes(typingctx, bits, value):
    """u32 bits -> 32 bytes: byte i is `value` where bit i is set, else 0 (Q5_0's fifth bits)."""
    def codegen(context, builder, sig, args):
        b = builder.trunc(_as(context, builder, args[0], sig.args[0], types.int64), _i32)
        mask = builder.bitcast(b, ir.VectorType(ir.IntType(1), 32))
        val = _byte_splat(context, builder, args[1], sig.args[1])
        return builder.select(mask, val, ir.Constant(_v32i8, None))
    return I8x32(types.int64, types.int64), codegen


@intrinsic
def select_bit(typingctx, v, mask, value):
    """Per byte: `value` where v & mask != 0, else 0 (Q5_K's fifth bits)."""
    def codegen(context, builder, sig, args):
        m = _byte_splat(context, builder, args[1], sig.args[1])
        val = _byte_splat(context, builder, args[2], sig.args[2])
        set_ = builder.icmp_unsigned("!=", builder.and_(args[0], m), ir.Constant(_v32i8, None))
        return builder.select(set_, val, ir.Constant(_v32i8, None))
    return I8x32(I8x32, types.int64, types.int64), codegen


# ---- integer dots ----

@intrinsic
def dot_us(typingctx, u, xaddr):
    """32 unsigned weight bytes (< 128) . 32 int8 activations at xaddr -> 8 x i32 partial sums."""
    def codegen(context, builder, sig, args):
        p = _maddubs(builder, args[0], _load(builder, args[1], _v32i8))
        return _madd1(builder, p)
    return I32x8(I8x32, types.intp), codegen


@intrinsic
def dot_ss(typingctx, s8, xaddr):
    """32 signed weight bytes . 32 int8 activations (|x| <= 127) -> 8 x i32: |w| . sign(x, w)."""
    def codegen(context, builder, sig, args):
        w = args[0]
        return _sign_dot(builder, _abs8(builder, w), w, _load(builder, args[1], _v32i8))
    return I32x8(I8x32, types.intp), codegen


# ---- int32 / float lanes ----

@intrinsic
def add_i32x8(typingctx, a, b):
    def codegen(context, builder, sig, args):
        return builder.add(args[0], args[1])
    return I32x8(I32x8, I32x8), codegen


@intrinsic
def zero_f32x8(typingctx):
    def codegen(context, builder, sig, args):
        return ir.Constant(_v8f32, None)
    return F32x8(), codegen


@intrinsic
def fma_i(typingctx, acc, v, s):
    """acc + float(v) * s, lane-wise (s a float32 splat)."""
    def codegen(context, builder, sig, args):
        f = builder.sitofp(args[1], _v8f32)
        sp = _splat(builder, args[2], _v8f32)
        return builder.call(_fn(builder, "llvm.fma.v8f32", _v8f32, [_v8f32] * 3), [f, sp, args[0]])
    return F32x8(F32x8, I32x8, types.float32), codegen


@intrinsic
def fma_f(typingctx, acc, a, b):
    """acc + a * b, lane-wise."""
    def codegen(context, builder, sig, args):
        return builder.call(_fn(builder, "llvm.fma.v8f32", _v8f32, [_v8f32] * 3), [args[1], args[2], args[0]])
    return F32x8(F32x8, F32x8, F32x8), codegen


@intrinsic
def hsum_f32x8(typingctx, v):
    """Sum of the 8 lanes as float32 (pairwise: (0+4)+(2+6) + (1+5)+(3+7))."""
    def codegen(context, builder, sig, args):
        v = args[0]
        m = lambda idx: ir.Constant(ir.VectorType(_i32, len(idx)), idx)  # noqa: E731
        a = builder.fadd(builder.shuffle_vector(v, v, m([0, 1, 2, 3])), builder.shuffle_vector(v, v, m([4, 5, 6, 7])))
        b = builder.fadd(builder.shuffle_vector(a, a, m([0, 1])), builder.shuffle_vector(a, a, m([2, 3])))
        return builder.fadd(builder.extract_element(b, ir.Constant(_i32, 0)), builder.extract_element(b, ir.Constant(_i32, 1)))
    return types.float32(F32x8), codegen


@intrinsic
def ld_u32(typingctx, addr):
    """The little-endian u32 at addr, as int64."""
    def codegen(context, builder, sig, args):
        return builder.zext(_load(builder, args[0], _i32), _i64)
    return types.int64(types.intp), codegen


@intrinsic
def ld_f32(typingctx, addr):
    def codegen(context, builder, sig, args):
        return _load(builder, args[0], _f32, align=4)
    return types.float32(types.intp), codegen


@intrinsic
def splat_f32_ld(typingctx, addr):
    """The float32 at addr in all 8 lanes (vbroadcastss from memory)."""
    def codegen(context, builder, sig, args):
        return _splat(builder, _load(builder, args[0], _f32, align=4), _v8f32)
    return F32x8(types.intp), codegen


@intrinsic
def mul_f32x8(typingctx, a, b):
    def codegen(context, builder, sig, args):
        return builder.fmul(args[0], args[1])
    return F32x8(F32x8, F32x8), codegen


@intrinsic
def fma_iv(typingctx, acc, v, s):
    """acc + float(v) * s, lane-wise (s a vector)."""
    def codegen(context, builder, sig, args):
        f = builder.sitofp(args[1], _v8f32)
        return builder.call(_fn(builder, "llvm.fma.v8f32", _v8f32, [_v8f32] * 3), [f, args[2], args[0]])
    return F32x8(F32x8, I32x8, F32x8), codegen


# ---- K-quant scales: 16 x i16 vectors ----

I16x16 = Vec(types.int16, 16)


@intrinsic
def k4_scales(typingctx, addr):
    """Q4_K/Q5_K 12 packed scale bytes at addr -> 16 x i16: sc[0..7] then m[0..7] (6-bit each).

    llama.cpp's kmask trick on three u32 words: sub-blocks 0-3 are the low 6 bits of bytes 0-3
    (sc) and 4-7 (m); sub-blocks 4-7 take the nibbles of bytes 8-11 plus the top 2 bits of 0-7.
    """
    def codegen(context, builder, sig, args):
        def word(i):
            return _load(builder, builder.add(args[0], ir.Constant(_i64, 4 * i)), _i32, align=1)
        u0, u1, u2 = word(0), word(1), word(2)
        c = lambda v: ir.Constant(_i32, v)  # noqa: E731
        k1, k2, k3 = c(0x3F3F3F3F), c(0x0F0F0F0F), c(0x03030303)
        sc_lo = builder.and_(u0, k1)
        sc_hi = builder.or_(builder.and_(u2, k2), builder.shl(builder.and_(builder.lshr(u0, c(6)), k3), c(4)))
        m_lo = builder.and_(u1, k1)
        m_hi = builder.or_(builder.and_(builder.lshr(u2, c(4)), k2), builder.shl(builder.and_(builder.lshr(u1, c(6)), k3), c(4)))
        v = ir.Constant(ir.VectorType(_i32, 4), None)
        for i, x in enumerate((sc_lo, sc_hi, m_lo, m_hi)):
            v = builder.insert_element(v, x, ir.Constant(_i32, i))
        return builder.zext(builder.bitcast(v, _v16i8), _v16i16)
    return I16x16(types.intp), codegen


@intrinsic
def q6_scales(typingctx, addr):
    """Q6_K 16 int8 scales at addr -> 16 x i16."""
    def codegen(context, builder, sig, args):
        return builder.sext(_load(builder, args[0], _v16i8), _v16i16)
    return I16x16(types.intp), codegen


@intrinsic
def k_dup(typingctx, scv, half):
    """scv lanes 8h..8h+7 repeated in both 128-bit halves (h a literal): the table dot_us_k
    picks scales from with one in-lane vpshufb each."""
    if not isinstance(half, types.IntegerLiteral):
        return None

    def codegen(context, builder, sig, args):
        h = sig.args[1].literal_value
        return builder.shuffle_vector(args[0], args[0], ir.Constant(ir.VectorType(_i32, 16), list(range(8 * h, 8 * h + 8)) * 2))
    return I16x16(I16x16, half), codegen


def _pick16(builder, scd, lo, hi):  # vpshufb: i16 lane lo of each half into lanes 0-7, lane hi into 8-15
    mask = [2 * lo, 2 * lo + 1] * 8 + [2 * hi, 2 * hi + 1] * 8
    fn = _fn(builder, "llvm.x86.avx2.pshuf.b", _v32i8, [_v32i8, _v32i8])
    return builder.bitcast(builder.call(fn, [builder.bitcast(scd, _v32i8), ir.Constant(_v32i8, mask)]), _v16i16)


@intrinsic
def dot_us_k(typingctx, u, xaddr, scd, i):
    """32 unsigned weights . 32 int8 x at xaddr, times scale i of scd (a k_dup table; i a literal) -> 8 x i32."""
    if not isinstance(i, types.IntegerLiteral):
        return None

    def codegen(context, builder, sig, args):
        k = sig.args[3].literal_value
        p = _maddubs(builder, args[0], _load(builder, args[1], _v32i8))
        return _maddwd(builder, p, _pick16(builder, args[2], k, k))
    return I32x8(I8x32, types.intp, I16x16, i), codegen


@intrinsic
def k4_mins(typingctx, scv, bsaddr):
    """8 x i32: m[i] * (bs[2i] + bs[2i+1]) with m = scv[8..15] and 16 int32 activation sums at bsaddr."""
    def codegen(context, builder, sig, args):
        bs = _load(builder, args[1], ir.VectorType(_i32, 16), align=4)
        idx = lambda l: ir.Constant(ir.VectorType(_i32, 8), l)  # noqa: E731
        pair = builder.add(builder.shuffle_vector(bs, bs, idx(list(range(0, 16, 2)))),
                           builder.shuffle_vector(bs, bs, idx(list(range(1, 16, 2)))))
        m = builder.zext(builder.shuffle_vector(args[0], args[0], idx(list(range(8, 16)))), _v8i32)
        return builder.mul(m, pair)
    return I32x8(I16x16, types.intp), codegen


@intrinsic
def splat_tab(typingctx, tab, addr):
    """The half at addr, as float32 in all 8 lanes, through the f16 -> f32 table at address tab.

    movzwl + vbroadcastss from memory: two loads and no vector ALU work (vcvtph2ps costs
    2 uops on Zen 3 and a scalar conversion needs a vmovd and a broadcast besides).  Real
    scales take few distinct values, so the table lines they touch stay in L1/L2.
    """
    def codegen(context, builder, sig, args):
        h = builder.zext(_load(builder, args[1], _i16, align=1), _i64)
        p = builder.add(args[0], builder.mul(h, ir.Constant(_i64, 4)))
        return _splat(builder, _load(builder, p, _f32, align=4), _v8f32)
    return F32x8(types.intp, types.intp), codegen


# ---- llama.cpp's exact float order (one 8-lane accumulator per output, fixed reductions) ----

@intrinsic
def fma32(typingctx, a, b, c):
    """a * b + c for float32 scalars, rounded once (llvm.fma.f32: vfmadd on FMA CPUs, an exact
    libm/compiler-rt fmaf elsewhere).  Numba never fuses a plain `a * b + c`."""
    def codegen(context, builder, sig, args):
        a, b, c = (_as(context, builder, v, t, types.float32) for v, t in zip(args, sig.args))
        return builder.call(_fn(builder, "llvm.fma.f32", _f32, [_f32] * 3), [a, b, c])
    return types.float32(a, b, c), codegen


@intrinsic
def dot_us_off(typingctx, u, xaddr, off):
    """(u - off) . x over 32 bytes -> 8 x i32, lane l = bytes 4l..4l+3 (as llama.cpp's
    mul_sum_i8_pairs on the signed q - off): maddubs(u, x) - maddubs(off, x) in 16 bits
    (|.| < 2^15 for u < 32), then vpmaddwd with ones."""
    def codegen(context, builder, sig, args):
        x = _load(builder, args[1], _v32i8)
        return _madd1(builder, builder.sub(_maddubs(builder, args[0], x), _off16(context, builder, args[2], sig.args[2], x)))
    return I32x8(I8x32, types.intp, types.int64), codegen


@intrinsic
def tab_f32(typingctx, tab, addr):
    """The half at addr as a float32 scalar, through the f16 -> f32 table at address tab."""
    def codegen(context, builder, sig, args):
        h = builder.zext(_load(builder, args[1], _i16, align=1), _i64)
        return _load(builder, builder.add(args[0], builder.mul(h, ir.Constant(_i64, 4))), _f32, align=4)
    return types.float32(types.intp, types.intp), codegen


@intrinsic
def pairsum_lo4(typingctx, v):
    """(v0+v1, v2+v3, v4+v5, v6+v7, 0, 0, 0, 0): Q4_K's min products in llama.cpp's 4 lanes
    (its _mm_madd_epi16 of 8 mins with the 8 hadd-ed bsum pairs)."""
    def codegen(context, builder, sig, args):
        z = ir.Constant(_v8i32, None)
        a = builder.shuffle_vector(args[0], z, ir.Constant(ir.VectorType(_i32, 8), [0, 2, 4, 6, 8, 8, 8, 8]))
        b = builder.shuffle_vector(args[0], z, ir.Constant(ir.VectorType(_i32, 8), [1, 3, 5, 7, 8, 8, 8, 8]))
        return builder.add(a, b)
    return I32x8(I32x8), codegen


@intrinsic
def hsum_lo4(typingctx, v):
    """(v0 + v2) + (v1 + v3) as float32: llama.cpp's 128-bit reduction (movehl, add, movehdup, add)."""
    def codegen(context, builder, sig, args):
        v = args[0]
        e = lambda i: builder.extract_element(v, ir.Constant(_i32, i))  # noqa: E731
        return builder.fadd(builder.fadd(e(0), e(2)), builder.fadd(e(1), e(3)))
    return types.float32(F32x8), codegen


@intrinsic
def hsum_i32x8(typingctx, v):
    """Sum of the 8 int32 lanes (exact), as int64."""
    def codegen(context, builder, sig, args):  # a tree (vextracti128, vpaddd, ...): integer, exact in any order
        v = args[0]
        m = lambda idx: ir.Constant(ir.VectorType(_i32, len(idx)), idx)  # noqa: E731
        a = builder.add(builder.shuffle_vector(v, v, m([0, 1, 2, 3])), builder.shuffle_vector(v, v, m([4, 5, 6, 7])))
        b = builder.add(builder.shuffle_vector(a, a, m([0, 1])), builder.shuffle_vector(a, a, m([2, 3])))
        s = builder.add(builder.extract_element(b, ir.Constant(_i32, 0)), builder.extract_element(b, ir.Constant(_i32, 1)))
        return builder.sext(s, _i64)
    return types.int64(I32x8), codegen


@intrinsic
def dot_us_k2(typingctx, u, xaddr, scd, lo, hi):
    """Q6_K: unsigned u . x over 32 values, the first 16 times scale lo of scd, the last 16 times
    scale hi (scd a k_dup table; lo / hi literals) -> 8 x i32 (the -32 offset goes in q6_off)."""
    if not isinstance(lo, types.IntegerLiteral) or not isinstance(hi, types.IntegerLiteral):
        return None

    def codegen(context, builder, sig, args):
        p = _maddubs(builder, args[0], _load(builder, args[1], _v32i8))
        return _maddwd(builder, p, _pick16(builder, args[2], sig.args[3].literal_value, sig.args[4].literal_value))
    return I32x8(I8x32, types.intp, I16x16, lo, hi), codegen


@intrinsic
def q6_off(typingctx, scv, bsaddr):
    """Q6_K's offset lanes as llama.cpp forms them: lane l = 32 * (sc[2l] bs[2l] + sc[2l+1] bs[2l+1])
    (its vpmaddwd of the 16 scales with the 16 bsums, << 5); bs: 16 int32 at bsaddr."""
    def codegen(context, builder, sig, args):
        bs = _load(builder, args[1], ir.VectorType(_i32, 16), align=4)
        p = builder.mul(builder.sext(args[0], ir.VectorType(_i32, 16)), bs)
        idx = lambda l: ir.Constant(ir.VectorType(_i32, 8), l)  # noqa: E731
        s = builder.add(builder.shuffle_vector(p, p, idx(list(range(0, 16, 2)))),
                        builder.shuffle_vector(p, p, idx(list(range(1, 16, 2)))))
        return builder.shl(s, ir.Constant(_v8i32, [5] * 8))
    return I32x8(I16x16, types.intp), codegen


@intrinsic
def sub_i32x8(typingctx, a, b):
    def codegen(context, builder, sig, args):
        return builder.sub(args[0], args[1])
    return I32x8(I32x8, I32x8), codegen


# ---- several activation columns against one weight block (avx2.tile8) ----

@intrinsic
def st_vec(typingctx, addr, v):
    """Store the vector v (any of I8x32, I32x8, F32x8, ...) at addr (unaligned)."""
    if not isinstance(v, Vec):
        return None

    def codegen(context, builder, sig, args):
        builder.store(args[1], _ptr(builder, args[0], args[1].type), align=1)
        return context.get_dummy_value()
    return types.none(types.intp, v), codegen


@intrinsic
def st_off16(typingctx, addr, xaddr, off):
    """Store at addr the 16 x i16 pair sums off * (x[2i] + x[2i+1]) of the 32 int8 x at xaddr:
    the activation half of dot_us_off, which depends on x alone, computed once per column."""
    def codegen(context, builder, sig, args):
        off = _off16(context, builder, args[2], sig.args[2], _load(builder, args[1], _v32i8))
        builder.store(off, _ptr(builder, args[0], _v16i16), align=1)
        return context.get_dummy_value()
    return types.none(types.intp, types.intp, off), codegen


@intrinsic
def dot_us_pre(typingctx, u, xaddr, oaddr):
    """dot_us_off with the offset pair sums stored by st_off16 at oaddr: maddubs(u, x) - off16,
    then vpmaddwd with ones.  The same integers, one vpmaddubsw fewer per column."""
    def codegen(context, builder, sig, args):
        p = builder.sub(_maddubs(builder, args[0], _load(builder, args[1], _v32i8)), _load(builder, args[2], _v16i16))
        return _madd1(builder, p)
    return I32x8(I8x32, types.intp, types.intp), codegen


@intrinsic
def abs_i8(typingctx, v):
    def codegen(context, builder, sig, args):
        return _abs8(builder, args[0])
    return I8x32(I8x32), codegen


@intrinsic
def dot_ss_abs(typingctx, absw, w, xaddr):
    """dot_ss with |w| given (shared by the columns of a tile): |w| . sign(x, w) -> 8 x i32."""
    def codegen(context, builder, sig, args):
        return _sign_dot(builder, args[0], args[1], _load(builder, args[2], _v32i8))
    return I32x8(I8x32, I8x32, types.intp), codegen


@intrinsic
def fence4(typingctx, a, b, c, d):
    """(a, b, c, d) unchanged, through an empty inline asm that LLVM cannot see into.  The K-quant
    tile passes its 4 columns' integer sums through it after each sub-block, so that LLVM keeps
    the written order (one unpacked sub-block live at a time) rather than regrouping the adds
    column by column, which keeps all 8 unpacked sub-blocks live and spills."""
    def codegen(context, builder, sig, args):
        st = ir.LiteralStructType([_v8i32] * 4)
        call = builder.asm(ir.FunctionType(st, [_v8i32] * 4), "", "=x,=x,=x,=x,0,1,2,3", list(args), False)
        return context.make_tuple(builder, sig.return_type, [builder.extract_value(call, i) for i in range(4)])
    return types.UniTuple(I32x8, 4)(I32x8, I32x8, I32x8, I32x8), codegen


@intrinsic
def zero_i32x8(typingctx):
    def codegen(context, builder, sig, args):
        return ir.Constant(_v8i32, None)
    return I32x8(), codegen


@intrinsic
def k4_mins16(typingctx, scv, bpaddr):
    """pairsum_lo4(k4_mins(...)) from int16 sums: lane p = m[2p] bp[2p] + m[2p+1] bp[2p+1] (lanes
    4-7 zero), m = scv[8..15], bp the 8 int16 sums of 32 activations at bpaddr; one vpmaddwd (as
    llama.cpp's _mm_madd_epi16 of the mins with its hadd-ed bsums).  The same integers."""
    def codegen(context, builder, sig, args):
        v8i16 = ir.VectorType(_i16, 8)
        m = builder.shuffle_vector(args[0], args[0], ir.Constant(ir.VectorType(_i32, 8), list(range(8, 16))))
        p = builder.call(_fn(builder, "llvm.x86.sse2.pmadd.wd", ir.VectorType(_i32, 4), [v8i16, v8i16]),
                         [m, _load(builder, args[1], v8i16, align=2)])
        return builder.shuffle_vector(p, ir.Constant(ir.VectorType(_i32, 4), None),
                                      ir.Constant(ir.VectorType(_i32, 8), [0, 1, 2, 3, 4, 4, 4, 4]))
    return I32x8(I16x16, types.intp), codegen


@intrinsic
def q6_off16(typingctx, scv, bsaddr):
    """q6_off from 16 int16 sums at bsaddr: one vpmaddwd of the scales with them, << 5."""
    def codegen(context, builder, sig, args):
        return builder.shl(_maddwd(builder, args[0], _load(builder, args[1], _v16i16, align=2)), ir.Constant(_v8i32, [5] * 8))
    return I32x8(I16x16, types.intp), codegen


@intrinsic
def u8_ptr(typingctx, addr):
    """An integer address as a uint8 pointer, for numba.carray: a view of memory that the caller keeps
    alive and has checked (kernels.matmul_many passes the addresses of arrays it validated)."""
    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], _i8.as_pointer())
    return types.CPointer(types.uint8)(types.intp), codegen
