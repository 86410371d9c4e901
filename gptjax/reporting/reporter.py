"""Where a run's numbers go, in one place: ``metrics.jsonl``, TensorBoard event files and the console (a tqdm bar
on a terminal, plain lines otherwise). Training only calls :class:`Reporter`; plots read ``metrics.jsonl``.

Only the process that reports (process 0) writes anything; the others get a silent reporter.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from gptjax.reporting.metrics import MetricsLog, format_row
from gptjax.reporting.tensorboard import TensorBoardWriter
from gptjax.runs import RunDir

CONSOLE_TRAIN_KEYS = ("step", "loss", "tokens_per_sec", "mfu", "lr")


class Reporter:
    def __init__(self, run_dir: RunDir | str | Path | None, *, enabled: bool = True, progress: bool = True,
                 total_steps: int = 0, initial_step: int = 0, tensorboard: bool = True, desc: str = "train",
                 wandb: Any = None):
        """``initial_step``: the step the run starts (or resumes) from; what an earlier attempt recorded after it
        is dropped from metrics.jsonl (kept in metrics.dropped.jsonl) and hidden in TensorBoard, so every step
        appears once. ``wandb``: a ``WandbRun`` the rows also go to (the trainer finishes it after the summary)."""
        self.enabled, self.wandb = enabled, wandb
        run = RunDir(run_dir) if run_dir is not None and enabled else None
        self.metrics = MetricsLog(run.metrics, run.dropped_metrics) if run else MetricsLog(None)
        self.metrics.truncate_after(initial_step)
        self.tb = (TensorBoardWriter(run.tensorboard, purge_step=initial_step + 1 if initial_step else None)
                   if run and tensorboard else None)
        show_bar = progress and enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total_steps, initial=initial_step, disable=not show_bar, dynamic_ncols=True,
                        desc=desc)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar.disable:
            print(text, flush=True)
        else:
            self.bar.write(text)

    def train(self, step: int, **values: float) -> dict:
        """Training metrics of ``step``: recorded, shown on the bar (or as a line when there is none)."""
        row = self.metrics.write(step, **values)
        for sink in (self.tb, self.wandb):
            if sink:
                sink.scalars(step, "train", values)
        if self.enabled:
            if self.bar.disable:
                self.message(format_row({k: row[k] for k in CONSOLE_TRAIN_KEYS if k in row}))
            else:
                self.bar.set_postfix(loss=f"{values['loss']:.3f}", tok_s=f"{values['tokens_per_sec']:,.0f}",
                                     mfu=f"{values['mfu']:.1%}")  # the floats: a NaN loss prints as nan
        return row

    def eval(self, step: int, **values: float) -> dict:
        """Evaluation metrics of ``step``: recorded and printed."""
        row = self.metrics.write(step, **values)
        for sink in (self.tb, self.wandb):
            if sink:
                sink.scalars(step, "eval", values)
        self.message(format_row(row))
        return row

    def advance(self, steps: int = 1) -> None:
        self.bar.update(steps)

    def close(self) -> None:
        self.bar.close()
        if self.tb:
            self.tb.close()
