"""Sizes and alignment: the one home of byte units, O_DIRECT and arena alignment, size parsing and printing.

Every size a user types (--budget, bench-io --chunk, serve --n-ctx memory, ...) goes through
`parse_size`, with one convention, the one `dd`, docker and java use:

  bare suffix   K, M, G, T   powers of 1024 (512M = 512 MiB)
  decimal       KB, MB, GB, TB   powers of 1000 (800MB = 800,000,000 bytes)
  binary        KiB, MiB, GiB, TiB   powers of 1024
  percent       25%          of a total the caller names (a budget: of the model's resident size)

Suffixes are case-insensitive; a bare number is bytes.
"""

from __future__ import annotations

import math
import mmap

from .errors import IOBackendError, ParameterError

PAGE = mmap.PAGESIZE  # 4096 on x86-64 and most arm64 kernels; the unit mmap and mlock work in
# O_DIRECT: the file offset, the length and the buffer address must be multiples of the device's
# logical block size (512 B on virtio, 4 KiB on 4Kn NVMe); 4096 satisfies both.
DIRECT_ALIGN = 4096
RESIDENT_ALIGN = 64  # resident tensor parts start on a cache line in the arena

_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
}
SIZE_HELP = "K/M/G = KiB/MiB/GiB, KB/MB/GB = 10^3/10^6/10^9 bytes"


class SizeError(ParameterError):
    """A size argument that cannot be parsed, or is out of range."""


def round_up(n: int, align: int) -> int:
    return -(-n // align) * align


def aligned_span(offset: int, length: int, align: int = DIRECT_ALIGN) -> tuple[int, int]:
    """(offset, length) -> (start, nbytes) of the smallest `align`-aligned range that covers it.

    Size an O_DIRECT buffer with nbytes; the data starts at offset - start inside it.
    """
    if offset < 0 or length < 0:
        raise IOBackendError(f"invalid range: offset {offset}, length {length} (both must be >= 0)")
    start = offset - offset % align
    if length == 0:
        return start, 0
    return start, round_up(offset + length, align) - start


def parse_size(text: str | int, total: int | None = None, *, what: str = "size") -> int:
    """'1.5GiB', '800MB', '512M', '25%' (of total), or an int -> bytes (see the module docstring)."""
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise SizeError(f"{what}: expected a size such as 1.5GiB, 800MB or 25%, got {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise SizeError(f"{what}: expected a size >= 0 bytes, got {text}")
        return text
    s = text.strip().replace(" ", "").replace("_", "")
    if s.endswith("%"):
        pct = _number(s[:-1], text, what)
        if not 0 <= pct <= 100:
            raise SizeError(f"{what}: expected a percentage in [0, 100], got {text!r}")
        if total is None:
            raise SizeError(f"{what}: a percentage ({text!r}) needs a total to be a percentage of")
        return int(total * pct / 100)
    i = len(s)
    while i and not (s[i - 1].isdigit() or s[i - 1] == "."):
        i -= 1
    unit = s[i:].lower()
    if unit not in _UNITS:
        raise SizeError(f"{what}: cannot parse size {text!r}: unknown unit (expected a size such as 1.5GiB, 800MB, 512M or 25%; "
                        f"{SIZE_HELP})")
    value = _number(s[:i], text, what) * _UNITS[unit]
    if value < 0 or not math.isfinite(value):
        raise SizeError(f"{what}: expected a size >= 0, got {text!r}")
    return int(value)


def _number(s: str, text: str, what: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise SizeError(f"{what}: cannot parse size {text!r} (expected a size such as 1.5GiB, 800MB, 512M or 25%)") from None
    if not math.isfinite(v):
        raise SizeError(f"{what}: expected a finite number, got {text!r}")
    return v


def fmt_bytes(n: float) -> str:
    """Bytes in binary units for people: '812 B', '3.50 MiB', '1.25 GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"
