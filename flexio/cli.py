"""Command line -> one subcommand module's run(args).

Each subcommand lives in its own module exposing `add_arguments(parser)` and
`run(args) -> int`; only the chosen one is imported (Numba and the tokenizer are
not loaded for `--help`).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import FlexioError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("flexio.generate_cmd", "generate text from a prompt (streams tokens, reports tok/s)"),
    "fetch": ("flexio.fetch", "fetch a named model into the cache and print its path"),
    "synth": ("flexio.synth", "write a synthetic GGUF with real shapes and random weights"),
    "bench-io": ("flexio.bench_io", "I/O microbenchmark: io_uring O_DIRECT vs pread vs mmap vs fio"),
    "bench-peer": ("flexio.bench_peer", "decode/prefill tok/s of flexio vs llama.cpp on one GGUF file"),
    "bench-sweep": ("flexio.bench_sweep", "decode tok/s vs memory budget for each mode, with a PNG plot"),
}


def _parser(command: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flexio", description="Run LLMs larger than memory at the speed of the SSD.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        if name == command:
            importlib.import_module(module).add_arguments(sp)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = _parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except FlexioError as e:
        print(f"flexio {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("flexio: interrupted", file=sys.stderr)
        return 130
