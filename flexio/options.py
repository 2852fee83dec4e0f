"""Command-line flags -> Engine keyword arguments: the weight and compute options of every command that opens a model."""

from __future__ import annotations

import argparse

from .experts import POLICIES as EXPERT_POLICIES
from .modes import MODES, POLICIES
from .units import SIZE_HELP


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """--threads, --budget, --mode, --window, --policy, --io-backend, --expert-policy (the model and context flags
    are the command's)."""
    p.add_argument("--threads", type=int, default=None,
                   help="compute threads: 1..the number of cores; 0 or unset = all cores")
    p.add_argument("--budget", default=None,
                   help=f"memory for weights, e.g. 1.5GiB, 800MB, 25%% of the model ({SIZE_HELP}; "
                        "default: the whole model, mode memory)")
    p.add_argument("--mode", default=None, choices=list(MODES), help="weight residency mode (default: flexinfer with "
                   "--budget, else memory)")
    p.add_argument("--window", type=int, default=3, help="layers prefetched ahead of compute, >= 1 (default: %(default)s)")
    p.add_argument("--policy", default="auto", choices=POLICIES, help="which tensors stay resident (default: auto)")
    p.add_argument("--io-backend", default="auto", choices=("auto", "io_uring", "threads"))
    p.add_argument("--expert-policy", default="lfu", choices=EXPERT_POLICIES,
                   help="a mixture of experts' cache: keep the most often (lfu) or most recently (lru) used experts "
                        "of each layer (default: %(default)s)")


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The Engine keyword arguments `add_engine_arguments` flags give."""
    return dict(threads=args.threads, budget=args.budget, mode=args.mode, window=args.window, policy=args.policy,
                io_backend=args.io_backend, expert_policy=args.expert_policy)
