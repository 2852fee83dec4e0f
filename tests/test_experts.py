"""The expert cache on its own: experts arrive with the file's bytes, cached ones first; the policy keeps the
hot ones within each layer's slots; predictions are read ahead and counted; a failed read fails the layer that
waits for it; finishing a layer (or failing midway) leaves nothing pinned; abort wakes a waiting layer."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import numpy as np
import pytest

from flexio.arena import Arena
from flexio.errors import FlexioError
from flexio.experts import LOADING, ExpertCache, ExpertsAborted
from flexio.gguf import TensorInfo
from flexio.plan import ExpertLayer, ExpertPlan
from flexio.reader import Reader
from flexio.units import aligned_span

N_EXPERT, ROWS, ROW_BYTES, LAYERS, K = 8, 16, 288, 3, 2  # Q4_0 rows of 512 weights


@pytest.fixture
def model(tmp_path):
    """A file holding, per layer, three expert tensors (gate, up, down) of N_EXPERT experts x ROWS rows, at
    unaligned offsets (as in a GGUF), random bytes: the reader must put each expert's own bytes in its slot."""
    rng = np.random.default_rng(0)
    path = tmp_path / "experts.bin"
    data = rng.integers(0, 256, 64 + LAYERS * 3 * N_EXPERT * ROWS * ROW_BYTES + 4096, dtype=np.uint8)
    data.tofile(path)
    layers, off = [], 96  # 32-byte aligned, not 4096
    for i in range(LAYERS):
        ts = []
        for role in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
            n = N_EXPERT * ROWS * ROW_BYTES
            ts.append(TensorInfo(f"blk.{i}.{role}.weight", 2, (512, ROWS, N_EXPERT), off, n))
            off += n
        layers.append(ExpertLayer(i, tuple(ts), N_EXPERT))
    return str(path), data, tuple(layers)


def make(model, cached=2, pool=4, policy="lfu"):
    path, data, layers = model
    slot = max(L.span_bytes(e) for L in layers for e in range(N_EXPERT))
    plan = ExpertPlan(layers, N_EXPERT, K, "cache", cached, pool, True, slot)
    arena = Arena(plan.memory_bytes + 4096, name="experts", lock=False)
    reader = Reader(path).open()
    return ExpertCache(plan, reader, arena, policy), reader, arena, data


def expert_bytes(data, L: ExpertLayer, e: int) -> list[bytes]:
    return [data[off: off + n].tobytes() for off, n in L.ranges(e)]


def run_layers(cache, script):
    """Run `script(cache)` on a compute thread while this thread's event loop does the reads."""
    out, err = [], []

    def compute():
        try:
            out.append(script(cache))
        except BaseException as e:  # surfaced to the test
            err.append(e)

    async def main():
        cache.bind(asyncio.get_running_loop())
        t = threading.Thread(target=compute)
        t.start()
        while t.is_alive():
            await asyncio.sleep(0.005)
        await cache.drain()

    asyncio.run(main())
    if err:
        raise err[0]
    return out[0]


def use(cache, layer, ids):
    """One layer's FFN: want, take every expert as it comes, done; returns the order they came in and their bytes."""
    cache.want(layer, ids)
    got = []
    try:
        for _ in ids:
            e, parts = cache.next(layer)
            got.append((e, [p.tobytes() for p in parts]))
            cache.done(layer, e)
    finally:
        cache.finish(layer)
    return got


def test_experts_arrive_with_the_files_bytes_and_cached_ones_first(model):
    cache, reader, arena, data = make(model)
    layers = model[2]

    def script(c):
        first = use(c, 1, [5, 2])  # both read
        second = use(c, 1, [3, 2])  # 2 is cached now: it comes first
        return first, second

    first, second = run_layers(cache, script)
    assert sorted(e for e, _ in first) == [2, 5]
    assert [e for e, _ in second][0] == 2
    for e, parts in first + second:
        assert parts == expert_bytes(data, layers[1], e)
    st = cache.statistics()
    assert (st.wanted, st.hits, st.misses) == (4, 1, 3)
    assert st.bytes_read == sum(layers[1].span_bytes(e) for e in (5, 2, 3))
    cache.close(), reader.close(), arena.close()


@pytest.mark.parametrize("policy", ["lfu", "lru"])
def test_the_policy_keeps_the_hot_experts_within_each_layers_slots(model, policy):
    cache, reader, arena, data = make(model, cached=2, pool=4, policy=policy)

    def script(c):
        for _ in range(3):
            use(c, 0, [1, 6])  # 1 and 6 are hot in layer 0
        use(c, 0, [3, 4])  # a one-off
        after_one_off = c.cached_experts(0)
        use(c, 0, [1, 6])
        return after_one_off, [c.cached_experts(i) for i in range(LAYERS)]

    after_one_off, cached = run_layers(cache, script)
    assert all(len(x) <= 2 for x in cached)  # never beyond a layer's slots
    # frequency keeps the hot ones through a one-off; recency lets the one-off in
    assert after_one_off == ([1, 6] if policy == "lfu" else [3, 4])
    assert cached[0] == [1, 6]
    assert cached[1] == cached[2] == []
    cache.close(), reader.close(), arena.close()


def test_predictions_are_read_ahead_and_counted(model):
    cache, reader, arena, data = make(model, cached=0, pool=4)

    def script(c):
        c.predict(2, [4, 7])
        a = use(c, 2, [4, 1])  # 4 was predicted (a hit of the prediction), 1 was not
        c.predict(0, [0])  # (layer 2's guesses were half wrong: it is no longer read ahead)
        use(c, 1, [5])  # layer 1 needs slots: the unused prediction's slot may go
        return a

    a = run_layers(cache, script)
    assert sorted(e for e, _ in a) == [1, 4]
    st = cache.statistics()
    assert st.predicted == 3 and st.predicted_hits == 1 and st.misses == 2
    assert st.prediction_hit_rate == pytest.approx(1 / 3)
    cache.close(), reader.close(), arena.close()


def test_a_layer_whose_guesses_go_unused_is_not_read_ahead_until_they_improve(model):
    from flexio.experts import PREDICT_MIN

    cache, reader, arena, data = make(model, cached=0, pool=4)
    wrong = [[4, 7], [0, 6], [3, 5]]  # layer 2 wants 1 and 2; none of these

    def script(c):
        reads, precision = [], []
        right = [[3, 5], [0, 6], [4, 7]] * 2
        for guess, wants in [(g, [1, 2]) for g in wrong * 4] + [(g, g) for g in right]:
            before = c.statistics().predicted
            c.predict(2, guess)
            reads.append(c.statistics().predicted - before)
            use(c, 2, wants)
            precision.append(c.precision[2])
            while any(x.state == LOADING for x in c.slots):  # the guesses' reads land (at most k in flight)
                time.sleep(0.001)
        return reads, precision

    reads, precision = run_layers(cache, script)
    assert reads[0] == 2  # read while the moving share of used guesses is >= PREDICT_MIN (it starts there) ...
    assert precision[0] < PREDICT_MIN and reads[1:12] == [0] * 11, (reads, precision)  # ... then only scored
    back = next(i for i in range(12, len(reads)) if precision[i] >= PREDICT_MIN)  # right guesses, scored ...
    assert reads[12 : back + 1] == [0] * (back - 11) and sum(reads[back + 1 :]) >= 4, (
        reads, precision)  # ... bring the reads back (of the guesses not still in a slot)
    assert precision[-1] > PREDICT_MIN and cache.statistics().mispredicted <= 2
    cache.close(), reader.close(), arena.close()


def test_more_misses_than_slots_go_in_waves(model):
    cache, reader, arena, data = make(model, cached=0, pool=2)
    layers = model[2]
    got = run_layers(cache, lambda c: use(c, 0, list(range(N_EXPERT))))  # 8 experts through 2 slots
    assert sorted(e for e, _ in got) == list(range(N_EXPERT))
    assert all(parts == expert_bytes(data, layers[0], e) for e, parts in got)
    assert all(s.pins == 0 for s in cache.slots)
    cache.close(), reader.close(), arena.close()


def test_a_failed_read_fails_the_layer_and_leaves_nothing_pinned(model, tmp_path):
    cache, reader, arena, data = make(model)
    layers = model[2]
    os.truncate(model[0], layers[2].tensors[0].offset)  # layer 2's experts are cut off

    def script(c):
        with pytest.raises(FlexioError, match="file shrank|end of file"):
            use(c, 2, [0, 1])
        return use(c, 0, [3])  # the cache goes on for what is in the file

    got = run_layers(cache, script)
    assert got[0][1] == expert_bytes(data, layers[0], 3)
    assert all(s.pins == 0 for s in cache.slots)
    cache.close(), reader.close(), arena.close()


def test_abort_wakes_a_layer_waiting_for_a_read(model):
    cache, reader, arena, data = make(model)
    cache.bind(asyncio.new_event_loop())  # a loop that never runs: the read never starts
    got = []

    def compute():
        try:
            cache.want(0, [1])
            cache.next(0)
        except BaseException as e:
            got.append(e)
        finally:
            cache.finish(0)

    t = threading.Thread(target=compute)
    t.start()
    t.join(0.2)
    assert t.is_alive()
    cache.abort()
    t.join(5)
    assert isinstance(got[0], ExpertsAborted) and all(s.pins == 0 for s in cache.slots)
    cache.loop.close()
    cache.close(), reader.close(), arena.close()


def test_expert_ranges_and_spans():
    t = TensorInfo("blk.0.ffn_up_exps.weight", 2, (512, 16, 8), 100, 8 * 16 * 288)
    L = ExpertLayer(0, (t,), 8)
    assert L.ranges(3) == [(100 + 3 * 16 * 288, 16 * 288)]
    assert L.span_bytes(3) == aligned_span(100 + 3 * 16 * 288, 16 * 288)[1]
    assert L.expert_bytes == 16 * 288


def test_a_read_reuses_the_oldest_spare_slot(model):
    cache, reader, arena, data = make(model, cached=0, pool=3)

    def script(c):
        for e in (1, 2, 3):
            use(c, 0, [e])  # each a miss that no layer keeps: its slot stays readable until a read needs it
        use(c, 0, [4])  # no free slot: the oldest spare one (expert 1's) is taken
        held = sorted(e for (layer, e) in c.index)
        use(c, 0, [2])  # still in its slot: a hit
        return held

    assert run_layers(cache, script) == [2, 3, 4]
    st = cache.statistics()
    assert (st.hits, st.misses) == (1, 4)
    cache.close(), reader.close(), arena.close()


def test_a_layer_that_finds_its_experts_cached_is_not_predicted_until_it_misses(model):
    cache, reader, arena, data = make(model, cached=2, pool=4)

    def script(c):
        asked = [c.wants_prediction(0)]  # nothing cached yet
        for _ in range(8):
            use(c, 0, [1, 6])  # cached after the first pass
            asked.append(c.wants_prediction(0))
        use(c, 0, [1, 3])  # a miss
        asked.append(c.wants_prediction(0))
        return asked

    asked = run_layers(cache, script)
    assert asked[:3] == [True, True, True] and asked[7:9] == [False, False], asked
    assert asked[-1] is True
    assert not cache.wants_prediction(LAYERS)  # not a layer of this model
    cache.close(), reader.close(), arena.close()
