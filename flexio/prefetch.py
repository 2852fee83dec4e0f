"""Plan + reader + arena -> per-stage weight views, streamed `window` stages ahead of compute.

How the two sides meet
  The weights of one pass are a cyclic sequence of stages (layer 0 .. layer L-1,
  head chunks); passes repeat it, so stage `seq % n_stages` is the seq-th stage
  the compute thread will need, across tokens. Two counters order everything:
    loaded    stages whose bytes are in a slot (advanced by the I/O pump),
    consumed  stages whose compute has finished (advanced by the compute thread).
  The compute thread takes stages in order with `acquire()` / `release()` (the stream
  keeps the cursor); the pump (an asyncio task on the event loop) issues stage `seq` into slot
  `seq % window` once that slot's previous occupant (stage seq - window) is
  consumed, every free slot at once; the compute thread blocks on a threading.Condition until
  `loaded > seq`. Nobody sleeps or polls. With window 1 (the `sync` modes) a
  stage is read only once the previous one is consumed: no overlap.

  Resident rows (the plan's locked share) are read once at open into an arena
  buffer and never move, so a stage's weights are resident views plus views into
  its slot: `stage_parts(stage, slot)` describes them, and the engine builds its
  weight objects once per (stage, slot).

Failure and cancellation
  An I/O error is stored and wakes the compute thread, which raises it (no hang).
  `abort()` (engine closing) wakes a blocked compute thread with StreamAborted;
  the pump's reads are cancelled by the reader. A cancelled generation needs
  neither: its pass runs to the end on the compute thread, so the counters stay
  in step with the next pass.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from dataclasses import dataclass

import numpy as np

from .arena import Arena, ArenaBuffer
from .errors import FlexioError
from .gguf import GGUFFile, TensorInfo
from .plan import Plan, StagePlan
from .units import aligned_span


class StreamAborted(FlexioError):
    """The pass was abandoned (generation cancelled or engine closing)."""


@dataclass(frozen=True)
class StreamStats:
    passes: int
    stages_loaded: int
    bytes_read: int
    compute_wait_s: float  # time the compute thread spent blocked on I/O


def _read_exact(fd: int, view: memoryview, offset: int) -> None:
    """pread until `view` is full (buffered fd; used once at open for resident rows)."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise FlexioError(f"unexpected end of file at byte {offset + done:,} while loading resident weights")
        done += n


def stage_reads(s: StagePlan) -> list[tuple[int, int, int, int]]:
    """The reads that fill a slot with stage `s`'s streamed bytes: [(span file offset, span
    bytes, slot offset of the span, segment offset in the span)], spans 4096-aligned."""
    out, pos = [], 0
    for _tp, off, n in s.segments:
        start, nbytes = aligned_span(off, n)
        out.append((start, nbytes, pos, off - start))
        pos += nbytes
    return out


class StageStream:
    """The weights of every stage of a plan, resident or streamed through `window` slots."""

    def __init__(self, gf: GGUFFile, plan: Plan, reader, arena: Arena):
        self.gf, self.plan, self.reader, self.arena = gf, plan, reader, arena
        self.window = plan.window
        self.n_stages = len(plan.stages)
        self._bufs: list[ArenaBuffer] = []
        self._load_resident()
        # (stage, slot) -> weights view, and each stage's reads: (file offset, nbytes, slot offset)
        self._reads = [stage_reads(s) for s in plan.stages]
        # no slots (and no pump) when no stage streams a byte, e.g. a mixture of experts whose budget holds
        # every dense tensor (its experts come through the expert cache): a stage is then always there, and
        # handing each one to the event loop and back would cost a thread switch per layer for nothing
        streams = plan.streams and any(self._reads)
        self.slots = arena.carve(max(plan.slot_bytes, 4096), self.window, tag="slot") if streams else []
        self._bufs += self.slots
        self._cond = threading.Condition()
        self.loaded = 0
        self.consumed = 0
        self._error: BaseException | None = None
        self._aborted = False
        self._progress: asyncio.Event | None = None  # wakes the pump: a slot freed or a read finished
        self._loop: asyncio.AbstractEventLoop | None = None
        self.bytes_read = 0
        self.wait_s = 0.0
        self.passes = 0

    # --- resident part -------------------------------------------------------------

    def _load_resident(self) -> None:
        p, gf = self.plan, self.gf
        self._resident: dict[tuple[str, int], np.ndarray] = {}  # (name, row0) -> uint8 (rows, row_bytes)
        self._vectors: dict[str, np.ndarray] = {}
        # mixture of experts held whole (memory mode) or mapped (mmap mode): layer -> a uint8 (rows, row_bytes)
        # array per expert tensor; with an expert cache (flexio/experts.py) the experts are not the stream's
        self.expert_tensors: dict[int, list[np.ndarray]] = {}
        ex = p.experts if p.experts is not None and p.experts.where != "cache" else None
        if p.mode.page_cache:  # llama.cpp's way: views of a shared read-only mapping, the page cache does the rest
            m = np.memmap(gf.path, np.uint8, "r")
            for t in p.vectors:
                self._vectors[t.name] = m[t.offset : t.offset + t.nbytes]
            for s in p.stages:
                for tp in s.tensors:
                    a = m[tp.info.offset : tp.info.offset + tp.resident_bytes]
                    self._resident[(tp.info.name, tp.row0)] = a.reshape(tp.resident_rows, tp.info.row_bytes)
            emb = p.embedding
            self._emb = m[emb.offset : emb.offset + emb.nbytes].reshape(emb.n_rows, emb.row_bytes)
            for L in ex.layers if ex else ():
                self.expert_tensors[L.layer] = [m[t.offset : t.offset + t.nbytes].reshape(t.n_rows, t.row_bytes)
                                                for t in L.tensors]
            return
        fd = os.open(gf.path, os.O_RDONLY)
        try:
            for t in p.vectors:
                buf = self._alloc(t.nbytes, f"vec:{t.name}")
                _read_exact(fd, buf.view, t.offset)
                self._vectors[t.name] = np.frombuffer(buf.view, np.uint8)
            for s in p.stages:
                for tp in s.tensors:
                    if tp.resident_rows:
                        buf = self._alloc(tp.resident_bytes, f"res:{tp.info.name}")
                        _read_exact(fd, buf.view, tp.info.offset)
                        self._resident[(tp.info.name, tp.row0)] = np.frombuffer(buf.view, np.uint8).reshape(
                            tp.resident_rows, tp.info.row_bytes)
            for L in ex.layers if ex else ():
                arrays = []
                for t in L.tensors:
                    buf = self._alloc(t.nbytes, f"res:{t.name}")
                    _read_exact(fd, buf.view, t.offset)
                    arrays.append(np.frombuffer(buf.view, np.uint8).reshape(t.n_rows, t.row_bytes))
                self.expert_tensors[L.layer] = arrays
            emb = p.embedding
            if p.embedding_resident and not p.tied:
                buf = self._alloc(emb.nbytes, "res:token_embd")
                _read_exact(fd, buf.view, emb.offset)
                self._emb = np.frombuffer(buf.view, np.uint8).reshape(emb.n_rows, emb.row_bytes)
            else:
                self._emb = None
            try:  # the resident bytes now live in the arena: do not keep them twice in the page cache
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass
        finally:
            os.close(fd)

    def _alloc(self, n: int, tag: str) -> ArenaBuffer:
        b = self.arena.alloc(n, align=64, tag=tag)
        self._bufs.append(b)
        return b

    # --- per-stage layout --------------------------------------------------------------

    def _parts(self, tp, slot: ArenaBuffer | None, seg_pos: int | None) -> list[tuple[int, np.ndarray]]:
        """Row ranges of one tensor (rows numbered within the whole tensor) as uint8 views."""
        parts = []
        if tp.resident_rows:
            parts.append((tp.row0, self._resident[(tp.info.name, tp.row0)]))
        if tp.streamed_rows:
            n = tp.streamed_rows * tp.info.row_bytes
            raw = np.frombuffer(slot.view, np.uint8, count=n, offset=seg_pos)
            parts.append((tp.row0 + tp.resident_rows, raw.reshape(tp.streamed_rows, tp.info.row_bytes)))
        return parts

    def stage_parts(self, stage: int, slot: int) -> list[tuple[TensorInfo, list[tuple[int, np.ndarray]]]]:
        """Stage `stage` as it is laid out when loaded into slot `slot`: [(tensor, row-range parts)].

        Views are stable for the stream's lifetime, so a caller builds its weight
        objects once per (stage, slot) and reuses them every pass.
        """
        s = self.plan.stages[stage]
        buf = self.slots[slot] if self.slots else None
        reads = iter(self._reads[stage])
        out = []
        for tp in s.tensors:
            seg_pos = None
            if tp.streamed_rows:
                _start, _nb, slot_off, inner = next(reads)
                seg_pos = slot_off + inner
            out.append((tp.info, self._parts(tp, buf, seg_pos)))
        return out

    @property
    def n_slots(self) -> int:
        return max(1, len(self.slots))

    def vector(self, name: str) -> np.ndarray:
        """Raw bytes (uint8) of a resident 1-D tensor (norm or bias)."""
        return self._vectors[name]

    def embed_rows(self, ids: np.ndarray, fd: int) -> tuple[np.ndarray, np.ndarray]:
        """token_embd rows for `ids` -> (raw uint8 rows, row ids into them)."""
        emb = self.plan.embedding
        if self._emb is not None:
            return self._emb, ids
        out = np.empty((len(ids), emb.row_bytes), np.uint8)
        for i, t in enumerate(ids):
            _read_exact(fd, memoryview(out[i]), emb.offset + int(t) * emb.row_bytes)
        return out, np.arange(len(ids), dtype=np.int64)

    # --- compute side (compute thread) --------------------------------------------------

    def acquire(self) -> tuple[int, int]:
        """Block until the next stage the compute thread needs is loaded; returns (stage, slot) for
        `stage_parts`. Stages come in pass order, pass after pass (the stream's cursor, `consumed`)."""
        seq = self.consumed
        if self.slots:  # (nothing streams: every stage is always there)
            with self._cond:
                if self.loaded <= seq:
                    t0 = time.perf_counter()
                    self._cond.wait_for(lambda: self.loaded > seq or self._error is not None or self._aborted)
                    self.wait_s += time.perf_counter() - t0
                if self._error is not None:
                    raise self._error
                if self._aborted:
                    raise StreamAborted("weight stream aborted")
        return seq % self.n_stages, (seq % self.window if self.slots else 0)

    def release(self) -> None:
        """Compute on the stage `acquire` returned is done: its slot may be refilled."""
        with self._cond:
            self.consumed += 1
            if self.consumed % self.n_stages == 0:
                self.passes += 1
        if self._loop is not None and self._progress is not None:
            self._loop.call_soon_threadsafe(self._progress.set)

    # --- I/O side (event loop) -----------------------------------------------------------

    async def pump(self) -> None:
        """Keep the window's slots filled ahead of compute, forever (until cancelled).

        Stage seq goes into slot seq % window, which is free once stage seq - window
        is consumed. Every free slot is read at once (the reader queues their chunks in
        stage order), so the disk's queue does not drain at each stage boundary; `loaded`
        still advances strictly in order. With window 1 a stage is read only after the
        previous one's compute finished: the `sync` baseline, no overlap.
        """
        self._loop = asyncio.get_running_loop()
        progress = self._progress = asyncio.Event()
        seq = self.loaded
        inflight: list[tuple[int, asyncio.Task | None]] = []  # (seq, its read) in seq order
        try:
            while True:
                progress.clear()
                while self.consumed >= seq - self.window + 1:  # slot seq % window is free
                    task = self._read_stage(seq)
                    if task is not None:
                        task.add_done_callback(lambda _t: progress.set())
                    inflight.append((seq, task))
                    seq += 1
                while inflight and (inflight[0][1] is None or inflight[0][1].done()):  # loaded, in order
                    done_seq, task = inflight.pop(0)
                    if task is not None:
                        err = task.exception()
                        if err is not None:  # hand it to the compute thread, which raises it
                            with self._cond:  # (without its traceback, which pins this frame's slot views)
                                self._error = (err if isinstance(err, FlexioError) else FlexioError(
                                    f"reading stage {self.plan.stages[done_seq % self.n_stages].name} failed: {err}"
                                )).with_traceback(None)
                                self._cond.notify_all()
                            return
                        self.bytes_read += sum(nb for _, nb, _, _ in self._reads[done_seq % self.n_stages])
                    with self._cond:
                        self.loaded = done_seq + 1
                        self._cond.notify_all()
                await progress.wait()  # cleared before the checks above: nothing since is missed
        finally:  # cancelled (or failed): the kernel must be done with every slot before we leave
            tasks = [t for _, t in inflight if t is not None]
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            for t in tasks:  # a failed read's traceback holds its slot's views: drop it (the error is handed on)
                if not t.cancelled() and t.exception() is not None:
                    t.exception().with_traceback(None)

    def _read_stage(self, seq: int) -> asyncio.Task | None:
        """Start reading stage `seq` into its slot; None when the stage streams nothing."""
        reads = self._reads[seq % self.n_stages]
        if not reads:
            return None
        slot = self.slots[seq % self.window]
        size = self.reader.size  # the last tensor's span may end past EOF: O_DIRECT reads whole blocks up to EOF
        return asyncio.ensure_future(self.reader.read_ranges(
            [(off, min(nb, size - off), slot.view[pos : pos + nb]) for off, nb, pos, _ in reads]))

    def abort(self) -> None:
        with self._cond:
            self._aborted = True
            self._cond.notify_all()

    @property
    def error(self) -> BaseException | None:
        """The I/O error that stopped the stream, if one did."""
        return self._error

    def statistics(self) -> StreamStats:
        return StreamStats(self.passes, self.loaded, self.bytes_read, self.wait_s)

    def close(self) -> None:
        """Drop every view of arena memory, then give the buffers back (the arena can then unmap)."""
        self._resident.clear()
        self._vectors.clear()
        self.expert_tensors.clear()
        self._emb = None
        for b in self._bufs:
            b.release()
        self._bufs = []
