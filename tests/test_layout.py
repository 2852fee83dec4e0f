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
    "arch": 2,
    "gguf": 3,
    "tokenizer": 4, "sampling": 4, "stops": 4,
    "plan": 5,
    "arena": 6, "uring": 6,
    "reader": 7,
    "prefetch": 8, "experts": 8,
    "moe": 9,
    "model": 10,
    "calibrate": 11, "batcher": 11,
    "engine": 12,
    "options": 13, "api_models": 13, "api_errors": 13,
    "api_answers": 14,
    "server": 15,
    "generate_cmd": 16, "serve_cmd": 16,
    "cli": 17, "__main__": 18,
}


def _imports(path: pathlib.Path, package: str = "flexio") -> set[str]:
    """Everything a file imports, its relative imports as '<package>.<module>'."""
    out = set()
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):  # annotations only: an import under `if TYPE_CHECKING:` is not one
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            node.body = []
    for node in ast.walk(tree):
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
        if top == "flexio_kernels":  # the model's modules (moe.py, model.py) and what runs them
            assert RANK[name] >= RANK["moe"], f"flexio/{name}.py uses the kernels upstream of the model"


@pytest.mark.parametrize("path", sorted((ROOT / "kernels").glob("*.py")), ids=lambda p: p.name)
def test_the_kernels_are_a_leaf(path):
    assert not {i for i in _imports(path, "flexio_kernels") if i.split(".")[0] in ("flexio", "flexio_bench")}, path.name


def test_bench_commands_are_found_through_entry_points():
    from flexio.cli import COMMANDS, commands

    found = commands()
    assert {"synth", "bench-io", "bench-peer", "bench-sweep"} <= set(found) - set(COMMANDS)
    assert all(found[c][0].startswith("flexio_bench.") for c in ("synth", "bench-io", "bench-peer", "bench-sweep"))
