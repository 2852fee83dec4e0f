"""Mixture-of-experts models (Mixtral = llama with experts, qwen3moe) on tiny synthesized files: identical to
llama.cpp, the same tokens in every mode (experts cached, predicted, read on demand, mapped), the expert plan,
and the faults (tensors that disagree with expert_count, a read that fails mid-pass, a cancellation mid-layer)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil

import pytest

from flexio.engine import Engine
from flexio.errors import FlexioError, GGUFError
from flexio.gguf import open_gguf
from flexio.plan import plan_budget
from flexio.prefetch import stage_reads
from flexio_bench.synth import synthesize

PROMPTS = {"tiny-mixtral": [1, 415, 5565, 302, 4843, 349], "tiny-qwen3moe": [785, 6722, 315, 9625, 374]}
N = 24


@pytest.fixture(scope="module")
def models(tmp_path_factory, smollm2_path) -> dict[str, str]:
    d = tmp_path_factory.mktemp("moe")
    return {like: synthesize(like, "q4_k_m", str(d / f"{like}.gguf"), tokenizer_from=smollm2_path)
            for like in PROMPTS}


async def tokens(path: str, prompt, n=N, **kw) -> tuple[list[int], Engine]:
    async with Engine(path, threads=2, n_ctx=256, **kw) as e:
        got = [t async for t in e.generate_tokens(prompt, n, ignore_eos=True)]
        return got, e


@pytest.fixture(scope="module")
def in_memory(models) -> dict[str, list[int]]:
    return {like: asyncio.run(tokens(path, PROMPTS[like]))[0] for like, path in models.items()}


@pytest.mark.peer
@pytest.mark.parametrize("like", list(PROMPTS))
def test_identical_to_llama_cpp(models, like):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e .[peer])")
    from peer_util import compare, flexio_greedy, llama_greedy

    ref = llama_greedy(models[like], PROMPTS[like], 32)
    ours = flexio_greedy(models[like], PROMPTS[like], 32)
    note = compare(ref, ours)
    assert note.startswith("identical"), note


@pytest.mark.parametrize("mode,budget", [
    ("flexinfer", "30%"), ("flexinfer", "70%"), ("no-predict", "30%"), ("no-cache", "30%"), ("sync", "30%"),
    ("prefetch-only", "30%"), ("no-balance", "50%"), ("mmap", "30%"),
])
@pytest.mark.parametrize("like", list(PROMPTS))
def test_every_mode_gives_the_same_tokens(models, in_memory, like, mode, budget):
    got, e = asyncio.run(tokens(models[like], PROMPTS[like], mode=mode, budget=budget))
    assert got == in_memory[like]


def test_no_stage_slots_when_only_experts_stream(models, in_memory):
    """At 70 % every dense tensor is resident and only experts are read: the stage stream has no slots and
    no pump (no hand-off to the event loop per layer), and the tokens are memory mode's."""
    like = "tiny-qwen3moe"
    assert not any(stage_reads(s) for s in plan_budget(open_gguf(models[like]), "70%").stages)

    async def run(budget):
        async with Engine(models[like], threads=2, n_ctx=256, budget=budget) as e:
            got = [t async for t in e.generate_tokens(PROMPTS[like], N, ignore_eos=True)]
            return got, len(e.stream.slots), e.plan.window, e.expert_statistics().wanted

    got, slots, _, wanted = asyncio.run(run("70%"))
    assert got == in_memory[like] and slots == 0 and wanted > 0
    got, slots, window, _ = asyncio.run(run("30%"))  # attention streamed too
    assert got == in_memory[like] and slots == window


def test_the_expert_plan_spreads_the_cache_over_the_layers(models):
    gf = open_gguf(models["tiny-qwen3moe"])
    p = plan_budget(gf, "85%", policy="ffn")
    ex = p.experts
    assert ex.where == "cache" and ex.cached_per_layer > 0 and ex.pool == 4 + 4  # k for a pass + k predicted
    assert p.total_bytes <= p.budget and ex.slot_bytes % 4096 == 0
    assert ex.expected_misses_per_token == pytest.approx(3 * 4 * (1 - ex.cached_per_layer / 16))
    assert f"cache {ex.cached_per_layer} slot(s) per layer x 3 layers" in p.describe()
    assert plan_budget(gf, "85%", policy="ffn", mode="no-cache").experts.cached_per_layer == 0
    assert not plan_budget(gf, "85%", policy="ffn", mode="no-predict").experts.predict
    assert plan_budget(gf, "85%", policy="ffn", batch=4).experts.pool == min(16, 4 * 4) + 4
    whole = plan_budget(gf, "100%")
    assert whole.experts.where == "resident" and whole.total_bytes <= whole.budget


def test_the_sweep_reads_the_expected_expert_misses(models):
    """bench-sweep's per-point disk ceiling reads what the plan will: the stages' spans and, per layer, as
    many experts as it expects to miss (each tensor's slice, DIRECT_ALIGN-aligned, inside the file)."""
    import math

    from flexio_bench.sweep import expert_reads, plan_reads

    gf = open_gguf(models["tiny-qwen3moe"])
    p = plan_budget(gf, "85%", policy="ffn")
    ex = p.experts
    reads = expert_reads(p, gf.size)
    miss = math.ceil(ex.n_used * (1 - ex.hit_rate))
    assert len(reads) == len(ex.layers) * miss * 3  # gate, up, down of each
    assert all(off % 4096 == 0 and 0 < n and off + n <= gf.size for off, n in reads)
    spans = sum(n for _, n in reads)
    assert spans >= ex.expected_bytes_per_token  # the misses rounded up
    stages = sum(min(n, gf.size - off) for s in p.stages for off, n, _, _ in stage_reads(s))
    assert sum(n for _, n in plan_reads(p, gf.size)) == stages + spans
    assert expert_reads(plan_budget(gf, "100%"), gf.size) == []  # resident: nothing to read


def test_generate_json_reports_the_experts(models, capsys):
    from flexio.cli import main

    assert main(["generate", "--model", models["tiny-qwen3moe"], "--budget", "85%", "-n", "12", "--ignore-eos",
                 "--json", "--threads", "2"]) == 0
    ex = json.loads(capsys.readouterr().out)["experts"]
    assert ex["per_token"] == 4 and ex["of"] == 16 and ex["where"] == "cache" and ex["cached_per_layer"] > 0
    assert 0 <= ex["hit_rate"] <= 1 and ex["reads_per_token"] >= 0
    # what a token reads: its misses, plus the predictions that missed (counted), nothing else
    assert ex["bytes_read_per_token"] <= (ex["reads_per_token"] + 0.5) * open_gguf(models["tiny-qwen3moe"]).size


def test_expert_tensors_that_disagree_with_expert_count_are_refused(models, tmp_path, smollm2_path):
    bad = synthesize("tiny-qwen3moe", "q4_0", str(tmp_path / "bad.gguf"), tokenizer_from=smollm2_path,
                     extra_keys={"qwen3moe.expert_count": 12})  # the tensors hold 16 experts
    with pytest.raises(GGUFError, match=r"blk\.0\.ffn_gate_inp\.weight.*wrong shape.*expert_count"):
        open_gguf(bad)


def test_a_failed_expert_read_ends_the_generation_with_a_clear_error(models, tmp_path):
    path = tmp_path / "model.gguf"
    shutil.copyfile(models["tiny-mixtral"], path)

    async def main():
        async with Engine(str(path), threads=2, n_ctx=256, budget="30%") as e:
            first = e.plan.experts.layers[0].tensors[0]
            os.truncate(path, first.offset + 4096)  # every expert of every layer is cut off
            with pytest.raises(FlexioError, match="shrank|end of file"):
                await asyncio.wait_for(tokens_of(e, PROMPTS["tiny-mixtral"]), 60)
            assert all(s.pins == 0 for s in e.experts.slots)

    asyncio.run(main())


async def tokens_of(e: Engine, prompt, n=N) -> list[int]:
    return [t async for t in e.generate_tokens(prompt, n, ignore_eos=True)]


def test_cancelling_mid_layer_leaves_no_expert_slot_pinned(models, in_memory):
    async def main():
        async with Engine(models["tiny-qwen3moe"], threads=2, n_ctx=256, budget="30%", parallel=2) as e:
            for _ in range(5):
                task = asyncio.create_task(tokens_of(e, PROMPTS["tiny-qwen3moe"], 200))
                await asyncio.sleep(0.05)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            for _ in range(500):
                if e.metrics().requests_running == 0:
                    break
                await asyncio.sleep(0.01)
            assert all(s.pins == 0 for s in e.experts.slots)
            return await tokens_of(e, PROMPTS["tiny-qwen3moe"])

    assert asyncio.run(main()) == in_memory["tiny-qwen3moe"]


def test_batched_requests_share_their_experts_and_give_what_each_gives_alone(models, in_memory):
    other = [9707, 11, 1879, 0, 358]

    async def main():
        async with Engine(models["tiny-qwen3moe"], threads=2, n_ctx=512, budget="60%", parallel=2) as e:
            alone = await tokens_of(e, other)
            a, b = await asyncio.gather(tokens_of(e, PROMPTS["tiny-qwen3moe"]), tokens_of(e, other))
            return alone, a, b

    alone, a, b = asyncio.run(main())
    assert a == in_memory["tiny-qwen3moe"] and b == alone
