"""The package's layers point one way. Every ``import gptjax.<layer>`` inside ``gptjax/`` (at module level or
inside a function) must be an edge this table allows; a new edge is a design decision, made here."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gptjax"

# layer -> the layers it may import (besides itself)
ALLOWED = {
    "config": set(),
    "data": {"config"},
    "reporting": {"config"},
    "sharding": {"config"},
    "model": {"config", "sharding"},
    "checkpoint": {"config", "sharding", "model"},
    "inference": {"config", "sharding", "model", "checkpoint"},
    "evals": {"config", "sharding", "model", "checkpoint", "inference", "data"},
    "interop": {"config", "sharding", "model", "checkpoint", "data"},
    "training": {"config", "sharding", "model", "checkpoint", "inference", "evals", "data", "reporting"},
    "finetune": {"config", "sharding", "model", "checkpoint", "inference", "evals", "data", "reporting",
                 "training"},
    # consumers: nothing but the CLI imports them
    "planning": {"config", "sharding", "model", "training"},
    "scaling": {"config", "model", "reporting"},
    "cli": {"config", "sharding", "model", "checkpoint", "inference", "evals", "interop", "data", "reporting",
            "training", "finetune", "planning", "scaling"},
    "__init__": {"config"},  # the package root re-exports the config API only
}


def layer_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 or rel.name != "__init__.py" else "__init__"


def imported_layers(path: Path) -> set[tuple[str, int]]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] if node.module != "gptjax" else [f"gptjax.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "gptjax" and len(parts) > 1:
                out.add((parts[1], node.lineno))
    return out


def all_edges() -> list[tuple[str, str, str]]:
    edges = []
    for path in sorted(PACKAGE.rglob("*.py")):
        src = layer_of(path)
        for dst, line in imported_layers(path):
            if dst != src:
                edges.append((src, dst, f"{path.relative_to(PACKAGE.parent)}:{line}"))
    return edges


def test_every_layer_is_in_the_table():
    layers = {layer_of(p) for p in PACKAGE.rglob("*.py")}
    assert layers <= set(ALLOWED), f"add {sorted(layers - set(ALLOWED))} to ALLOWED (with its allowed imports)"


def test_imports_point_one_way():
    bad = [f"{where}: {src} -> {dst}" for src, dst, where in all_edges() if dst not in ALLOWED.get(src, set())]
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_nothing_but_the_cli_imports_the_consumers():
    users = {(src, dst) for src, dst, _ in all_edges() if dst in ("planning", "scaling", "cli")}
    assert {src for src, _ in users} <= {"cli"}, users


def test_the_table_has_no_cycles():
    done = set()

    def visit(layer, stack):
        assert layer not in stack, f"cycle: {' -> '.join(stack + [layer])}"
        if layer in done:
            return
        for dep in ALLOWED[layer]:
            visit(dep, stack + [layer])
        done.add(layer)

    for layer in ALLOWED:
        visit(layer, [])


@pytest.mark.parametrize("src, dst", [("model", "training"), ("data", "model"), ("sharding", "model")])
def test_the_checker_sees_a_bad_edge(tmp_path, src, dst):
    """The test is not vacuous: an injected import against the direction is reported."""
    path = tmp_path / "gptjax" / src / "bad.py"
    path.parent.mkdir(parents=True)
    path.write_text(f"def f():\n    from gptjax.{dst}.x import y\n")
    assert (dst, 2) in imported_layers(path) and dst not in ALLOWED[src]
