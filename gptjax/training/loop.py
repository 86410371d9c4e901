"""The step loop and nothing else: next batch, train step, hooks."""

from __future__ import annotations

import time
from typing import Iterator, Sequence

from gptjax.reporting.reporter import Reporter
from gptjax.training.hooks import Clock, Hook
from gptjax.training.program import TrainProgram


def run_steps(program: TrainProgram, batches: Iterator[dict], state: dict, start: int, end: int,
              hooks: Sequence[Hook], reporter: Reporter, clock: Clock | None = None) -> tuple[dict, int]:
    """Train from step ``start`` to ``end``; returns the state and the last completed step. ``clock``: where the
    host's time waiting for each batch adds up (``LogHook`` reports it as ``data_time``)."""
    step = start
    for step in range(start + 1, end + 1):
        t = time.perf_counter()
        batch = next(batches)
        if clock is not None:
            clock.data_s += time.perf_counter() - t
        state, metrics = program.train_step(state, program.global_batch(batch))
        for hook in hooks:
            hook.after_step(step, end, state, metrics)
        reporter.advance()
    return state, step
