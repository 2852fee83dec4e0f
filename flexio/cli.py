"""Command line -> one subcommand module's run(args).

Each subcommand lives in its own module exposing `add_arguments(parser)` and
`run(args) -> int`; only the chosen one is imported (Numba and the tokenizer are
not loaded for `--help`). The runtime's own commands are listed here; commands that
live outside the runtime (synth and the benchmarks, in flexio_bench) are found
through the "flexio.commands" entry points the installed distribution declares,
so the runtime never names them.

Errors: a FlexioError is printed as one line, `flexio CMD: error: ...`, with exit
status 1, or 2 for a ParameterError (a usage error, as argparse's own).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import entry_points

from .errors import FlexioError, ParameterError

# the runtime's commands: name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("flexio.generate_cmd", "generate text from a prompt (streams tokens, reports tok/s)"),
    "serve": ("flexio.serve_cmd", "serve the model over HTTP: OpenAI- and Ollama-compatible API"),
    "fetch": ("flexio.fetch", "fetch a named model into the cache and print its path"),
}


def commands() -> dict[str, tuple[str, str | None]]:
    """The runtime's commands, then those other installed packages declare (help: their module's docstring)."""
    out: dict[str, tuple[str, str | None]] = dict(COMMANDS)
    for ep in sorted(entry_points(group="flexio.commands"), key=lambda e: e.name):
        out.setdefault(ep.name, (ep.value, None))
    return out


def _help(module: str) -> str:
    """A plugin module's HELP line, else the first line of its docstring."""
    mod = importlib.import_module(module)
    doc = getattr(mod, "HELP", None) or (mod.__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""


def _parser(cmds: dict[str, tuple[str, str | None]], command: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flexio", description="Run LLMs larger than memory at the speed of the SSD.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in cmds.items():
        if help_ is None:  # a plugin command: its module's first docstring line (imported only for `--help`)
            help_ = _help(module) if command is None or name == command else ""
        sp = sub.add_parser(name, help=help_, description=help_)
        if name == command:
            importlib.import_module(module).add_arguments(sp)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmds = commands()
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = _parser(cmds, command if command in cmds else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(cmds[args.command][0])
    try:
        return int(module.run(args) or 0)
    except ParameterError as e:
        print(f"flexio {args.command}: error: {e}", file=sys.stderr)
        return 2
    except FlexioError as e:
        print(f"flexio {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("flexio: interrupted", file=sys.stderr)
        return 130
