"""Weights & Biases logging of a run (``train.wandb_project``; the ``wandb`` extra): the config, every metric the
run logs (the same rows as ``metrics.jsonl``, as ``train/<name>`` and ``eval/<name>``), and at the end the summary
and the curves plot. Only process 0 logs.

The W&B run id follows the run directory: the first start draws one and writes it to ``<run>/wandb-id``, and every
resume of that directory (here, on another machine, after a move) continues the same W&B run. W&B's own
environment applies: ``WANDB_MODE=offline`` writes the run under ``<run>/wandb/`` for a later ``wandb sync``
(what the tests do: nothing here reaches a server), ``WANDB_API_KEY`` / ``WANDB_ENTITY`` online. A resumed run logs
from its checkpoint's step on; W&B keeps the rows an earlier attempt logged past it (``metrics.jsonl`` moves them
to ``metrics.dropped.jsonl``), so in W&B those steps may appear twice.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from gptjax.config import ConfigError
from gptjax.reporting.metrics import finite_scalars
from gptjax.runs import RunDir, write_atomic


class WandbRun:
    def __init__(self, run: RunDir, project: str, config: dict):
        try:
            import wandb
        except ImportError:
            raise ConfigError(f"train.wandb_project={project!r} needs the wandb package: pip install "
                              "'gptjax[wandb]' (or leave train.wandb_project empty)") from None
        self.wandb = wandb
        run_id = run.wandb_id.read_text().strip() if run.wandb_id.is_file() else uuid.uuid4().hex[:12]
        write_atomic(run.wandb_id, run_id + "\n")
        self.id = run_id
        self.run = wandb.init(project=project, id=run_id, resume="allow", name=run.name, dir=str(run.path),
                              config=config, settings=wandb.Settings(console="off", quiet=True))
        self.finished = False

    def scalars(self, step: int, prefix: str, values: dict) -> None:
        row = {f"{prefix}/{k}": v for k, v in finite_scalars(values).items()}
        if row:
            self.run.log(row, step=step)

    def finish(self, summary: dict | None = None, curves: Path | None = None, exit_code: int = 0) -> None:
        """Record the run's summary (its numbers) and curves, and close the W&B run; once."""
        if self.finished:
            return
        self.finished = True
        for key, value in _numbers(summary or {}).items():
            self.run.summary[key] = value
        if curves is not None and Path(curves).is_file():
            self.run.log({"curves": self.wandb.Image(str(curves))})
        self.run.finish(exit_code=exit_code)


def _numbers(summary: dict, prefix: str = "") -> dict[str, Any]:
    """The summary's numbers, nested keys joined with '/' (W&B's summary shows scalars)."""
    out = {}
    for k, v in summary.items():
        if isinstance(v, dict):
            out.update(_numbers(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out
