"""The checkpoint policy of a run: where it starts (fresh, its own checkpoint, or another run's parameters via
``train.init_from``), what may change on resume, and when it saves.

On resume the run directory's ``config.json`` is the source of truth: a config that differs from it in a field
that defines the model or changes the optimizer trajectory (any role but cadence and execution,
``gptjax/config/schema.py``) is refused with the list of differences, before any file is written. Training
longer is the one documented way to change the length: ``extend_run`` keeps the lr schedule as it was (past its
end the lr stays at its final value) instead of re-stretching it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from gptjax import storage
from gptjax.checkpoint.manager import Checkpointer, CheckpointMismatch, CheckpointNotFound
from gptjax.config import ConfigError, Role, RunConfig, build_run_config
from gptjax.runs import RunDir
from gptjax.training.program import TrainProgram

log = logging.getLogger("gptjax")

# What a resumed run may change: when it observes and saves itself, and how and where it runs.
RESUMABLE_ROLES = (Role.CADENCE, Role.EXECUTION)


class RunSpec:
    """What the checkpoint policy knows of a run, whatever trains it: its config (anything with ``differences(other)``
    and ``roles()``: a :class:`RunConfig`, a fine-tune's ``FinetuneConfig``), where it lives, its length, when it
    saves, and the file of the run directory that holds the config it was started with. Pre-training's is
    ``RunSpec.of(cfg)``; a fine-tune builds its own, so both resume, refuse and save by the one policy below."""

    def __init__(self, config: Any, run_dir: str | Path, steps: int, checkpoint_every: int, keep: int,
                 async_save: bool, record: str, read_stored: Callable[[RunDir], Any],
                 hint: str = "", stored_steps: Callable[[Any], int | None] = lambda stored: None,
                 length_fields: Callable[[Any, Any], tuple[str, ...]] = lambda stored, new: ()):
        """``read_stored(run)``: the config the run directory holds; ``stored_steps(stored)``: its length, where the
        config alone tells; ``length_fields(stored, new)``: differences that only change the length (a resumed
        run may make them); ``hint``: what to do instead of a refused resume."""
        self.config, self.run = config, RunDir(run_dir)
        self.steps, self.checkpoint_every, self.keep, self.async_save = steps, checkpoint_every, keep, async_save
        self.record, self.read_stored, self.hint = record, read_stored, hint
        self.stored_steps, self.length_fields = stored_steps, length_fields

    @classmethod
    def of(cls, cfg: RunConfig) -> "RunSpec":
        """A pre-training run's: ``train.*``, its ``config.json``; ``--extend-steps`` changes only the length."""
        t = cfg.train
        return cls(cfg, t.run_dir, t.steps, t.checkpoint_every, t.keep_checkpoints, t.async_checkpoint,
                   RunDir.CONFIG, RunDir.read_config, hint=(
                       "Resume with the run's own config (no --set for these fields); to train longer use "
                       "--extend-steps N; for a different config choose another run directory "
                       "(train.init_from=<this run> starts a new run from its parameters)."),
                   stored_steps=lambda stored: stored.train.steps, length_fields=_schedule_kept)

    def check_resume(self, stored: Any) -> None:
        """A ``ConfigError`` listing every difference from the ``stored`` config that would change the model or the
        optimizer trajectory (any role but :data:`RESUMABLE_ROLES`)."""
        diff = stored.differences(self.config)
        for name in self.length_fields(stored, self.config):
            diff.pop(name, None)
        roles = stored.roles()
        bad = {k: v for k, v in diff.items() if roles[k] not in RESUMABLE_ROLES}
        if bad:
            lines = "\n".join(f"  {k}: {a!r} in {self.record}, {b!r} now ({roles[k].value})"
                              for k, (a, b) in sorted(bad.items()))
            raise ConfigError(f"--resume: the config differs from {self.run}/{self.record} (which is "
                              f"unchanged):\n{lines}\n{self.hint}".rstrip())


def _schedule_kept(stored: RunConfig, new: RunConfig) -> tuple[str, ...]:
    """A longer or shorter run on the same lr schedule is an extension: its steps may differ."""
    schedule = lambda c: c.optim.schedule_steps or c.train.steps  # noqa: E731
    return ("train.steps", "optim.schedule_steps") if schedule(stored) == schedule(new) else ()


def check_resume_config(stored: RunConfig, new: RunConfig) -> None:
    """A ``ConfigError`` listing every difference of pre-training config ``new`` from ``stored`` that a resumed
    run may not make (:meth:`RunSpec.check_resume`)."""
    RunSpec.of(new).check_resume(stored)


def extend_run(stored: RunConfig, steps: int) -> list[str]:
    """Overrides that extend (or shorten) a run to ``steps`` while keeping its lr schedule."""
    return [f"train.steps={steps}", f"optim.schedule_steps={stored.optim.schedule_steps or stored.train.steps}"]


def resumes(run: RunDir, resume: bool | str | None) -> bool:
    """Whether a start asked for ``resume`` continues ``run``: ``True`` always (an error if there is nothing to
    continue), ``"auto"`` when the run directory holds a checkpoint (a requeued job, a sweep), else not."""
    return run.has_checkpoint() if resume == "auto" else bool(resume)


def resolve_resume(run_dir: str | Path, resume: bool | str | None, base: RunConfig | str | Path | None = None,
                   overrides: Sequence[str] = (), extend_steps: int | None = None,
                   fresh: RunConfig | str | Path | None = None) -> tuple[RunConfig, bool]:
    """The one resume policy, for ``gptjax-train`` and Python callers alike: ``(config, resuming)`` of a start in
    ``run_dir`` asked for ``resume`` (:func:`resumes`). Resuming, the base is the run's own ``config.json`` unless
    ``base`` is given (a config asked for explicitly: it must then agree with the stored one,
    :func:`check_resume_config`), then ``overrides``, then ``extend_steps`` (:func:`extend_run`: train to N steps,
    the lr schedule kept). Starting, ``base`` (or ``fresh``, a preset or config for a start only) with
    ``overrides``."""
    run = RunDir(run_dir)
    if not resumes(run, resume):
        if extend_steps:
            raise ConfigError("--extend-steps continues a run: it goes with --resume")
        return build_run_config(fresh if base is None else base, overrides=list(overrides)), False
    stored = run.read_config()
    extend = extend_run(stored, extend_steps) if extend_steps else []
    return build_run_config(stored if base is None else base, overrides=[*overrides, *extend]), True


class RunComplete(Exception):
    """The run directory already holds the finished run; ``summary`` is what it reported."""

    def __init__(self, run_dir: RunDir, step: int, summary: dict):
        self.run_dir, self.step, self.summary = run_dir, step, summary
        super().__init__(f"{run_dir} is complete (step {step}); nothing to do")


class CheckpointPolicy:
    def __init__(self, spec: RunSpec, resume: bool | str, resume_step: int | None = None):
        """``resume=True``: continue from the latest intact checkpoint (or ``resume_step``); an error if there is
        none. ``"auto"``: continue if there is one, else start. ``False``: start; a directory that already holds
        checkpoints is refused, unless it holds this very run, finished (then ``RunComplete``)."""
        self.spec = spec
        self.run = spec.run
        self.checkpointer = Checkpointer(self.run.checkpoints, keep=spec.keep, async_save=spec.async_save)
        latest = self.checkpointer.latest_step()
        stored = spec.read_stored(self.run) if latest is not None else None
        if latest is not None and latest >= spec.steps and stored is not None and resume_step is None and (
                resume or not stored.differences(spec.config)):  # (--resume-step re-branches a finished run)
            if resume:
                spec.check_resume(stored)
            raise RunComplete(self.run, latest, self.run.read_summary() or {"final_step": latest})
        if latest is not None and not resume:
            same = stored is not None and not stored.differences(spec.config)
            length = spec.stored_steps(stored) if stored is not None else None
            raise FileExistsError(f"{self.run} already holds checkpoints (latest step {latest}"
                                  + (f" of {length}" if length else "") + "); pass --resume to continue that run"
                                  + ("" if same else f" (with its own {spec.record})") +
                                  ", or choose another run directory")
        if resume is True and latest is None:
            raise CheckpointNotFound(f"--resume: no checkpoint in {self.checkpointer.directory}; run without "
                                     "--resume to start this run")
        if resume_step is not None and resume_step not in self.checkpointer.all_steps():
            raise CheckpointNotFound(f"--resume-step {resume_step}: no such checkpoint in "
                                     f"{self.checkpointer.directory}; available: {self.checkpointer.all_steps()}")
        if latest is not None and resume:
            spec.check_resume(stored)
        self.resuming = latest is not None and resumes(self.run, resume)
        self.resume_step = resume_step
        self.last_saved: int | None = None
        self.stalls: list[float] = []

    def initial_state(self, program: TrainProgram, data_iterator: Any) -> dict:
        """The state training starts from: the run's own checkpoint when resuming, else the program's fresh start
        (pre-training: ``train.seed`` or ``train.init_from``; a fine-tune: the pretrained run and a new head)."""
        if self.resuming:
            return self._restore_intact(program, data_iterator)
        return program.initial_state()

    def _restore_intact(self, program: TrainProgram, data_iterator: Any) -> dict:
        """The newest checkpoint that restores (or exactly ``resume_step``); damaged newer ones are reported
        and moved aside (``<step>.damaged-<time>``), so that training can write those steps again."""
        ck = self.checkpointer
        candidates = [self.resume_step] if self.resume_step is not None else sorted(ck.all_steps(), reverse=True)
        problems = []
        for step in candidates:
            why = ck.problem(step)
            if why is None:
                try:
                    state = ck.restore(program.abstract_state, data_iterator, step)
                except CheckpointMismatch as e:  # intact, but not for this run as asked: never moved aside
                    raise CheckpointNotFound(f"checkpoint step {step}: {e}") from None
                except Exception as e:  # a truncated or unreadable file: orbax / tensorstore errors vary
                    why = f"restore failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
                else:
                    if problems:
                        log.warning("resuming from step %d instead (%s)", step, "; ".join(problems))
                    for newer in (s for s in ck.all_steps() if s > step):
                        self._move_aside(newer, f"newer than step {step}, which the run resumed from")
                    return state
            problems.append(f"checkpoint step {step} is damaged: {why}")
            log.warning("%s", problems[-1])
            if self.resume_step is not None:
                raise CheckpointNotFound(f"--resume-step {step}: {problems[-1]}")
            self._move_aside(step, why)
        raise CheckpointNotFound(f"no intact checkpoint in {ck.directory}: " + "; ".join(problems))

    def _move_aside(self, step: int, why: str) -> None:
        if jax.process_index() == 0:
            log.warning("moved checkpoint step %d aside to %s", step, self.checkpointer.move_aside(step, why).name)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"gptjax:move_aside:{step}")
            self.checkpointer.manager.reload()

    def due(self, step: int, end: int) -> bool:
        return step % self.spec.checkpoint_every == 0 or step == end

    def save(self, step: int, state: dict, data_iterator: Any) -> float:
        if self.last_saved == step:
            return 0.0
        stall = self.checkpointer.save(step, state, data_iterator)
        failed = None
        if jax.process_index() == 0:
            try:
                self.run.push()  # a run on a bucket: its metrics and events reach it at every checkpoint
            except storage.StorageError as e:
                failed = e
        if self.run.url and jax.process_count() > 1:  # the others learn it here, not as a collective that hangs
            if not int(multihost_utils.broadcast_one_to_all(np.int32(failed is None))) and failed is None:
                failed = storage.StorageError(f"process 0 could not copy the run's files to {self.run.url} (its "
                                              "error says why)")
        if failed is not None:
            raise failed
        self.last_saved = step
        self.stalls.append(stall)
        return stall

    def close(self) -> None:
        self.checkpointer.close()
