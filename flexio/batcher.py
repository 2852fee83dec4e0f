"""Concurrent requests -> the rows of each forward pass: continuous batching over a fixed set of sequence slots.

One weight pass costs the same whether it carries 1 row or 8 when decode is I/O-bound
(the weights are read once per pass), so every running sequence rides every pass:

  slots      `parallel` KV caches, allocated once; a request holds one from admission to its end.
  admission  requests wait (first come, first served) until a slot is free; at most `max_waiting`
             wait, beyond that `submit` refuses (the server answers 429/503).
  a pass     every decoding sequence contributes its last token (one row); sequences still reading
             their prompt contribute the next chunk of it, in admission order, up to `prefill_rows`
             rows per pass together, so a long prompt does not stall the others for its whole length.
             A chunk is never a single token unless the whole prompt is one token: the attention of a
             single query is computed in another float order (llama.cpp's vec_dot_f16 vs its tile
             kernel), and a request must give the same tokens batched as alone.
  sampling   a sequence whose pass ended its prompt, or that decoded, gets its logits row and its own
             sampler picks the next token; end-of-generation tokens (unless ignore_eos), max_tokens and
             cancellation end it, and its slot is free for the next pass.

Pure bookkeeping: no threads, no I/O, no model. The engine runs the passes and calls `plan()` before
and `finish_pass()` after each one.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import numpy as np

from .errors import FlexioError
from .sampling import Sampler

END = None  # put on a sequence's queue when it ends (its stop_reason says why)


class QueueFullError(FlexioError):
    """Every slot is busy and `max_waiting` requests already wait."""


@dataclass
class Sequence:
    """One request from admission to its end: prompt, slot, sampler, stop rule, timings, output queue."""

    prompt: list[int]
    max_tokens: int
    sampler: Sampler
    stop_ids: frozenset[int]
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)  # generated ids, then END
    slot: int | None = None  # index of the KV cache it holds
    fed: int = 0  # prompt tokens already in its KV cache
    last: int | None = None  # the token generated last (the next pass's input)
    generated: int = 0
    stop_reason: str | None = None  # "eos", "length", "cancelled", "error" once ended
    error: BaseException | None = None
    cancelled: bool = False
    t_submit: float = field(default_factory=time.perf_counter)
    t_admit: float | None = None  # it got a slot
    t_first: float | None = None  # the prompt's last pass ended (the first token is sampled then)
    t_end: float | None = None
    io_wait_s: float = 0.0  # of its decode passes, time the compute thread waited on reads
    bytes_read: int = 0  # weight bytes read during its decode passes

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.prompt)

    @property
    def ended(self) -> bool:
        return self.stop_reason is not None


@dataclass(frozen=True)
class Row:
    """A sequence's part of one pass: `ids` at positions pos0.. of its slot; `sample`: it gets logits."""

    seq: Sequence
    ids: list[int]
    pos0: int
    sample: bool


class Batcher:
    def __init__(self, parallel: int, max_waiting: int, prefill_rows: int = 256):
        if prefill_rows < 2:
            raise ValueError("prefill_rows must be >= 2 (a chunk of one token is computed differently)")
        self.parallel = parallel
        self.max_waiting = max_waiting
        self.prefill_rows = prefill_rows
        self.free = deque(range(parallel))
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order
        self.passes = 0
        self.rows_total = 0
        self.seqs_total = 0  # sequences carried by passes, summed (batch size x passes)
        self.ended_total = 0  # requests ended, any reason (cancelled included)
        self.prompt_tokens_total = 0  # prompt tokens read into KV caches
        self.generated_total = 0

    # --- requests ---------------------------------------------------------------------

    def submit(self, seq: Sequence) -> None:
        """Queue a request. :raises QueueFullError: all slots busy and max_waiting requests waiting."""
        if len(self.waiting) >= len(self.free) + self.max_waiting:  # (slots are taken at the next pass)
            raise QueueFullError(f"all {self.parallel} sequence slots are busy and {self.max_waiting} requests "
                                 f"already wait (the limit): try again later")
        self.waiting.append(seq)

    def cancel(self, seq: Sequence) -> None:
        """The request's consumer went away: it ends before the next pass (a waiting one at once)."""
        seq.cancelled = True
        if seq in self.waiting:
            self.waiting.remove(seq)
            self._end(seq, "cancelled")

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting

    # --- passes -----------------------------------------------------------------------

    def plan(self) -> list[Row]:
        """Admit what fits, drop cancelled sequences, and lay out the next pass's rows."""
        for seq in [s for s in self.running if s.cancelled]:
            self._end(seq, "cancelled")
        while self.free and self.waiting:
            seq = self.waiting.popleft()
            seq.slot = self.free.popleft()
            seq.t_admit = time.perf_counter()
            self.running.append(seq)
        rows: list[Row] = []
        budget = self.prefill_rows
        for seq in self.running:
            if not seq.prefilling:
                rows.append(Row(seq, [seq.last], len(seq.prompt) + seq.generated - 1, True))
                continue
            left = len(seq.prompt) - seq.fed
            if budget < min(left, 2):
                continue  # its turn comes in a later pass
            n = min(left, budget)
            if left - n == 1:  # never leave a one-token chunk behind
                n -= 1
            rows.append(Row(seq, seq.prompt[seq.fed: seq.fed + n], seq.fed, seq.fed + n == len(seq.prompt)))
            budget -= n
        return rows

    def finish_pass(self, rows: Seq[Row], logits: Seq[np.ndarray | None], io_wait_s: float, bytes_read: int) -> None:
        """Apply one pass's results: feed prompts, sample, end what stops. `logits[i]` is row i's last
        position's logits (None for rows that do not sample)."""
        now = time.perf_counter()
        self.passes += 1
        self.rows_total += sum(len(r.ids) for r in rows)
        self.seqs_total += len(rows)
        for row, lg in zip(rows, logits):
            seq = row.seq
            if seq.ended:
                continue
            decoding = not seq.prefilling
            if decoding:
                seq.io_wait_s += io_wait_s
                seq.bytes_read += bytes_read
            else:
                seq.fed += len(row.ids)
            if seq.cancelled:
                self._end(seq, "cancelled")
                continue
            if not row.sample:
                continue
            if seq.t_first is None:
                seq.t_first = now
            if seq.generated >= seq.max_tokens:  # max_tokens 0: the prompt is read, nothing generated
                self._end(seq, "length")
                continue
            try:
                tok = seq.sampler(lg)
            except FlexioError as e:  # non-finite logits (corrupt weights): this sequence ends with the error
                seq.error = e.with_traceback(None)
                self._end(seq, "error")
                continue
            if tok in seq.stop_ids:
                self._end(seq, "eos")
                continue
            seq.generated += 1
            seq.last = tok
            seq.queue.put_nowait(tok)
            if seq.generated >= seq.max_tokens:
                self._end(seq, "length")

    def fail(self, rows: Seq[Row], error: BaseException) -> None:
        """A pass failed: every sequence it carried ends with the error."""
        for row in rows:
            if not row.seq.ended:
                row.seq.error = error
                self._end(row.seq, "error")

    def close(self, error: BaseException) -> None:
        """The engine is closing: everything running or waiting ends with `error`."""
        for seq in list(self.running) + list(self.waiting):
            seq.error = error
            self._end(seq, "error")

    def _end(self, seq: Sequence, reason: str) -> None:
        if seq.ended:
            return
        seq.stop_reason = reason
        seq.t_end = time.perf_counter()
        self.ended_total += 1
        self.prompt_tokens_total += seq.fed
        self.generated_total += seq.generated
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq.slot is not None:
            self.free.append(seq.slot)
        seq.queue.put_nowait(END)
