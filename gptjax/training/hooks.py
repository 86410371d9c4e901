"""What happens between train steps, one job per hook: training metrics and throughput, evaluation,
checkpointing. A new cadence-driven job (a pre-emption handler, a new metric) is one more hook.

Time spent in evaluation and checkpointing is excluded from throughput (``Clock.paused``).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator, Sequence

import jax
import numpy as np

from gptjax.evals.loss import evaluate
from gptjax.model.sharded import ShardedModel
from gptjax.reporting.reporter import Reporter
from gptjax.training.checkpointing import CheckpointPolicy
from gptjax.training.perf import mfu


class Clock:
    """Training time since the last throughput window, less the pauses."""

    def __init__(self):
        self.start = time.perf_counter()

    @contextlib.contextmanager
    def paused(self, state: dict) -> Iterator[None]:
        jax.block_until_ready(state["step"])  # the step's own compute is training time: finish it first
        t = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - t

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self.start = now - self.start, now
        return dt


class Hook:
    def after_step(self, step: int, end: int, state: dict, metrics: dict) -> None:
        raise NotImplementedError


class LogHook(Hook):
    """Every ``every`` steps (and at the end): loss, grad norm, lr, z-loss, tokens/s, step time, MFU."""

    def __init__(self, every: int, reporter: Reporter, clock: Clock, tokens_per_step: int, flops_per_token: float,
                 peak_flops: float, n_devices: int):
        self.every, self.reporter, self.clock = every, reporter, clock
        self.tokens_per_step, self.fpt, self.peak, self.n_devices = tokens_per_step, flops_per_token, peak_flops, n_devices
        self.window_steps, self.last_loss = 0, None

    def after_step(self, step, end, state, metrics):
        self.window_steps += 1
        if step % self.every and step != end:
            return
        m = jax.device_get(metrics)
        dt = self.clock.lap()
        tps = self.window_steps * self.tokens_per_step / dt
        row = self.reporter.train(step, loss=float(m["loss"]), grad_norm=float(m["grad_norm"]), lr=float(m["lr"]),
                                  z_loss=float(m["z_loss"]), tokens_per_sec=tps, step_time=dt / self.window_steps,
                                  mfu=mfu(tps, self.fpt, self.peak, self.n_devices),
                                  tokens=step * self.tokens_per_step)
        self.last_loss, self.window_steps = row["loss"], 0


class EvalHook(Hook):
    """Every ``every`` steps (and at the end): validation loss and perplexity, next to the unigram baseline."""

    def __init__(self, every: int, model: ShardedModel, batches: Sequence[dict[str, np.ndarray]], reporter: Reporter,
                 clock: Clock, unigram_loss: float):
        self.every, self.model, self.batches, self.reporter, self.clock = every, model, batches, reporter, clock
        self.unigram_loss, self.last = unigram_loss, None

    def __call__(self, params: Any) -> float:
        return evaluate(self.model, params, self.batches)

    def after_step(self, step, end, state, metrics):
        if step % self.every and step != end:
            return
        with self.clock.paused(state):
            self.last = self(state["params"])
            self.reporter.eval(step, val_loss=self.last, val_ppl=float(np.exp(self.last)),
                               unigram_loss=self.unigram_loss)


class CheckpointHook(Hook):
    def __init__(self, policy: CheckpointPolicy, data_iterator: Any, clock: Clock):
        self.policy, self.data_iterator, self.clock = policy, data_iterator, clock

    def after_step(self, step, end, state, metrics):
        if self.policy.due(step, end):
            with self.clock.paused(state):
                self.policy.save(step, state, self.data_iterator)
