"""The house as the README draws it: data flows one way through flexio's modules, the kernels are a
leaf, and the runtime never imports the benchmarks or synthesis (flexio_bench imports the runtime)."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# GGUF file -> plan -> arena -> reader/prefetch -> kernels -> model -> engine -> server -> CLI: a module may
# import only modules of a lower rank (helpers at rank 0-1 serve everyone; the kernels sit at `model`'s
# rank as flexio_kernels, a separate package).
RANK = {
    "__init__": 0, "errors": 0,
    "units": 1, "modes": 1, "fetch": 1,
    "gguf": 2,
    "tokenizer": 3, "sampling": 3,
    "plan": 4,
    "arena": 5, "uring": 5,
    "reader": 6,
    "prefetch": 7,
    "model": 8,
    "calibrate": 9,
    "stops": 3,
    "engine": 10,
    "api_models": 11, "api_errors": 11,
    "api_answers": 12,
    "server": 13,
    "generate_cmd": 14, "serve_cmd": 14,
    "cli": 15, "__main__": 16,
}


def _imports(path: pathlib.Path, package: str = "flexio") -> set[str]:
    """Everything a file imports, its relative imports as '<package>.<module>'."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from .x import y / from . import y
                base = package + (f".{node.module}" if node.module else "")
                if node.module is None:
                    out.update(f"{package}.{a.name}" if a.name in RANK else f"{package}.__init__" for a in node.names)
                else:
                    out.add(base)
            else:
                out.add(node.module)
    return out


def test_every_runtime_module_has_a_rank():
    assert {p.stem for p in (ROOT / "flexio").glob("*.py")} == set(RANK)


@pytest.mark.parametrize("name", sorted(RANK))
def test_runtime_imports_flow_one_way(name):
    for imp in _imports(ROOT / "flexio" / f"{name}.py"):
        top = imp.split(".")[0]
        assert top != "flexio_bench", f"flexio/{name}.py imports {imp}: the runtime never imports benchmarks"
        if top == "flexio":
            other = imp.split(".")[1] if "." in imp else "__init__"
            assert RANK[other] < RANK[name], f"flexio/{name}.py imports {imp}, which is downstream of it"
        if top == "flexio_kernels":
            assert RANK[name] >= RANK["model"], f"flexio/{name}.py uses the kernels upstream of the model"


@pytest.mark.parametrize("path", sorted((ROOT / "kernels").glob("*.py")), ids=lambda p: p.name)
def test_the_kernels_are_a_leaf(path):
    assert not {i for i in _imports(path, "flexio_kernels") if i.split(".")[0] in ("flexio", "flexio_bench")}, path.name


def test_bench_commands_are_found_through_entry_points():
    from flexio.cli import COMMANDS, commands

    found = commands()
    assert {"synth", "bench-io", "bench-peer", "bench-sweep"} <= set(found) - set(COMMANDS)
    assert all(found[c][0].startswith("flexio_bench.") for c in ("synth", "bench-io", "bench-peer", "bench-sweep"))
