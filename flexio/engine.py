"""Prompt -> streamed text: plan, arena, weight stream, forward passes on a compute thread, sampling.

`Engine` is the async API (`async with Engine(...) as e: async for piece in e.generate(...)`);
`generate()` at the bottom is the synchronous wrapper for scripts.

Threads and tasks
  One compute thread runs forward passes (Numba kernels release the GIL). The
  event loop owns the I/O: a pump task (in the engine's TaskGroup) keeps the plan's
  window of stages in flight through the io_uring reader. The two meet in the
  StageStream's counters. Two generations on one engine are serialised by a lock.

Modes (one flag each, same forward pass, token-identical greedy output):
  memory         every tensor resident (locked arena)
  flexinfer      balanced locking + flexible preservation (policy) + prefetch window
  no-preserve    balanced locking, fixed policy (same fraction of every tensor)
  no-balance     whole layers locked (the first ones), the rest prefetched
  prefetch-only  nothing locked beyond the window, prefetched
  no-prefetch    balanced + preservation, window 1 (read when needed)
  sync           nothing locked, window 1 (read each layer when needed, no overlap)
  mmap           llama.cpp's way: views of an mmap, the page cache decides
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from dataclasses import dataclass

import numba
import numpy as np

from .arena import Arena
from .calibrate import calibrate
from .errors import FlexioError
from .fetch import model_path
from .gguf import open_gguf
from .model import LAYER_FIELDS, KVCache, LayerWeights, Model, Weight, vector, warmup_kernels, weight
from .plan import MODES, CostModel, Plan, plan_budget
from .prefetch import StageStream
from .reader import Reader
from .sampling import Sampler, SamplingParams
from .tokenizer import StreamDecoder, Tokenizer


# Kernel loops hand out their row chunks dynamically, this many prange iterations (16 rows each) at a
# time, instead of one fixed half per thread. When something else takes a core for a moment (the
# event loop handling completions, the hypervisor serving the disk), the other thread takes over the
# rest rather than waiting at the end of the loop. Measured on the 7B Q4_0 file, 2 threads, 4
# interleaved runs each: 90 % budget 3.84 -> 4.42 tok/s (median), memory mode unchanged (6.15/6.21).
# numba keeps this per thread: it is set in the compute thread.
PARALLEL_CHUNK = 16


@dataclass(frozen=True)
class GenerationStats:
    prompt_tokens: int
    prompt_seconds: float
    decode_tokens: int
    decode_seconds: float
    stop_reason: str  # "eos", "length" or "cancelled"
    decode_io_wait_seconds: float = 0.0  # of decode_seconds, the compute thread blocked on weight reads
    decode_bytes_read: int = 0  # weight bytes streamed from disk during decode
    # CPU time the hypervisor took from this machine's CPUs during decode (/proc/stat "steal", all
    # CPUs, so other processes' share too). On a VM whose host serves the disk with its own CPU
    # time, streaming while computing shows up here; 0 on bare metal or without /proc/stat.
    decode_cpu_steal_seconds: float = 0.0

    @property
    def prompt_tok_s(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        # the first generated token comes from the prefill pass; decode passes make the rest
        n = max(self.decode_tokens - 1, 0)
        return n / self.decode_seconds if self.decode_seconds > 0 else 0.0


def cpu_steal_seconds() -> float:
    """Seconds of CPU time stolen by the hypervisor so far, summed over all CPUs (0.0 if unknown)."""
    try:
        with open("/proc/stat", "rb") as f:
            fields = f.readline().split()  # cpu user nice system idle iowait irq softirq steal ...
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


class Engine:
    """Load a GGUF model and generate text from it.

    model: a .gguf path or a known model name ("smollm2", fetched on first use).
    budget: bytes (or "1.5GiB", "25%") of memory for weights; None = the whole model (mode "memory").
    window: stages (layers) kept in flight ahead of compute. policy: "auto", "ffn", "attn", "mixed".
    mode: see the module docstring. threads: compute threads (default: all cores).
    n_ctx: context length (default min(train ctx, 4096)). io_backend: "auto", "io_uring", "threads".
    """

    def __init__(self, model: str, *, budget: int | str | None = None, window: int = 3, policy: str = "auto",
                 mode: str | None = None, threads: int | None = None, n_ctx: int | None = None,
                 io_backend: str = "auto", cost: CostModel | None = None, lock: bool = True):
        mode = mode or ("memory" if budget is None else "flexinfer")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r} (one of {', '.join(MODES)})")
        self.model_ref = model
        self.budget, self.window, self.policy, self.mode = budget, window, policy, mode
        self.threads = threads or os.cpu_count() or 1
        self.io_backend, self.cost, self.lock = io_backend, cost, lock
        self._n_ctx = n_ctx
        self._lock = asyncio.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._stack: AsyncExitStack | None = None
        self.stream: StageStream | None = None
        self.reader: Reader | None = None
        self.arena: Arena | None = None
        self.stats: GenerationStats | None = None

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
            await self._run(self._load, path)
            if self.stream.slots:
                tg = await self._stack.enter_async_context(asyncio.TaskGroup())
                self._pump = tg.create_task(self.stream.pump(), name="flexio-pump")
        except BaseException:
            await self.close()
            raise

    def _load(self, path: str) -> None:
        self.gguf = gf = open_gguf(path)
        self.config = gf.config
        self.tokenizer = Tokenizer.from_gguf(gf)
        self.n_ctx = min(self._n_ctx or min(self.config.n_ctx_train, 4096), self.config.n_ctx_train)
        self.model = Model(self.config, self.n_ctx)
        warmup_kernels({t.ggml_type for t in gf.tensors if len(t.shape) > 1}, self.config)
        budget = self.budget if self.budget is not None else sum(t.nbytes for t in gf.tensors) * 2
        if self.cost is None and self.policy == "auto" and self.mode in ("flexinfer", "no-prefetch"):
            self.cost = calibrate(gf, self.threads)  # measured disk and kernel figures for the auto policy
        self.plan: Plan = plan_budget(gf, budget, window=self.window, policy=self.policy, mode=self.mode,
                                      cost=self.cost)
        numba.set_num_threads(min(self.threads, numba.config.NUMBA_NUM_THREADS))
        if self.mode != "mmap":
            # the plan's total counts every buffer padded as the arena pads it; the first slot may need
            # up to a page to reach 4096 alignment, and an all-resident streaming plan keeps 1-page slots
            self.arena = Arena(self.plan.total_bytes + 4096 * (self.plan.window + 1), name="weights", lock=self.lock)
        if self.plan.streams:
            self.reader = Reader(path, backend=self.io_backend).open()
        self.stream = StageStream(gf, self.plan, self.reader, self.arena)
        self._emb_fd = os.open(path, os.O_RDONLY)
        self._build_weights()
        self._seq = 0  # stages consumed so far, across passes (the StageStream's sequence)

    def _build_weights(self) -> None:
        """One weight object per (stage, slot): views made once, reused every pass."""
        st = self.stream
        self._weights = []
        for s in self.plan.stages:
            per_slot = []
            for j in range(st.n_slots):
                parts = st.stage_parts(s.index, j)
                if s.name.startswith("layer"):
                    fields = {LAYER_FIELDS[t.role]: weight(t, p) for t, p in parts}
                    layer = parts[0][0].layer
                    for t in self.gguf.layer_tensors(layer):
                        if len(t.shape) == 1 and t.role in LAYER_FIELDS:
                            fields[LAYER_FIELDS[t.role]] = vector(t, st.vector(t.name))
                    per_slot.append(LayerWeights(**fields))
                else:  # a head chunk: rows numbered in the full vocabulary
                    per_slot.append([Weight(t.name, t.ggml_type, t.n_rows, t.row_len, p) for t, p in parts])
            self._weights.append(per_slot)
        norm = self.gguf.by_name["output_norm.weight"]
        self._output_norm = vector(norm, st.vector(norm.name))

    async def close(self) -> None:
        """Stop the pump, wait for the compute thread, release arena, reader and fds."""
        if self.stream is not None:
            self.stream.abort()  # wakes a compute thread blocked on a stage that will never come
        if self._stack is not None:
            stack, self._stack = self._stack, None
            if getattr(self, "_pump", None) is not None:
                self._pump.cancel()
            await stack.aclose()
            self._pump = None  # a cancelled task keeps its frames (and their buffer views) alive
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await asyncio.get_running_loop().run_in_executor(None, pool.shutdown, True)
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
        if getattr(self, "_emb_fd", None) is not None:
            os.close(self._emb_fd)
            self._emb_fd = None

    async def _run(self, fn, *args):
        if self._pool is None:
            raise RuntimeError("engine is closed")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # --- forward pass (compute thread) ----------------------------------------------

    def forward(self, tokens: Sequence[int], cache: KVCache) -> np.ndarray:
        """Run tokens (at positions cache.pos..) through every stage; return the last token's logits."""
        ids = np.asarray(tokens, dtype=np.int64)
        vocab = self.config.vocab_size
        if ids.size == 0 or ids.min() < 0 or ids.max() >= vocab:
            raise ValueError(f"token ids must be in [0, {vocab}), got {tokens!r:.80}")
        n, pos0 = ids.size, cache.pos
        cache.reserve(pos0 + n)
        emb = self.plan.embedding
        raw, local = self.stream.embed_rows(ids, self._emb_fd)
        x = self.model.embed(Weight(emb.name, emb.ggml_type, raw.shape[0], emb.row_len, [(0, raw)]), local)
        st, model = self.stream, self.model
        h = logits = None
        for s in self.plan.stages:
            stage, slot = st.acquire(self._seq)
            w = self._weights[stage][slot]
            if isinstance(w, LayerWeights):
                model.layer(stage, w, x, cache, pos0)
            else:
                if h is None:
                    h = model.final_norm(self._output_norm, x[-1:])
                    logits = np.empty((1, vocab), np.float32)
                for chunk in w:
                    chunk.matmul(h, logits)
            st.release(self._seq)
            self._seq += 1
        st.passes += 1
        cache.pos = pos0 + n
        return logits[0]

    # --- generation -------------------------------------------------------------

    def prompt_tokens(self, prompt: str, chat: bool = False, system: str | None = None) -> list[int]:
        if chat:
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            text = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
            return self.tokenizer.encode(text, parse_special=True)
        return self.tokenizer.encode(prompt)

    def _io_counters(self) -> tuple[float, int, float]:
        st = self.stream.statistics() if self.stream is not None else None
        wait, nbytes = (st.compute_wait_s, st.bytes_read) if st else (0.0, 0)
        return wait, nbytes, cpu_steal_seconds()

    async def generate_tokens(
        self, tokens: Sequence[int], max_tokens: int = 128, sampling: SamplingParams | None = None
    ) -> AsyncIterator[int]:
        """Prompt token ids -> generated token ids, streamed; sets self.stats when done."""
        if not tokens:
            raise ValueError("the prompt is empty: nothing to condition on")
        if len(tokens) + max_tokens > self.n_ctx:
            raise ValueError(
                f"prompt ({len(tokens)} tokens) + max_tokens ({max_tokens}) exceeds the context ({self.n_ctx})"
            )
        sampler = Sampler(sampling or SamplingParams())
        stop_ids = self.tokenizer.stop_ids
        async with self._lock:
            cache = KVCache(self.config, self.n_ctx)
            generated, reason = 0, "length"
            t0 = time.perf_counter()
            t_prompt = t_dec = 0.0
            try:
                logits = await self._run(self.forward, list(tokens), cache)
                t_prompt = time.perf_counter() - t0
                t1 = time.perf_counter()
                io0 = self._io_counters()
                while generated < max_tokens:
                    tok = sampler(logits)
                    if tok in stop_ids:
                        reason = "eos"
                        break
                    generated += 1
                    yield tok
                    if generated == max_tokens:
                        break
                    logits = await self._run(self.forward, [tok], cache)
                t_dec = time.perf_counter() - t1
            except (asyncio.CancelledError, GeneratorExit):
                reason = "cancelled"
                raise
            finally:
                io = [b - a for a, b in zip(io0, self._io_counters())] if t_dec else (0.0, 0, 0.0)
                self.stats = GenerationStats(len(tokens), t_prompt, generated, t_dec, reason, io[0], int(io[1]), io[2])

    async def generate(
        self, prompt: str, max_tokens: int = 128, sampling: SamplingParams | None = None, chat: bool = False
    ) -> AsyncIterator[str]:
        """Prompt text -> pieces of generated text as they become valid UTF-8."""
        dec = StreamDecoder(self.tokenizer)
        async for tok in self.generate_tokens(self.prompt_tokens(prompt, chat), max_tokens, sampling):
            piece = dec.push(tok)
            if piece:
                yield piece
        tail = dec.flush()
        if tail:
            yield tail


def generate(model: str, prompt: str, max_tokens: int = 128, *, chat: bool = False,
             sampling: SamplingParams | None = None, **engine_kw) -> str:
    """Synchronous convenience wrapper: the whole generated text."""

    async def _main() -> str:
        async with Engine(model, **engine_kw) as e:
            return "".join([p async for p in e.generate(prompt, max_tokens, sampling, chat)])

    return asyncio.run(_main())
