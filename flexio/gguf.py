"""GGUF file -> validated GGUFFile: metadata with exact types, tensor table with absolute offsets, ModelConfig.

A strict reader written by hand (as tinygrad's gguf.py and llama.cpp's gguf.cpp are):
every check the engine relies on happens here, when the file is opened, before any
arena exists, and every problem is a GGUFError that names the key or tensor.

The format (GGUF v2/v3, little endian):
  header      magic 'GGUF' | version u32 | n_tensors u64 | n_kv u64
  kv pair     key: string | type u32 | value
              string = length u64 + bytes (UTF-8 by convention, not checked by llama.cpp)
              array  = element type u32 | count u64 | count elements (arrays of arrays:
                       llama.cpp refuses them and so do we)
  tensor info name: string | n_dims u32 | dims u64 x n_dims (ne0 first) | type u32 | offset u64
  padding to `general.alignment` (u32, a power of two, default 32), then the data section.
  A tensor's absolute offset = data_offset + its relative offset; ne0 is the row length
  (innermost dimension), so a 2-D weight with dims (k, n) has n rows of k.

Every count and length in the header comes from the file, so none is trusted: before
anything is allocated or looped over, the bytes it needs (count x the smallest size of
one element) are compared with the bytes that remain before the end of the file. Opening
therefore costs time and memory proportional to the bytes the header really occupies --
a bit-flipped count fails at once instead of looping past the end of the file. (A sparse
file can still *be* huge; reading such a header costs what reading those bytes costs.)
The header is read with pread through a moving window, never through an mmap: a file
truncated while it is read gives a short read, not a SIGBUS.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from .arch import LAYER_RE, ModelConfig, check_architecture, check_tensors, expected_shapes, model_config
from .errors import GGUFError, UnsupportedError


GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # v1 had 32-bit counts; llama.cpp dropped it too
GGML_MAX_DIMS = 4
GGML_MAX_NAME = 64  # tensor names are shorter than this (llama.cpp: name.length() >= GGML_MAX_NAME is an error)
MAX_KEY_LEN = 65535  # GGUF spec: keys are at most 2**16 - 1 bytes
DEFAULT_ALIGNMENT = 32

T = GGMLQuantizationType
V = GGUFValueType
# Tensor types the kernels implement (kernels/layouts.py has their block layouts).
SUPPORTED_TYPES: frozenset[int] = frozenset(
    int(t) for t in (T.F32, T.F16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K)
)

# Fixed-size value types: struct for one scalar, numpy dtype for an array of them.
_SCALAR: dict[int, struct.Struct] = {
    V.UINT8: struct.Struct("<B"), V.INT8: struct.Struct("<b"), V.UINT16: struct.Struct("<H"),
    V.INT16: struct.Struct("<h"), V.UINT32: struct.Struct("<I"), V.INT32: struct.Struct("<i"),
    V.FLOAT32: struct.Struct("<f"), V.BOOL: struct.Struct("<?"), V.UINT64: struct.Struct("<Q"),
    V.INT64: struct.Struct("<q"), V.FLOAT64: struct.Struct("<d"),
}
_DTYPE: dict[int, np.dtype] = {
    V.UINT8: np.dtype("<u1"), V.INT8: np.dtype("<i1"), V.UINT16: np.dtype("<u2"), V.INT16: np.dtype("<i2"),
    V.UINT32: np.dtype("<u4"), V.INT32: np.dtype("<i4"), V.FLOAT32: np.dtype("<f4"), V.BOOL: np.dtype("<u1"),
    V.UINT64: np.dtype("<u8"), V.INT64: np.dtype("<i8"), V.FLOAT64: np.dtype("<f8"),
}
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
# The fewest bytes one record can take: they bound n_kv and n_tensors by the file size.
MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, a 1-byte key, type, a 1-byte value
MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name length, 1-byte name, n_dims, one dim, type, offset


def type_name(ggml_type: int) -> str:
    try:
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"type#{ggml_type}"


def _value_type_name(t: int) -> str:
    try:
        return V(t).name
    except ValueError:
        return f"type#{t}"


# --- opening: regular files only -----------------------------------------------------------

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a fifo (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _not_regular(path: str, mode: int) -> GGUFError:
    what = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    return GGUFError(f"model path {path!r} is {what}, not a GGUF file")


def open_regular(path: str) -> tuple[int, int]:
    """Path -> (read-only fd, size), for a regular file only.

    stat first, so that a fifo (open would wait for a writer forever), a directory or a
    device is refused without being opened; the open is O_NONBLOCK and fstat'ed again in
    case the path was swapped in between.
    """
    try:
        st = os.stat(path)
    except OSError as e:
        raise GGUFError(f"cannot open model file {path!r}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(path, st.st_mode)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise GGUFError(f"cannot open model file {path!r}: {e.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise _not_regular(path, st.st_mode)
    return fd, st.st_size


def _pread_exact(fd: int, n: int, offset: int) -> bytes:
    parts, got = [], 0
    while got < n:
        b = os.pread(fd, min(n - got, 1 << 30), offset + got)
        if not b:
            break
        parts.append(b)
        got += len(b)
    return parts[0] if len(parts) == 1 else b"".join(parts)


# --- the header reader ------------------------------------------------------------------------


class _Reader:
    """Sequential little-endian reads of the header through a window of the file.

    Each read first checks that the bytes it needs lie before `size` (the file size at
    open), so that no count or length taken from the file can allocate or loop past it.
    """

    CHUNK = 1 << 20

    def __init__(self, fd: int, size: int, path: str):
        self.fd, self.size, self.path = fd, size, path
        self.buf = b""  # file bytes [base, base + len(buf))
        self.base = 0
        self.pos = 0  # file offset of the next read

    def remaining(self) -> int:
        return self.size - self.pos

    def truncated(self, what: str, need: int) -> GGUFError:
        return GGUFError(
            f"{self.path}: malformed or truncated GGUF header: {what} needs {need:,} bytes at byte {self.pos:,}, "
            f"but the file ends at byte {self.size:,}"
        )

    def window(self, n: int, what: str) -> int:
        """Make file bytes [pos, pos + n) available in self.buf; return the index of pos in it."""
        if n > self.size - self.pos:
            raise self.truncated(what, n)
        i = self.pos - self.base
        if i + n > len(self.buf):
            self.buf = _pread_exact(self.fd, min(max(n, self.CHUNK), self.size - self.pos), self.pos)
            self.base, i = self.pos, 0
            if len(self.buf) < n:
                raise GGUFError(f"{self.path}: short read at byte {self.pos:,}: the file shrank while it was read")
        return i

    def u32(self, what: str) -> int:
        i = self.window(4, what)
        self.pos += 4
        return _U32.unpack_from(self.buf, i)[0]

    def u64(self, what: str) -> int:
        i = self.window(8, what)
        self.pos += 8
        return _U64.unpack_from(self.buf, i)[0]

    def scalar(self, t: int, what: str) -> Any:
        s = _SCALAR[t]
        i = self.window(s.size, what)
        self.pos += s.size
        return s.unpack_from(self.buf, i)[0]

    def string(self, what: str, max_len: int | None = None) -> str:
        n = self.u64(f"length of {what}")
        if max_len is not None and n > max_len:
            raise GGUFError(f"{self.path}: {what} is {n:,} bytes long; at most {max_len:,} are allowed")
        i = self.window(n, what)
        self.pos += n
        # Invalid UTF-8 is kept, not replaced: llama.cpp keeps strings as bytes, and with
        # surrogateescape s.encode("utf-8", "surrogateescape") gives back the file's bytes,
        # so metadata copied to a new file is identical. Users of a string that must be
        # text (the tokenizer) check it and name the key.
        return self.buf[i : i + n].decode("utf-8", "surrogateescape")

    def strings(self, n: int, what: str) -> list[str]:
        """n strings; the hot loop of a 49k-token vocabulary, so the window is handled inline."""
        if n > self.remaining() // 8:
            raise self.truncated(f"{what} (an array of {n:,} strings)", n * 8)
        out: list[str] = []
        append, unpack = out.append, _U64.unpack_from
        buf, base, pos, size = self.buf, self.base, self.pos, self.size
        for k in range(n):
            i = pos - base
            if i + 8 > len(buf):
                self.pos = pos
                i = self.window(8, f"length of {what}[{k}]")
                buf, base = self.buf, self.base
            ln = unpack(buf, i)[0]
            pos += 8
            i += 8
            if i + ln > len(buf):
                self.pos = pos
                if ln > size - pos:
                    raise self.truncated(f"{what}[{k}]", ln)
                i = self.window(ln, f"{what}[{k}]")
                buf, base = self.buf, self.base
            append(buf[i : i + ln].decode("utf-8", "surrogateescape"))
            pos += ln
        self.pos = pos
        return out

    def array(self, t: int, n: int, what: str) -> np.ndarray:
        dt = _DTYPE[t]
        if n > self.remaining() // dt.itemsize:
            raise self.truncated(f"{what} (an array of {n:,} {_value_type_name(t)})", n * dt.itemsize)
        i = self.window(n * dt.itemsize, what)
        a = np.frombuffer(self.buf, dt, n, i).copy()
        self.pos += n * dt.itemsize
        return a != 0 if t == V.BOOL else a


KVTypes = dict[str, tuple[GGUFValueType, GGUFValueType | None]]


def _read_kv(r: _Reader, n_kv: int, on_arch: Callable[[Any], Any] | None) -> tuple[dict[str, Any], KVTypes]:
    """The n_kv metadata pairs -> (key -> value, key -> (type, array element type)).

    Values: ints, floats, bools and str as Python scalars; numeric arrays as numpy
    arrays (BOOL arrays as numpy bool); string arrays as list[str].
    """
    metadata: dict[str, Any] = {}
    kv_types: KVTypes = {}
    for k in range(n_kv):
        key = r.string(f"key of metadata pair {k}", MAX_KEY_LEN)
        if not key:
            raise GGUFError(f"{r.path}: metadata pair {k} has an empty key")
        if key in metadata:
            raise GGUFError(f"{r.path}: duplicate metadata key {key!r} (pairs {list(metadata).index(key)} and {k})")
        what = f"value of key {key!r}"
        t = r.u32(f"type of key {key!r}")
        sub = None
        if t == V.ARRAY:
            sub = r.u32(f"element type of key {key!r}")
            n = r.u64(f"element count of key {key!r}")
            if sub == V.ARRAY:
                raise GGUFError(f"metadata key {key!r} is an array of arrays: nested arrays are not supported "
                                "(llama.cpp refuses them too)")
            if sub == V.STRING:
                value: Any = r.strings(n, what)
            elif sub in _DTYPE:
                value = r.array(sub, n, what)
            else:
                raise GGUFError(f"metadata key {key!r} is an array of unknown value type {sub}")
        elif t == V.STRING:
            value = r.string(what)
        elif t in _SCALAR:
            value = r.scalar(t, what)
        else:
            raise GGUFError(f"metadata key {key!r} has unknown value type {t}")
        metadata[key] = value
        kv_types[key] = (V(t), V(sub) if sub is not None else None)
        if key == "general.architecture" and on_arch is not None:
            on_arch(value)  # refuse an unsupported family before parsing the rest
    return metadata, kv_types


def _read_start(r: _Reader) -> tuple[int, int, int]:
    """Magic, version, and the two counts, bounded by the bytes left -> (version, n_tensors, n_kv)."""
    if r.size < 8:
        raise GGUFError(f"{r.path}: file is {r.size} bytes, too short for a GGUF header")
    i = r.window(8, "magic and version")
    magic = r.buf[i : i + 4]
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{r.path}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    version = _U32.unpack_from(r.buf, i + 4)[0]
    if version not in SUPPORTED_VERSIONS:
        raise GGUFError(f"{r.path}: GGUF version {version} is not supported (expected one of {SUPPORTED_VERSIONS})")
    r.pos = 8
    n_tensors = r.u64("n_tensors")
    n_kv = r.u64("n_kv")
    left = r.remaining()
    if n_kv > left // MIN_KV_BYTES:
        raise GGUFError(f"{r.path}: malformed or truncated GGUF header: n_kv = {n_kv:,} metadata pairs, but the "
                        f"{left:,} bytes after the header hold at most {left // MIN_KV_BYTES:,}")
    if n_tensors > (left - n_kv * MIN_KV_BYTES) // MIN_TENSOR_INFO_BYTES:
        raise GGUFError(f"{r.path}: malformed or truncated GGUF header: n_tensors = {n_tensors:,} tensors, but the "
                        f"{left:,} bytes after the header hold at most "
                        f"{(left - n_kv * MIN_KV_BYTES) // MIN_TENSOR_INFO_BYTES:,} beside {n_kv:,} metadata pairs")
    return version, n_tensors, n_kv


def read_metadata(path: str | os.PathLike[str]) -> tuple[dict[str, Any], KVTypes]:
    """A GGUF file's metadata, of any architecture -> (key -> value, key -> (type, array element type)).

    The types are the file's own, so the metadata can be written to a new file unchanged,
    e.g. `writer.add_key_value(key, value, t, sub_type=sub)`. gguf.GGUFWriter wants a
    sequence for an array (numeric arrays here are numpy arrays: pass `value.tolist()`),
    and writes a str as strict UTF-8; a string that was not valid UTF-8 in the file
    carries surrogate escapes here, and `s.encode("utf-8", "surrogateescape")` (bytes,
    which GGUFWriter writes as they are) gives back the original bytes.
    """
    p = os.fspath(path)
    fd, size = open_regular(p)
    try:
        r = _Reader(fd, size, p)
        _, _, n_kv = _read_start(r)
        return _read_kv(r, n_kv, None)
    finally:
        os.close(fd)


# --- the tensor table --------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the file. `shape` is in GGUF order: shape[0] is the row length."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]
    offset: int  # absolute file offset of the first byte
    nbytes: int

    @property
    def type_name(self) -> str:
        return type_name(self.ggml_type)

    @property
    def layer(self) -> int | None:
        m = LAYER_RE.match(self.name)
        return int(m.group(1)) if m else None

    @property
    def role(self) -> str:
        """Name without the layer prefix: 'attn_q.weight', 'token_embd.weight', ..."""
        m = LAYER_RE.match(self.name)
        return m.group(2) if m else self.name

    @property
    def row_len(self) -> int:
        return self.shape[0]

    @property
    def n_rows(self) -> int:
        n = 1
        for d in self.shape[1:]:
            n *= d
        return n

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.n_rows


def _read_tensor_info(r: _Reader, k: int, seen: set[str]) -> tuple[str, int, tuple[int, ...], int, int]:
    """One tensor info -> (name, type, dims, offset relative to the data section, nbytes), its
    type and shape checked: the shape's byte size is an exact integer (Python ints cannot
    overflow) and is compared with the file size later, with the offsets."""
    name = r.string(f"name of tensor {k}", GGML_MAX_NAME - 1)
    if not name:
        raise GGUFError(f"{r.path}: tensor {k} has an empty name")
    if name in seen:
        raise GGUFError(f"{r.path}: duplicate tensor name {name!r}")
    seen.add(name)
    n_dims = r.u32(f"n_dims of tensor {name!r}")
    if not 1 <= n_dims <= GGML_MAX_DIMS:
        raise GGUFError(f"tensor {name!r} has {n_dims:,} dimensions; expected 1 to {GGML_MAX_DIMS} (GGML_MAX_DIMS)")
    i = r.window(8 * n_dims, f"dims of tensor {name!r}")
    dims = struct.unpack_from(f"<{n_dims}Q", r.buf, i)
    r.pos += 8 * n_dims
    raw_type = r.u32(f"type of tensor {name!r}")
    offset = r.u64(f"offset of tensor {name!r}")
    try:
        qt = GGMLQuantizationType(raw_type)
    except ValueError:
        raise UnsupportedError(f"tensor {name!r} has unknown GGML type id {raw_type}") from None
    if raw_type not in SUPPORTED_TYPES:
        raise UnsupportedError(
            f"tensor {name!r} has type {qt.name}, which flexio does not support "
            f"(supported: {', '.join(type_name(t) for t in sorted(SUPPORTED_TYPES))})"
        )
    if any(d < 1 for d in dims):
        raise GGUFError(f"tensor {name!r} has invalid shape {list(dims)}: every dimension must be at least 1")
    block, type_size = GGML_QUANT_SIZES[qt]
    if dims[0] % block:
        raise GGUFError(f"tensor {name!r}: row length {dims[0]} is not a multiple of the {qt.name} block size {block}")
    n = 1
    for d in dims:
        n *= d
    return name, raw_type, dims, offset, n // block * type_size


# --- the file ------------------------------------------------------------------------------------


class GGUFFile:
    """A validated GGUF file: `metadata` (key -> value), `kv_types`, `tensors` (file order), `config`."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        fd, self.size = open_regular(self.path)
        try:
            r = _Reader(fd, self.size, self.path)
            self.version, n_tensors, n_kv = _read_start(r)
            self.metadata, self.kv_types = _read_kv(r, n_kv, check_architecture)
            seen: set[str] = set()
            infos = [_read_tensor_info(r, k, seen) for k in range(n_tensors)]
            header_end = r.pos
        finally:
            os.close(fd)
        self.alignment = self._alignment()
        self.data_offset = -(-header_end // self.alignment) * self.alignment
        self.tensors: list[TensorInfo] = [self._place(*info) for info in infos]
        self._check_overlap()
        self.by_name = {t.name: t for t in self.tensors}
        self.config: ModelConfig = model_config(self.metadata, self.by_name)
        check_tensors(self.config, self.by_name)

    # --- validation -------------------------------------------------------------

    def _alignment(self) -> int:
        key = "general.alignment"
        if key not in self.metadata:
            return DEFAULT_ALIGNMENT
        v, (t, _) = self.metadata[key], self.kv_types[key]
        if t not in (V.UINT8, V.UINT16, V.UINT32, V.UINT64, V.INT8, V.INT16, V.INT32, V.INT64):
            raise GGUFError(f"metadata key {key!r} has wrong type {t.name}, expected an integer (UINT32)")
        if v <= 0 or v & (v - 1):
            raise GGUFError(f"key {key!r} = {v} is invalid: expected a power of two")
        return v

    def _place(self, name: str, raw_type: int, dims: tuple[int, ...], rel: int, nbytes: int) -> TensorInfo:
        """Relative offset -> absolute, checked aligned and inside the file."""
        if rel % self.alignment:
            raise GGUFError(f"tensor {name!r} offset {rel:,} is not aligned to {self.alignment} bytes")
        offset = self.data_offset + rel
        if offset + nbytes > self.size:
            raise GGUFError(
                f"tensor {name!r} data is not within the file bounds "
                f"(ends at byte {offset + nbytes:,} > file size {self.size:,}): model is truncated or corrupt"
            )
        return TensorInfo(name, raw_type, tuple(dims), offset, nbytes)

    def _check_overlap(self) -> None:
        # llama.cpp goes further and wants the tensors packed in table order; overlapping
        # data is what a corrupt offset produces, and what flexio's reads must not assume.
        placed = sorted(self.tensors, key=lambda t: t.offset)
        for a, b in zip(placed, placed[1:]):
            if a.offset + a.nbytes > b.offset:
                raise GGUFError(
                    f"tensors {a.name!r} (bytes {a.offset:,}..{a.offset + a.nbytes:,}) and {b.name!r} "
                    f"(from byte {b.offset:,}) overlap: the tensor table is corrupt"
                )

    # --- helpers ----------------------------------------------------------------

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the engine needs, with its GGUF shape (row length first)."""
        return expected_shapes(self.config, self.by_name)

    def layer_tensors(self, layer: int) -> list[TensorInfo]:
        return [t for t in self.tensors if t.layer == layer]

    def read_tensor_bytes(self, t: TensorInfo) -> np.ndarray:
        """Read one tensor's bytes into a new uint8 array shaped (rows, row_bytes)."""
        buf = np.empty(t.nbytes, dtype=np.uint8)
        fd, _ = open_regular(self.path)
        try:
            got = os.preadv(fd, [memoryview(buf)], t.offset) if t.nbytes else 0
            while 0 < got < t.nbytes:  # preadv may return short for reads over 2 GiB
                n = os.preadv(fd, [memoryview(buf)[got:]], t.offset + got)
                if n == 0:
                    break
                got += n
        finally:
            os.close(fd)
        if got != t.nbytes:
            raise GGUFError(f"tensor {t.name!r}: short read ({got} of {t.nbytes} bytes): file changed or truncated")
        return buf.reshape(t.n_rows, t.row_bytes)

    def __repr__(self) -> str:
        return f"GGUFFile({self.path!r}, {self.config.arch}, {len(self.tensors)} tensors, {self.size:,} bytes)"


def open_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    return GGUFFile(path)
