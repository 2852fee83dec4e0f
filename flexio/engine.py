"""Prompt -> streamed text: tokenizer, weight store, forward passes on a compute thread, sampling.

`Engine` is the async API (`async with Engine(...) as e: async for piece in e.generate(...)`);
`generate()` at the bottom is the synchronous wrapper for scripts. Forward passes
run on one dedicated compute thread (Numba kernels release the GIL), so the event
loop stays free for the application and for weight I/O. Two generations on one
engine are serialised by a lock, never interleaved.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numba
import numpy as np

from .fetch import model_path
from .gguf import GGUFFile, open_gguf
from .model import GlobalWeights, KVCache, Model, layer_weights, vector, weight
from .sampling import Sampler, SamplingParams
from .tokenizer import StreamDecoder, Tokenizer


@dataclass(frozen=True)
class GenerationStats:
    prompt_tokens: int
    prompt_seconds: float
    decode_tokens: int
    decode_seconds: float
    stop_reason: str  # "eos", "length" or "cancelled"

    @property
    def prompt_tok_s(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        # the first generated token comes from the prefill pass; decode passes make the rest
        n = max(self.decode_tokens - 1, 0)
        return n / self.decode_seconds if self.decode_seconds > 0 else 0.0


class MemoryStore:
    """Every tensor resident in RAM: the `memory` mode (and the in-memory reference)."""

    def __init__(self, gf: GGUFFile):
        self.gf = gf
        raw = {t.name: gf.read_tensor_bytes(t) for t in gf.tensors}
        self._layers = []
        for i in range(gf.config.n_layer):
            ts = {t.role: (t, [(0, raw[t.name])]) for t in gf.layer_tensors(i)}
            self._layers.append(layer_weights(ts))
        bn = gf.by_name
        emb = weight(bn["token_embd.weight"], [(0, raw["token_embd.weight"])])
        out = emb if gf.config.tied_output else weight(bn["output.weight"], [(0, raw["output.weight"])])
        self.globals = GlobalWeights(emb, vector(bn["output_norm.weight"], raw["output_norm.weight"]), out)

    def layer(self, i: int):
        return self._layers[i]

    def close(self) -> None:
        self._layers = []


class Engine:
    """Load a GGUF model and generate text from it.

    model: a path to a .gguf file or a known model name ("smollm2", fetched on first use).
    threads: compute threads (default: all cores). n_ctx: context length (default min(train ctx, 4096)).
    """

    def __init__(self, model: str, *, threads: int | None = None, n_ctx: int | None = None, mode: str = "memory"):
        if mode != "memory":
            raise ValueError(f"unknown mode {mode!r}")
        self.model_ref = model
        self.threads = threads or os.cpu_count() or 1
        self.mode = mode
        self._n_ctx = n_ctx
        self._lock = asyncio.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self.stats: GenerationStats | None = None

    # --- lifecycle --------------------------------------------------------------

    async def __aenter__(self) -> "Engine":
        await self.open()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def open(self) -> None:
        path = model_path(self.model_ref)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flexio-compute")
        try:
            await self._run(self._load, path)
        except BaseException:
            self._pool.shutdown(wait=True)
            self._pool = None
            raise

    def _load(self, path: str) -> None:
        numba.set_num_threads(min(self.threads, numba.config.NUMBA_NUM_THREADS))
        self.gguf = open_gguf(path)
        self.config = self.gguf.config
        self.tokenizer = Tokenizer.from_gguf(self.gguf)
        self.n_ctx = min(self._n_ctx or min(self.config.n_ctx_train, 4096), self.config.n_ctx_train)
        self.model = Model(self.config, self.n_ctx)
        self.store = MemoryStore(self.gguf)

    async def close(self) -> None:
        if self._pool is None:
            return
        async with self._lock:
            pool, self._pool = self._pool, None
            pool.submit(self.store.close)
            pool.shutdown(wait=True)

    async def _run(self, fn, *args):
        if self._pool is None:
            raise RuntimeError("engine is closed")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # --- forward pass (compute thread) ----------------------------------------------

    def forward(self, tokens: Sequence[int], cache: KVCache) -> np.ndarray:
        """Run tokens (at positions cache.pos..) through every layer; return the last token's logits."""
        n = len(tokens)
        pos0 = cache.pos
        cache.reserve(pos0 + n)
        x = self.model.embed(self.store.globals, np.asarray(tokens))
        for i in range(self.config.n_layer):
            self.model.layer(i, self.store.layer(i), x, cache, pos0)
        cache.pos = pos0 + n
        return self.model.logits(self.store.globals, x[-1:])

    # --- generation -------------------------------------------------------------

    def prompt_tokens(self, prompt: str, chat: bool = False, system: str | None = None) -> list[int]:
        if chat:
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            text = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
            return self.tokenizer.encode(text, parse_special=True)
        return self.tokenizer.encode(prompt)

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
                self.stats = GenerationStats(len(tokens), t_prompt, generated, t_dec, reason)

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
