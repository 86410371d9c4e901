"""The checkpoint policy of a run: where it starts (fresh, its own latest checkpoint, or another run's
parameters via ``train.init_from``) and when it saves."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax

from gptjax.checkpoint.manager import Checkpointer, CheckpointNotFound
from gptjax.checkpoint.restore import init_params_from
from gptjax.config import TrainConfig
from gptjax.training.program import Program

log = logging.getLogger("gptjax")


class CheckpointPolicy:
    def __init__(self, run_dir: Path, cfg: TrainConfig, resume: bool | str):
        """``resume=True``: continue from the latest checkpoint (an error if there is none); ``"auto"``: continue
        if there is one, else start; ``False``: start, and refuse a directory that already holds checkpoints."""
        self.cfg = cfg
        self.checkpointer = Checkpointer(run_dir / "checkpoints", keep=cfg.keep_checkpoints)
        latest = self.checkpointer.latest_step()
        if latest is not None and not resume:
            raise FileExistsError(f"{run_dir} already holds checkpoints (latest step {latest}); pass --resume to "
                                  "continue that run, or choose another train.run_dir")
        if resume is True and latest is None:
            raise CheckpointNotFound(f"--resume: no checkpoint in {self.checkpointer.directory}; run without "
                                     "--resume to start this run")
        self.resume_step = latest if resume else None

    def initial_state(self, program: Program, data_iterator: Any) -> dict:
        if self.resume_step is not None:
            return self.checkpointer.restore(program.abstract_state, data_iterator)
        if self.cfg.init_from:
            log.info("initialising the parameters from %s (fresh optimizer state)", self.cfg.init_from)
            return program.init_from_params(init_params_from(self.cfg.init_from, program.model))
        return program.init(jax.random.key(self.cfg.seed))

    def due(self, step: int, end: int) -> bool:
        return step % self.cfg.checkpoint_every == 0 or step == end

    def save(self, step: int, state: dict, data_iterator: Any) -> None:
        self.checkpointer.save(step, state, data_iterator)

    def close(self) -> None:
        self.checkpointer.close()
