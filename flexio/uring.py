"""Read requests (fd, file offset, length, buffer address) → io_uring submissions and completions, via ctypes.

Why ctypes and not a PyPI binding: the `liburing` wheel (2026.3.30, built with Zig)
dies with SIGILL in `Ring()` on this machine's CPU, which kills the process and
cannot be caught; `uring-api` is a release candidate without eventfd or
registered buffers. The three syscalls and two mmaps below are all io_uring needs.

Facts about io_uring this module relies on
------------------------------------------
* `io_uring_setup(entries, params)` returns a ring fd and fills `params` with the
  offsets of the submission ring (head, tail, mask, index array), the completion
  ring (head, tail, mask, CQEs) and the SQE array, which we map with mmap at
  IORING_OFF_SQ_RING / IORING_OFF_CQ_RING / IORING_OFF_SQES. With
  IORING_FEAT_SINGLE_MMAP (5.4+) the SQ and CQ rings share one mapping.
* Submitting = fill an SQE, write its index into the SQ array at `tail & mask`,
  bump the SQ tail, then `io_uring_enter(fd, to_submit, 0, 0)`. Without SQPOLL the
  kernel reads the tail inside that syscall, which is a full barrier, so plain
  stores from Python are ordered well enough.
* Completions: the kernel writes a CQE, then store-releases the CQ tail. We load
  the tail, read CQEs [head, tail), then store the new head. Each CQE carries
  our 64-bit `user_data` and `res` (bytes read, or -errno). One CQE per SQE, in
  any order. (On x86-64 loads are not reordered with loads; on weakly ordered
  CPUs the syscall that woke us orders them.)
* The CQ has 2× the SQ entries by default; we never keep more than `entries`
  requests in flight, so it cannot overflow.
* An eventfd registered with IORING_REGISTER_EVENTFD is signalled for every CQE
  posted, which is how asyncio (`loop.add_reader`) learns about completions
  without a thread. Read the eventfd *before* reaping so no wakeup is lost.
* A read is not undone by cancellation: IORING_OP_ASYNC_CANCEL may stop a request
  that has not started, but one already at the device completes (or returns
  -ECANCELED). Either way a CQE arrives; the buffer is the kernel's until then.
* Registered buffers (IORING_REGISTER_BUFFERS) pin the pages once so each
  READ_FIXED skips get_user_pages; registered files (IORING_REGISTER_FILES +
  IOSQE_FIXED_FILE) skip the fd table lookup. Pinning is charged to
  RLIMIT_MEMLOCK unless the process has CAP_IPC_LOCK.
* io_uring may be unavailable: ENOSYS (old kernel or seccomp), EPERM
  (`/proc/sys/kernel/io_uring_disabled` = 2, or = 1 and not in io_uring_group).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform

import numpy as np

# syscall numbers: the generic table (arm64, riscv) and x86-64 agree on these
_NR_SETUP, _NR_ENTER, _NR_REGISTER = 425, 426, 427
if platform.machine() not in ("x86_64", "aarch64", "arm64", "riscv64"):
    _NR_SETUP = _NR_ENTER = _NR_REGISTER = -1  # unknown ABI: report io_uring as unavailable

OFF_SQ_RING, OFF_CQ_RING, OFF_SQES = 0, 0x8000000, 0x10000000
FEAT_SINGLE_MMAP = 1 << 0
ENTER_GETEVENTS = 1 << 0

OP_NOP, OP_READ_FIXED, OP_ASYNC_CANCEL, OP_READ = 0, 4, 14, 22
SQE_FIXED_FILE = 1 << 0

REGISTER_BUFFERS, UNREGISTER_BUFFERS = 0, 1
REGISTER_FILES, UNREGISTER_FILES = 2, 3
REGISTER_EVENTFD, UNREGISTER_EVENTFD = 4, 5


class _SQRingOffsets(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint32) for n in ("head", "tail", "ring_mask", "ring_entries", "flags", "dropped", "array", "resv1")] + [("user_addr", ctypes.c_uint64)]


class _CQRingOffsets(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint32) for n in ("head", "tail", "ring_mask", "ring_entries", "overflow", "cqes", "flags", "resv1")] + [("user_addr", ctypes.c_uint64)]


class _Params(ctypes.Structure):  # struct io_uring_params, 120 bytes
    _fields_ = [(n, ctypes.c_uint32) for n in ("sq_entries", "cq_entries", "flags", "sq_thread_cpu", "sq_thread_idle", "features", "wq_fd")] + [
        ("resv", ctypes.c_uint32 * 3),
        ("sq_off", _SQRingOffsets),
        ("cq_off", _CQRingOffsets),
    ]


assert ctypes.sizeof(_Params) == 120, "struct io_uring_params layout"

# struct io_uring_sqe, 64 bytes (the fields a read needs; the rest stays zero)
SQE_DTYPE = np.dtype({
    "names": ["opcode", "flags", "ioprio", "fd", "off", "addr", "len", "rw_flags", "user_data", "buf_index"],
    "formats": [np.uint8, np.uint8, np.uint16, np.int32, np.uint64, np.uint64, np.uint32, np.uint32, np.uint64, np.uint16],
    "offsets": [0, 1, 2, 4, 8, 16, 24, 28, 32, 40],
    "itemsize": 64,
})
# struct io_uring_cqe, 16 bytes
CQE_DTYPE = np.dtype([("user_data", np.uint64), ("res", np.int32), ("flags", np.uint32)])

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def _check(ret: int, what: str) -> int:
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return ret


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def io_uring_disabled() -> int:
    """Value of /proc/sys/kernel/io_uring_disabled: 0 enabled, 1 only for io_uring_group, 2 disabled."""
    try:
        with open("/proc/sys/kernel/io_uring_disabled") as fh:
            return int(fh.read().strip() or 0)
    except (OSError, ValueError):
        return 0


class Ring:
    """One io_uring instance: `prep_read` + `submit`, `reap` completions, optional eventfd/fixed buffers/files.

    Not thread-safe: one thread (the event loop's, or the sync caller's) drives it.

    :raises OSError: io_uring_setup failed (ENOSYS, EPERM, ENOMEM, ...).
    """

    def __init__(self, entries: int):
        if _NR_SETUP < 0:
            raise OSError(errno.ENOSYS, f"io_uring syscall numbers unknown on {platform.machine()}")
        p = _Params()
        self.fd = _check(_syscall(_NR_SETUP, ctypes.c_uint(entries), ctypes.byref(p)), "io_uring_setup")
        self._maps: list[mmap.mmap] = []
        try:
            sq_size = p.sq_off.array + p.sq_entries * 4
            cq_size = p.cq_off.cqes + p.cq_entries * CQE_DTYPE.itemsize
            prot = mmap.PROT_READ | mmap.PROT_WRITE
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            if p.features & FEAT_SINGLE_MMAP:
                sq = cq = mmap.mmap(self.fd, max(sq_size, cq_size), flags, prot, offset=OFF_SQ_RING)
                self._maps.append(sq)
            else:
                sq = mmap.mmap(self.fd, sq_size, flags, prot, offset=OFF_SQ_RING)
                cq = mmap.mmap(self.fd, cq_size, flags, prot, offset=OFF_CQ_RING)
                self._maps += [sq, cq]
            sqe_map = mmap.mmap(self.fd, p.sq_entries * SQE_DTYPE.itemsize, flags, prot, offset=OFF_SQES)
            self._maps.append(sqe_map)
            u32 = np.uint32
            self.sq_head = np.frombuffer(sq, u32, 1, p.sq_off.head)
            self.sq_tail = np.frombuffer(sq, u32, 1, p.sq_off.tail)
            self.sq_mask = int(np.frombuffer(sq, u32, 1, p.sq_off.ring_mask)[0])
            self.sq_array = np.frombuffer(sq, u32, p.sq_entries, p.sq_off.array)
            self.cq_head = np.frombuffer(cq, u32, 1, p.cq_off.head)
            self.cq_tail = np.frombuffer(cq, u32, 1, p.cq_off.tail)
            self.cq_mask = int(np.frombuffer(cq, u32, 1, p.cq_off.ring_mask)[0])
            self.cqes = np.frombuffer(cq, CQE_DTYPE, p.cq_entries, p.cq_off.cqes)
            self.sqes = np.frombuffer(sqe_map, SQE_DTYPE, p.sq_entries)
        except BaseException:
            self.close()
            raise
        self.entries = p.sq_entries
        self.features = p.features
        self._to_submit = 0
        self._keep: object = None  # registered iovecs / fds must outlive the registration
        self.eventfd: int | None = None
        self.fixed_file = False

    # --- submission --------------------------------------------------------------

    def sq_space(self) -> int:
        return self.entries - (int(self.sq_tail[0]) - int(self.sq_head[0])) % (1 << 32)

    def _push(self, opcode: int, fd: int, off: int, addr: int, length: int, user_data: int, flags: int = 0, buf_index: int = 0) -> None:
        tail = int(self.sq_tail[0])
        idx = tail & self.sq_mask
        self.sqes[idx] = (opcode, flags, 0, fd, off, addr, length, 0, user_data, buf_index)
        self.sq_array[idx] = idx
        self.sq_tail[0] = (tail + 1) & 0xFFFFFFFF
        self._to_submit += 1

    def prep_read(self, fd: int, addr: int, length: int, offset: int, user_data: int, buf_index: int | None = None) -> None:
        """Queue a read of `length` bytes at file `offset` into memory at `addr` (call `submit` after).

        `buf_index` selects a registered buffer (READ_FIXED); `addr` must then lie inside it.
        With registered files `fd` is ignored and slot 0 is used.
        """
        flags = 0
        if self.fixed_file:
            fd, flags = 0, SQE_FIXED_FILE
        if buf_index is None:
            self._push(OP_READ, fd, offset, addr, length, user_data, flags)
        else:
            self._push(OP_READ_FIXED, fd, offset, addr, length, user_data, flags, buf_index)

    def prep_cancel(self, target_user_data: int, user_data: int) -> None:
        """Queue IORING_OP_ASYNC_CANCEL of the request tagged `target_user_data`."""
        self._push(OP_ASYNC_CANCEL, -1, 0, target_user_data, 0, user_data)

    def submit(self, wait_nr: int = 0) -> int:
        """io_uring_enter: hand the queued SQEs to the kernel; optionally wait for `wait_nr` CQEs."""
        n, self._to_submit = self._to_submit, 0
        if n == 0 and wait_nr == 0:
            return 0
        flags = ENTER_GETEVENTS if wait_nr else 0
        while True:
            ret = _syscall(_NR_ENTER, self.fd, n, wait_nr, flags, None, 0)
            if ret >= 0:
                return ret
            e = ctypes.get_errno()
            if e == errno.EINTR:  # only returned when nothing was submitted: retry the same SQEs
                continue
            if e in (errno.EAGAIN, errno.EBUSY):  # CQ full or kernel short of memory: let the caller reap
                self._to_submit = n
                return 0
            raise OSError(e, f"io_uring_enter: {os.strerror(e)}")

    # --- completion ----------------------------------------------------------------

    def reap(self) -> list[tuple[int, int]]:
        """All completions available now, as (user_data, res) pairs; advances the CQ head."""
        head = int(self.cq_head[0])
        tail = int(self.cq_tail[0])
        if head == tail:
            return []
        out = []
        mask = self.cq_mask
        cqes = self.cqes
        while head != tail:
            c = cqes[head & mask]
            out.append((int(c["user_data"]), int(c["res"])))
            head = (head + 1) & 0xFFFFFFFF
        self.cq_head[0] = head
        return out

    def wait(self, nr: int = 1) -> None:
        """Block until at least `nr` completions are posted (submitting anything queued)."""
        self.submit(wait_nr=nr)

    # --- registration --------------------------------------------------------------

    def _register(self, opcode: int, arg, nr: int, what: str) -> None:
        _check(_syscall(_NR_REGISTER, self.fd, opcode, arg, nr), what)

    def register_eventfd(self, efd: int) -> None:
        self._register(REGISTER_EVENTFD, ctypes.byref(ctypes.c_int(efd)), 1, "IORING_REGISTER_EVENTFD")
        self.eventfd = efd

    def register_buffers(self, regions: list[tuple[int, int]]) -> None:
        """Pin (address, nbytes) regions; READ_FIXED then names one by its index."""
        iov = (_Iovec * len(regions))(*[_Iovec(a, n) for a, n in regions])
        self._register(REGISTER_BUFFERS, iov, len(regions), "IORING_REGISTER_BUFFERS")
        self._keep = iov

    def register_file(self, fd: int) -> None:
        arr = (ctypes.c_int * 1)(fd)
        self._register(REGISTER_FILES, arr, 1, "IORING_REGISTER_FILES")
        self.fixed_file = True

    def close(self) -> None:
        """Unmap the rings and close the ring fd (the kernel cancels and reaps anything left)."""
        for name in ("sq_head", "sq_tail", "sq_array", "cq_head", "cq_tail", "cqes", "sqes"):
            self.__dict__.pop(name, None)  # drop numpy views so the mmaps can close
        for m in self._maps:
            try:
                m.close()
            except BufferError:
                pass
        self._maps = []
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
