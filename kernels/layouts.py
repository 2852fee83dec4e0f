"""GGML type id -> Layout: the byte map of one quant block, written once for every kernel.

Each block stores `block_elems` weights in `block_bytes` bytes; a weight row of length k
is k / block_elems blocks back to back.  Offsets are in bytes from the block start; all
multi-byte fields are little-endian, `half` is IEEE float16.  Kernels read offsets from
here and never hard-code a block size.
"""

from __future__ import annotations

from dataclasses import dataclass

QK = 32  # elements per legacy block (Q4_0 ... Q8_0) and per activation block (q8_0 / q8_1)
QK_K = 256  # elements per K-quant super-block (Q4_K, Q5_K, Q6_K) and per q8_K activation block


@dataclass(frozen=True)
class Layout:
    type_id: int  # gguf.GGMLQuantizationType value
    name: str
    block_elems: int
    block_bytes: int
    fields: tuple[tuple[str, int, int], ...]  # (name, offset, nbytes), in byte order
    formula: str

    def offset(self, field: str) -> int:
        for name, off, _ in self.fields:
            if name == field:
                return off
        raise KeyError(f"{self.name} block has no field {field!r}; fields are {[f[0] for f in self.fields]}")

    def row_bytes(self, k: int) -> int:
        if k % self.block_elems:
            raise ValueError(f"{self.name}: row length {k} is not a multiple of the block size {self.block_elems}")
        return k // self.block_elems * self.block_bytes

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.block_bytes / self.block_elems


def _layout(type_id, name, block_elems, fields, formula) -> Layout:
    off = 0
    for fname, foff, nbytes in fields:  # fields are contiguous and in order
        assert foff == off, f"{name}.{fname}: offset {foff}, expected {off}"
        off += nbytes
    return Layout(type_id, name, block_elems, off, tuple(fields), formula)


LAYOUTS: dict[int, Layout] = {
    layout.type_id: layout
    for layout in (
        _layout(0, "F32", 1, [("value", 0, 4)], "w = value"),
        _layout(1, "F16", 1, [("value", 0, 2)], "w = half(value)"),
        # Q4_0: 32 weights per 18 bytes (d:2, qs:16); weight j < 16 is qs[j] & 15, j >= 16 is qs[j-16] >> 4
        _layout(2, "Q4_0", QK, [("d", 0, 2), ("qs", 2, 16)], "w = d * (q - 8)"),
        # Q4_1: 32 weights per 20 bytes (d:2, m:2, qs:16); nibbles as Q4_0
        _layout(3, "Q4_1", QK, [("d", 0, 2), ("m", 2, 2), ("qs", 4, 16)], "w = d * q + m"),
        # Q5_0: 32 weights per 22 bytes (d:2, qh:4, qs:16); q = nibble | bit j of u32 qh << 4
        _layout(6, "Q5_0", QK, [("d", 0, 2), ("qh", 2, 4), ("qs", 6, 16)], "w = d * (q - 16)"),
        # Q8_0: 32 weights per 34 bytes (d:2, qs:32 int8)
        _layout(8, "Q8_0", QK, [("d", 0, 2), ("qs", 2, 32)], "w = d * q"),
        # Q4_K: 256 weights per 144 bytes (d:2, dmin:2, scales:12, qs:128); 8 sub-blocks of 32 with
        # 6-bit scale sc[i] and min m[i] packed in `scales`; qs[32c:32c+32] holds sub-block 2c in the
        # low nibbles and 2c+1 in the high nibbles
        _layout(12, "Q4_K", QK_K, [("d", 0, 2), ("dmin", 2, 2), ("scales", 4, 12), ("qs", 16, 128)],
                "w = d * sc[i] * q - dmin * m[i]"),
        # Q5_K: 256 weights per 176 bytes (d:2, dmin:2, scales:12, qh:32, qs:128); as Q4_K, plus the
        # fifth bit of sub-block i in bit i of qh[j], j = position in the sub-block
        _layout(13, "Q5_K", QK_K, [("d", 0, 2), ("dmin", 2, 2), ("scales", 4, 12), ("qh", 16, 32), ("qs", 48, 128)],
                "w = d * sc[i] * q - dmin * m[i]"),
        # Q6_K: 256 weights per 210 bytes (ql:128, qh:64, scales:16 int8, d:2); 16 groups of 16 with an
        # int8 scale each; for e = 128h + r: q = (ql[64h + r%64] >> 4(r//64)) & 15 | ((qh[32h + r%32] >> 2(r//32)) & 3) << 4
        _layout(14, "Q6_K", QK_K, [("ql", 0, 128), ("qh", 128, 64), ("scales", 192, 16), ("d", 208, 2)],
                "w = d * scales[e // 16] * (q - 32)"),
    )
}

# the sizes gguf-py (and ggml-common.h) use; fields must add up to them
_GGML_SIZES = {0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 8: (32, 34),
               12: (256, 144), 13: (256, 176), 14: (256, 210)}
for _t, (_elems, _bytes) in _GGML_SIZES.items():
    assert (LAYOUTS[_t].block_elems, LAYOUTS[_t].block_bytes) == (_elems, _bytes), \
        f"{LAYOUTS[_t].name}: fields give {LAYOUTS[_t].block_bytes} bytes per block, ggml says {_bytes}"
