"""The step loop and nothing else: next batch, train step, hooks."""

from __future__ import annotations

from typing import Iterator, Sequence

from gptjax.reporting.reporter import Reporter
from gptjax.training.hooks import Hook
from gptjax.training.program import Program


def run_steps(program: Program, batches: Iterator[dict], state: dict, start: int, end: int,
              hooks: Sequence[Hook], reporter: Reporter) -> tuple[dict, int]:
    """Train from step ``start`` to ``end``; returns the state and the last completed step."""
    step = start
    for step in range(start + 1, end + 1):
        state, metrics = program.train_step(state, program.global_batch(next(batches)))
        for hook in hooks:
            hook.after_step(step, end, state, metrics)
        reporter.advance()
    return state, step
