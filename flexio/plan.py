"""Tensor table + memory budget -> Plan: which rows of which tensors stay resident, what streams per token.

A pure function of the model's tensor table, the budget, the prefetch window, the
preservation policy and the mode: no disk, no allocation, so it is unit-tested
on its own and printed by `generate --show-plan`.

Vocabulary
  stage      what the engine streams as one unit: layer i (its matrices), then the
             head (output.weight, or token_embd.weight when the output is tied).
  resident   rows kept in the locked arena for the whole run. A tensor is split
             along rows: its first `resident_rows` rows are resident, the rest stream.
  segment    one contiguous streamed byte range (a tensor's streamed tail).
  span       the O_DIRECT read that covers a segment: file offset rounded down and
             end rounded up to DIRECT_ALIGN, so its buffer is larger than the segment.

Budget accounting (bytes, all counted):
  resident bytes (rows kept, each tensor part padded to RESIDENT_ALIGN in the arena)
  + window x slot bytes (a slot holds one stage's spans; `window` slots in flight)
  + vectors (norms, biases: always resident)
  <= budget.
The minimum budget streams everything: vectors + window x the largest stage's spans.

Mixture-of-experts models (ExpertPlan): a token uses only the experts its router picks
(k of n per layer), so their `*_exps` tensors are not part of the stages. The stages hold
the rest of each layer (attention; routers are always resident, with the norms); the budget
those leave is an expert cache of equal slots, one expert's three row ranges each, spread
evenly over the layers (balanced locking at expert granularity), plus a pool of slots for
the reads in flight (the experts a token misses, and those predicted for the next layer).

Balanced locking spreads the resident bytes so that every stage streams the same
number of bytes (water-filling: stage s streams min(bytes_s, S), with S chosen so
the resident total fills the budget), and within a stage the policy decides which
tensors are kept first. The cost model (`predict`) turns a plan into a predicted
seconds-per-token from measured disk bandwidth, per-request overhead and per-byte
compute time; policy "auto" picks the policy with the smallest prediction.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .errors import BudgetError, ParameterError
from .gguf import GGUFFile, TensorInfo
from .modes import MODES, POLICIES, Mode, mode as get_mode
from .units import RESIDENT_ALIGN, aligned_span, fmt_bytes, parse_size

# Roles by part of the block, for the preservation policies. A fused tensor keeps its part's role:
# attn_qkv (Q, K and V in one matrix) is attention; phi3's ffn_up (gate and up in one) is FFN. Like any
# tensor it is split by rows when only part of it stays resident (its first resident_rows rows).
FFN_ROLES = ("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")
EXPERT_ROLES = ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight")  # (n_embd|ff, rows, n_expert)
ROUTER_ROLE = "ffn_gate_inp.weight"  # (n_embd, n_expert): resident with the norms, used one layer ahead to predict
ATTN_ROLES = ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_qkv.weight", "attn_output.weight")
ORDER = {"ffn": FFN_ROLES + ATTN_ROLES, "attn": ATTN_ROLES + FFN_ROLES}


@dataclass(frozen=True)
class TensorPlan:
    info: TensorInfo  # for a head chunk: a row range of the tensor (offset and shape of the chunk)
    stage: int
    resident_rows: int
    row0: int = 0  # first row of `info` within the whole tensor (head chunks)

    @property
    def resident_bytes(self) -> int:
        return self.resident_rows * self.info.row_bytes

    @property
    def streamed_rows(self) -> int:
        return self.info.n_rows - self.resident_rows

    @property
    def segment(self) -> tuple[int, int] | None:
        """(file offset, nbytes) of the streamed tail, or None when fully resident."""
        if self.streamed_rows == 0:
            return None
        return self.info.offset + self.resident_bytes, self.streamed_rows * self.info.row_bytes


@dataclass(frozen=True)
class StagePlan:
    index: int
    kind: str  # "layer" (one block's matrices) or "head" (a row chunk of the output head)
    number: int  # the layer index, or the head chunk's index
    tensors: tuple[TensorPlan, ...]
    chunks: int = 1  # head: how many chunks the head is cut into

    @property
    def name(self) -> str:
        """For people: "layer 7", "head", "head 2"."""
        return f"{self.kind} {self.number}" if self.kind == "layer" or self.chunks > 1 else self.kind

    @property
    def nbytes(self) -> int:
        return sum(t.info.nbytes for t in self.tensors)

    @property
    def resident_bytes(self) -> int:
        return sum(t.resident_bytes for t in self.tensors)

    @property
    def streamed_bytes(self) -> int:
        return self.nbytes - self.resident_bytes

    @property
    def segments(self) -> list[tuple[TensorPlan, int, int]]:
        return [(t, *t.segment) for t in self.tensors if t.segment is not None]

    @property
    def span_bytes(self) -> int:
        """Bytes of the O_DIRECT buffer that holds all of this stage's streamed segments."""
        return sum(aligned_span(off, n)[1] for _, off, n in self.segments)


@dataclass(frozen=True)
class ExpertLayer:
    """One layer's expert tensors (gate if the model has one, up, down), each (row_len, rows, n_expert):
    expert e is rows [e * rows, (e + 1) * rows), one contiguous byte range per tensor."""

    layer: int
    tensors: tuple[TensorInfo, ...]
    n_expert: int

    def ranges(self, e: int) -> list[tuple[int, int]]:
        """(file offset, nbytes) of expert e in each tensor."""
        return [(t.offset + e * (t.nbytes // self.n_expert), t.nbytes // self.n_expert) for t in self.tensors]

    def span_bytes(self, e: int) -> int:
        """Bytes of the O_DIRECT reads that bring expert e (its ranges, each widened to DIRECT_ALIGN)."""
        return sum(aligned_span(off, n)[1] for off, n in self.ranges(e))

    @property
    def expert_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors) // self.n_expert


@dataclass(frozen=True)
class ExpertPlan:
    """Where a mixture-of-experts model's experts live (see the module docstring).

    where: "resident" (whole tensors in the arena: memory mode), "mapped" (views of an mmap: mmap
    mode) or "cache" (read on demand into slots of `slot_bytes`: `cached_per_layer` slots per layer
    keep experts between tokens, `pool` more hold the reads in flight and the predicted ones).
    """

    layers: tuple[ExpertLayer, ...]
    n_expert: int
    n_used: int
    where: str
    cached_per_layer: int = 0
    pool: int = 0
    predict: bool = False
    slot_bytes: int = 0

    @property
    def memory_bytes(self) -> int:
        if self.where == "resident":
            return sum(_pad(t.nbytes) for L in self.layers for t in L.tensors)
        if self.where == "cache":
            return (len(self.layers) * self.cached_per_layer + self.pool) * self.slot_bytes
        return 0

    @property
    def hit_rate(self) -> float:
        """The fraction of a token's experts found cached when routing is uniform (random weights; real
        models route unevenly, and the cache keeps the popular experts: more hits)."""
        return self.cached_per_layer / self.n_expert if self.where == "cache" else 1.0

    @property
    def expected_misses_per_token(self) -> float:
        return len(self.layers) * self.n_used * (1.0 - self.hit_rate)

    @property
    def expected_bytes_per_token(self) -> float:
        """Bytes one token's expert misses read (their O_DIRECT spans), at `hit_rate`."""
        if self.where != "cache":
            return 0.0
        miss = self.n_used * (1.0 - self.hit_rate)
        return sum(miss * sum(L.span_bytes(e) for e in range(L.n_expert)) / L.n_expert for L in self.layers)

    def describe(self) -> str:
        e0 = self.layers[0]
        if self.where != "cache":
            return (f"  experts: {self.n_used} of {self.n_expert} per token and layer, all {self.where} "
                    f"({fmt_bytes(self.memory_bytes)})")
        return (f"  experts: {self.n_used} of {self.n_expert} per token and layer; cache {self.cached_per_layer} "
                f"slot(s) per layer x {len(self.layers)} layers + {self.pool} in flight, {fmt_bytes(self.slot_bytes)} "
                f"each ({fmt_bytes(self.memory_bytes)}); an expert is {fmt_bytes(e0.expert_bytes)}; "
                f"prediction {'on' if self.predict else 'off'}\n"
                f"  expected per token (uniform routing): {self.expected_misses_per_token:.1f} expert reads = "
                f"{fmt_bytes(self.expected_bytes_per_token)} (hit rate {100 * self.hit_rate:.1f}%)")


@dataclass(frozen=True)
class Plan:
    mode: Mode
    policy: str  # the policy used (auto resolved)
    budget: int
    window: int
    stages: tuple[StagePlan, ...]
    vectors: tuple[TensorInfo, ...]  # norms and biases: always resident
    embedding: TensorInfo  # token_embd.weight
    embedding_resident: bool  # False: rows are read on demand per pass
    model_bytes: int
    predicted: dict = field(default_factory=dict, compare=False)  # policy -> predicted s/token (auto)
    cost: CostModel | None = field(default=None, compare=False)  # the figures `predicted` came from
    experts: ExpertPlan | None = None  # mixture-of-experts models only

    @property
    def resident_bytes(self) -> int:
        emb = self.embedding.nbytes if self.embedding_resident and not self.tied else 0
        return sum(_pad(t.resident_bytes) for s in self.stages for t in s.tensors) + emb

    @property
    def tied(self) -> bool:
        return any(t.info.name == "token_embd.weight" for t in self.stages[-1].tensors)

    @property
    def vector_bytes(self) -> int:
        return sum(_pad(t.nbytes) for t in self.vectors)

    @property
    def slot_bytes(self) -> int:
        return max((s.span_bytes for s in self.stages), default=0)

    @property
    def window_bytes(self) -> int:
        return self.window * self.slot_bytes if self.streams else 0

    @property
    def streams(self) -> bool:
        """Whether the engine reads weights while generating (window slots, the reader, the pump)."""
        return self.mode.reads

    @property
    def total_bytes(self) -> int:
        """Everything the engine allocates for weights: must be <= budget."""
        experts = self.experts.memory_bytes if self.experts is not None else 0
        return self.resident_bytes + self.window_bytes + self.vector_bytes + experts

    @property
    def streamed_bytes_per_token(self) -> int:
        """Bytes one decode pass reads: the stages' streamed parts and, for experts, the expected misses."""
        experts = self.experts.expected_bytes_per_token if self.experts is not None else 0.0
        return sum(s.streamed_bytes for s in self.stages) + round(experts)

    @property
    def budget_use(self) -> float:
        return self.total_bytes / self.budget if self.budget else 0.0

    def describe(self) -> str:
        lines = [
            f"plan: mode={self.mode.name} policy={self.policy} window={self.window} budget={fmt_bytes(self.budget)} "
            f"(uses {fmt_bytes(self.total_bytes)} = {100 * self.budget_use:.1f}%)",
            f"  model {fmt_bytes(self.model_bytes)}; resident {fmt_bytes(self.resident_bytes)} + vectors "
            f"{fmt_bytes(self.vector_bytes)} + window {self.window} x {fmt_bytes(self.slot_bytes)}",
            f"  streamed per token: {fmt_bytes(self.streamed_bytes_per_token)}",
        ]
        for s in self.stages:
            parts = []
            for t in s.tensors:
                frac = t.resident_rows / t.info.n_rows
                tag = "all" if frac == 1 else ("-" if frac == 0 else f"{100 * frac:.0f}%")
                parts.append(f"{t.info.role.split('.')[0]}:{tag}")
            lines.append(f"  {s.name:>9}: resident {fmt_bytes(s.resident_bytes):>11}  streams "
                         f"{fmt_bytes(s.streamed_bytes):>11}  [{' '.join(parts)}]")
        if self.experts is not None:
            lines.append(self.experts.describe())
        if self.cost is not None:
            c = self.cost
            lines.append(f"  cost model: disk {c.disk_bps / 1e9:.2f} GB/s, {1e6 * c.request_s:.0f} us/request, "
                         f"kernels {c.compute_bps / 1e9:.1f} GB/s, {1e6 * c.op_s:.0f} us/call")
        for k, v in self.predicted.items():
            lines.append(f"  predicted {k}: {1e3 * v:.1f} ms/token")
        return "\n".join(lines)


def _pad(n: int) -> int:
    return -(-n // RESIDENT_ALIGN) * RESIDENT_ALIGN


@dataclass(frozen=True)
class CostModel:
    """Measured machine figures that turn a plan into predicted seconds per token."""

    disk_bps: float = 2.0e9  # O_DIRECT read bandwidth, bytes/s
    request_s: float = 60e-6  # fixed cost per read request (submission, completion, seek)
    compute_bps: float = 30e9  # weight bytes the kernels consume per second
    op_s: float = 20e-6  # fixed compute cost per matmul (dispatch, threads)

    def stage_times(self, st: StagePlan) -> tuple[float, float]:
        io = sum(self.request_s + n / self.disk_bps for _, _, n in st.segments)
        cpu = len(st.tensors) * self.op_s + st.nbytes / self.compute_bps
        return io, cpu

    def predict(self, plan: Plan, overlap: bool = True) -> float:
        """Seconds per token. With prefetch, I/O overlaps compute: a stage whose bytes arrive
        late stalls only by the excess, and the pipeline runs at the slower of the two sums."""
        io = [self.stage_times(s) for s in plan.stages]
        t_io = sum(a for a, _ in io)
        t_cpu = sum(b for _, b in io)
        if not overlap:
            return t_io + t_cpu
        # The window smooths imbalances between stages; what it cannot hide is each stage's own
        # excess of I/O over compute when the window is drained (uniform stages keep it small).
        stall = sum(max(0.0, a - b) for a, b in io) / max(plan.window, 1)
        return max(t_io, t_cpu) + stall * (1.0 if t_io > t_cpu else 0.0)


@dataclass(frozen=True)
class StageTensors:
    """One stage before planning: its kind, number and matrices [(first row within the tensor, tensor or chunk)]."""

    kind: str
    number: int
    items: list[tuple[int, TensorInfo]]
    chunks: int = 1

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for _, t in self.items)


def stage_tensors(gf: GGUFFile) -> list[StageTensors]:
    """The streaming order: each layer's matrices (file order), then the output head.

    The head is cut into row chunks no larger than the largest layer, so that a
    large vocabulary (SmolLM2's tied 30 MB head vs 2.2 MB layers) does not set the
    window's slot size.
    """
    c = gf.config
    stages = [StageTensors("layer", i, [(0, t) for t in gf.layer_tensors(i) if _streamed_by_stage(t)])
              for i in range(c.n_layer)]
    head = gf.by_name["token_embd.weight"] if c.tied_output else gf.by_name["output.weight"]
    limit = max((s.nbytes for s in stages), default=head.nbytes)
    n_chunks = max(1, -(-head.nbytes // limit))
    step = -(-head.n_rows // n_chunks)
    for k, r0 in enumerate(range(0, head.n_rows, step)):
        rows = min(step, head.n_rows - r0)
        chunk = replace(head, shape=(head.row_len, rows), offset=head.offset + r0 * head.row_bytes,
                        nbytes=rows * head.row_bytes)
        stages.append(StageTensors("head", k, [(r0, chunk)], chunks=n_chunks))
    return stages


def _streamed_by_stage(t: TensorInfo) -> bool:
    """A layer's matrices, but not its experts (ExpertPlan) nor its router (always resident)."""
    return len(t.shape) > 1 and t.role not in EXPERT_ROLES and t.role != ROUTER_ROLE


def _vectors(gf: GGUFFile) -> tuple[TensorInfo, ...]:
    """What stays resident whatever the budget: norms, biases, MoE routers."""
    return tuple(t for t in gf.tensors if len(t.shape) == 1 or t.role == ROUTER_ROLE)


def _keep(tensors: list[TensorInfo], resident: int, policy: str) -> list[int]:
    """Resident rows per tensor (in the given order) for `resident` bytes of this stage."""
    rows = [0] * len(tensors)
    if policy == "mixed":  # the same fraction of every tensor
        total = sum(t.nbytes for t in tensors)
        f = min(1.0, resident / total) if total else 0.0
        for i, t in enumerate(tensors):
            rows[i] = min(t.n_rows, int(f * t.n_rows))
        left = resident - sum(r * t.row_bytes for r, t in zip(rows, tensors))
        for i, t in enumerate(tensors):  # hand out what rounding down left over
            extra = min(t.n_rows - rows[i], max(0, left) // t.row_bytes)
            rows[i] += extra
            left -= extra * t.row_bytes
        return rows
    order = ORDER.get(policy)
    rank = {role: k for k, role in enumerate(order)} if order else {}
    idx = sorted(range(len(tensors)), key=lambda i: (rank.get(tensors[i].role, len(rank)), i))
    left = resident
    for i in idx:
        t = tensors[i]
        r = min(t.n_rows, max(0, left) // t.row_bytes)
        rows[i] = r
        left -= r * t.row_bytes
    return rows


def _build(gf, stages_t: list[StageTensors], mode: Mode, policy, budget, window, shares: list[int]) -> Plan:
    stages = []
    for k, (st, share) in enumerate(zip(stages_t, shares)):
        rows = _keep([t for _, t in st.items], share, policy)
        tensors = tuple(TensorPlan(t, k, r, r0) for (r0, t), r in zip(st.items, rows))
        stages.append(StagePlan(k, st.kind, st.number, tensors, st.chunks))
    emb = gf.by_name["token_embd.weight"]
    return Plan(mode, policy, budget, window, tuple(stages), _vectors(gf), emb,
                embedding_resident=False, model_bytes=sum(t.nbytes for t in gf.tensors))


def _fit(gf, stages_t, mode, policy, budget, window, balanced: bool) -> Plan:
    """The plan that keeps the most bytes resident within the budget.

    Balanced: bisect on the streamed bytes per stage S. The plan's total falls as
    S grows (each byte of S frees one resident byte in every stage taller than S
    and costs only `window` bytes of slot), so the smallest S that fits is found
    by bisection. Unbalanced (whole stages, the first ones first): bisect on the
    resident total; the slot is then the largest stage whatever is kept.
    """
    sizes = [st.nbytes for st in stages_t]

    def build(shares):
        return _build(gf, stages_t, mode, policy, budget, window, shares)

    if balanced:
        lo, hi = 0, max(sizes)  # S = max(sizes): nothing resident
        best = build([0] * len(sizes))
        if best.total_bytes > budget:
            return best
        while lo < hi:
            mid = (lo + hi) // 2
            p = build([max(0, b - mid) for b in sizes])
            if p.total_bytes <= budget:
                hi, best = mid, p
            else:
                lo = mid + 1
        return best

    def whole(resident: int) -> list[int]:
        out, left = [], resident
        for b in sizes:
            out.append(b if left >= b else 0)
            left -= out[-1]
        return out

    lo, hi = 0, sum(sizes)
    best = build(whole(0))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        p = build(whole(mid))
        if p.total_bytes <= budget:
            lo, best = mid, p
        else:
            hi = mid - 1
    return best


def minimum_budget(gf: GGUFFile, window: int = 3) -> int:
    stages_t = stage_tensors(gf)
    p = _build(gf, stages_t, MODES["prefetch-only"], "ffn", 0, window, [0] * len(stages_t))
    ex = expert_layers(gf)
    return p.total_bytes + (expert_pool(gf.config, 1, True) * _slot_bytes(ex) if ex else 0)


def _whole(gf: GGUFFile, stages_t: list[StageTensors], mode: Mode, budget: int, window: int) -> Plan:
    """The plan that keeps every tensor of the stages resident, the embedding too."""
    p = _build(gf, stages_t, mode, "ffn", budget, window, [st.nbytes for st in stages_t])
    return replace(p, embedding_resident=True)


def expert_layers(gf: GGUFFile) -> tuple[ExpertLayer, ...]:
    """Each layer's expert tensors (empty for a dense model)."""
    c = gf.config
    n_expert = getattr(c, "n_expert", 0)
    if not n_expert:
        return ()
    return tuple(ExpertLayer(i, tuple(gf.by_name[f"blk.{i}.{r}"] for r in EXPERT_ROLES if f"blk.{i}.{r}" in gf.by_name),
                             n_expert) for i in range(c.n_layer))


def expert_pool(c, batch: int, predict: bool) -> int:
    """Slots for reads in flight: the experts one pass of `batch` sequences can want in a layer (k each,
    at most all of them), and the next layer's predicted ones."""
    return min(c.n_expert, c.n_expert_used * max(1, batch)) + (c.n_expert_used if predict else 0)


def _slot_bytes(layers: tuple[ExpertLayer, ...]) -> int:
    """A slot holds any layer's any expert: the largest sum of its three O_DIRECT spans."""
    return max(L.span_bytes(e) for L in layers for e in range(L.n_expert))


def model_footprint(gf: GGUFFile, stages_t: list[StageTensors] | None = None) -> int:
    """Bytes of weight memory the whole model takes resident (its tensors, each padded as the
    arena pads it): what a percentage budget is a percentage of, so that "100%" holds it all."""
    whole = _whole(gf, stages_t if stages_t is not None else stage_tensors(gf), MODES["memory"], 0, 1).total_bytes
    return whole + sum(_pad(t.nbytes) for L in expert_layers(gf) for t in L.tensors)


def plan_budget(gf: GGUFFile, budget: int | str, *, window: int = 3, policy: str = "auto",
                mode: str | Mode = "flexinfer", cost: CostModel | None = None, batch: int = 1) -> Plan:
    """Plan what stays resident for `budget` bytes of weight memory (see module docstring).

    The mode's properties decide the shape of the plan (modes.py); `window` and `policy`
    are the caller's, used where the mode does not fix them. `batch`: the sequences a pass
    carries at most (a mixture of experts needs a read slot for each expert they may want).
    """
    m = get_mode(mode)
    if policy not in POLICIES:
        raise ParameterError(f"unknown policy {policy!r} (one of: {', '.join(POLICIES)})", param="policy")
    if not isinstance(window, int) or window < 1:
        raise ParameterError(f"window: expected an integer >= 1 (stages read ahead of compute), got {window!r}",
                             param="window")
    stages_t = stage_tensors(gf)
    footprint = model_footprint(gf, stages_t)
    budget = parse_size(budget, footprint, what="budget")
    ex = expert_layers(gf)
    if m.resident == "all" or (budget >= footprint and m.locks_beyond_window):
        # (a budget that holds the whole model keeps it all: nothing is left to stream)
        p = _whole(gf, stages_t, m, budget, window)
        if ex:
            c = gf.config
            p = replace(p, experts=ExpertPlan(ex, c.n_expert, c.n_expert_used, "mapped" if m.page_cache else "resident"))
        if m.resident == "all" and not m.page_cache and p.total_bytes > budget:
            raise BudgetError(f"mode {m.name!r} keeps the whole model resident: needs {p.total_bytes:,} bytes "
                              f"({fmt_bytes(p.total_bytes)}), budget is {budget:,} ({fmt_bytes(budget)})")
        return p
    window = m.window or window
    if not ex:
        return _plan_stages(gf, stages_t, m, budget, window, policy, cost)
    c = gf.config
    predict = m.predict and window > 1
    pool = expert_pool(c, batch, predict)
    slot = _slot_bytes(ex)
    left = budget - pool * slot  # for the layers' other tensors, then the expert cache
    whole = _whole(gf, stages_t, m, left, window)
    if m.locks_beyond_window and m.expert_cache and whole.total_bytes <= left:
        p, cached = whole, min(c.n_expert, (left - whole.total_bytes) // (len(ex) * slot))
    else:
        minimum = _build(gf, stages_t, m, "ffn", 0, window, [0] * len(stages_t)).total_bytes + pool * slot
        if budget < minimum:
            raise BudgetError(
                f"budget {budget:,} bytes ({fmt_bytes(budget)}) is below the minimum {minimum:,} bytes "
                f"({fmt_bytes(minimum)}) for mode {m.name!r}: {window} x the largest stage streamed whole + norms "
                f"and routers + {pool} expert read slots of {fmt_bytes(slot)}"
            )
        p, cached = _plan_stages(gf, stages_t, m, left, window, policy, cost), 0
    return replace(p, budget=budget, experts=ExpertPlan(ex, c.n_expert, c.n_expert_used, "cache", cached, pool,
                                                        predict, slot))


def _plan_stages(gf, stages_t, m: Mode, budget: int, window: int, policy: str, cost: CostModel | None) -> Plan:
    """The stages' plan for a budget that cannot hold them all (balanced, preserved by policy, per the mode)."""
    minimum = _build(gf, stages_t, m, "ffn", budget, window, [0] * len(stages_t)).total_bytes
    if budget < minimum:
        raise BudgetError(
            f"budget {budget:,} bytes ({fmt_bytes(budget)}) is below the minimum {minimum:,} bytes "
            f"({fmt_bytes(minimum)}) for mode {m.name!r}: {window} x the largest stage streamed whole + norms"
        )
    if m.resident == "none":  # baselines that lock nothing beyond the window
        return _build(gf, stages_t, m, m.policy or "ffn", budget, window, [0] * len(stages_t))
    balanced = m.resident == "balanced"
    policy = m.policy or policy
    if policy != "auto":
        return _fit(gf, stages_t, m, policy, budget, window, balanced)
    cost = cost or CostModel()
    cands = {pol: _fit(gf, stages_t, m, pol, budget, window, balanced) for pol in ("ffn", "attn", "mixed")}
    predicted = {pol: cost.predict(p, overlap=m.overlaps) for pol, p in cands.items()}
    best = min(predicted, key=lambda k: (round(predicted[k], 9), ("ffn", "attn", "mixed").index(k)))
    return replace(cands[best], predicted=predicted, cost=cost)
