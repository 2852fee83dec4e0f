"""StageStream on its own: stages arrive in order within the window, their bytes are the file's,
abort and I/O errors wake the compute side, and a cancelled pump leaves no read in flight and no slot pinned."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading

import numpy as np
import pytest

from flexio.arena import Arena
from flexio.errors import FlexioError
from flexio.gguf import open_gguf
from flexio.plan import plan_budget
from flexio.prefetch import StageStream, StreamAborted
from flexio.reader import Reader
from flexio_bench.synth import synthesize


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_path) -> str:
    out = tmp_path_factory.mktemp("prefetch") / "tiny-llama-q4_0.gguf"
    return synthesize("tiny-llama", "q4_0", str(out), tokenizer_from=smollm2_path, n_layer=4)


def _open(path: str, budget="20%", window=2, mode="flexinfer"):
    gf = open_gguf(path)
    plan = plan_budget(gf, budget, window=window, policy="ffn", mode=mode)
    assert plan.streams and plan.streamed_bytes_per_token > 0
    arena = Arena(plan.total_bytes + 4096 * (plan.window + 1), name="test-stream", lock=False)
    reader = Reader(path).open()
    return gf, plan, arena, reader, StageStream(gf, plan, reader, arena)


def _close(stream, reader, arena):
    stream.close()
    reader.close()
    arena.close()  # raises if any view of a slot is still exported


@pytest.mark.parametrize("window", [1, 2, 3])
def test_stages_arrive_in_order_within_the_window_with_the_files_bytes(tiny, window):
    gf, plan, arena, reader, st = _open(tiny, window=window)
    n = len(plan.stages)
    seen: list[tuple[int, int, int]] = []  # (seq, loaded, consumed) at each acquire
    errors: list[BaseException] = []

    def compute():
        try:
            for seq in range(3 * n):  # three passes
                stage, slot = st.acquire()
                seen.append((seq, st.loaded, st.consumed))
                assert stage == seq % n and slot == seq % window
                for info, parts in st.stage_parts(stage, slot):
                    for row0, raw in parts:  # resident rows and streamed rows alike are the file's bytes
                        with open(gf.path, "rb") as f:
                            f.seek(info.offset + (row0 - _base_row(plan, stage, info)) * info.row_bytes)
                            want = f.read(raw.nbytes)
                        assert raw.tobytes() == want, (info.name, row0)
                st.release()
        except BaseException as e:  # surfaced below
            errors.append(e)

    async def main():
        pump = asyncio.create_task(st.pump())
        t = threading.Thread(target=compute)
        t.start()
        await asyncio.get_running_loop().run_in_executor(None, t.join)
        pump.cancel()
        await asyncio.gather(pump, return_exceptions=True)

    asyncio.run(main())
    assert not errors, errors[0]
    assert [s for s, _, _ in seen] == list(range(3 * n))
    for seq, loaded, consumed in seen:
        assert consumed == seq  # the stream keeps the cursor: one stage at a time, in order
        assert seq < loaded <= consumed + window  # never ahead of the window, never handed out unloaded
    assert st.passes == 3 and st.statistics().bytes_read >= 3 * plan.streamed_bytes_per_token
    _close(st, reader, arena)


def _base_row(plan, stage, info):
    """The first row (within the whole tensor) of the tensor or head chunk `info` in `stage`."""
    return next(tp.row0 for tp in plan.stages[stage].tensors if tp.info == info)


def test_abort_wakes_a_blocked_compute_thread(tiny):
    gf, plan, arena, reader, st = _open(tiny)
    got: list[BaseException] = []

    def compute():
        try:
            st.acquire()  # no pump runs: nothing will ever be loaded
        except BaseException as e:
            got.append(e)

    t = threading.Thread(target=compute)
    t.start()
    t.join(0.2)
    assert t.is_alive()  # blocked, not polling past it
    st.abort()
    t.join(5)
    assert not t.is_alive() and isinstance(got[0], StreamAborted)
    _close(st, reader, arena)


def test_a_read_error_reaches_the_compute_thread(tiny, tmp_path):
    path = tmp_path / "model.gguf"
    shutil.copyfile(tiny, path)
    gf, plan, arena, reader, st = _open(str(path))
    os.truncate(path, plan.stages[0].segments[0][1])  # the first streamed segment is cut off

    async def main():
        pump = asyncio.create_task(st.pump())
        loop = asyncio.get_running_loop()
        with pytest.raises(FlexioError):
            await asyncio.wait_for(loop.run_in_executor(None, st.acquire), 30)
        await asyncio.wait_for(pump, 30)  # the pump ends after handing the error over

    asyncio.run(main())
    _close(st, reader, arena)


def test_cancelling_the_pump_mid_stage_leaves_nothing_in_flight_or_pinned(tiny):
    gf, plan, arena, reader, st = _open(tiny, budget="10%", window=3)

    async def main():
        pump = asyncio.create_task(st.pump())
        for _ in range(20):  # cancel as soon as reads are in flight
            await asyncio.sleep(0)
            if reader.statistics().in_flight:
                break
        pump.cancel()
        await asyncio.gather(pump, return_exceptions=True)
        assert reader.statistics().in_flight == 0

    asyncio.run(main())
    _close(st, reader, arena)  # every slot released and unmapped: no export left
    assert arena.closed
