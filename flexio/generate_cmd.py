"""`python -m flexio generate` -> streamed text on stdout and tok/s on stderr (or one JSON object)."""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys

from .fetch import DEFAULT_MODEL
from .plan import MODES, POLICIES
from .sampling import SamplingParams


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=DEFAULT_MODEL, help="a .gguf path or a known model name (default: %(default)s)")
    p.add_argument("--prompt", "-p", default="The capital of France is", help="prompt text")
    p.add_argument("-n", "--max-tokens", type=int, default=64, help="maximum new tokens (default: %(default)s)")
    p.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=None, help="sampling seed (sampling is reproducible when set)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: all cores)")
    p.add_argument("--ctx", type=int, default=None, help="context length (default: min(train ctx, 4096))")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    p.add_argument("--budget", default=None,
                   help="memory for weights, e.g. 1.5GiB, 800MB, 25%% (default: the whole model, mode memory)")
    p.add_argument("--mode", default=None, choices=MODES, help="weight residency mode (default: flexinfer with "
                   "--budget, else memory)")
    p.add_argument("--window", type=int, default=3, help="layers prefetched ahead of compute (default: %(default)s)")
    p.add_argument("--policy", default="auto", choices=POLICIES, help="which tensors stay resident (default: auto)")
    p.add_argument("--io-backend", default="auto", choices=("auto", "io_uring", "threads"))
    p.add_argument("--show-plan", action="store_true", help="print the memory plan to stderr before generating")


async def _generate(args: argparse.Namespace) -> dict:
    from .engine import Engine
    from .tokenizer import StreamDecoder

    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    async with Engine(args.model, threads=args.threads, n_ctx=args.ctx, budget=args.budget, mode=args.mode,
                      window=args.window, policy=args.policy, io_backend=args.io_backend) as e:
        if args.show_plan:
            print(e.plan.describe(), file=sys.stderr)
        prompt_ids = e.prompt_tokens(args.prompt, chat=args.chat)
        tokens: list[int] = []
        dec = StreamDecoder(e.tokenizer)
        async for tok in e.generate_tokens(prompt_ids, args.max_tokens, sampling):
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
            "mode": e.mode,
            "policy": e.plan.policy,
            "budget_bytes": e.plan.budget if e.budget is not None else None,
            "streamed_bytes_per_token": e.plan.streamed_bytes_per_token,
            "io_backend": e.reader.backend if e.reader else None,
            "decode_io_wait_s": round(st.decode_io_wait_seconds, 3),
            "decode_steal_s": round(st.decode_cpu_steal_seconds, 3),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "decode_stream_gbps": round(st.decode_bytes_read / st.decode_seconds / 1e9, 3) if st.decode_seconds else None,
        }


def run(args: argparse.Namespace) -> int:
    if args.max_tokens < 0:
        raise SystemExit("flexio generate: error: -n must be >= 0")
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
