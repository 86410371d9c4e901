"""The README and docs/ as a user reads them: every command shown parses with the console script's own parser (and
every script and subcommand named answers --help), every file named by a `python` command exists, every relative
link and anchor resolves, and the README stays a front door."""

import importlib
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from helpers import ONE_DEVICE_ENV, ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "results" / "HISTORY.md"]
SCRIPTS = {name: target.split(":")[0] for name, target in
           tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"].items()}
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def commands(page: Path) -> list[tuple[int, list[str]]]:
    """``(line, argv)`` of every command in the page's shell code blocks (continuation lines joined, comments,
    environment assignments and a trailing ``&`` dropped)."""
    text = page.read_text()
    out = []
    for block in FENCE.finditer(text):
        if block.group(1) not in ("bash", "sh", "console"):
            continue
        first_line = text[:block.start(2)].count("\n") + 1
        for i, line in enumerate(block.group(2).replace("\\\n", " ").splitlines()):
            argv = shlex.split(line, comments=True)
            while argv and re.fullmatch(r"[A-Z_]+=\S*", argv[0]):
                argv = argv[1:]
            if argv and argv[-1] == "&":
                argv = argv[:-1]
            if argv:
                out.append((first_line + i, argv))
    return out


ALL_COMMANDS = [(f"{page.relative_to(ROOT)}:{line}", argv) for page in PAGES for line, argv in commands(page)]


def problem(argv: list[str]) -> str | None:
    """Why ``argv`` would not parse or run as shown (None: it would)."""
    head, args = argv[0], argv[1:]
    if head in SCRIPTS:
        try:
            importlib.import_module(SCRIPTS[head]).parser().parse_args(args)
        except SystemExit as e:
            return f"{head} rejects its arguments (exit {e.code})"
        return None
    if head == "python" and args[:1] == ["-m"]:
        return problem([next((s for s, m in SCRIPTS.items() if m == args[1]), args[1]), *args[2:]]) \
            if args[1] in SCRIPTS.values() else f"no console module {args[1]}"
    if head == "python" and args and args[0].endswith(".py"):
        return None if (ROOT / args[0]).is_file() else f"{args[0]} does not exist"
    if head == "python" and args[:1] == ["-c"]:
        return None
    if head == "make":
        targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M)
        return None if all(t in targets for t in args if "=" not in t) else f"no make target in {args}"
    if head == "jupyter":
        notebooks = [a for a in args if a.endswith(".ipynb")]
        return None if notebooks and all((ROOT / n).is_file() for n in notebooks) else f"no notebook in {args}"
    if head == "tensorboard":
        return None
    if head.startswith("tools/"):  # the operations scripts, run from the checkout
        path = ROOT / head
        return None if path.is_file() and os.access(path, os.X_OK) else f"{head} is not an executable script"
    return f"{head} is not a command this project provides"


def test_the_pages_show_commands_of_every_console_script():
    named = {argv[0] for _, argv in ALL_COMMANDS}
    assert set(SCRIPTS) <= named, f"not shown anywhere: {set(SCRIPTS) - named}"
    assert len(ALL_COMMANDS) > 40


@pytest.mark.parametrize("where, argv", ALL_COMMANDS, ids=[w for w, _ in ALL_COMMANDS])
def test_every_command_shown_parses(where, argv):
    assert problem(argv) is None, f"{where}: {' '.join(argv)}: {problem(argv)}"


def test_the_checker_sees_a_bad_command():
    assert problem(["gptjax-train", "--no-such-flag"]) and problem(["gptjax-plan", "gpt2-small", "--mesh", "1,x"])
    assert problem(["gptjax-scaling", "fit", "points.csv"])  # --out is required
    assert problem(["python", "bench/no_such_bench.py"]) and problem(["make", "deploy"])
    assert problem(["tools/no_such_tool"]) and problem(["tools/gpu_check.py"]) is None
    assert problem(["gptjax-train", "--set", "model.d_model=64"]) is None


def test_every_console_script_and_subcommand_answers_help():
    """The installed entry points themselves (not only their parsers)."""
    bin_dir = Path(sys.executable).parent
    named = {(argv[0], argv[1] if argv[0] == "gptjax-scaling" else None) for _, argv in ALL_COMMANDS
             if argv[0] in SCRIPTS}
    for script, sub in sorted(named, key=str):
        cmd = [str(bin_dir / script), *([sub] if sub else []), "--help"]
        r = subprocess.run(cmd, capture_output=True, text=True, env=ONE_DEVICE_ENV, timeout=120)
        assert r.returncode == 0 and "usage:" in r.stdout, (cmd, r.stderr[-1000:])


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def links(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text())  # links inside code blocks are code
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_relative_link_resolves(page):
    bad = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor:
            headings = re.findall(r"^#+ (.+)$", FENCE.sub("", dest.read_text()), re.M)
            if anchor not in {_slug(h) for h in headings}:
                bad.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not bad, f"{page.relative_to(ROOT)}:\n" + "\n".join(bad)


def test_the_readme_is_a_front_door():
    """A few screens: what gptjax is, the two commands, quickstarts, features and the layout; the depth is in
    docs/, every page of which the README links."""
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 165  # (150 until the cloud-storage section; past this, move depth to docs/)
    assert {p.name for p in (ROOT / "docs").glob("*.md")} <= {Path(t).name for t in links(ROOT / "README.md")}
    layout = re.search(r"^## Layout\n(.*?)^## ", text, re.M | re.S).group(1)
    for name in [p.name for p in (ROOT / "gptjax").iterdir() if p.is_dir() and not p.name.startswith("_")
                 and p.name != "assets"] + ["runs.py"]:
        assert f"gptjax/{name}" in layout, f"the README's layout does not name gptjax/{name}"
