"""`python -m flexio generate` -> streamed text on stdout and tok/s on stderr (or one JSON object)."""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import threading
import time

from .fetch import DEFAULT_MODEL
from .options import add_engine_arguments, engine_kwargs
from .sampling import SamplingParams


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=DEFAULT_MODEL, help="a .gguf path or a known model name (default: %(default)s)")
    p.add_argument("--prompt", "-p", default="The capital of France is", help="prompt text (UTF-8)")
    p.add_argument("-n", "--max-tokens", type=int, default=64, help="maximum new tokens, >= 0 (default: %(default)s)")
    p.add_argument("--temperature", "--temp", "-t", type=float, default=0.0, help="0 = greedy (default), else >= 0")
    p.add_argument("--top-k", type=int, default=40, help="sample among the k most likely tokens, 0 = off (default: 40)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling, in (0, 1]; 1 = off (default: 0.95)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (sampling is reproducible when set)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-generation tokens "
                   "(as llama.cpp's --ignore-eos: benchmarks get exactly -n tokens)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("-c", "--ctx", type=int, default=None,
                   help="context length in tokens; 0 = the model's own (default: the model's own, at most 4096)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    add_engine_arguments(p)
    p.add_argument("--show-plan", action="store_true", help="print the memory plan to stderr before generating")


class Status:
    """One status line on stderr while the engine loads: a rich spinner on a terminal, else a plain line
    for any step still running after a second.

    A step that took longer than a second is reported when it ends, with its time: the first run
    compiles the kernels (a minute or two, then cached on disk) and must not look like a hang.
    """

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(stderr=True, highlight=False)
        self.live = None
        self.timer: threading.Timer | None = None
        self.step: str | None = None
        self.t0 = 0.0

    def __call__(self, what: str) -> None:
        self._end_step()
        self.step, self.t0 = what, time.perf_counter()
        if self.console.is_terminal:
            if self.live is None:
                self.live = self.console.status(what)
                self.live.start()
            else:
                self.live.update(what)
        else:
            self.timer = threading.Timer(1.0, print, args=(f"flexio: {what} ...",), kwargs={"file": sys.stderr,
                                                                                             "flush": True})
            self.timer.daemon = True
            self.timer.start()

    def _end_step(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        took = time.perf_counter() - self.t0
        if self.step is not None and took > 1.0:
            name = self.step.split(" (")[0]
            if name == "loading kernels":
                from numba.core.config import CACHE_DIR

                name = f"loaded kernels (cached in {CACHE_DIR or 'the package'}: the next run starts faster)"
            self.console.print(f"flexio: {name}: {took:.1f} s", soft_wrap=True)
        self.step = None

    def done(self) -> None:
        self._end_step()
        if self.live is not None:
            self.live.stop()
            self.live = None


async def _generate(args: argparse.Namespace) -> dict:
    from .engine import Engine
    from .tokenizer import StreamDecoder

    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    status = Status() if not args.json else None
    e = Engine(args.model, n_ctx=args.ctx, progress=status, **engine_kwargs(args))
    try:
        try:
            await e.open()
        finally:
            if status is not None:
                status.done()
        if args.show_plan:
            print(e.describe(), file=sys.stderr)
        prompt_ids = e.prompt_tokens(args.prompt, chat=args.chat)
        tokens: list[int] = []
        dec = StreamDecoder(e.tokenizer)
        ex0 = None
        async for tok in e.generate_tokens(prompt_ids, args.max_tokens, sampling, ignore_eos=args.ignore_eos):
            if not tokens:  # the first token comes from the prompt's pass: decode starts now
                ex0 = e.expert_statistics()
            tokens.append(tok)
            if not args.json:
                sys.stdout.write(dec.push(tok))
                sys.stdout.flush()
        if not args.json:
            sys.stdout.write(dec.flush())
        st = e.stats
        return {
            "model": e.gguf.path,
            "text": e.tokenizer.decode(tokens),
            "tokens": tokens,
            "prompt_tokens": len(prompt_ids),
            "generated_tokens": len(tokens),
            "stop_reason": st.stop_reason,
            "prompt_tok_s": round(st.prompt_tok_s, 2),
            "decode_tok_s": round(st.decode_tok_s, 2),
            "threads": e.threads,
            "n_ctx": e.n_ctx,
            "mode": e.mode.name,
            "policy": e.plan.policy,
            "budget_bytes": e.plan.budget if e.budget is not None else None,
            "streamed_bytes_per_token": e.plan.streamed_bytes_per_token,
            "io_backend": e.reader.backend if e.reader else None,
            "decode_io_wait_s": round(st.decode_io_wait_seconds, 3),
            "decode_stream_gbps": round(st.decode_bytes_read / st.decode_seconds / 1e9, 3) if st.decode_seconds else None,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "load_seconds": e.load_seconds,
            **experts_json(e, ex0, len(tokens)),
        }

    finally:
        await e.close()


def experts_json(e, ex0, generated: int) -> dict:
    """A mixture of experts' decode: how its experts came (cached, predicted, read) per token."""
    ex = e.plan.experts
    if ex is None:
        return {}
    out = {"experts": {"per_token": ex.n_used, "of": ex.n_expert, "where": ex.where, "cached_per_layer":
                       ex.cached_per_layer, "expected_bytes_per_token": round(ex.expected_bytes_per_token)}}
    x1 = e.expert_statistics()
    passes = generated - 1
    if ex0 is not None and x1 is not None and passes > 0:
        d = {f: getattr(x1, f) - getattr(ex0, f) for f in ("wanted", "hits", "predicted_hits", "misses", "predicted",
                                                           "mispredicted", "bytes_read")}
        out["experts"].update(
            hit_rate=round(d["hits"] / d["wanted"], 4) if d["wanted"] else None,
            prediction_hit_rate=round(d["predicted_hits"] / d["predicted"], 4) if d["predicted"] else None,
            reads_per_token=round((d["misses"] + d["predicted"]) / passes, 2),
            mispredicted_per_token=round(d["mispredicted"] / passes, 2),
            bytes_read_per_token=round(d["bytes_read"] / passes))
    return out


def run(args: argparse.Namespace) -> int:
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        runner = asyncio.run
    result = runner(_generate(args))
    if args.json:
        print(json.dumps(result))
    else:
        print()
        print(
            f"[{result['prompt_tokens']} prompt tokens at {result['prompt_tok_s']:.1f} tok/s, "
            f"{result['generated_tokens']} generated at {result['decode_tok_s']:.1f} tok/s, "
            f"stop: {result['stop_reason']}]",
            file=sys.stderr,
        )
    return 0
