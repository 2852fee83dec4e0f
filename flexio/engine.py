"""Prompt -> streamed text: plan, arena, weight stream, forward passes on a compute thread, sampling.

`Engine` is the async API (`async with Engine(...) as e: async for piece in e.generate(...)`);
`generate()` at the bottom is the synchronous wrapper for scripts.

Threads and tasks
  One compute thread runs forward passes (Numba kernels release the GIL). The
  event loop owns the I/O: a pump task (in the engine's TaskGroup) keeps the plan's
  window of stages in flight through the io_uring reader. The two meet in the
  StageStream's counters. A scheduler task (also in the TaskGroup) batches concurrent
  generations (flexio/batcher.py): every running sequence rides every pass, so the weights
  are read once per pass for all of them.

Modes (flexio/modes.py defines them; all give the same greedy tokens): memory, flexinfer,
no-preserve, no-balance, prefetch-only, no-prefetch, sync, mmap.

Parameters are checked where they enter (the constructor, `generate_tokens`): a value
outside its range is a ParameterError that names it and gives the range.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from dataclasses import dataclass

import numba
import numpy as np

from .arena import Arena, memory_limit
from .calibrate import calibrate
from .errors import BudgetError, FlexioError, GGUFError, ParameterError
from .fetch import model_path
from .gguf import GGUFFile, ModelConfig, open_gguf
from .batcher import END, Batcher, QueueFullError, Sequence as Request
from .experts import POLICIES as EXPERT_POLICIES, ExpertCache, ExpertStats
from .model import KVCache, LayerWeights, Model, Segment, Weight, vector, warmup_kernels
from .moe import MoEWeights, ResidentExperts
from .modes import POLICIES, Mode, mode as get_mode
from .plan import CostModel, Plan, model_footprint, plan_budget
from .prefetch import StageStream
from .reader import Reader
from .sampling import Sampler, SamplingParams
from .tokenizer import StreamDecoder, Tokenizer
from .units import fmt_bytes, parse_size

log = logging.getLogger("flexio.engine")

# Kernel loops hand out their row chunks dynamically, this many prange iterations (16 rows each) at a
# time, instead of one fixed half per thread. When something else takes a core for a moment (the
# event loop handling completions, the hypervisor serving the disk), the other thread takes over the
# rest rather than waiting at the end of the loop. Measured on the 7B Q4_0 file, 2 threads, 4
# interleaved runs each: 90 % budget 3.84 -> 4.42 tok/s (median), memory mode unchanged (6.15/6.21).
# numba keeps this per thread: it is set in the compute thread.
PARALLEL_CHUNK = 16
DEFAULT_CTX = 4096  # the context when none is given: the model's own, at most this
IO_BACKENDS = ("auto", "io_uring", "threads")
MAX_PARALLEL = 64
PROCESS_RESERVE = 512 << 20  # memory left to the process itself (Python, Numba, tokenizer, scratch) beside weights and KV


@dataclass(frozen=True)
class GenerationStats:
    prompt_tokens: int
    prompt_seconds: float
    decode_tokens: int
    decode_seconds: float
    stop_reason: str  # "eos", "length" or "cancelled"
    decode_io_wait_seconds: float = 0.0  # of decode_seconds, the compute thread blocked on weight reads
    decode_bytes_read: int = 0  # weight bytes streamed from disk during decode

    @property
    def prompt_tok_s(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        # the first generated token comes from the prefill pass; decode passes make the rest
        n = max(self.decode_tokens - 1, 0)
        return n / self.decode_seconds if self.decode_seconds > 0 else 0.0


@dataclass(frozen=True)
class EngineMetrics:
    """What the engine is doing, for monitoring (the server's /metrics). Totals count since open()."""

    parallel: int  # sequences that can run at once
    n_ctx_seq: int  # the context of one sequence, tokens
    requests_running: int  # sequences in the current batch
    requests_waiting: int  # requests waiting for a free sequence slot
    requests_total: int  # generations finished (any stop reason)
    prompt_tokens_total: int
    generated_tokens_total: int
    passes_total: int  # forward passes over the weights
    batch_size_mean: float  # sequences per pass, mean since open (0.0 before the first pass)
    decode_tok_s: float  # generated tokens per second over the last RATE_WINDOW_S seconds of passes
    streamed_bytes_per_pass: int  # weight bytes a pass reads from disk (the plan's)
    bytes_read_total: int  # weight bytes read from disk while generating
    weights_bytes: int  # memory the weights hold (resident + window + vectors)
    kv_cache_bytes: int  # memory the KV caches of all sequence slots hold
    # mixtures of experts (0 for a dense model): experts the layers asked for, found cached, read on demand,
    # read ahead by a prediction and then used, and the bytes expert reads took
    experts_wanted_total: int = 0
    experts_cached_total: int = 0
    experts_missed_total: int = 0
    experts_predicted_total: int = 0
    experts_predicted_used_total: int = 0
    experts_read_bytes_total: int = 0


RATE_WINDOW_S = 10.0


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_threads(threads: int | None) -> int:
    """None or 0 -> every CPU this process may use; else 1..that many (ParameterError otherwise)."""
    n = available_cpus()
    if threads is None or threads == 0:
        return n
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= n:
        raise ParameterError(f"threads: expected 0 (all {n} cores) or 1..{n}, got {threads!r}", param="threads")
    return threads


class Engine:
    """Load a GGUF model and generate text from it.

    model: a .gguf path or a known model name ("smollm2", fetched on first use).
    budget: bytes (or "1.5GiB", "25%") of memory for weights; None = the whole model (mode "memory").
    window: stages (layers) kept in flight ahead of compute (>= 1). policy: "auto", "ffn", "attn", "mixed".
    mode: see flexio/modes.py. threads: compute threads (None or 0: all cores).
    n_ctx: context length in tokens shared by the `parallel` sequences, as llama-server's -c (None: the
    model's own, at most 4096; 0: the model's own); each sequence may use n_ctx // parallel of it.
    parallel: sequences generated at once (1..MAX_PARALLEL), each with a KV cache allocated at open;
    max_waiting: requests that may wait for a sequence slot. io_backend: "auto", "io_uring", "threads".
    progress: called on the event loop with a short description of each loading step as it starts
    (the CLI shows it as a status line).
    Every attribute exists from construction; the model-dependent ones are set by `open()`.
    """

    def __init__(self, model: str, *, budget: int | str | None = None, window: int = 3, policy: str = "auto",
                 mode: str | Mode | None = None, threads: int | None = None, n_ctx: int | None = None,
                 io_backend: str = "auto", cost: CostModel | None = None, lock: bool = True,
                 parallel: int = 1, max_waiting: int = 1024, expert_policy: str = "lfu",
                 progress: Callable[[str], None] | None = None):
        self.mode = get_mode(mode or ("memory" if budget is None else "flexinfer"))
        if policy not in POLICIES:
            raise ParameterError(f"policy: expected one of {', '.join(POLICIES)}, got {policy!r}", param="policy")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ParameterError(f"window: expected an integer >= 1 (stages read ahead of compute), got {window!r}",
                                 param="window")
        if n_ctx is not None and (isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 0):
            raise ParameterError(f"n_ctx: expected 0 (the model's own context) or a positive number of tokens, "
                                 f"got {n_ctx!r}", param="n_ctx")
        if isinstance(parallel, bool) or not isinstance(parallel, int) or not 1 <= parallel <= MAX_PARALLEL:
            raise ParameterError(f"parallel: expected 1..{MAX_PARALLEL} sequences, got {parallel!r}", param="parallel")
        if isinstance(max_waiting, bool) or not isinstance(max_waiting, int) or max_waiting < 0:
            raise ParameterError(f"max_waiting: expected an integer >= 0, got {max_waiting!r}", param="max_waiting")
        if expert_policy not in EXPERT_POLICIES:
            raise ParameterError(f"expert_policy: expected one of {', '.join(EXPERT_POLICIES)}, got {expert_policy!r}",
                                 param="expert_policy")
        if io_backend not in IO_BACKENDS:
            raise ParameterError(f"io_backend: expected one of {', '.join(IO_BACKENDS)}, got {io_backend!r}",
                                 param="io_backend")
        if budget is not None and not (isinstance(budget, str) and budget.strip().endswith("%")):
            parse_size(budget, what="budget")  # a malformed size is refused before any file is opened
        self.model_ref = model
        self.budget, self.window, self.policy, self.parallel = budget, window, policy, parallel
        self.max_waiting, self.expert_policy = max_waiting, expert_policy
        self.threads = check_threads(threads)
        self.io_backend, self.cost, self.lock = io_backend, cost, lock
        self._n_ctx = n_ctx
        self._progress = progress
        self._pool: ThreadPoolExecutor | None = None
        self._stack: AsyncExitStack | None = None
        self._pump: asyncio.Task | None = None
        self._emb_fd: int | None = None
        self._weights: list[list] = []  # [stage][slot] -> LayerWeights or head chunk weights
        self._output_norm: np.ndarray | None = None
        self._warned_deleted = False
        self._batcher: Batcher | None = None  # requests -> rows of each pass (set by open)
        self._wake = asyncio.Event()  # a request arrived or left: the scheduler looks again
        self._caches: list[KVCache] = []  # one per sequence slot, allocated by open
        self._scheduler: asyncio.Task | None = None
        self._totals = {"passes": 0, "batched": 0}
        self._recent: list[tuple[float, int]] = []  # (time a pass ended, tokens it generated), last RATE_WINDOW_S
        # set by open():
        self.gguf: GGUFFile | None = None
        self.config: ModelConfig | None = None
        self.tokenizer: Tokenizer | None = None
        self.n_ctx = 0  # the context shared by the parallel sequences
        self.n_ctx_seq = 0  # the context of one sequence: n_ctx // parallel
        self.model: Model | None = None
        self.plan: Plan | None = None
        self.arena: Arena | None = None
        self.reader: Reader | None = None
        self.stream: StageStream | None = None
        self.experts: ExpertCache | ResidentExperts | None = None  # a mixture of experts' experts
        self.stats: GenerationStats | None = None
        self.load_seconds: dict[str, float] = {}  # loading step -> seconds (e.g. "kernels": JIT compile or cache load)

    # --- lifecycle --------------------------------------------------------------

    async def __aenter__(self) -> "Engine":
        await self.open()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def open(self) -> None:
        path = model_path(self.model_ref)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flexio-compute",
                                        initializer=numba.set_parallel_chunksize, initargs=(PARALLEL_CHUNK,))
        self._stack = AsyncExitStack()
        try:
            await self._step("model", f"reading {os.path.basename(path)}", self._open_model, path)
            types = {t.ggml_type for t in self.gguf.tensors if len(t.shape) > 1}
            await self._step("kernels", "loading kernels (the first run compiles them: a minute or two)",
                             warmup_kernels, types, self.config)
            if self.cost is None and self.policy == "auto" and self.mode.policy is None and self.mode.reads:
                await self._step("calibrate", "measuring this disk and the kernels (once per disk)", self._calibrate)
            await self._step("weights", "reading resident weights", self._load_weights, path)
            await self._step("kv", "allocating the KV caches", self._allocate_caches)
            if isinstance(self.experts, ExpertCache):
                self.experts.bind(asyncio.get_running_loop())  # expert reads run on this loop, with the pump's
            self._batcher = Batcher(self.parallel, self.max_waiting)
            tg = await self._stack.enter_async_context(asyncio.TaskGroup())
            if self.stream.slots:
                self._pump = tg.create_task(self.stream.pump(), name="flexio-pump")
            self._scheduler = tg.create_task(self._schedule(), name="flexio-scheduler")
        except BaseException:
            await self.close()
            raise

    async def _step(self, key: str, what: str, fn, *args) -> None:
        if self._progress is not None:
            self._progress(what)
        t0 = time.perf_counter()
        await self._run(fn, *args)
        self.load_seconds[key] = round(time.perf_counter() - t0, 3)

    def _open_model(self, path: str) -> None:
        self.gguf = gf = open_gguf(path)
        self.config = c = gf.config
        self.tokenizer = Tokenizer.from_gguf(gf)
        if self._n_ctx is None:
            self.n_ctx = min(c.n_ctx_train, DEFAULT_CTX)
        else:
            self.n_ctx = self._n_ctx or c.n_ctx_train
        self.n_ctx_seq = self.n_ctx // self.parallel
        if self.n_ctx_seq < 1:
            raise ParameterError(f"n_ctx: {self.n_ctx} tokens cannot be shared by {self.parallel} sequences: "
                                 f"expected at least {self.parallel}", param="n_ctx")
        if self.n_ctx_seq > c.n_ctx_train:
            log.warning("a sequence's context of %d tokens is larger than the context the model was trained for "
                        "(%d): output past %d tokens may degrade", self.n_ctx_seq, c.n_ctx_train, c.n_ctx_train)
        factors = c.rope_factor_tensor(self.n_ctx_seq)  # llama 3's rope_freqs, LongRoPE's long or short set
        if factors is not None:
            t = gf.by_name[factors]
            factors = vector(t, gf.read_tensor_bytes(t)).copy()
            if not (np.isfinite(factors).all() and (factors > 0).all()):
                bad = next(float(f) for f in factors if not (np.isfinite(f) and f > 0))
                raise GGUFError(f"tensor {t.name!r} holds {bad}: rope frequency factors divide the rotation "
                                "angles, expected finite numbers > 0")
        self.model = Model(c, self.n_ctx_seq, factors)
        numba.set_num_threads(min(self.threads, numba.config.NUMBA_NUM_THREADS))

    def _allocate_caches(self) -> None:
        """One KV cache per sequence slot, committed now; refused when they do not fit beside the weights."""
        per_seq = KVCache.bytes_for(self.config, self.n_ctx_seq)
        total = per_seq * self.parallel
        limit = memory_limit()
        weights = self.plan.total_bytes if not self.mode.page_cache else 0
        if limit is not None and weights + total + PROCESS_RESERVE > limit[0]:
            raise BudgetError(
                f"the KV caches of {self.parallel} sequence(s) x {self.n_ctx_seq} tokens need {total:,} bytes "
                f"({fmt_bytes(total)}), but {limit[1]} ({fmt_bytes(limit[0])}) leaves "
                f"{fmt_bytes(max(0, limit[0] - weights - PROCESS_RESERVE))} beside the weights' {fmt_bytes(weights)} "
                f"and {fmt_bytes(PROCESS_RESERVE)} for the process: lower the context, --parallel or the budget")
        self._caches = [KVCache(self.config, self.n_ctx_seq, preallocate=True) for _ in range(self.parallel)]

    def describe(self) -> str:
        """The memory plan (what stays resident, what streams) and the KV caches beside it."""
        kv = sum(c.nbytes for c in self._caches)
        return (f"{self.plan.describe()}\n  KV caches: {self.parallel} x {self.n_ctx_seq} tokens = {fmt_bytes(kv)} "
                f"(beside the budget); context {self.n_ctx} tokens shared by {self.parallel} sequence(s)")

    def _calibrate(self) -> None:
        self.cost = calibrate(self.gguf, self.threads)  # measured disk and kernel figures for the auto policy

    def _load_weights(self, path: str) -> None:
        gf = self.gguf
        footprint = model_footprint(gf)
        budget = footprint if self.budget is None else parse_size(self.budget, footprint, what="budget")
        limit = memory_limit()
        if limit is not None and not self.mode.page_cache and budget > limit[0]:
            what = "the whole model resident" if self.budget is None else f"a budget of {fmt_bytes(budget)}"
            raise BudgetError(f"{what} needs {budget:,} bytes, more than {limit[1]}: {limit[0]:,} bytes "
                              f"({fmt_bytes(limit[0])}); give a smaller budget (e.g. --budget 50%)")
        self.plan = plan_budget(gf, budget, window=self.window, policy=self.policy, mode=self.mode, cost=self.cost,
                                batch=self.parallel)
        if not self.mode.page_cache:
            # the plan's total counts every buffer padded as the arena pads it; the first slot may need
            # up to a page to reach 4096 alignment, and an all-resident streaming plan keeps 1-page slots
            self.arena = Arena(self.plan.total_bytes + 4096 * (self.plan.window + 1), name="weights", lock=self.lock)
        if self.plan.streams:
            self.reader = Reader(path, backend=self.io_backend).open()
        self.stream = StageStream(gf, self.plan, self.reader, self.arena)
        ex = self.plan.experts
        if ex is not None:
            self.experts = (ExpertCache(ex, self.reader, self.arena, self.expert_policy) if ex.where == "cache"
                            else ResidentExperts(ex, self.stream.expert_tensors))
        self._emb_fd = os.open(path, os.O_RDONLY)
        self._build_weights()

    def _build_weights(self) -> None:
        """One weight object per (stage, slot): views made once, reused every pass."""
        st = self.stream
        self._weights = []
        for s in self.plan.stages:
            per_slot = []
            for j in range(st.n_slots):
                parts = st.stage_parts(s.index, j)
                if s.kind == "layer":
                    vectors = [(t, st.vector(t.name)) for t in self.gguf.layer_tensors(s.number) if len(t.shape) == 1]
                    per_slot.append(LayerWeights.build(self.config, parts, vectors, self._moe_weights(s.number)))
                else:  # a head chunk: rows numbered in the full vocabulary
                    per_slot.append([Weight(t.name, t.ggml_type, t.n_rows, t.row_len, p) for t, p in parts])
            self._weights.append(per_slot)
        norm = self.gguf.by_name["output_norm.weight"]
        self._output_norm = vector(norm, st.vector(norm.name))

    def _moe_weights(self, layer: int) -> MoEWeights | None:
        """A layer's mixture-of-experts FFN: its resident router, the expert source, the next layer's router."""
        ex = self.plan.experts
        if ex is None:
            return None
        c, st = self.config, self.stream

        def router(i: int) -> np.ndarray:
            raw = st.vector(f"blk.{i}.ffn_gate_inp.weight")  # F32 (n_expert, n_embd), checked at open
            return raw.view(np.float32).reshape(c.n_expert, c.n_embd)

        def norm(i: int) -> np.ndarray:
            t = self.gguf.by_name[f"blk.{i}.ffn_norm.weight"]
            return vector(t, st.vector(t.name))

        nxt = layer + 1 < c.n_layer
        return MoEWeights(layer, router(layer), tuple(t.ggml_type for t in ex.layers[layer].tensors), self.experts,
                          c.n_expert_used, norm=norm(layer), next_router=router(layer + 1) if nxt else None,
                          next_norm=norm(layer + 1) if nxt else None, predict=ex.predict, eps=c.norm_eps)

    async def close(self) -> None:
        """Stop the pump, wait for the compute thread, release arena, reader and fds. Idempotent."""
        if self.stream is not None:
            self.stream.abort()  # wakes a compute thread blocked on a stage that will never come
        if isinstance(self.experts, ExpertCache):
            self.experts.abort()  # ... or on an expert
        if self._stack is not None:
            stack, self._stack = self._stack, None
            for task in (self._pump, self._scheduler):
                if task is not None:
                    task.cancel()
            await stack.aclose()
            self._pump = self._scheduler = None  # a cancelled task keeps its frames (and their buffer views) alive
        if isinstance(self.experts, ExpertCache):
            await self.experts.drain()  # the kernel must be done with every expert slot
        if self._batcher is not None:
            self._batcher.close(FlexioError("the engine was closed during the generation"))
            self._batcher = None
        self._caches = []
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await asyncio.get_running_loop().run_in_executor(None, pool.shutdown, True)
        if isinstance(self.experts, ExpertCache):
            self.experts.close()
        self.experts = None
        if self.stream is not None:
            self.stream.close()
            self.stream = None
        self._weights = []
        self._output_norm = None
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        if self.arena is not None:
            arena, self.arena = self.arena, None
            try:
                arena.close()
            except FlexioError:
                # A caller still holds an exception whose traceback references weight views: the
                # pages are already unlocked, and the mapping goes when that exception is dropped.
                pass
        if self._emb_fd is not None:
            os.close(self._emb_fd)
            self._emb_fd = None

    async def _run(self, fn, *args):
        if self._pool is None:
            raise FlexioError("the engine is closed (or was never opened)")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # --- forward pass (compute thread) ----------------------------------------------

    def forward(self, tokens: Sequence[int], cache: KVCache) -> np.ndarray:
        """Run tokens (at positions cache.pos..) of one sequence through every stage; return the last
        token's logits. (Generation goes through `generate_tokens`, which batches; this is for tests.)"""
        cache.reserve(cache.pos + len(tokens))
        return self._forward_rows([(list(tokens), cache, cache.pos, True)])[0]

    def _forward_rows(self, rows: list[tuple[list[int], KVCache, int, bool]]) -> list[np.ndarray | None]:
        """One pass over the weights for several sequences: rows of (token ids, KV cache, position of the
        first id, whether its last position's logits are wanted) -> those logits (None where not).
        The weights are read once for all; each sequence's arithmetic is the same as if it ran alone."""
        vocab = self.config.vocab_size
        ids = np.asarray([t for r in rows for t in r[0]], dtype=np.int64)
        if ids.size == 0 or ids.min() < 0 or ids.max() >= vocab:
            raise ParameterError(f"token ids: expected 1 or more ids in [0, {vocab}), got {ids.tolist()!r:.80}",
                                 param="tokens")
        segments, last, r0 = [], [], 0
        for toks, cache, pos0, want in rows:
            if pos0 + len(toks) > cache.n_ctx:
                raise ParameterError(f"tokens: positions {pos0}..{pos0 + len(toks) - 1} are past the context of "
                                     f"{cache.n_ctx} tokens", param="tokens")
            segments.append(Segment(r0, len(toks), cache, pos0))
            if want:
                last.append(r0 + len(toks) - 1)
            r0 += len(toks)
        emb = self.plan.embedding
        raw, local = self.stream.embed_rows(ids, self._emb_fd)
        x = self.model.embed(Weight(emb.name, emb.ggml_type, raw.shape[0], emb.row_len, [(0, raw)]), local)
        st, model = self.stream, self.model
        h = logits = None
        try:
            for _ in self.plan.stages:
                stage, slot = st.acquire()
                try:
                    w = self._weights[stage][slot]
                    if isinstance(w, LayerWeights):
                        model.layer(self.plan.stages[stage].number, w, x, segments)
                    elif last:
                        if h is None:
                            h = model.final_norm(self._output_norm, np.ascontiguousarray(x[last]))
                            logits = np.empty((len(last), vocab), np.float32)
                        for chunk in w:
                            chunk.matmul(h, logits)
                        if stage == len(self.plan.stages) - 1:
                            model.finish_logits(logits)
                finally:
                    st.release()
        except BaseException:
            self._resync()
            raise
        for seg in segments:
            seg.cache.pos = seg.pos0 + seg.n
        out, k = [], 0
        for _toks, _cache, _pos0, want in rows:
            out.append(logits[k] if want else None)
            k += want
        return out

    def _resync(self) -> None:
        """After a pass failed midway, step the stream to the next pass boundary so that the next pass
        gets its stages in order (if the stream itself failed, this raises its error again: nothing to do)."""
        st = self.stream
        try:
            while st.consumed % st.n_stages:
                st.acquire()
                st.release()
        except FlexioError:
            pass

    # --- generation -------------------------------------------------------------

    def prompt_tokens(self, prompt: str, chat: bool = False, system: str | None = None) -> list[int]:
        """Text (or one user message, with chat=True) -> the token ids the model sees."""
        if not isinstance(prompt, str):
            raise ParameterError(f"prompt: expected a string, got {type(prompt).__name__}", param="prompt")
        bad = next((i for i, ch in enumerate(prompt) if "\ud800" <= ch <= "\udfff"), None)
        if bad is not None:  # what Python makes of bytes that are not UTF-8 (surrogateescape)
            raise ParameterError(f"prompt: expected UTF-8 text, got an invalid byte at character {bad} "
                                 f"({prompt[max(0, bad - 10):bad]!r} then byte 0x{ord(prompt[bad]) & 0xFF:02x})",
                                 param="prompt")
        if chat:
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            return self.chat_tokens(msgs)
        return self.tokenizer.encode(prompt)

    def chat_tokens(self, messages: list[dict]) -> list[int]:
        """Chat messages ({role, content}) -> prompt token ids through the model's chat template.

        A template that writes BOS itself, for a tokenizer that adds one, would give two: one is kept,
        as llama-server does. :raises GGUFError: the model has no (usable) template; ParameterError:
        the template refuses these messages."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = self.tokenizer.encode(text, parse_special=True)
        bos = self.tokenizer.bos_id
        if len(ids) > 1 and bos is not None and ids[0] == ids[1] == bos:
            del ids[0]
        return ids

    @property
    def healthy(self) -> bool:
        """False once the weight stream has failed (an I/O error): every later generation would fail too."""
        return self.stream is not None and self.stream.error is None

    def check_request(self, n_prompt: int, max_tokens: int) -> None:
        """Refuse (ParameterError, with the allowed range) a prompt that is empty or does not fit the context."""
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
            raise ParameterError(f"max_tokens: expected an integer >= 0, got {max_tokens!r}", param="max_tokens")
        if n_prompt == 0:
            raise ParameterError("prompt: expected at least one token, got an empty prompt", param="prompt")
        n = self.n_ctx_seq
        if n_prompt > n:
            raise ParameterError(f"prompt: {n_prompt} tokens do not fit the context of {n} tokens "
                                 f"(raise the context, up to the model's {self.config.n_ctx_train})", param="prompt")
        if n_prompt + max_tokens > n:
            raise ParameterError(
                f"max_tokens: the prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) = {n_prompt + max_tokens} "
                f"exceeds the context of {n} tokens: expected max_tokens <= {n - n_prompt} "
                f"(or a larger context, up to the model's {self.config.n_ctx_train})", param="max_tokens")

    def _io_counters(self) -> tuple[float, int]:
        """(seconds the compute thread waited for reads, bytes read): the stages' and the experts'."""
        st = self.stream.statistics()
        wait, nbytes = st.compute_wait_s, st.bytes_read
        if isinstance(self.experts, ExpertCache):
            ex = self.experts.statistics()
            wait, nbytes = wait + ex.wait_s, nbytes + ex.bytes_read
        return wait, nbytes

    def _check_file(self) -> None:
        """Warn once when the model file was deleted under us (we go on through the open descriptor)."""
        if not self._warned_deleted and self._emb_fd is not None and os.fstat(self._emb_fd).st_nlink == 0:
            self._warned_deleted = True
            log.warning("the model file %s was deleted while open: generation goes on from the open file, "
                        "whose disk space is freed when the engine closes", self.gguf.path)

    async def generate_tokens(
        self, tokens: Sequence[int], max_tokens: int = 128, sampling: SamplingParams | None = None,
        ignore_eos: bool = False,
    ) -> AsyncIterator[int]:
        """Prompt token ids -> generated token ids, streamed; sets self.stats when done.

        Concurrent calls run together: up to `parallel` sequences share every forward pass, the
        others wait for a slot (at most `max_waiting`, beyond that QueueFullError). Leaving the
        iteration early (break, cancellation) frees the slot at the next pass.
        ignore_eos: keep generating past end-of-generation tokens (as llama.cpp's --ignore-eos), for
        benchmarks that need a fixed number of tokens.
        """
        if self._batcher is None:
            raise FlexioError("the engine is not open: use `async with Engine(...)` or `await engine.open()`")
        if self._scheduler.done() or self._scheduler.get_loop() is not asyncio.get_running_loop():
            raise FlexioError("the engine was opened on another event loop (or that loop has ended): open and use "
                              "an engine on one loop, e.g. inside one asyncio.run(), or with asyncio.Runner")
        tokens = list(tokens)
        self.check_request(len(tokens), max_tokens)
        vocab = self.config.vocab_size
        if any(isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < vocab for t in tokens):
            raise ParameterError(f"tokens: expected token ids in [0, {vocab}), got {tokens!r:.80}", param="tokens")
        seq = Request([int(t) for t in tokens], max_tokens, Sampler(sampling or SamplingParams()),
                      frozenset() if ignore_eos else self.tokenizer.stop_ids)
        self._check_file()
        self._batcher.submit(seq)
        self._wake.set()
        try:
            while True:
                tok = await seq.queue.get()
                if tok is END:
                    break
                yield tok
            if seq.error is not None:
                raise seq.error
        finally:
            if not seq.ended:
                self._batcher.cancel(seq)  # the consumer left early: the slot frees before the next pass
                self._wake.set()
            self.stats = self._seq_stats(seq)

    @staticmethod
    def _seq_stats(seq: Request) -> GenerationStats:
        t_admit = seq.t_admit if seq.t_admit is not None else seq.t_submit
        t_first = seq.t_first if seq.t_first is not None else t_admit
        t_end = seq.t_end if seq.t_end is not None else time.perf_counter()
        return GenerationStats(len(seq.prompt), t_first - t_admit if seq.t_first else 0.0, seq.generated,
                               t_end - t_first if seq.t_first else 0.0, seq.stop_reason or "cancelled",
                               seq.io_wait_s, seq.bytes_read)

    async def _schedule(self) -> None:
        """The batching loop (a task of the engine): plan a pass, run it on the compute thread, apply it."""
        b = self._batcher
        while True:
            if b.idle:
                self._wake.clear()
                await self._wake.wait()
                continue
            rows = b.plan()
            if not rows:  # every running request was just cancelled
                continue
            wait0, bytes0 = self._io_counters()
            try:
                logits = await self._run(self._forward_rows,
                                         [(r.ids, self._caches[r.seq.slot], r.pos0, r.sample) for r in rows])
            except FlexioError as e:
                b.fail(rows, e.with_traceback(None))
                continue
            except Exception as e:  # not one of ours: a bug; the requests end with it, the engine goes on
                log.exception("forward pass failed")
                b.fail(rows, FlexioError(f"forward pass failed: {type(e).__name__}: {e}"))
                continue
            wait1, bytes1 = self._io_counters()
            before = sum(r.seq.generated for r in rows)
            b.finish_pass(rows, logits, wait1 - wait0, bytes1 - bytes0)
            self._count_pass(sum(r.seq.generated for r in rows) - before, len(rows))

    def _count_pass(self, generated: int, batch: int) -> None:
        now = time.monotonic()
        self._totals["passes"] += 1
        self._totals["batched"] += batch
        self._recent.append((now, generated))
        while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
            self._recent.pop(0)

    def metrics(self) -> EngineMetrics:
        """What the engine is doing now and has done since open() (see EngineMetrics)."""
        t = self._totals
        now = time.monotonic()
        recent = [(at, n) for at, n in self._recent if at >= now - RATE_WINDOW_S]
        span = now - recent[0][0] if len(recent) > 1 else 0.0
        plan, b = self.plan, self._batcher
        return EngineMetrics(
            parallel=self.parallel, n_ctx_seq=self.n_ctx_seq,
            requests_running=len(b.running) if b else 0, requests_waiting=len(b.waiting) if b else 0,
            requests_total=b.ended_total if b else 0, prompt_tokens_total=b.prompt_tokens_total if b else 0,
            generated_tokens_total=b.generated_total if b else 0,
            passes_total=t["passes"], batch_size_mean=t["batched"] / t["passes"] if t["passes"] else 0.0,
            decode_tok_s=sum(n for _, n in recent[1:]) / span if span > 0 else 0.0,
            streamed_bytes_per_pass=plan.streamed_bytes_per_token if plan else 0,
            bytes_read_total=self.stream.statistics().bytes_read if self.stream else 0,
            weights_bytes=plan.total_bytes if plan and not self.mode.page_cache else 0,
            kv_cache_bytes=sum(c.nbytes for c in self._caches),
            **self._expert_metrics(),
        )

    def _expert_metrics(self) -> dict[str, int]:
        if not isinstance(self.experts, ExpertCache):
            return {}
        x = self.experts.statistics()
        return dict(experts_wanted_total=x.wanted, experts_cached_total=x.hits, experts_missed_total=x.misses,
                    experts_predicted_total=x.predicted, experts_predicted_used_total=x.predicted_hits,
                    experts_read_bytes_total=x.bytes_read)

    def expert_statistics(self) -> ExpertStats | None:
        """The expert cache's counters since open (None unless experts are read on demand)."""
        return self.experts.statistics() if isinstance(self.experts, ExpertCache) else None

    async def generate(
        self, prompt: str, max_tokens: int = 128, sampling: SamplingParams | None = None, chat: bool = False,
        ignore_eos: bool = False,
    ) -> AsyncIterator[str]:
        """Prompt text -> pieces of generated text as they become valid UTF-8."""
        dec = StreamDecoder(self.tokenizer)
        async for tok in self.generate_tokens(self.prompt_tokens(prompt, chat), max_tokens, sampling, ignore_eos):
            piece = dec.push(tok)
            if piece:
                yield piece
        tail = dec.flush()
        if tail:
            yield tail


def generate(model: str, prompt: str, max_tokens: int = 128, *, chat: bool = False,
             sampling: SamplingParams | None = None, ignore_eos: bool = False, **engine_kw) -> str:
    """Synchronous convenience wrapper: the whole generated text."""

    async def _main() -> str:
        async with Engine(model, **engine_kw) as e:
            return "".join([p async for p in e.generate(prompt, max_tokens, sampling, chat, ignore_eos)])

    return asyncio.run(_main())
