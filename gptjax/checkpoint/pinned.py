"""Reading a checkpoint while a run writes others: the reader pins the step it reads.

A run keeps ``train.keep_checkpoints`` steps and deletes older ones as it saves new ones, at any moment. A reader
(export, sampling, evaluation, ``init_from``) that opened a step can lose it mid-read; measured before this module,
an export racing a run that checkpointed every step with ``keep_checkpoints=1`` crashed in 3 of 12 tries. So a
reader first hard-links the step's files into a private directory, ``<run>/.readers/<host>-<pid>-<time>/<step>/``,
copy-free (the data stays on disk until the last link goes), reads from there, and removes it when done. A step
deleted while it is being linked is noticed and the newest step is pinned instead; a newest step that is damaged
(checked on the pinned copy, its files against their checksums included) is skipped with a warning, as resume does.

A run on a bucket is read in place: objects have no hard links to pin with, so a step that the writer's retention
deletes mid-read fails that read (with the step named; read a step retention keeps, or a finished run).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Iterator

from gptjax.checkpoint.manager import step_problem
from gptjax.runs import HOST, CheckpointNotFound, RunDir, deferred_interrupt, process_alive

log = logging.getLogger("gptjax")

ATTEMPTS = 20  # re-listings when the step being pinned is deleted under the reader (retention of a live run)


def steps_in(directory: Path) -> list[int]:
    """The checkpoint steps in ``directory`` (orbax names them by their number; leftovers of interrupted saves
    and damaged steps moved aside have other names)."""
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


@contextlib.contextmanager
def pinned(run_dir: RunDir | str | Path, step: int | None = None,
           items: tuple[str, ...] = ("state",)) -> Iterator[tuple[int, Path]]:
    """``(step, root)``: checkpoint ``step`` (default: the newest intact one) pinned for reading, as ``root/<step>``
    (``root`` is a checkpoint directory with that one step). ``items``: what the reader needs of the step. An
    explicit ``step`` that is missing or damaged is a :class:`CheckpointNotFound` naming the problem and the steps
    there are."""
    run = RunDir(run_dir)
    if not run.checkpoints.is_dir():
        raise CheckpointNotFound(f"no checkpoint in {run.checkpoints} (is {run} a gptjax run directory?)")
    if run.url:
        yield _newest_intact(run, step, items), run.checkpoints
        return
    _remove_leftovers(run)
    root = run.readers / f"{HOST}-{os.getpid()}-{time.time_ns()}"
    try:
        found = _pin(run, step, items, root)
        yield found, root
    finally:  # a Ctrl-C landing inside the clean-up left the snapshot behind (once in CI): it waits until it ends
        with deferred_interrupt():
            shutil.rmtree(root, ignore_errors=True)
            with contextlib.suppress(OSError):
                run.readers.rmdir()


def _newest_intact(run: RunDir, step: int | None, items: tuple[str, ...]) -> int:
    """A run on a bucket: ``step``, or the newest step that is intact (checksums included), read in place."""
    steps = steps_in(run.checkpoints)
    if step is not None and step not in steps:
        raise CheckpointNotFound(f"no checkpoint for step {step} in {run.checkpoints}; available: {steps}")
    skipped = []
    for s in [step] if step is not None else sorted(steps, reverse=True):
        why = step_problem(run.checkpoints / str(s), items)
        if why is None:
            if skipped:
                log.warning("reading checkpoint step %d: %s (choose another with --step)", s, "; ".join(skipped))
            return s
        if step is not None:
            raise CheckpointNotFound(f"checkpoint step {s} in {run.checkpoints} cannot be read: {why}; "
                                     f"available: {steps}")
        skipped.append(f"step {s} is damaged ({why})")
    raise CheckpointNotFound(f"no intact checkpoint in {run.checkpoints}: " + ("; ".join(skipped) or "there is none"))


def _pin(run: RunDir, step: int | None, items: tuple[str, ...], root: Path) -> int:
    for _ in range(ATTEMPTS):
        skipped: list[str] = []
        steps = steps_in(run.checkpoints)
        if step is not None and step not in steps:
            raise CheckpointNotFound(f"no checkpoint for step {step} in {run.checkpoints}; available: {steps}")
        for s in ([step] if step is not None else sorted(steps, reverse=True)):
            why = step_problem(run.checkpoints / str(s), items, verify=False)  # the pinned copy is verified
            if why is not None and not (run.checkpoints / str(s)).exists():
                break  # deleted by retention since the listing (not damaged): list again
            if why is None:
                try:
                    _link_tree(run.checkpoints / str(s), root / str(s))
                except FileNotFoundError:  # retention deleted it while it was being linked: list again
                    shutil.rmtree(root / str(s), ignore_errors=True)
                    break
                why = step_problem(root / str(s), items)
                if why is None:
                    if skipped:
                        log.warning("reading checkpoint step %d: %s (choose another with --step)", s,
                                    "; ".join(skipped))
                    return s
                shutil.rmtree(root / str(s), ignore_errors=True)
            if step is not None:
                raise CheckpointNotFound(f"checkpoint step {s} in {run.checkpoints} cannot be read: {why}; "
                                         f"available: {steps}")
            now = steps_in(run.checkpoints)
            if s not in now or now[-1:] != steps[-1:]:
                break  # being deleted by retention, a newer step saved meanwhile: list again (not damage)
            skipped.append(f"step {s} is damaged ({why})")
        else:
            raise CheckpointNotFound(f"no intact checkpoint in {run.checkpoints}: " + ("; ".join(skipped) or
                                                                                     "there is none"))
    raise CheckpointNotFound(f"{run.checkpoints}: every step was deleted while it was being pinned "
                             f"({ATTEMPTS} tries); is a run with keep_checkpoints=1 saving every step?")


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link every file below ``src`` into the same place below ``dst`` (copies where the filesystem has no
    hard links)."""
    def fail(error: OSError) -> None:  # a directory that vanished mid-walk: the step is being deleted
        raise FileNotFoundError(error.filename) from error

    for here, _, files in os.walk(src, onerror=fail):
        target = dst / Path(here).relative_to(src)
        target.mkdir(parents=True, exist_ok=True)
        for name in files:
            try:
                os.link(Path(here) / name, target / name)
            except FileNotFoundError:
                raise
            except OSError:
                shutil.copy2(Path(here) / name, target / name)


def _remove_leftovers(run: RunDir) -> None:
    """Remove the snapshots of readers of this host that were killed before they could."""
    if not run.readers.is_dir():
        return
    for snapshot in run.readers.iterdir():
        host, pid, _ = (snapshot.name.rsplit("-", 2) + ["", ""])[:3]
        if pid.isdigit() and process_alive(host, int(pid)) is False:
            shutil.rmtree(snapshot, ignore_errors=True)
