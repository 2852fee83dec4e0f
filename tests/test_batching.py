"""Continuous batching: concurrent requests share each weight pass and give exactly the tokens they give alone;
the batcher's bookkeeping (admission, chunked prefill, cancellation, the bounded queue) on its own."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from flexio import engine as engine_mod
from flexio.batcher import END, Batcher, QueueFullError, Sequence
from flexio.engine import Engine
from flexio.errors import BudgetError, FlexioError
from flexio.model import KVCache
from flexio.sampling import Sampler, SamplingParams

PROMPTS = [
    [504, 3575, 282, 4649, 314],  # "The capital of France is"
    [6403, 1980, 253, 655, 28],  # "Once upon a time,"
    [504, 2213, 282],
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13],
]
N = 48


async def tokens(e: Engine, prompt, n=N, **kw) -> list[int]:
    return [t async for t in e.generate_tokens(prompt, n, **kw)]


@pytest.fixture(scope="module")
def alone(smollm2_path) -> list[list[int]]:
    """Each prompt's 48 greedy tokens, one request at a time (in memory: every mode gives the same tokens,
    tests/test_engine.py)."""

    async def main():
        async with Engine(smollm2_path, threads=2, parallel=1) as e:
            return [await tokens(e, p, ignore_eos=True) for p in PROMPTS]

    return asyncio.run(main())


@pytest.mark.parametrize("budget", [None, "40%"])
def test_four_requests_together_give_what_each_gives_alone(smollm2_path, alone, budget):
    async def main():
        async with Engine(smollm2_path, threads=2, budget=budget, parallel=4) as e:
            together = await asyncio.gather(*[tokens(e, p, ignore_eos=True) for p in PROMPTS])
            return together, e.metrics()

    together, m = asyncio.run(main())
    assert together == alone
    assert m.passes_total <= N + 2  # they shared passes: 4 x 48 tokens in about 48 passes, not 192
    assert m.batch_size_mean > 3.5
    assert m.requests_running == 0 and m.requests_total == 4 and m.generated_tokens_total == 4 * N
    assert m.kv_cache_bytes == 4 * KVCache.bytes_for(_cfg(smollm2_path), m.n_ctx_seq)


def _cfg(path):
    from flexio.gguf import open_gguf

    return open_gguf(path).config


def test_a_long_prompt_is_read_in_chunks_with_the_same_result(smollm2_path):
    """A prompt longer than a pass's prefill rows goes in chunks across passes (the others keep decoding);
    its tokens equal those of the whole prompt in one pass."""
    prompt = [int(t) for t in np.random.default_rng(0).integers(100, 40000, 300)]

    async def main():
        async with Engine(smollm2_path, threads=2, parallel=2, n_ctx=2048) as e:
            cache = KVCache(e.config, e.n_ctx_seq)
            logits = await e._run(e.forward, prompt, cache)  # all 300 rows in one pass
            first = int(np.argmax(logits))
            other = asyncio.create_task(tokens(e, PROMPTS[0], 40, ignore_eos=True))
            chunked = await tokens(e, prompt, 4)  # 256 + 44 rows, beside the other request's decode
            await other
            return first, chunked, e.metrics()

    first, chunked, m = asyncio.run(main())
    assert chunked[0] == first
    assert m.batch_size_mean > 1


def test_cancelling_one_request_frees_its_slot_and_leaves_the_others(smollm2_path):
    async def main():
        async with Engine(smollm2_path, threads=2, budget="40%", parallel=2) as e:
            alone = await tokens(e, PROMPTS[1], 24, ignore_eos=True)
            got = []

            async def doomed():
                async for t in e.generate_tokens(PROMPTS[0], 200, ignore_eos=True):
                    got.append(t)

            victim = asyncio.create_task(doomed())
            survivor = asyncio.create_task(tokens(e, PROMPTS[1], 24, ignore_eos=True))
            while len(got) < 3:
                await asyncio.sleep(0.01)
            victim.cancel()
            with pytest.raises(asyncio.CancelledError):
                await victim
            third = await tokens(e, PROMPTS[2], 4)  # the freed slot takes a new request
            return alone, await survivor, third, e.metrics()

    alone, survivor, third, m = asyncio.run(main())
    assert survivor == alone and len(third) == 4
    assert m.requests_running == 0 and m.requests_waiting == 0


def test_more_requests_than_slots_wait_and_beyond_the_queue_are_refused(smollm2_path):
    async def main():
        async with Engine(smollm2_path, threads=2, parallel=1, max_waiting=1) as e:
            a = asyncio.create_task(tokens(e, PROMPTS[0], 8))
            b = asyncio.create_task(tokens(e, PROMPTS[1], 8))
            await asyncio.sleep(0)
            await asyncio.sleep(0.05)
            with pytest.raises(QueueFullError, match="1 requests already wait"):
                await tokens(e, PROMPTS[2], 8)
            return await a, await b

    a, b = asyncio.run(main())
    assert len(a) == len(b) == 8


def test_kv_caches_that_do_not_fit_are_refused_at_open_with_the_figures(smollm2_path, monkeypatch):
    monkeypatch.setattr(engine_mod, "memory_limit", lambda: (1 << 30, "this machine's RAM (MemTotal)"))

    async def main():
        async with Engine(smollm2_path, threads=2, parallel=8, n_ctx=8 * 8192):
            pass

    with pytest.raises(BudgetError, match=r"KV caches of 8 sequence\(s\) x 8192 tokens need .* bytes"):
        asyncio.run(main())


# --- the batcher alone -------------------------------------------------------------------------------


def _seq(n_prompt: int, max_tokens: int = 4) -> Sequence:
    return Sequence(list(range(10, 10 + n_prompt)), max_tokens, Sampler(SamplingParams()), frozenset({0}))


def _logits(tok: int) -> np.ndarray:
    z = np.zeros(16, np.float32)
    z[tok] = 1.0
    return z


def test_batcher_chunks_prompts_and_never_leaves_a_one_token_chunk():
    async def main():
        b = Batcher(parallel=2, max_waiting=4, prefill_rows=8)
        s1, s2 = _seq(9), _seq(3)
        b.submit(s1)
        b.submit(s2)
        rows = b.plan()
        # 9 prompt tokens with 8 rows per pass: 7 now (not 8, which would leave 1), s2 waits for rows
        assert [(r.seq, len(r.ids), r.pos0, r.sample) for r in rows] == [(s1, 7, 0, False)]
        b.finish_pass(rows, [None], 0.0, 0)
        rows = b.plan()
        assert [(r.seq, len(r.ids), r.pos0, r.sample) for r in rows] == [(s1, 2, 7, True), (s2, 3, 0, True)]
        b.finish_pass(rows, [_logits(5), _logits(6)], 0.0, 0)
        assert s1.queue.get_nowait() == 5 and s2.queue.get_nowait() == 6
        rows = b.plan()  # both decode now: one row each, at their next positions
        assert [(r.ids, r.pos0) for r in rows] == [([5], 9), ([6], 3)]

    asyncio.run(main())


def test_batcher_admission_cancellation_and_limits():
    async def main():
        b = Batcher(parallel=1, max_waiting=1, prefill_rows=8)
        s1, s2, s3 = _seq(2, max_tokens=1), _seq(2, max_tokens=0), _seq(2)
        b.submit(s1)
        b.submit(s2)
        with pytest.raises(QueueFullError):
            b.submit(s3)
        rows = b.plan()
        assert [r.seq for r in rows] == [s1] and s2 in b.waiting  # one slot: s2 waits its turn
        b.finish_pass(rows, [_logits(3)], 0.0, 0)
        assert s1.stop_reason == "length" and [s1.queue.get_nowait(), s1.queue.get_nowait()] == [3, END]
        rows = b.plan()  # s1's slot went to s2; max_tokens 0 reads the prompt and generates nothing
        b.finish_pass(rows, [_logits(3)], 0.0, 0)
        assert s2.stop_reason == "length" and s2.queue.get_nowait() is END
        s4, s5 = _seq(2), _seq(2)
        b.submit(s4)
        b.submit(s5)
        b.cancel(s5)  # waiting: ends at once
        assert s5.stop_reason == "cancelled" and s5.queue.get_nowait() is END
        rows = b.plan()
        b.finish_pass(rows, [_logits(0)], 0.0, 0)  # token 0 is end-of-generation
        assert s4.stop_reason == "eos" and b.idle and list(b.free) == [0]

    asyncio.run(main())


def test_non_finite_logits_end_that_sequence_only():
    """A sampler that refuses its logits (NaN from corrupt weights, found by the fuzzer on a qwen3 file)
    ends its sequence with the NumericalError; the batch and the other sequences go on."""
    from flexio.errors import NumericalError

    async def main():
        b = Batcher(parallel=2, max_waiting=2, prefill_rows=8)
        s1 = _seq(2)
        s2 = Sequence(list(range(10, 12)), 4, Sampler(SamplingParams(temperature=0.7, seed=0)), frozenset({0}))
        b.submit(s1)
        b.submit(s2)
        rows = b.plan()
        bad = _logits(5)
        bad[3] = np.nan
        b.finish_pass(rows, [_logits(5), bad], 0.0, 0)
        assert s1.queue.get_nowait() == 5 and s1.stop_reason is None
        assert s2.stop_reason == "error" and isinstance(s2.error, NumericalError) and s2.queue.get_nowait() is END
        assert [r.seq for r in b.plan()] == [s1]

    asyncio.run(main())


def test_an_engine_used_from_another_event_loop_says_so_instead_of_hanging(smollm2_path):
    e = Engine(smollm2_path, threads=2)
    asyncio.run(e.open())  # this loop ends here, and the engine's scheduler task with it
    try:
        with pytest.raises(FlexioError, match="opened on another event loop"):
            asyncio.run(asyncio.wait_for(tokens(e, PROMPTS[0], 2), 30))
    finally:
        with asyncio.Runner() as r:
            r.run(e.close())
