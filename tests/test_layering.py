"""The package's layers point one way. Every ``import gptjax.<layer>`` inside ``gptjax/`` (at module level or
inside a function) must be an edge this table allows; a new edge is a design decision, made here."""

import ast
import importlib
import json
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gptjax"

# layer -> the layers it may import (besides itself)
ALLOWED = {
    "config": set(),
    "storage": set(),  # where a path lives (local or an object store): one module every caller goes through
    "runs": {"config", "storage"},  # the run directory: its file names, reading and writing them
    "data": {"config", "storage", "runs"},
    "reporting": {"config", "runs"},
    "sharding": {"config"},
    "model": {"config", "sharding"},
    "checkpoint": {"config", "storage", "runs", "sharding", "model", "data"},  # data: a loaded run's tokenizer
    "inference": {"config", "sharding", "model", "checkpoint"},
    "evals": {"config", "runs", "sharding", "model", "checkpoint", "inference", "data"},
    "interop": {"config", "storage", "runs", "sharding", "model", "checkpoint", "data"},
    "training": {"config", "storage", "runs", "sharding", "model", "checkpoint", "inference", "evals", "data",
                 "reporting"},
    "finetune": {"config", "runs", "sharding", "model", "checkpoint", "data", "evals", "reporting", "training"},
    # consumers: nothing but the CLI imports them
    "planning": {"config", "runs", "sharding", "model", "training", "scaling"},  # scaling: plans from a fit
    "scaling": {"config", "runs", "model", "reporting"},
    "launch": set(),  # job files for schedulers: it runs commands, it imports none of the library
    "experiments": {"config", "storage", "runs", "sharding", "training", "scaling", "launch"},  # sweeps, μP checks
    "cli": {"config", "storage", "runs", "sharding", "model", "checkpoint", "inference", "evals", "interop", "data",
            "reporting", "training", "finetune", "planning", "scaling", "launch", "experiments"},
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
    """The sweeps (``experiments``) fit what they collect, so they use ``scaling`` too, and the compute planner
    plans from a fit; nothing in the package imports the sweeps (experiment files do)."""
    users = {(src, dst) for src, dst, _ in all_edges() if dst in ("planning", "scaling", "cli", "experiments")}
    assert {src for src, dst in users if dst != "scaling"} <= {"cli"}, users
    assert {src for src, dst in users if dst == "scaling"} <= {"cli", "experiments", "planning"}, users


def test_the_consumers_reach_the_model_through_its_public_names():
    """The planner and the scaling fits use what ``gptjax.model`` exports (e.g. ``abstract_layer``), never its
    modules, so a change inside the model cannot break them silently."""
    problems = []
    for layer in ("planning", "scaling"):
        for path in sorted((PACKAGE / layer).rglob("*.py")):
            problems += public_api_problems(path.read_text(), str(path.relative_to(PACKAGE.parent)), "gptjax.model")
    assert not problems, "\n".join(problems)


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


# ---- the users of the library: experiments, notebooks, benchmarks, operations tools ------------------------------
ROOT = PACKAGE.parent
USER_CODE = ("experiments", "bench", "notebooks", "tools")


def user_sources() -> list[tuple[str, str]]:
    """``(where, source)`` of every experiment and benchmark file and every notebook's code cells."""
    out = []
    for folder in USER_CODE:
        for path in sorted((ROOT / folder).rglob("*.py")):
            out.append((str(path.relative_to(ROOT)), path.read_text()))
        for path in sorted((ROOT / folder).rglob("*.ipynb")):
            cells = json.loads(path.read_text())["cells"]
            code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
            code = ["\n".join(ln for ln in cell.splitlines() if not ln.lstrip().startswith(("%", "!")))
                    for cell in code]
            out.append((str(path.relative_to(ROOT)), "\n\n".join(code)))
    return out


def public_api_problems(source: str, where: str, only: str = "gptjax") -> list[str]:
    """Imports of gptjax (of ``only``) that are not its public API: a module below a package's top
    (``gptjax.scaling.plots``), a name outside that package's ``__all__``, the console scripts (``gptjax.cli``);
    and edits of ``sys.path``."""
    problems = []
    for node in ast.walk(ast.parse(source, where)):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and not any(
                n.startswith(only) for n in ([a.name for a in node.names] if isinstance(node, ast.Import)
                                             else [node.module or ""])):
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                name = alias.name
                if name.startswith("gptjax.") and name.count(".") > 1 or name.startswith("gptjax.cli"):
                    problems.append(f"{where}:{node.lineno}: import {name}")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "gptjax":
            module = node.module
            if module.count(".") > 1 or module.startswith("gptjax.cli"):
                problems.append(f"{where}:{node.lineno}: from {module} import ... (use the package's public names)")
                continue
            public = set(getattr(importlib.import_module(module), "__all__", ()))
            problems += [f"{where}:{node.lineno}: {a.name} is not in {module}.__all__" for a in node.names
                         if a.name not in public]
        elif isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", None) == "sys":
            problems.append(f"{where}:{node.lineno}: sys.path (install the package: pip install -e .)")
    return problems


def test_experiments_notebooks_and_benchmarks_use_the_public_api():
    sources = user_sources()
    assert {w.split("/")[0] for w, _ in sources} == set(USER_CODE)  # every folder was read
    problems = [p for where, source in sources for p in public_api_problems(source, where)]
    assert not problems, "imports past the public API:\n" + "\n".join(problems)


@pytest.mark.parametrize("line", ["from gptjax.scaling.plots import plot_fit", "from gptjax.cli.scaling import x",
                                  "from gptjax.scaling import _interval", "import gptjax.model.flash",
                                  "import sys\nsys.path.insert(0, '.')"])
def test_the_public_api_checker_sees_a_private_import(line):
    assert public_api_problems(line, "x.py")


def test_no_name_a_package_exports_is_also_a_module_of_it():
    """``from gptjax.data import prepare`` gave the module ``gptjax.data.prepare`` instead of the function the
    package exports under that name, once anything had imported the module (bench/loader_bench.py and
    bench/prepare_bench.py failed with "'module' object is not callable"). A name exported by a package and
    also one of its modules must be that module. Checked in a fresh interpreter (import order decides it)."""
    import subprocess
    import sys

    check = """
import importlib, sys
from pathlib import Path
root = Path(sys.argv[1])
bad = []
for pkg in sorted(p for p in root.iterdir() if (p / "__init__.py").exists()):
    mod = importlib.import_module(f"gptjax.{pkg.name}")
    for name in getattr(mod, "__all__", []):
        if (pkg / f"{name}.py").exists() or (pkg / name / "__init__.py").exists():
            exported = getattr(mod, name)
            if exported is not importlib.import_module(f"gptjax.{pkg.name}.{name}"):
                bad.append(f"gptjax.{pkg.name}.{name}")
print(bad)
"""
    r = subprocess.run([sys.executable, "-c", check, str(PACKAGE)], capture_output=True, text=True,
                       env={"JAX_PLATFORMS": "cpu", "PATH": ""})
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr[-2000:]


def test_a_run_is_loaded_for_use_in_one_place():
    """cli/evaluate.py (twice), cli/engine_args.py and evals/harness.py each restored the parameters, built the
    model and loaded the tokenizer by hand; ``checkpoint.load_run`` is the one sequence."""
    restores = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                if ".restore_params(" in p.read_text() and p.parent.name != "checkpoint"]
    assert not restores, restores


def test_the_cli_runs_no_console_script_of_its_own_for_a_result():
    """The compute plan ran ``python -m gptjax.cli.plan`` to get the memory report, and gptjax-plan ran itself
    for the compiled check: the report is ``planning.memory_report``; no module starts a console script."""
    starts = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if '"gptjax.cli.' in p.read_text()]
    assert not starts, starts


def test_background_faults_are_routed_in_one_place():
    """The routing of background threads' reports into a run's errors.log was written twice (the trainer and the
    CLI's exit); ``runs.route_faults`` is the one place that replaces the exception hooks."""
    hooks = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
             if "threading.excepthook =" in p.read_text() or "sys.unraisablehook = lambda" in p.read_text()]
    assert hooks == ["runs.py"], hooks


def test_no_private_attribute_is_reached_from_another_object():
    """``model._init_params`` (training) and ``checkpointer._existing_step`` (checkpoint/restore.py) were private
    calls across packages; now ``fresh_params`` and ``existing_step``. Only ``self`` / ``cls`` reach a private
    name (JAX's own private modules aside, named where they are imported)."""
    import re

    reach = re.compile(r"\b(?!self\b|cls\b|jax\b|os\b|sys\b)[a-z][a-z0-9_]*\._[a-z][a-z0-9_]*")  # os._exit, sys._getframe
    found = [f"{p.relative_to(PACKAGE)}:{n}: {line.strip()}" for p in PACKAGE.rglob("*.py")
             for n, line in enumerate(p.read_text().splitlines(), 1) if reach.search(line.split("#")[0])]
    # the one allowed: orbax 0.12 has no S3 branch, and storage.use_orbax sends s3:// down its GCS branch (three
    # private names of orbax, in that function only)
    patch = (PACKAGE / "storage.py").read_text().split("def use_orbax", 1)[1].split("\ndef ", 1)[0]
    found = [f for f in found if not (f.startswith("storage.py:") and f.split(": ", 1)[1] in patch)]
    assert not found, found


def test_one_step_loop_one_signal_handler_one_writer_lock():
    """``finetune/trainer.py`` had its own step loop, SIGTERM flag, writer lock, resume check, tqdm bar and metric
    cadence; a fine-tune is now a ``TrainProgram`` driven by ``training``'s job frame, loop and hooks. Only those
    modules loop over steps, install signal handlers, take the writer lock or draw a progress bar."""
    def where(*needles: str) -> list[str]:
        return sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                      if any(n in p.read_text() for n in needles))

    assert where("for step in range(") == ["training/loop.py"]
    assert "training/hooks.py" in where("signal.SIGTERM")
    assert not [p for p in where("signal.", "WriterLock(", "tqdm", "optax.adamw(", "lr_schedule(")
                if p.startswith(("finetune/", "training/"))
                and p not in ("training/hooks.py", "training/job.py", "training/optimizer.py",
                              "training/seed.py")]  # (seed: gptjax-import's writer, which trains nothing)
    assert where("WriterLock(run)") == ["training/job.py"]
