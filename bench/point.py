"""One sweep point in a fresh process: model + mode + budget -> one JSON line of decode figures.

`python -m flexio_bench.point --model M --mode flexinfer --budget 1000000000 -n 8 --threads 2`
runs the engine through its public API (as a user would, EOS ignored so every point decodes the
same number of tokens) and adds what only a benchmark wants to know: the CPU time the hypervisor
stole during decode. bench-sweep starts one per point, inside the point's memory cgroup.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import time

from flexio.experts import POLICIES as EXPERT_POLICIES


def cpu_steal_seconds() -> float:
    """Seconds of CPU time stolen by the hypervisor so far, summed over all CPUs (0.0 if unknown).

    /proc/stat's "steal": on a VM whose host serves the virtual disk with its own CPU time,
    streaming while computing shows up here; 0 on bare metal."""
    try:
        with open("/proc/stat", "rb") as f:
            fields = f.readline().split()  # cpu user nice system idle iowait irq softirq steal ...
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


async def measure(model: str, prompt: str, n: int, threads: int, mode: str, budget: str | None,
                  expert_policy: str = "lfu", n_ctx: int = 256, warmup: int = 0) -> dict:
    from flexio.engine import Engine
    from flexio.generate_cmd import experts_json

    async with Engine(model, threads=threads, mode=mode, budget=budget, expert_policy=expert_policy, n_ctx=n_ctx) as e:
        ids = e.prompt_tokens(prompt)
        if warmup:  # a generation before the measured one: a mixture of experts' cache holds what decode uses
            _ = [t async for t in e.generate_tokens(ids, warmup, ignore_eos=True)]
        steal0 = ex0 = None
        async for _tok in e.generate_tokens(ids, n, ignore_eos=True):
            if steal0 is None:  # the first token comes from the prompt pass: decode starts now
                steal0 = cpu_steal_seconds()
                ex0 = e.expert_statistics()
        st = e.stats
        passes = st.decode_tokens - 1
        return {
            "decode_tok_s": round(st.decode_tok_s, 3),
            "generated_tokens": st.decode_tokens,
            "prompt_tok_s": round(st.prompt_tok_s, 2),
            "decode_io_wait_s": round(st.decode_io_wait_seconds, 3),
            "decode_stream_gbps": round(st.decode_bytes_read / st.decode_seconds / 1e9, 3) if st.decode_seconds else None,
            "decode_steal_s": round(cpu_steal_seconds() - steal0, 3) if steal0 is not None else None,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "streamed_bytes_per_token": e.plan.streamed_bytes_per_token,
            # what decode read per pass (stages and expert misses), beside the plan's expectation above
            "decode_bytes_per_token": round(st.decode_bytes_read / passes) if passes > 0 else None,
            "policy": e.plan.policy,
            "threads": e.threads,
            "io_backend": e.reader.backend if e.reader is not None else None,
            **experts_json(e, ex0, st.decode_tokens),  # a mixture of experts: hits, predictions, bytes
        }


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m flexio_bench.point", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("-n", type=int, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--mode", required=True)
    p.add_argument("--budget", default=None)
    p.add_argument("--expert-policy", default="lfu", choices=EXPERT_POLICIES)
    p.add_argument("--ctx", type=int, default=256, help="context (the KV cache beside the budget; llama.cpp's point uses 256)")
    p.add_argument("--warmup", type=int, default=0, help="tokens generated (same prompt) before the measured run")
    a = p.parse_args()
    t0 = time.perf_counter()
    out = asyncio.run(measure(a.model, a.prompt, a.n, a.threads, a.mode, a.budget, a.expert_policy, a.ctx, a.warmup))
    out["wall_s"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
