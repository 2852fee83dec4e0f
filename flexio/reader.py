"""(file offset, length, destination buffer) ranges → bytes in arena memory, via io_uring O_DIRECT (or a fallback).

One `Reader` per file. It splits each range into chunks of at most `chunk_size`,
keeps up to `queue_depth` of them in flight, and completes a range when all its
chunks have. The same core serves `await reader.read_ranges(...)` (asyncio: the
completions wake the loop through an eventfd, no thread) and
`reader.read_ranges_sync(...)` (blocks in poll on that same eventfd).

Facts this module relies on
---------------------------
* O_DIRECT bypasses the page cache: the device DMAs straight into our buffer.
  The file offset, the length and the buffer address must be multiples of the
  logical block size (512 B or 4 KiB; we use 4096, safe for both), else the
  read fails with EINVAL. GGUF tensors are only 32-byte aligned, so a tensor is
  read through its enclosing aligned span (`aligned_span`) and exposed as a
  view at the exact offset. At end of file the kernel reads whole blocks into
  the buffer but reports only the bytes up to EOF, so the destination needs
  room for the rounded-up length.
* Some filesystems refuse O_DIRECT: open fails with EINVAL, or (FUSE, some
  network filesystems) the first read does. We probe one block at open and fall
  back to buffered reads followed by posix_fadvise(DONTNEED), which drops the
  pages we just copied so the page cache does not double our memory.
* A read may return fewer bytes than asked (signal, device limits, EOF). A
  short read before the range's end is resubmitted for the rest; 0 bytes before
  the end means the file shrank, which is an error naming the offset.
* io_uring posts exactly one CQE per SQE and signals the registered eventfd for
  each. A submitted read cannot be taken back: IORING_OP_ASYNC_CANCEL stops it
  only if it has not started; in every case a CQE arrives and until then the
  kernel owns the destination memory. So a cancelled `await` cancels what it
  can, then waits for (drains) the rest before it lets the caller reuse the
  buffer; each in-flight range also holds a buffer export (ctypes pin) so the
  arena cannot be unmapped under the kernel.
* When io_uring is unavailable (`/proc/sys/kernel/io_uring_disabled` = 2,
  seccomp or an old kernel: ENOSYS/EPERM) a thread pool runs `os.preadv`; it
  signals the same eventfd, so the rest of the reader does not change.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import itertools
import logging
import mmap
import os
import select
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Sequence

from .arena import Arena, ArenaBuffer
from .errors import IOBackendError
from .units import DIRECT_ALIGN, aligned_span, round_up
from .uring import Ring, io_uring_disabled

log = logging.getLogger("flexio.reader")

# Chosen from measurement (`python -m flexio bench-io FILE --qd 8,16,32,64 --chunk 1M,4M`, cold reads
# of a 2 GiB file on a virtio disk): throughput is set by the bytes in flight; QD 32 x 4 MiB = 128 MiB
# reached fio's ceiling, smaller windows stayed ~35 % lower.
DEFAULT_QUEUE_DEPTH = 32
DEFAULT_CHUNK_SIZE = 4 << 20
DEFAULT_THREADS = 4

_CANCEL_TAG = 1 << 63  # user_data of ASYNC_CANCEL SQEs; their CQEs are ignored


@dataclass(frozen=True)
class ReaderStats:
    backend: str  # "io_uring+O_DIRECT", "threads+O_DIRECT", "io_uring+buffered", "threads+buffered"
    queue_depth: int
    chunk_size: int
    bytes_read: int  # bytes the kernel returned (aligned spans, so >= the bytes asked for)
    requests: int  # reads submitted to the kernel / thread pool, resubmissions included
    in_flight: int  # reads submitted and not yet completed
    ranges: int  # ranges completed successfully
    short_reads: int  # reads that returned less than asked before the range's end
    cancelled: int  # ranges whose awaiting task was cancelled
    fixed_buffers: bool  # registered buffers in use (io_uring READ_FIXED)


class _Request:
    """One read_ranges call: its chunks, how many are in flight, and how it ends."""

    __slots__ = ("n_chunks", "done_chunks", "inflight", "error", "cancelled", "future", "drained", "pins", "finished")

    def __init__(self) -> None:
        self.n_chunks = 0
        self.done_chunks = 0
        self.inflight = 0
        self.error: BaseException | None = None
        self.cancelled = False
        self.future: asyncio.Future | None = None
        self.drained: asyncio.Future | None = None
        self.pins: list = []  # buffer exports held until the kernel is done with the memory
        self.finished = False


class _Chunk:
    """One kernel read: `length` bytes at file `offset` into `addr` / `view`; `need` of them are required."""

    __slots__ = ("req", "offset", "addr", "view", "length", "need", "buf_index")

    def __init__(self, req: _Request, offset: int, addr: int, view: memoryview | None, length: int, need: int, buf_index: int | None):
        self.req = req
        self.offset = offset
        self.addr = addr
        self.view = view  # only for the thread engine (preadv wants a buffer, not an address)
        self.length = length
        self.need = need
        self.buf_index = buf_index

    def advance(self, n: int) -> None:
        """Skip the `n` bytes a short read delivered."""
        self.offset += n
        self.addr += n
        if self.view is not None:
            self.view = self.view[n:]
        self.length -= n
        self.need -= n
        if self.buf_index is not None and (self.addr % DIRECT_ALIGN or self.offset % DIRECT_ALIGN):
            self.buf_index = None


# --- engines: submit chunks, report (tag, res) completions, signal the eventfd ------------


class _UringEngine:
    name = "io_uring"
    wants_view = False

    def __init__(self, fd: int, queue_depth: int, efd: int, fixed: Sequence[Arena], fixed_file: bool):
        self.fd = fd
        self.ring = Ring(queue_depth * 2)  # room for ASYNC_CANCEL SQEs beside a full window
        self.regions: list[tuple[int, int, int]] = []  # (start address, end address, buffer index)
        try:
            self.ring.register_eventfd(efd)
            if fixed_file:
                try:
                    self.ring.register_file(fd)
                except OSError as e:
                    log.info("io_uring: registered file refused (%s); using the plain fd", e.strerror)
            if fixed:
                try:
                    self.ring.register_buffers([(a.address, a.size) for a in fixed])
                    self.regions = [(a.address, a.address + a.size, i) for i, a in enumerate(fixed)]
                except OSError as e:
                    log.warning("io_uring: registering %d arena(s) as fixed buffers failed (%s); using plain reads", len(fixed), e.strerror)
        except BaseException:
            self.ring.close()
            raise

    def buf_index(self, addr: int, n: int) -> int | None:
        for lo, hi, i in self.regions:
            if lo <= addr and addr + n <= hi:
                return i
        return None

    def submit(self, tag: int, c: _Chunk) -> None:
        self.ring.prep_read(self.fd, c.addr, c.length, c.offset, tag, c.buf_index)

    def space(self) -> int:
        return self.ring.sq_space()

    def flush(self) -> None:
        self.ring.submit()

    def reap(self) -> list[tuple[int, int]]:
        return self.ring.reap()

    def cancel(self, tag: int) -> None:
        if self.ring.sq_space() == 0:
            self.ring.submit()
        self.ring.prep_cancel(tag, _CANCEL_TAG | tag)

    def close(self) -> None:
        self.ring.close()


class _ThreadEngine:
    name = "threads"
    wants_view = True

    def __init__(self, fd: int, threads: int, efd: int):
        self.fd = fd
        self.efd = efd
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="flexio-pread")
        self.done: deque[tuple[int, int]] = deque()  # appended by workers, popped by the driving thread
        self.futures: dict[int, object] = {}

    def _read(self, view: memoryview, offset: int) -> int:
        try:
            return os.preadv(self.fd, [view], offset)
        except OSError as e:
            return -(e.errno or errno.EIO)

    def submit(self, tag: int, c: _Chunk) -> None:
        fut = self.pool.submit(self._read, c.view, c.offset)
        self.futures[tag] = fut

        def done(f, tag=tag) -> None:
            res = -errno.ECANCELED if f.cancelled() else f.result()
            self.done.append((tag, res))
            os.eventfd_write(self.efd, 1)

        fut.add_done_callback(done)

    def space(self) -> int:
        return 1 << 30

    def flush(self) -> None:
        pass

    def reap(self) -> list[tuple[int, int]]:
        out = []
        while self.done:
            tag, res = self.done.popleft()
            self.futures.pop(tag, None)
            out.append((tag, res))
        return out

    def cancel(self, tag: int) -> None:
        fut = self.futures.get(tag)
        if fut is not None:
            fut.cancel()  # only succeeds if the worker has not started it; its callback reports ECANCELED

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


# --- the reader ---------------------------------------------------------------------


def _probe_direct(fd: int, size: int) -> None:
    """Read the first block through the O_DIRECT fd; raises OSError(EINVAL) where O_DIRECT reads are refused.

    Tests replace this to simulate a filesystem without O_DIRECT (tmpfs accepts it on recent kernels).
    """
    if size == 0:
        return
    scratch = mmap.mmap(-1, DIRECT_ALIGN)
    try:
        os.preadv(fd, [scratch], 0)
    finally:
        scratch.close()


def _new_ring_engine(fd: int, queue_depth: int, efd: int, fixed: Sequence[Arena], fixed_file: bool) -> _UringEngine:
    """Set up io_uring; raises OSError (ENOSYS, EPERM, ...) where it is unavailable. Tests replace this."""
    if io_uring_disabled() == 2:
        raise OSError(errno.EPERM, "disabled by /proc/sys/kernel/io_uring_disabled = 2")
    return _UringEngine(fd, queue_depth, efd, fixed, fixed_file)


class Reader:
    """Reads byte ranges of one file into caller buffers; asyncio and blocking APIs over one backend.

    backend: "auto" (io_uring, else threads), "io_uring" or "threads".
    direct: None (O_DIRECT if the filesystem allows it), True (required) or False (buffered + DONTNEED).
    fixed_buffers: arenas to register with io_uring (READ_FIXED for destinations inside them).

    Use `with Reader(path) as r:` / `async with Reader(path) as r:` or `open()`/`close()`.
    One thread drives a reader (the event loop's, or the blocking caller's).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        backend: str = "auto",
        direct: bool | None = None,
        queue_depth: int = DEFAULT_QUEUE_DEPTH,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        threads: int = DEFAULT_THREADS,
        fixed_buffers: Arena | Sequence[Arena] | None = None,
        fixed_file: bool = True,
    ):
        if backend not in ("auto", "io_uring", "threads"):
            raise IOBackendError(f"unknown I/O backend {backend!r}; expected 'auto', 'io_uring' or 'threads'")
        if queue_depth < 1:
            raise IOBackendError(f"queue_depth must be >= 1, got {queue_depth}")
        if chunk_size < DIRECT_ALIGN or chunk_size % DIRECT_ALIGN:
            raise IOBackendError(f"chunk_size must be a positive multiple of {DIRECT_ALIGN}, got {chunk_size}")
        self.path = os.fspath(path)
        self.requested_backend = backend
        self.requested_direct = direct
        self.queue_depth = queue_depth
        self.chunk_size = chunk_size
        self.threads = threads
        self.fixed = [fixed_buffers] if isinstance(fixed_buffers, Arena) else list(fixed_buffers or [])
        self.fixed_file = fixed_file
        self.fd = -1
        self.efd = -1
        self.size = 0
        self.direct = False
        self.engine: _UringEngine | _ThreadEngine | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: deque[_Chunk] = deque()
        self._inflight: dict[int, _Chunk] = {}
        self._tags = itertools.count(1)
        self._thread: int | None = None
        self._bytes = self._requests = self._ranges = self._short = self._cancelled = 0

    # --- lifecycle ---------------------------------------------------------------------

    @property
    def backend(self) -> str:
        if self.engine is None:
            return "closed"
        return f"{self.engine.name}+{'O_DIRECT' if self.direct else 'buffered'}"

    def open(self) -> Reader:
        """Open the file and the backend, logging one line for each fallback taken.

        :raises IOBackendError: the file cannot be opened, or a forced backend/direct mode is unavailable.
        """
        if self.engine is not None:
            return self
        try:
            self._open_file()
            self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._open_engine()
        except BaseException:
            self._close_fds()
            raise
        self._thread = threading.get_ident()
        return self

    def _open_file(self) -> None:
        try:
            st = os.stat(self.path)
        except OSError as e:
            raise IOBackendError(f"cannot open {self.path!r}: {e.strerror}") from None
        self.size = st.st_size
        why = None
        if self.requested_direct is not False:
            try:
                self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
                _probe_direct(self.fd, self.size)
                self.direct = True
                return
            except OSError as e:
                if self.fd >= 0:
                    os.close(self.fd)
                    self.fd = -1
                if e.errno != errno.EINVAL:
                    raise IOBackendError(f"cannot open {self.path!r} with O_DIRECT: {e.strerror}") from None
                why = f"the filesystem rejects O_DIRECT ({os.strerror(e.errno)})"
                if self.requested_direct is True:
                    raise IOBackendError(f"{self.path}: O_DIRECT was required but {why}") from None
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise IOBackendError(f"cannot open {self.path!r}: {e.strerror}") from None
        self.direct = False
        if why:
            log.warning("flexio reader: %s: %s; using buffered reads + posix_fadvise(DONTNEED)", self.path, why)

    def _open_engine(self) -> None:
        if self.requested_backend in ("auto", "io_uring"):
            try:
                self.engine = _new_ring_engine(self.fd, self.queue_depth, self.efd, self.fixed, self.fixed_file)
                return
            except OSError as e:
                why = e.strerror or os.strerror(e.errno or 0)
                name = errno.errorcode.get(e.errno or 0, "?")
                if self.requested_backend == "io_uring":
                    raise IOBackendError(f"io_uring is unavailable ({name}: {why})") from None
                log.warning(
                    "flexio reader: io_uring unavailable (%s: %s); falling back to a %d-thread os.preadv pool",
                    name, why, self.threads,
                )
        self.engine = _ThreadEngine(self.fd, self.threads, self.efd)

    def close(self) -> None:
        """Cancel and drain every read, stop the backend; leaves no fd, thread or pinned buffer. Idempotent."""
        if self.engine is None:
            return
        err = IOBackendError(f"{self.path}: reader closed while the read was pending")
        reqs = {c.req for c in itertools.chain(self._pending, self._inflight.values())}
        for req in reqs:
            req.error = req.error or err
            self._cancel(req)
        while self._inflight:
            self._wait_blocking(1.0)
        if self._loop is not None:
            try:
                self._loop.remove_reader(self.efd)
            except Exception:  # the loop may already be closed
                pass
            self._loop = None
        self.engine.close()
        self.engine = None
        self._close_fds()

    def _close_fds(self) -> None:
        for name in ("fd", "efd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    def __enter__(self) -> Reader:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    async def __aenter__(self) -> Reader:
        return self.open()

    async def __aexit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "engine", None) is not None and not self._inflight:
            try:
                self.close()
            except Exception:
                pass

    def statistics(self) -> ReaderStats:
        return ReaderStats(
            backend=self.backend,
            queue_depth=self.queue_depth,
            chunk_size=self.chunk_size,
            bytes_read=self._bytes,
            requests=self._requests,
            in_flight=len(self._inflight),
            ranges=self._ranges,
            short_reads=self._short,
            cancelled=self._cancelled,
            fixed_buffers=bool(isinstance(self.engine, _UringEngine) and self.engine.regions),
        )

    # --- building requests -----------------------------------------------------------------

    def _make_request(self, ranges: Iterable[tuple[int, int, object]], urgent: bool = False) -> _Request:
        if self.engine is None:
            raise IOBackendError(f"{self.path}: reader is not open")
        req = _Request()
        chunks: list[_Chunk] = []
        wants_view = self.engine.wants_view
        for item in ranges:
            offset, length, dest = item
            if not isinstance(offset, int) or not isinstance(length, int):
                raise IOBackendError(f"{self.path}: offset and length must be ints, got {offset!r}, {length!r}")
            if offset < 0 or length < 0:
                raise IOBackendError(f"{self.path}: invalid range: offset {offset}, length {length} (both must be >= 0)")
            if offset + length > self.size:
                raise IOBackendError(
                    f"{self.path}: range [{offset:,}, {offset + length:,}) ends past EOF (file size {self.size:,})"
                )
            if length == 0:
                continue
            mv = dest.view if isinstance(dest, ArenaBuffer) else memoryview(dest)
            if mv is None:
                raise IOBackendError(f"{self.path}: destination {dest!r} was released")
            if mv.readonly:
                raise IOBackendError(f"{self.path}: destination for offset {offset} is read-only")
            if mv.format != "B" or mv.ndim != 1:
                mv = mv.cast("B")
            # Direct reads ask for whole blocks; the kernel may write up to the rounded-up length.
            span = round_up(length, DIRECT_ALIGN) if self.direct else length
            if len(mv) < span:
                raise IOBackendError(
                    f"{self.path}: destination of {len(mv):,} bytes is too small for range at offset {offset:,}: "
                    f"needs {span:,} (length {length:,}{' rounded up to 4096 for O_DIRECT' if self.direct else ''})"
                )
            pin = ctypes.c_char.from_buffer(mv)  # export: the memory cannot be unmapped while we hold it
            base = ctypes.addressof(pin)
            req.pins.append(pin)
            if self.direct and (offset % DIRECT_ALIGN or base % DIRECT_ALIGN):
                raise IOBackendError(
                    f"{self.path}: O_DIRECT needs 4096-aligned file offsets and buffers; got offset {offset:,} "
                    f"(mod 4096 = {offset % DIRECT_ALIGN}), buffer address mod 4096 = {base % DIRECT_ALIGN}; "
                    f"read the enclosing span from aligned_span() instead"
                )
            for pos in range(0, span, self.chunk_size):
                n = min(self.chunk_size, span - pos)
                need = min(n, length - pos)
                idx = None
                if isinstance(self.engine, _UringEngine) and self.engine.regions:
                    idx = self.engine.buf_index(base + pos, n)
                chunks.append(_Chunk(req, offset + pos, base + pos, mv[pos : pos + n] if wants_view else None, n, need, idx))
        req.n_chunks = len(chunks)
        if urgent:  # ahead of everything queued (not of what the kernel already has in flight)
            self._pending.extendleft(reversed(chunks))
        else:
            self._pending.extend(chunks)
        return req

    # --- the core: submit, complete, finish ----------------------------------------------

    def _pump(self) -> None:
        eng = self.engine
        submitted = False
        while self._pending and len(self._inflight) < self.queue_depth and eng.space() > 0:
            c = self._pending.popleft()
            tag = next(self._tags)
            self._inflight[tag] = c
            c.req.inflight += 1
            eng.submit(tag, c)
            self._requests += 1
            submitted = True
        if submitted:
            eng.flush()

    def _drain(self) -> None:
        """Handle every completion available now, then refill the queue."""
        while True:
            done = self.engine.reap()
            if not done:
                break
            for tag, res in done:
                if tag & _CANCEL_TAG:
                    continue
                self._complete(tag, res)
        self._pump()

    def _complete(self, tag: int, res: int) -> None:
        c = self._inflight.pop(tag)
        req = c.req
        req.inflight -= 1
        if req.cancelled or req.error is not None:
            pass  # the range is being abandoned; just account for the completion
        elif res in (-errno.EAGAIN, -errno.EINTR):
            self._pending.appendleft(c)  # transient: retry
            return
        elif res < 0:
            req.error = IOBackendError(
                f"{self.path}: read of {c.length:,} bytes at offset {c.offset:,} failed: "
                f"{os.strerror(-res)} ({errno.errorcode.get(-res, res)}, backend {self.backend})"
            )
            self._drop_pending(req)
        else:
            self._bytes += res
            if not self.direct and res:
                os.posix_fadvise(self.fd, c.offset, res, os.POSIX_FADV_DONTNEED)
            if res < c.need:
                if res == 0:
                    req.error = IOBackendError(
                        f"{self.path}: unexpected end of file at offset {c.offset:,} "
                        f"({c.need:,} more bytes expected): the file shrank while being read"
                    )
                    self._drop_pending(req)
                else:
                    self._short += 1
                    c.advance(res)
                    self._pending.appendleft(c)
                    return
            else:
                req.done_chunks += 1
        if req.inflight == 0 and (req.cancelled or req.error is not None or req.done_chunks == req.n_chunks):
            self._finish(req)

    def _finish(self, req: _Request) -> None:
        req.finished = True
        req.pins.clear()
        if req.error is None and not req.cancelled:
            self._ranges += 1
        fut = req.future
        if fut is not None and not fut.done():
            if req.error is not None:
                fut.set_exception(req.error)
            else:
                fut.set_result(None)
        if req.drained is not None and not req.drained.done():
            req.drained.set_result(None)

    def _drop_pending(self, req: _Request) -> None:
        if any(c.req is req for c in self._pending):
            self._pending = deque(c for c in self._pending if c.req is not req)

    def _cancel(self, req: _Request) -> None:
        """Drop the request's queued chunks and ask the backend to cancel its in-flight ones."""
        req.cancelled = True
        self._drop_pending(req)
        for tag, c in list(self._inflight.items()):
            if c.req is req:
                self.engine.cancel(tag)
        self.engine.flush()
        if req.inflight == 0 and not req.finished:
            self._finish(req)

    def _wait_blocking(self, timeout: float | None = None) -> None:
        """Block until the eventfd fires (some completion), then handle completions."""
        p = select.poll()
        p.register(self.efd, select.POLLIN)
        p.poll(None if timeout is None else int(timeout * 1000))
        self._on_wakeup()

    def _on_wakeup(self) -> None:
        try:
            os.eventfd_read(self.efd)  # reset first: a completion after this re-arms it
        except BlockingIOError:
            pass
        self._drain()

    # --- asyncio API ----------------------------------------------------------------------

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is loop:
            return
        if self._loop is not None:
            if self._inflight or self._pending:
                raise IOBackendError(f"{self.path}: reader is busy on another event loop")
            try:
                self._loop.remove_reader(self.efd)
            except Exception:
                pass
        loop.add_reader(self.efd, self._on_wakeup)
        self._loop = loop

    async def read_ranges(self, ranges: Iterable[tuple[int, int, object]], urgent: bool = False) -> None:
        """Read every (file_offset, length, dest) range; returns when all bytes are in place.

        dest is any writable buffer (ArenaBuffer, memoryview, numpy array, mmap) of at least
        `length` bytes; with O_DIRECT, offset and dest address must be 4096-aligned and dest
        needs room for `length` rounded up to 4096.
        On cancellation, queued chunks are dropped, in-flight ones cancelled or drained,
        and only then is CancelledError re-raised, so dest is free to reuse. urgent: queue these
        reads ahead of every read not yet submitted (compute is waiting for them).

        :raises IOBackendError: bad range (negative, past EOF, misaligned), I/O error, file shrank.
        """
        req = self._make_request(ranges, urgent)
        if req.n_chunks == 0:
            return
        loop = asyncio.get_running_loop()
        try:
            self._bind(loop)
        except BaseException:
            self._drop_pending(req)
            raise
        req.future = loop.create_future()
        self._pump()
        try:
            await req.future
        except asyncio.CancelledError:
            if not req.finished:
                self._cancelled += 1
                self._cancel(req)
                while not req.finished:  # the kernel still owns part of dest: wait for it
                    req.drained = loop.create_future()
                    try:
                        await req.drained
                    except asyncio.CancelledError:
                        continue
            raise

    async def read_into(self, dest, offset: int, length: int) -> None:
        """Read [offset, offset + length) into dest (see read_ranges for alignment rules)."""
        await self.read_ranges([(offset, length, dest)])

    def _span(self, offset: int, length: int, buf) -> tuple[int, int, memoryview]:
        if offset < 0 or length < 0:
            raise IOBackendError(f"{self.path}: invalid range: offset {offset}, length {length} (both must be >= 0)")
        if offset + length > self.size:
            raise IOBackendError(
                f"{self.path}: range [{offset:,}, {offset + length:,}) ends past EOF (file size {self.size:,})"
            )
        start, nbytes = aligned_span(offset, length)
        mv = buf.view if isinstance(buf, ArenaBuffer) else memoryview(buf).cast("B")
        if mv is None or len(mv) < nbytes:
            raise IOBackendError(
                f"{self.path}: buffer of {0 if mv is None else len(mv):,} bytes cannot hold the aligned span "
                f"{nbytes:,} bytes at {start:,} enclosing [{offset:,}, {offset + length:,}); size it with aligned_span()"
            )
        return start, min(nbytes, self.size - start), mv

    async def read(self, offset: int, length: int, buf) -> memoryview:
        """Read [offset, offset + length) — any alignment — through its aligned span into `buf`.

        Returns a view of exactly `length` bytes inside `buf` (at offset - aligned start).
        `buf` must be 4096-aligned (ArenaBuffer) and hold aligned_span(offset, length)[1] bytes.
        """
        start, n, mv = self._span(offset, length, buf)
        await self.read_ranges([(start, n, mv)])
        return mv[offset - start : offset - start + length]

    # --- blocking API ----------------------------------------------------------------------

    def read_ranges_sync(self, ranges: Iterable[tuple[int, int, object]]) -> None:
        """Blocking read_ranges for callers outside asyncio (same backend, same rules).

        Must not be called from a running event loop's thread while that loop awaits reads of
        this reader on another thread; one thread drives a reader.
        """
        req = self._make_request(ranges)
        if req.n_chunks == 0:
            return
        self._pump()
        try:
            while not req.finished:
                self._wait_blocking()
        except BaseException:  # KeyboardInterrupt: the kernel must be done with dest before we leave
            if not req.finished:
                self._cancel(req)
                while not req.finished:
                    self._wait_blocking(1.0)
            raise
        if req.error is not None:
            raise req.error

    def read_into_sync(self, dest, offset: int, length: int) -> None:
        self.read_ranges_sync([(offset, length, dest)])

    def read_sync(self, offset: int, length: int, buf) -> memoryview:
        """Blocking `read`: the exact bytes as a view inside `buf`."""
        start, n, mv = self._span(offset, length, buf)
        self.read_ranges_sync([(start, n, mv)])
        return mv[offset - start : offset - start + length]
