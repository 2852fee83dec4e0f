"""Byte budget → Arena: page-aligned anonymous memory, mlock'd, carved into buffers with exact accounting.

Kernel facts this module relies on
----------------------------------
* Anonymous `mmap` returns page-aligned (4096-byte) memory that is zero-filled on
  first touch. O_DIRECT needs the *user buffer address*, the file offset and the
  length aligned to the device's logical block size (512 B on virtio, 4 KiB on
  most NVMe with 4Kn format); every buffer here starts on a 4096-byte boundary,
  which satisfies all of them.
* `mlock(addr, len)` faults the range in and pins it: it can no longer be
  swapped or reclaimed, so a weight slot that has been read stays in RAM until
  we say otherwise. `munlock` undoes it; `munmap` of a locked range unlocks it too.
* `RLIMIT_MEMLOCK` caps how much an unprivileged process may lock (often 8 MiB).
  A process may raise its soft limit up to the hard limit itself; only
  CAP_SYS_RESOURCE raises the hard limit. CAP_IPC_LOCK (root) ignores the limit
  altogether. Over the limit, mlock fails with ENOMEM (or EPERM if the limit is 0).
* cgroup memory limits are different: in a cgroup v1 memory cgroup, locking
  beyond `memory.limit_in_bytes` does NOT fail with ENOMEM; the OOM killer kills
  the process (or, with oom_kill_disable=1, it hangs in D state). So before
  locking we compare the arena with the limit of our own cgroup
  (`/proc/self/cgroup` → `memory.limit_in_bytes`, or v2 `memory.max`) and refuse
  with a BudgetError instead of dying. Pages locked before a process moves to
  another cgroup stay charged to the old one.

Accounting: `size` is what the arena maps (the request rounded up to a page);
`used` is the sum of live buffers' sizes, each rounded up to its alignment, so
`used <= size` always holds and is what the memory budget is checked against.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import resource
import threading
from dataclasses import dataclass

from .errors import BudgetError, FlexioError
from .units import DIRECT_ALIGN, PAGE, fmt_bytes, round_up

log = logging.getLogger("flexio.arena")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.munlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)


def _mlock(addr: int, n: int) -> int:
    """mlock(2); returns 0 or an errno. Tests replace this to simulate a refusal."""
    return 0 if _libc.mlock(addr, n) == 0 else ctypes.get_errno()


def _munlock(addr: int, n: int) -> int:
    return 0 if _libc.munlock(addr, n) == 0 else ctypes.get_errno()


# --- cgroup memory limit ---------------------------------------------------------


def cgroup_memory_limit() -> int | None:
    """The memory limit of this process's own cgroup in bytes, or None when unlimited/unknown."""
    try:
        with open("/proc/self/cgroup") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _hid, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):  # cgroup v1 memory hierarchy
            f = f"/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"
        elif controllers == "":  # cgroup v2 unified hierarchy
            f = f"/sys/fs/cgroup{path}/memory.max"
            if not os.path.exists(f):
                f = f"/sys/fs/cgroup/unified{path}/memory.max"
        else:
            continue
        try:
            with open(f) as fh:
                text = fh.read().strip()
        except OSError:
            continue
        if text == "max":
            continue
        limit = int(text)
        if limit < (1 << 62):  # v1 reports "unlimited" as ~2**63 rounded to a page
            return limit
    return None


def physical_memory() -> int | None:
    """Bytes of RAM this machine has (MemTotal), or None when unknown."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def memory_limit() -> tuple[int, str] | None:
    """The memory this process may use at most and where the figure comes from: the smaller of the
    machine's RAM and this process's cgroup limit. None when neither is known."""
    found = []
    ram = physical_memory()
    if ram:
        found.append((ram, "this machine's RAM (MemTotal)"))
    cg = cgroup_memory_limit()
    if cg is not None:
        found.append((cg, "this process's cgroup memory limit"))
    return min(found) if found else None


def locked_bytes() -> int:
    """Bytes this process has locked now (VmLck of /proc/self/status)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmLck:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


_warned_unlocked = False


def _warn_unlocked_once(name: str, nbytes: int, err: int) -> None:
    global _warned_unlocked
    if _warned_unlocked:
        return
    _warned_unlocked = True
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    lim = "unlimited" if hard == resource.RLIM_INFINITY else fmt_bytes(hard)
    log.warning(
        "arena %r: mlock of %s refused (%s; RLIMIT_MEMLOCK hard limit %s); continuing UNLOCKED, "
        "weights may be paged out. Raise the limit with `ulimit -l unlimited` (shell), "
        "`memlock` in /etc/security/limits.conf, `LimitMEMLOCK=infinity` (systemd) or "
        "`--ulimit memlock=-1` (docker), or grant CAP_IPC_LOCK.",
        name, fmt_bytes(nbytes), os.strerror(err), lim,
    )


# --- buffers and arena -------------------------------------------------------------


class ArenaBuffer:
    """A carved piece of an arena: `offset` (in the arena, multiple of `align`), `nbytes`, `address`, `view`.

    `view` is a writable memoryview of exactly `nbytes` bytes; it becomes invalid
    (released) when the buffer is released or the arena is closed.
    """

    __slots__ = ("arena", "offset", "nbytes", "reserved", "address", "view", "tag")

    def __init__(self, arena: Arena, offset: int, nbytes: int, reserved: int, tag: str):
        self.arena = arena
        self.offset = offset  # byte offset inside the arena
        self.nbytes = nbytes  # bytes the caller asked for
        self.reserved = reserved  # bytes charged to the arena (nbytes rounded up to the alignment)
        self.address = arena.address + offset
        self.view: memoryview | None = arena._view[offset : offset + nbytes]
        self.tag = tag

    @property
    def released(self) -> bool:
        return self.view is None

    def release(self) -> None:
        """Give the bytes back to the arena (idempotent)."""
        if self.view is not None:
            self.arena._free(self)

    def __enter__(self) -> ArenaBuffer:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self.view is None else f"@{self.address:#x}"
        return f"ArenaBuffer({self.tag or '-'} off={self.offset} n={self.nbytes} {state})"


@dataclass(frozen=True)
class ArenaStats:
    name: str
    size: int  # bytes mapped (request rounded up to a page)
    used: int  # bytes charged to live buffers (each rounded up to its alignment)
    peak_used: int
    buffers: int  # live buffers
    largest_free: int  # largest contiguous free extent
    locked: bool  # whether mlock succeeded

    @property
    def free(self) -> int:
        return self.size - self.used


class Arena:
    """Page-aligned anonymous memory, locked with mlock, carved into ArenaBuffers.

    Lifecycle: `Arena(nbytes)` maps and locks; `close()` (or `with`) unlocks and
    unmaps. Allocation is first-fit over a sorted free list with coalescing, so
    carving fixed-size slots and recycling them never fragments.

    :raises BudgetError: the arena exceeds the process's cgroup memory limit, or
        an allocation does not fit.
    """

    def __init__(self, nbytes: int, *, name: str = "arena", lock: bool = True):
        if nbytes <= 0:
            raise BudgetError(f"arena {name!r}: size must be positive, got {nbytes}")
        self.name = name
        self.size = round_up(nbytes, PAGE)
        self.locked = False
        if lock:
            limit = cgroup_memory_limit()
            already = locked_bytes()
            if limit is not None and already + self.size > limit:
                raise BudgetError(
                    f"arena {name!r}: locking {fmt_bytes(self.size)} (+{fmt_bytes(already)} already locked) "
                    f"exceeds this process's cgroup memory limit {fmt_bytes(limit)}; the kernel would "
                    f"OOM-kill instead of refusing. Lower the budget or raise memory.limit_in_bytes"
                )
        self._mm: mmap.mmap | None = mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        anchor = ctypes.c_char.from_buffer(self._mm)  # temporary export, only to learn the address
        self.address = ctypes.addressof(anchor)
        del anchor
        if hasattr(mmap, "MADV_HUGEPAGE"):
            try:  # as numpy does for large arrays: 2 MiB pages for the gigabytes kernels stream through (before mlock faults them in)
                self._mm.madvise(mmap.MADV_HUGEPAGE)
            except OSError:  # THP disabled ("never") or unsupported: 4 KiB pages, same bytes
                pass
        self._view: memoryview = memoryview(self._mm)
        self._lock = threading.Lock()
        self._free_list: list[tuple[int, int]] = [(0, self.size)]  # (offset, nbytes), sorted by offset
        self._live: dict[int, ArenaBuffer] = {}  # offset -> buffer
        self.used = 0
        self.peak_used = 0
        if lock:
            self._lock_pages()

    def _lock_pages(self) -> None:
        err = _mlock(self.address, self.size)
        if err in (errno.ENOMEM, errno.EPERM, errno.EAGAIN):
            # Raise our own soft RLIMIT_MEMLOCK as far as the hard limit allows, then retry.
            soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
            if soft != hard:
                try:
                    resource.setrlimit(resource.RLIMIT_MEMLOCK, (hard, hard))
                    log.info("arena %r: raised RLIMIT_MEMLOCK soft limit %s -> %s", self.name, soft, hard)
                    err = _mlock(self.address, self.size)
                except (ValueError, OSError):
                    pass
        if err == 0:
            self.locked = True
        else:
            _warn_unlocked_once(self.name, self.size, err)

    # --- carving ---------------------------------------------------------------

    def alloc(self, nbytes: int, *, align: int = DIRECT_ALIGN, tag: str = "") -> ArenaBuffer:
        """Carve `nbytes` starting on an `align` boundary (power of two, ≥ 1).

        :raises BudgetError: not enough contiguous free space (the message gives free and largest extent).
        """
        if self._mm is None:
            raise FlexioError(f"arena {self.name!r} is closed")
        if nbytes <= 0:
            raise BudgetError(f"arena {self.name!r}: buffer size must be positive, got {nbytes} ({tag or 'untagged'})")
        if align <= 0 or align & (align - 1):
            raise BudgetError(f"arena {self.name!r}: alignment must be a power of two, got {align}")
        need = round_up(nbytes, align)
        with self._lock:
            for i, (off, n) in enumerate(self._free_list):
                start = round_up(self.address + off, align) - self.address  # align the address, not the offset
                if start + need <= off + n:
                    pieces = []
                    if start > off:
                        pieces.append((off, start - off))
                    if start + need < off + n:
                        pieces.append((start + need, off + n - start - need))
                    self._free_list[i : i + 1] = pieces
                    charged = need  # alignment padding before `start` stays on the free list
                    buf = ArenaBuffer(self, start, nbytes, charged, tag)
                    self._live[start] = buf
                    self.used += charged
                    self.peak_used = max(self.peak_used, self.used)
                    assert self.used <= self.size, "arena accounting exceeded its size"
                    return buf
            largest = max((n for _, n in self._free_list), default=0)
        raise BudgetError(
            f"arena {self.name!r} cannot fit {fmt_bytes(need)} for {tag or 'a buffer'}: "
            f"{fmt_bytes(self.size - self.used)} free of {fmt_bytes(self.size)}, largest free extent {fmt_bytes(largest)}"
        )

    def carve(self, slot_bytes: int, count: int, *, tag: str = "slot") -> list[ArenaBuffer]:
        """`count` equal slots of `slot_bytes` each (4096-aligned), for a prefetcher to recycle.

        :raises BudgetError: the slots do not fit; nothing is allocated then.
        """
        slots: list[ArenaBuffer] = []
        try:
            for i in range(count):
                slots.append(self.alloc(slot_bytes, tag=f"{tag}{i}"))
        except BudgetError:
            for s in slots:
                s.release()
            raise
        return slots

    def _free(self, buf: ArenaBuffer) -> None:
        with self._lock:
            if self._live.pop(buf.offset, None) is not buf:
                return
            view, buf.view = buf.view, None
            try:
                view.release()
            except BufferError:
                pass  # something still exports it (a numpy array); the mapping outlives it until close
            self.used -= buf.reserved
            off, n = buf.offset, buf.reserved
            fl = self._free_list
            # insert sorted, then coalesce with neighbours
            lo, hi = 0, len(fl)
            while lo < hi:
                mid = (lo + hi) // 2
                if fl[mid][0] < off:
                    lo = mid + 1
                else:
                    hi = mid
            fl.insert(lo, (off, n))
            if lo + 1 < len(fl) and fl[lo][0] + fl[lo][1] == fl[lo + 1][0]:
                fl[lo : lo + 2] = [(fl[lo][0], fl[lo][1] + fl[lo + 1][1])]
            if lo > 0 and fl[lo - 1][0] + fl[lo - 1][1] == fl[lo][0]:
                fl[lo - 1 : lo + 1] = [(fl[lo - 1][0], fl[lo - 1][1] + fl[lo][1])]

    # --- lifecycle ---------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._mm is None

    def statistics(self) -> ArenaStats:
        with self._lock:
            largest = max((n for _, n in self._free_list), default=0)
            return ArenaStats(self.name, self.size, self.used, self.peak_used, len(self._live), largest, self.locked)

    def close(self) -> None:
        """Release every buffer, munlock and munmap. Idempotent.

        :raises FlexioError: a view of the arena is still exported (e.g. a numpy
            array over a buffer); the pages are unlocked but stay mapped until it is dropped.
        """
        if self._mm is None:
            return
        for buf in list(self._live.values()):
            buf.release()
        if self.locked:
            _munlock(self.address, self.size)
            self.locked = False
        try:
            self._view.release()
            self._mm.close()
        except BufferError:
            raise FlexioError(
                f"arena {self.name!r} cannot be unmapped: a view of its memory is still alive "
                f"(numpy array or memoryview over a buffer); drop it before closing"
            ) from None
        self._mm = None

    def __enter__(self) -> Arena:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if self._mm is not None and self.locked:
                _munlock(self.address, self.size)
        except Exception:
            pass

    def __repr__(self) -> str:
        s = self.statistics() if self._mm is not None else None
        if s is None:
            return f"Arena({self.name!r}, closed)"
        return f"Arena({self.name!r}, {fmt_bytes(s.used)}/{fmt_bytes(s.size)} used, locked={s.locked})"
