"""Budget planner: pure function of a tensor table, tested without a disk."""

import math
from types import SimpleNamespace

import pytest
from hypothesis import given, settings, strategies as st

from flexio.errors import BudgetError, ParameterError
from flexio.gguf import ModelConfig, TensorInfo
from flexio.plan import CostModel, minimum_budget, plan_budget
from flexio.units import parse_size

Q4_0, Q6_K, F32 = 2, 14, 0
BPB = {Q4_0: (32, 18), Q6_K: (256, 210), F32: (1, 4)}


def stand_in(cfg, d, vocab, block, tied=False, head_type=Q6_K):
    """A GGUFFile stand-in: token_embd, each layer's tensors (block(layer prefix) -> [(name, shape, type)]),
    output_norm and output (unless tied), in a contiguous data section."""
    tensors, off = [], 4096

    def add(name, shape, t):
        nonlocal off
        be, bb = BPB[t]
        nbytes = math.prod(shape) // be * bb
        tensors.append(TensorInfo(name, t, shape, off, nbytes))
        off += -(-nbytes // 32) * 32

    add("token_embd.weight", (d, vocab), Q4_0)
    for i in range(cfg.n_layer):
        for name, shape, t in block(f"blk.{i}."):
            add(name, shape, t)
    add("output_norm.weight", (d,), F32)
    if not tied:
        add("output.weight", (d, vocab), head_type)
    by = {t.name: t for t in tensors}
    return SimpleNamespace(config=cfg, tensors=tensors, by_name=by,
                           layer_tensors=lambda i: [t for t in tensors if t.layer == i])


def fake_model(n_layer=32, d=512, ff=1376, vocab=2000, kv=None, tied=False, head_type=Q6_K):
    """llama shapes."""
    kv = kv or d
    cfg = ModelConfig("llama", n_layer, d, ff, 8, 8 * kv // d, 4096, vocab, 1e4, d // 8, 1e-5, tied)
    return stand_in(cfg, d, vocab, lambda p: [
        (p + "attn_norm.weight", (d,), F32),
        *((p + r + ".weight", shp, Q4_0) for r, shp in (("attn_q", (d, d)), ("attn_k", (d, kv)), ("attn_v", (d, kv)),
                                                          ("attn_output", (d, d)))),
        (p + "ffn_norm.weight", (d,), F32),
        *((p + r + ".weight", shp, Q4_0) for r, shp in (("ffn_gate", (d, ff)), ("ffn_up", (d, ff)), ("ffn_down", (ff, d))))],
        tied, head_type)


MODEL = fake_model()
TOTAL = sum(t.nbytes for t in MODEL.tensors)


def test_parse_size():
    assert parse_size("1.5GiB") == 3 * 2**29
    assert parse_size("800MB") == 800_000_000
    assert parse_size("25%", 1000) == 250
    assert parse_size(123) == 123
    with pytest.raises(ParameterError, match="cannot parse"):
        parse_size("12 parsecs")


def test_one_unit_convention_for_every_flag():
    """dd's and docker's: a bare K/M/G is binary, KB/MB/GB decimal, KiB/MiB/GiB binary, case-insensitive."""
    assert parse_size("512M") == parse_size("512MiB") == parse_size("512m") == 512 << 20
    assert parse_size("4k") == 4096 and parse_size("4KB") == 4000 and parse_size("1G") == 1 << 30
    assert parse_size("2 GB") == 2 * 10**9 and parse_size("4096") == 4096 and parse_size("1_000") == 1000
    for bad, why in (("-1G", ">= 0"), ("150%", r"percentage in \[0, 100\]"), ("nan", "cannot parse"),
                     ("inf GB", "cannot parse"), ("1e999G", "finite"), ("1.5", None), ("10%", "needs a total")):
        if why is None:
            assert parse_size(bad) == 1
            continue
        with pytest.raises(ParameterError, match=why):
            parse_size(bad)


def test_below_minimum_names_the_minimum():
    m = minimum_budget(MODEL)
    with pytest.raises(BudgetError, match=f"minimum {m:,} bytes"):
        plan_budget(MODEL, m - 1)
    plan_budget(MODEL, m)  # exactly the minimum is fine


@settings(max_examples=60, deadline=None)
@given(frac=st.floats(0.0, 1.2), policy=st.sampled_from(["ffn", "attn", "mixed", "auto"]),
       window=st.integers(1, 4))
def test_plan_within_budget_and_balanced(frac, policy, window):
    lo = minimum_budget(MODEL, window)
    budget = int(lo + frac * (TOTAL - lo))
    p = plan_budget(MODEL, budget, window=window, policy=policy)
    assert p.total_bytes <= budget
    for s in p.stages:
        for t in s.tensors:
            assert 0 <= t.resident_rows <= t.info.n_rows
    # balanced: every layer streams the same bytes, up to one row of one tensor
    layers = [s for s in p.stages if s.name.startswith("layer")]
    streamed = [s.streamed_bytes for s in layers]
    max_row = max(t.info.row_bytes for s in layers for t in s.tensors)
    assert max(streamed) - min(streamed) <= max_row
    # the budget is used (almost) fully: at most 0.5 % or one row per stage plus O_DIRECT padding is left
    if p.streamed_bytes_per_token > 0:  # else everything that can be resident already is
        slack = budget - p.total_bytes
        assert slack <= max(0.005 * budget, len(p.stages) * max_row + p.window * 2 * 4096 * 7), (slack, budget)


def test_more_budget_streams_less():
    prev = None
    for f in (0.1, 0.3, 0.5, 0.7, 0.9):
        p = plan_budget(MODEL, int(TOTAL * f), policy="ffn")
        if prev is not None:
            assert p.streamed_bytes_per_token < prev
        prev = p.streamed_bytes_per_token


def test_policies_keep_what_they_say():
    budget = int(TOTAL * 0.4)
    ffn = plan_budget(MODEL, budget, policy="ffn").stages[0]
    attn = plan_budget(MODEL, budget, policy="attn").stages[0]
    frac = {t.info.role: t.resident_rows / t.info.n_rows for t in ffn.tensors}
    assert frac["ffn_gate.weight"] == 1.0 and frac["attn_q.weight"] == 0.0
    frac = {t.info.role: t.resident_rows / t.info.n_rows for t in attn.tensors}
    assert frac["attn_q.weight"] == 1.0 and frac["attn_output.weight"] == 1.0
    mixed = plan_budget(MODEL, budget, policy="mixed").stages[0]
    fr = [t.resident_rows / t.info.n_rows for t in mixed.tensors]
    assert max(fr) - min(fr) < 0.05


def test_no_balance_locks_whole_layers():
    p = plan_budget(MODEL, int(TOTAL * 0.5), mode="no-balance", policy="ffn")
    for s in p.stages:
        assert s.resident_bytes in (0, s.nbytes)
    assert any(s.resident_bytes for s in p.stages) and any(not s.resident_bytes for s in p.stages)


def test_baseline_modes():
    assert plan_budget(MODEL, TOTAL * 2, mode="memory").streamed_bytes_per_token == 0
    with pytest.raises(BudgetError, match="whole model"):
        plan_budget(MODEL, TOTAL // 2, mode="memory")
    p = plan_budget(MODEL, TOTAL // 2, mode="prefetch-only")
    assert p.resident_bytes == 0 and p.streamed_bytes_per_token == TOTAL - sum(t.nbytes for t in p.vectors) - MODEL.by_name["token_embd.weight"].nbytes
    assert plan_budget(MODEL, TOTAL // 2, mode="sync").window == 1


def test_large_tied_head_is_chunked():
    m = fake_model(vocab=50000, tied=True)
    p = plan_budget(m, minimum_budget(m))
    heads = [s for s in p.stages if s.name.startswith("head")]
    assert len(heads) > 1
    layer = max(s.nbytes for s in p.stages if s.name.startswith("layer"))
    assert all(s.nbytes <= layer for s in heads)
    assert sum(s.tensors[0].info.n_rows for s in heads) == 50000
    assert [s.tensors[0].row0 for s in heads] == sorted(s.tensors[0].row0 for s in heads)


def test_auto_follows_the_cost_model():
    # With a high per-request cost, the policy that streams fewer segments wins at a low budget.
    cost = CostModel(disk_bps=2e9, request_s=2e-3, compute_bps=1e12)
    p = plan_budget(MODEL, int(TOTAL * 0.2), policy="auto", cost=cost)
    assert set(p.predicted) == {"ffn", "attn", "mixed"}
    assert p.policy == min(p.predicted, key=p.predicted.get)
    assert p.policy != "mixed"  # mixed streams all 7 tensors of every layer


def test_a_percentage_is_of_the_resident_footprint_and_100_percent_holds_it_all():
    from flexio.plan import model_footprint

    gf = MODEL
    footprint = model_footprint(gf)
    assert footprint >= TOTAL  # every tensor, each padded as the arena pads it
    assert plan_budget(gf, "50%").budget == footprint // 2
    for mode in ("flexinfer", "no-balance", "no-preserve", "no-prefetch", "memory"):
        p = plan_budget(gf, "100%", mode=mode)
        assert p.streamed_bytes_per_token == 0 and p.total_bytes <= p.budget, mode
    for mode in ("sync", "prefetch-only"):  # these baselines stream by definition
        assert plan_budget(gf, "100%", mode=mode).streamed_bytes_per_token > 0
    assert plan_budget(gf, "99%").streamed_bytes_per_token > 0


def fake_phi3(n_layer=8, d=768, ff=2048, vocab=2000):
    """phi3 shapes: one fused attn_qkv (Q, K, V rows) and one fused ffn_up (gate rows, then up rows)."""
    cfg = ModelConfig("phi3", n_layer, d, ff, 8, 8, 4096, vocab, 1e4, d // 8, 1e-5, False, qkv_fused=True)
    return stand_in(cfg, d, vocab, lambda p: [
        (p + "attn_norm.weight", (d,), F32), (p + "attn_qkv.weight", (d, 3 * d), Q4_0),
        (p + "attn_output.weight", (d, d), Q4_0), (p + "ffn_norm.weight", (d,), F32),
        (p + "ffn_up.weight", (d, 2 * ff), Q4_0), (p + "ffn_down.weight", (ff, d), Q4_0)])


def test_fused_tensors_are_preserved_by_their_part_of_the_block():
    """phi3's attn_qkv counts as attention and its fused ffn_up as FFN: a policy keeps its part's tensors
    first, in its order, and cuts at most one tensor by rows."""
    phi3 = fake_phi3()
    total = sum(t.nbytes for t in phi3.tensors)
    low = minimum_budget(phi3)
    for frac_budget in (0.3, 0.5, 0.7):
        budget = int(low + frac_budget * (total - low))
        for policy, order in (("attn", ("attn_qkv", "attn_output", "ffn_up", "ffn_down")),
                              ("ffn", ("ffn_up", "ffn_down", "attn_qkv", "attn_output"))):
            st = plan_budget(phi3, budget, policy=policy).stages[0]
            by = {t.info.role.split(".")[0]: t for t in st.tensors}
            frac = {r: t.resident_rows / t.info.n_rows for r, t in by.items()}
            kept = [frac[r] for r in order]
            assert kept == sorted(kept, reverse=True) and 0 < st.resident_bytes < st.nbytes, (policy, frac)
            cut = next(i for i, f in enumerate(kept) if f < 1)  # the first tensor cut by rows
            after = sum(by[r].resident_bytes for r in order[cut + 1:])
            assert after < by[order[cut]].info.row_bytes, (policy, frac)  # only what rounding to rows left
