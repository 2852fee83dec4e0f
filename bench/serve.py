"""`python -m flexio bench-serve MODEL --budget B --concurrency 1,2,4,8` -> JSON lines + PNG: what batching buys.

For each budget a real server (`python -m flexio serve`, a child process) is started with
`--parallel` = the largest concurrency, and driven over HTTP by N concurrent streaming
clients (OpenAI /v1/completions, fixed prompts, greedy, `ignore_eos`, a fixed number of
tokens), for each N, the N interleaved within one server's life so that they share its
disk and CPU weather; with --reps the whole ladder repeats and lines give medians.

Per N, one JSON line:
  aggregate_decode_tok_s   tokens after the first of every request / (last end - first first-token)
  steady_decode_tok_s      tokens that arrived while all N requests were decoding / that window
                           (from the last first token to the first end): the rate of the N-row
                           decode passes alone, without the prompt passes that the aggregate's
                           span also holds when requests start at different passes
  per_request_tok_s        median over requests of (tokens - 1) / (its end - its first token)
  ttft_p50_s, ttft_p95_s   time to first token (the prompt's passes, and waiting for a slot)
  batch_size_mean          sequences per forward pass, from the server's /metrics over the run
  streamed_bytes_per_pass  weight bytes each pass reads from disk (the plan's), and bytes_read_per_token
  ratio_to_1               aggregate tok/s over N = 1's, from the same run (steady_ratio_to_1: the steady rate's)
When decode is I/O-bound, a pass costs the same for 1 sequence as for 8, so the ratio approaches N;
when it is compute-bound, it grows as far as the kernels' several-rows path makes extra rows cheap.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time

from flexio.errors import ParameterError
from flexio.fetch import model_path

from .plot import figure, save

HELP = "aggregate decode tok/s of the HTTP server vs concurrent streaming clients (continuous batching)"

PROMPTS = [
    "The history of computing is a story of",
    "Once upon a time, in a village by the sea,",
    "The three most important ideas in physics are",
    "A good recipe for bread starts with",
    "In the year 2050, cities will",
    "The rules of chess say that a knight",
    "Rivers shape the land because",
    "The best way to learn a language is",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a .gguf path or a known model name")
    p.add_argument("--budget", default="none",
                   help="comma-separated weight budgets (sizes or percentages); 'none' = all in memory (default)")
    p.add_argument("--concurrency", default="1,2,4,8", help="comma-separated client counts (default: %(default)s)")
    p.add_argument("-n", "--max-tokens", type=int, default=32, help="tokens per request (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="server compute threads (default: all cores)")
    p.add_argument("--reps", type=int, default=1, help="repetitions of the whole ladder; lines give medians")
    p.add_argument("--out", default=None, help="PNG path (default: bench/results/serve-<model>.png)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the server to load")


def _csv(text: str, what: str, conv=str) -> list:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise ParameterError(f"{what}: expected a comma-separated list, got {text!r}", param=what)
    return [conv(x) for x in items]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m flexio serve` in a child process, on a free port of 127.0.0.1."""

    def __init__(self, model: str, budget: str | None, parallel: int, n_ctx: int, threads: int):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "flexio", "serve", "--model", model, "--port", str(self.port),
               "--parallel", str(parallel), "--n-ctx", str(n_ctx), "--threads", str(threads),
               "--max-queue", str(parallel), "--model-alias", "bench"]
        if budget is not None:
            cmd += ["--budget", budget]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    async def ready(self, client, timeout: float) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}): {self.proc.stderr.read()[-800:]}")
            try:
                if (await client.get(f"{self.url}/health")).status_code == 200:
                    return
            except Exception:  # not listening yet
                pass
            await asyncio.sleep(0.5)
        raise RuntimeError(f"the server did not load within {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def metrics(client, url: str) -> dict[str, float]:
    out = {}
    for line in (await client.get(f"{url}/metrics")).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


async def one_request(client, url: str, prompt: str, n: int) -> dict:
    """One streaming completion: its start, first-token and end times, its token count and the arrival
    time of each piece of text."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = None
    tokens = None
    arrivals = []
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                arrivals.append(time.perf_counter())
                if first is None:
                    first = arrivals[-1]
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return {"start": t0, "first": first or end, "end": end, "tokens": tokens or 0, "arrivals": arrivals}


def steady_rate(runs: list[dict]) -> float:
    """Tokens per second over the window in which every request was decoding (after the last first
    token, until the first request ended), counting the text pieces that arrived in it: the rate of
    passes whose rows are all decodes.  0 if the window is empty."""
    lo, hi = max(r["first"] for r in runs), min(r["arrivals"][-1] if r["arrivals"] else r["end"] for r in runs)
    if hi <= lo:
        return 0.0
    return sum(1 for r in runs for t in r["arrivals"] if lo < t <= hi) / (hi - lo)


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


async def ladder(client, url: str, conc: list[int], n: int) -> list[dict]:
    """Each concurrency once: N clients at the same time, with the server's counters around them."""
    out = []
    for k in conc:
        m0 = await metrics(client, url)
        runs = await asyncio.gather(*[one_request(client, url, PROMPTS[i % len(PROMPTS)] + f" ({i})", n)
                                     for i in range(k)])
        m1 = await metrics(client, url)
        first, last = min(r["first"] for r in runs), max(r["end"] for r in runs)
        decoded = sum(max(r["tokens"] - 1, 0) for r in runs)
        passes = m1.get("flexio_passes_total", 0) - m0.get("flexio_passes_total", 0)
        read = m1.get("flexio_read_bytes_total", 0) - m0.get("flexio_read_bytes_total", 0)
        gen = m1.get("flexio_generated_tokens_total", 0) - m0.get("flexio_generated_tokens_total", 0)
        out.append({
            "concurrency": k,
            "aggregate_decode_tok_s": decoded / (last - first) if last > first else 0.0,
            "steady_decode_tok_s": steady_rate(runs),
            "per_request_tok_s": statistics.median(max(r["tokens"] - 1, 0) / (r["end"] - r["first"])
                                                   for r in runs if r["end"] > r["first"]) if k else 0.0,
            "ttft_p50_s": _pct([r["first"] - r["start"] for r in runs], 0.5),
            "ttft_p95_s": _pct([r["first"] - r["start"] for r in runs], 0.95),
            "tokens": sum(r["tokens"] for r in runs),
            "passes": passes,
            "batch_size_mean": sum(r["tokens"] for r in runs) / passes if passes else None,
            "streamed_bytes_per_pass": m1.get("flexio_streamed_bytes_per_pass"),
            "bytes_read_per_token": read / gen if gen else None,
        })
    return out


def _median_lines(reps: list[list[dict]]) -> list[dict]:
    lines = []
    for i, first in enumerate(reps[0]):
        runs = [rep[i] for rep in reps]
        line = dict(first)
        for key in ("aggregate_decode_tok_s", "steady_decode_tok_s", "per_request_tok_s", "ttft_p50_s", "ttft_p95_s"):
            line[key] = round(statistics.median(r[key] for r in runs), 3)
        if len(runs) > 1:
            line["runs_aggregate_decode_tok_s"] = [round(r["aggregate_decode_tok_s"], 3) for r in runs]
        lines.append(line)
    base = next((x["aggregate_decode_tok_s"] for x in lines if x["concurrency"] == 1), None)
    steady = next((x["steady_decode_tok_s"] for x in lines if x["concurrency"] == 1), None)
    for x in lines:
        x["ratio_to_1"] = round(x["aggregate_decode_tok_s"] / base, 3) if base else None
        x["steady_ratio_to_1"] = round(x["steady_decode_tok_s"] / steady, 3) if steady else None
    return lines


def _plot(curves: dict[str, list[dict]], title: str, out: str) -> None:
    fig, ax = figure((7, 4.5))
    for label, lines in curves.items():
        line, = ax.plot([x["concurrency"] for x in lines], [x["aggregate_decode_tok_s"] for x in lines], marker="o",
                        label=label)
        ax.plot([x["concurrency"] for x in lines], [x["steady_decode_tok_s"] for x in lines], marker="x",
                linestyle="--", color=line.get_color(), label=f"{label}, all decoding")
    ax.set_xlabel("concurrent streaming requests")
    ax.set_ylabel("aggregate decode tokens/s")
    save(fig, ax, title, out)


async def _bench(args: argparse.Namespace) -> int:
    import httpx

    path = model_path(args.model)
    budgets = _csv(args.budget, "--budget")
    conc = _csv(args.concurrency, "--concurrency", int)
    if any(c < 1 for c in conc) or args.max_tokens < 2 or args.reps < 1:
        raise ParameterError("--concurrency: expected counts >= 1, -n >= 2, --reps >= 1", param="--concurrency")
    parallel = max(conc)
    n_ctx = parallel * (64 + args.max_tokens + 64)  # each sequence: its prompt, the tokens, room
    print(json.dumps({"header": {"model": path, "budgets": budgets, "concurrency": conc, "max_tokens": args.max_tokens,
                                 "threads": args.threads or os.cpu_count(), "reps": args.reps,
                                 "parallel": parallel, "n_ctx": n_ctx}}), flush=True)
    curves: dict[str, list[dict]] = {}
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0)) as client:
        for budget in budgets:
            server = Server(path, None if budget == "none" else budget, parallel, n_ctx, args.threads)
            try:
                await server.ready(client, args.timeout)
                await one_request(client, server.url, PROMPTS[0], 2)  # warm-up: first pass, page faults
                reps = [await ladder(client, server.url, conc, args.max_tokens) for _ in range(args.reps)]
            finally:
                server.stop()
            lines = _median_lines(reps)
            for x in lines:
                print(json.dumps({"budget": budget, **{k: (round(v, 3) if isinstance(v, float) else v)
                                                       for k, v in x.items()}}), flush=True)
            curves["in memory" if budget == "none" else f"budget {budget}"] = lines
    name = os.path.splitext(os.path.basename(path))[0]
    out = args.out or os.path.join("bench", "results", f"serve-{name}.png")
    _plot(curves, f"{os.path.basename(path)}: aggregate decode tok/s vs concurrent requests", out)
    print(json.dumps({"plot": out}), flush=True)
    return 0


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_bench(args))
