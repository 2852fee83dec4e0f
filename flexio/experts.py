"""Expert plan + reader + arena -> a mixture-of-experts layer's experts, when its router asks for them.

A token uses k of a layer's n experts, known only once that layer's router has run. The
experts live in equal slots of the arena (ExpertPlan): `cached_per_layer` slots of each
layer keep experts between tokens, and a pool of slots takes the reads in flight. Which
experts stay cached is decided from the routing seen so far (policy "lfu": a frequency with
exponential decay; "lru": the most recently used), never beyond a layer's slots.

Compute side (the compute thread, in a layer's FFN):
  want(layer, ids)     the distinct experts the layer uses now. Cached (or already predicted and
                       read) ones are ready at once; every other one is read now, all at once and
                       ahead of the stages' prefetch, each into a free slot. With fewer free slots
                       than misses (a long prompt may touch every expert), the rest wait for slots
                       that computed experts give back.
  next(layer)          blocks until one of them is in memory, ready ones first -> (id, its weights).
  ready(layer)         the same for every one of them in memory now: [(id, its weights), ...].
  done(layer, id)      its compute is over: the policy keeps it cached (evicting a colder one) or
                       frees its slot.
  finish(layer)        the layer is over (or failed): anything still pinned is let go.
  wants_prediction(layer)
                       whether a guess may pay: the layer has found some of its experts uncached
                       lately (a moving count per pass, at least PREDICT_UNCACHED_MIN).
  predict(layer, ids)  read a later layer's likely experts into free slots (never evicting one
                       that is cached); a wrong guess costs a read, never a wrong result. Every
                       guess is scored when its layer runs; a layer's guesses are read only while
                       at least PREDICT_MIN (3 in 4) of them are used.
A read takes a free slot, else the oldest spare one (an expert nobody uses and no layer keeps: a
finished miss before an unused guess); the spare slots are kept in order as they change, not searched.
I/O side: reads start on the event loop, through the engine's Reader: the reads a call starts go to the
loop together, in one call_soon_threadsafe (each wakes the loop thread, which then holds the GIL while it
submits: 0.2 ms per expert when they went one by one);
a finished read wakes the compute thread through a threading.Condition. A failed read fails
the layer that waits for it with the read's error; `abort()` wakes a waiting compute thread.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from .arena import Arena, ArenaBuffer
from .errors import FlexioError
from .plan import ExpertLayer, ExpertPlan
from .units import aligned_span

POLICIES = ("lfu", "lru")
DECAY = 0.95  # lfu: a use counts 1, and every pass of the layer multiplies the past by this
# Predictions pay only when they are right often enough: a wrong one reads an expert nobody uses, and when
# the disk is the bottleneck a useful read that comes with wrong ones costs their bytes too (at 50 % right,
# prediction decoded Qwen3-30B-A3B at 10 % slower than none). Every guess is scored when its layer runs (the
# share of the uncached ones among the k guessed experts that it then used, a moving average over passes,
# PREDICT_EMA), whether or not they were read; a layer's guesses are read only while that share is at least
# PREDICT_MIN. It starts there: one pass of mostly wrong guesses stops the reads, right ones resume them.
PREDICT_MIN, PREDICT_EMA = 0.75, 0.5
# A layer that finds every expert it wants cached has nothing to read early: the next layer's router product
# (0.2-0.3 ms on Qwen3-30B-A3B, 5-8 % of a token when the cache holds everything) is skipped while a layer's
# moving count of uncached experts per pass (PREDICT_EMA) is below this. A miss brings it back for a few passes.
PREDICT_UNCACHED_MIN = 0.1

FREE, LOADING, READY, FAILED = range(4)


class ExpertsAborted(FlexioError):
    """The engine is closing: a layer waiting for an expert gives up."""


@dataclass(frozen=True)
class ExpertStats:
    wanted: int  # experts layers asked for (one per layer and distinct expert of a pass)
    hits: int  # of those, found cached
    predicted_hits: int  # of those, read ahead because predicted (and so not waited for as long)
    misses: int  # read on demand
    predicted: int  # reads started by a prediction
    mispredicted: int  # of those, never used before their slot was needed again
    bytes_read: int  # expert bytes read (O_DIRECT spans), predictions included
    wait_s: float  # time the compute thread waited for expert reads

    @property
    def hit_rate(self) -> float:
        return self.hits / self.wanted if self.wanted else 0.0

    @property
    def prediction_hit_rate(self) -> float:
        """Predicted reads that the layer then used."""
        return self.predicted_hits / self.predicted if self.predicted else 0.0


class _Slot:
    __slots__ = ("buf", "key", "state", "pins", "cached", "predicted", "error", "parts", "task")

    def __init__(self, buf: ArenaBuffer):
        self.buf = buf
        self.key: tuple[int, int] | None = None  # (layer, expert)
        self.state = FREE
        self.pins = 0  # layers computing with it now
        self.cached = False  # counts toward its layer's slots
        self.predicted = False  # read by a prediction and not yet used
        self.error: BaseException | None = None
        self.parts: list[np.ndarray] | None = None  # per tensor: uint8 (rows, row_bytes) views
        self.task: asyncio.Task | None = None


class ExpertCache:
    """The experts of every layer through `plan.experts` slots; see the module docstring."""

    def __init__(self, plan: ExpertPlan, reader, arena: Arena, policy: str = "lfu"):
        if policy not in POLICIES:
            raise FlexioError(f"expert cache policy {policy!r} is not one of {', '.join(POLICIES)}")
        self.plan, self.reader, self.policy = plan, reader, policy
        self.layers = {L.layer: L for L in plan.layers}
        n = len(plan.layers) * plan.cached_per_layer + plan.pool
        self.slots = [_Slot(b) for b in arena.carve(plan.slot_bytes, n, tag="expert")]
        self.index: dict[tuple[int, int], int] = {}
        self.cached: dict[int, list[int]] = {L.layer: [] for L in plan.layers}  # layer -> its cached slots
        self.free: deque[int] = deque(range(n))
        # slots holding an expert nobody uses and no layer keeps (a finished miss, an unused prediction),
        # oldest first: a read takes one of these when no slot is free (the first dict before the second)
        self.spare: dict[int, None] = {}
        self.spare_predicted: dict[int, None] = {}
        self.predicting: set[int] = set()  # slots being read for a prediction nobody has wanted yet
        self.score: dict[int, np.ndarray] = {L.layer: np.zeros(plan.n_expert) for L in plan.layers}
        self.clock = 0  # lru: passes of any layer so far
        self.cond = threading.Condition()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.aborted = False
        self.pending: dict[int, deque[int]] = {}  # layer -> wanted experts still without a slot
        self.out: dict[int, deque[int]] = {}  # layer -> wanted experts not yet handed out by next()
        self.pinned: dict[int, set[int]] = {}  # layer -> experts it pinned
        self.predicted_for: dict[int, set[int]] = {L.layer: set() for L in plan.layers}  # this pass's guesses
        self.precision = {L.layer: PREDICT_MIN for L in plan.layers}  # moving share of a layer's guesses that were used
        self.uncached = {L.layer: float(plan.n_used) for L in plan.layers}  # moving count of uncached experts per pass
        self._wanted = self._hits = self._pred_hits = self._misses = self._pred = self._mispred = 0
        self._bytes = 0
        self._wait = 0.0
        self._starting: list[tuple] = []  # reads _load set up, for _send to hand to the event loop

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop the reads run on (the engine's)."""
        self.loop = loop

    # --- compute side --------------------------------------------------------------------------

    def want(self, layer: int, ids) -> None:
        with self.cond:
            self.clock += 1
            if self.policy == "lfu":
                self.score[layer] *= DECAY
            self.out[layer] = deque()
            self.pinned[layer] = set()
            pending = self.pending[layer] = deque()
            ready, waiting = [], []
            ids = list(dict.fromkeys(int(i) for i in ids))
            uncached = 0
            guessed = self.predicted_for[layer]
            if guessed:  # how good this pass's guess was, read or not
                used = len(guessed.intersection(ids)) / len(guessed)
                self.precision[layer] += PREDICT_EMA * (used - self.precision[layer])
                self.predicted_for[layer] = set()
            for e in ids:
                self._wanted += 1
                self._touch(layer, e)
                s = self.index.get((layer, e))
                if s is not None:
                    slot = self.slots[s]
                    slot.pins += 1
                    self.pinned[layer].add(e)
                    if slot.predicted:
                        slot.predicted = False
                        self.predicting.discard(s)
                        self._pred_hits += 1
                        uncached += 1
                    elif slot.state == READY:
                        self._hits += 1
                        uncached += not slot.cached
                    else:
                        uncached += 1
                    self._park(s)
                    (ready if slot.state == READY else waiting).append(e)
                else:
                    self._misses += 1
                    uncached += 1
                    pending.append(e)
                    waiting.append(e)
            self.uncached[layer] += PREDICT_EMA * (uncached - self.uncached[layer])
            self.out[layer].extend(ready + waiting)  # cached ones first
            self._start_pending(layer)
            self._send()

    def next(self, layer: int) -> tuple[int, list[np.ndarray]]:
        """The next wanted expert in memory: (id, one uint8 (rows, row_bytes) view per tensor)."""
        return self._take(layer, everything=False)[0]

    def ready(self, layer: int) -> list[tuple[int, list[np.ndarray]]]:
        """Every wanted expert in memory and not yet handed out, as next() gives them (at least one:
        blocks until then), so that the layer computes them in one call."""
        return self._take(layer, everything=True)

    def _take(self, layer: int, everything: bool) -> list[tuple[int, list[np.ndarray]]]:
        with self.cond:
            out = self.out[layer]
            if not out:
                raise FlexioError(f"layer {layer}: every wanted expert was already handed out")
            t0 = time.perf_counter()
            while True:
                if self.aborted:
                    raise ExpertsAborted("expert reads aborted: the engine is closing")
                got = []
                for e in out:
                    s = self.index.get((layer, e))
                    if s is None:
                        continue
                    slot = self.slots[s]
                    if slot.state == FAILED:
                        raise slot.error
                    if slot.state == READY:
                        got.append((e, slot.parts))
                        if not everything:
                            break
                if got:
                    for e, _ in got:
                        out.remove(e)
                    self._wait += time.perf_counter() - t0
                    return got
                self.cond.wait()

    def done(self, layer: int, e: int) -> None:
        """Compute with expert e of `layer` is over: keep it cached, or give its slot back."""
        with self.cond:
            s = self.index[(layer, e)]
            slot = self.slots[s]
            slot.pins -= 1
            self.pinned[layer].discard(e)
            if slot.pins == 0:
                self._settle(layer, s)
            self._park(s)
            self._start_pending(layer)
            self._send()

    def finish(self, layer: int) -> None:
        """The layer is over (normally, or failed midway): unpin what it still holds, drop what it still waits for."""
        with self.cond:
            for e in list(self.pinned.get(layer, ())):
                s = self.index.get((layer, e))
                if s is not None:
                    slot = self.slots[s]
                    slot.pins -= 1
                    if slot.pins == 0 and slot.state != LOADING:
                        self._settle(layer, s)
                    self._park(s)
            self.pinned.pop(layer, None)
            self.out.pop(layer, None)
            self.pending.pop(layer, None)

    def wants_prediction(self, layer: int) -> bool:
        """Whether guessing `layer`'s experts early may pay: it has found some of its experts uncached lately.
        (A layer whose guesses go unused is still asked, to score them; predict() then reads nothing.)"""
        return layer in self.layers and self.uncached[layer] >= PREDICT_UNCACHED_MIN

    def predict(self, layer: int, ids) -> None:
        """Start reading experts `layer` will probably want (free slots only; at most k at a time)."""
        if layer not in self.layers:
            return
        with self.cond:
            ids = list(dict.fromkeys(int(i) for i in ids))
            # the guesses a read would bring (a cached guess costs nothing, right or wrong): scored by want()
            self.predicted_for[layer] = {e for e in ids[: self.plan.n_used] if (layer, e) not in self.index}
            if self.precision[layer] < PREDICT_MIN:
                return  # this layer's guesses have been mostly wrong: read only what it asks for
            budget = self.plan.n_used - len(self.predicting)  # guesses in flight
            for e in ids:
                if budget <= 0:
                    break
                if (layer, e) in self.index:
                    continue
                s = self._take_slot()
                if s is None:
                    break
                self._load(s, layer, e, predicted=True)
                budget -= 1
            self._send()

    # --- slots and policy (self.cond held) -------------------------------------------------------

    def _touch(self, layer: int, e: int) -> None:
        if self.policy == "lfu":
            self.score[layer][e] += 1.0
        else:
            self.score[layer][e] = self.clock

    def _take_slot(self) -> int | None:
        """A slot to read into: a free one, else the oldest holding an expert nobody uses: a finished miss that
        was not cached, else an unused prediction (which may still be about to be used: the last resort), else None."""
        if self.free:
            return self.free.popleft()
        for spare in (self.spare, self.spare_predicted):
            if spare:
                s = next(iter(spare))
                self._forget(s)
                return s
        return None

    def _park(self, s: int) -> None:
        """Put slot s among the spare ones if it now holds an expert nobody uses and no layer keeps, else take it
        out (its state, pins or keeping changed)."""
        self.spare.pop(s, None)
        self.spare_predicted.pop(s, None)
        slot = self.slots[s]
        if slot.key is not None and slot.pins == 0 and not slot.cached and slot.state in (READY, FAILED):
            (self.spare_predicted if slot.predicted else self.spare)[s] = None

    def _forget(self, s: int) -> None:
        slot = self.slots[s]
        if slot.predicted:
            self._mispred += 1
        self.spare.pop(s, None)
        self.spare_predicted.pop(s, None)
        self.predicting.discard(s)
        self.index.pop(slot.key, None)
        slot.key, slot.state, slot.predicted, slot.error, slot.parts = None, FREE, False, None, None

    def _settle(self, layer: int, s: int) -> None:
        """An expert's last user is done: cache it if the layer has room or it is hotter than its coldest."""
        slot = self.slots[s]
        if slot.cached or self.plan.cached_per_layer == 0 or slot.state != READY:
            if not slot.cached and slot.state != READY:
                self._forget(s)
                self.free.append(s)
            return
        mine = self.cached[layer]
        if len(mine) < self.plan.cached_per_layer:
            slot.cached = True
            mine.append(s)
            return
        score = self.score[layer]
        victims = [v for v in mine if self.slots[v].pins == 0]
        if victims:
            v = min(victims, key=lambda v: score[self.slots[v].key[1]])
            if score[slot.key[1]] > score[self.slots[v].key[1]]:
                mine.remove(v)
                self.slots[v].cached = False
                self._forget(v)
                self.free.append(v)
                slot.cached = True
                mine.append(s)
                return
        # not kept: its slot stays readable (a later token may still find it) until a read needs it

    def _start_pending(self, layer: int) -> None:
        pending = self.pending.get(layer)
        while pending:
            s = self._take_slot()
            if s is None:
                return  # the rest wait for slots that done() gives back
            e = pending.popleft()
            self._load(s, layer, e, predicted=False)
            self.slots[s].pins += 1
            self.pinned[layer].add(e)

    def _load(self, s: int, layer: int, e: int, predicted: bool) -> None:
        slot = self.slots[s]
        slot.key, slot.state, slot.predicted, slot.error = (layer, e), LOADING, predicted, None
        self.index[(layer, e)] = s
        if predicted:
            self._pred += 1
            self.predicting.add(s)
        L = self.layers[layer]
        reads, parts, pos = [], [], 0
        for t, (off, n) in zip(L.tensors, L.ranges(e)):
            start, nbytes = aligned_span(off, n)
            reads.append((start, min(nbytes, self.reader.size - start), pos))
            rows = t.shape[1]
            parts.append(np.frombuffer(slot.buf.view, np.uint8, count=n, offset=pos + off - start).reshape(rows, n // rows))
            pos += nbytes
        slot.parts = parts
        self._bytes += sum(n for _, n, _ in reads)
        self._starting.append((s, (layer, e), reads, not predicted))

    def _send(self) -> None:
        if self._starting:
            self.loop.call_soon_threadsafe(self._start_reads, self._starting)
            self._starting = []

    # --- I/O side (event loop) ------------------------------------------------------------------

    def _start_reads(self, starting: list[tuple]) -> None:
        for s, key, reads, urgent in starting:
            slot = self.slots[s]
            if slot.key != key or self.aborted:
                continue
            view = slot.buf.view
            task = asyncio.ensure_future(self.reader.read_ranges(
                [(off, n, view[pos: pos + n]) for off, n, pos in reads], urgent=urgent))
            slot.task = task
            task.add_done_callback(lambda t, s=s, key=key: self._read_done(s, key, t))

    def _read_done(self, s: int, key: tuple[int, int], task: asyncio.Task) -> None:
        with self.cond:
            slot = self.slots[s]
            slot.task = None
            if slot.key == key:
                self.predicting.discard(s)
                if task.cancelled():
                    slot.state, slot.error = FAILED, ExpertsAborted("expert read cancelled: the engine is closing")
                elif task.exception() is not None:
                    err = task.exception()
                    slot.state = FAILED
                    slot.error = (err if isinstance(err, FlexioError) else FlexioError(
                        f"reading expert {key[1]} of layer {key[0]} failed: {err}")).with_traceback(None)
                else:
                    slot.state = READY
                self._park(s)  # a guess (or a miss whose layer let go) that nobody uses yet
            self.cond.notify_all()

    async def drain(self) -> None:
        """Cancel every read in flight and wait for them (the kernel must be done with the slots)."""
        tasks = [x.task for x in self.slots if x.task is not None]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for t in tasks:  # a failed read's traceback holds its slot's views
            if not t.cancelled() and t.exception() is not None:
                t.exception().with_traceback(None)

    def abort(self) -> None:
        with self.cond:
            self.aborted = True
            self.cond.notify_all()

    # --- statistics and lifetime ----------------------------------------------------------------

    def statistics(self) -> ExpertStats:
        return ExpertStats(self._wanted, self._hits, self._pred_hits, self._misses, self._pred, self._mispred,
                           self._bytes, self._wait)

    def cached_experts(self, layer: int) -> list[int]:
        return sorted(self.slots[s].key[1] for s in self.cached[layer])

    def close(self) -> None:
        for slot in self.slots:
            slot.parts = None
            slot.buf.release()
        self.slots = []
        self.index.clear()
