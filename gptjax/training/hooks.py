"""What happens between train steps, one job per hook: training metrics and throughput, the non-finite guard,
evaluation, checkpointing, pre-emption. A new job between steps is one more hook.

Time spent in evaluation and checkpointing is excluded from throughput (``Clock.paused``). A hook ends the run
by raising ``StopTraining`` (the trainer closes everything and reports it).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from gptjax.evals.loss import evaluate
from gptjax.evals.scoring import Scorer
from gptjax.evals.tasks import Task, TaskScore, evaluate_task
from gptjax.model.sharded import ShardedModel
from gptjax.reporting.reporter import Reporter
from gptjax.training.checkpointing import CheckpointPolicy
from gptjax.training.perf import mfu


class Clock:
    """Training time since the last throughput window, less the pauses."""

    def __init__(self):
        self.start = time.perf_counter()
        self.data_s = 0.0  # the host's time waiting for batches since the last throughput window (training/loop.py)

    @contextlib.contextmanager
    def paused(self, state: dict) -> Iterator[None]:
        jax.block_until_ready(state["step"])  # the step's own compute is training time: finish it first
        t = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - t

    def lap(self) -> tuple[float, float]:
        """Seconds since the last lap (less the pauses), and of them the seconds spent waiting for data."""
        now = time.perf_counter()
        dt, data, self.start, self.data_s = now - self.start, self.data_s, now, 0.0
        return dt, data


class StopTraining(Exception):
    """A hook ended the run; ``exit_code`` says how (the CLI exits with it)."""

    exit_code = 1


class Preempted(StopTraining):
    exit_code = 75  # EX_TEMPFAIL: try again later (resume)


class NonFiniteStop(StopTraining):
    exit_code = 3


class DataStop(StopTraining):
    exit_code = 2  # bad input: the data, named in the message


class Hook:
    def after_step(self, step: int, end: int, state: dict, metrics: dict) -> None:
        raise NotImplementedError


class LogHook(Hook):
    """Every ``every`` steps (and at the end): loss, grad norm, lr, the objective's other terms (z-loss; a
    fine-tune's task and LM losses), tokens/s, step time (``data_time`` of it: the host waiting for the batch;
    evaluation and checkpoint saves are paused out, a save's pause logged as ``checkpoint_stall_s``), MFU, and
    where the data stands (``data_position(step)``: epochs, and each source's tokens and epochs in a mixture)."""

    def __init__(self, every: int, reporter: Reporter, clock: Clock, tokens_per_step: int, flops_per_token: float,
                 peak_flops: float, n_devices: int, data_position: Callable[[int], dict[str, float]] | None = None):
        self.every, self.reporter, self.clock = every, reporter, clock
        self.data_position = data_position or (lambda step: {})
        self.tokens_per_step, self.fpt = tokens_per_step, flops_per_token
        self.peak, self.n_devices = peak_flops, n_devices
        self.window_steps, self.last_loss = 0, None

    def after_step(self, step, end, state, metrics):
        self.window_steps += 1
        if step % self.every and step != end:
            return
        m = jax.device_get(metrics)
        dt, data_s = self.clock.lap()
        tps = self.window_steps * self.tokens_per_step / dt
        first = ("loss", "grad_norm", "lr")  # then the objective's other terms (pre-training: z_loss), by name
        scalars = {k: float(m[k]) for k in (*first, *sorted(set(m) - {*first, "finite"}))}
        row = self.reporter.train(step, **scalars, tokens_per_sec=tps, step_time=dt / self.window_steps,
                                  data_time=data_s / self.window_steps,
                                  mfu=mfu(tps, self.fpt, self.peak, self.n_devices),
                                  tokens=step * self.tokens_per_step, **self.data_position(step))
        self.last_loss, self.window_steps = row["loss"], 0


class EvalHook(Hook):
    """Every ``every`` steps (and at the end): validation loss, perplexity and bits per byte (``bytes_per_token``:
    the bytes of text the scored validation tokens stand for, per token), next to the unigram baseline.
    ``batches`` maps each source's name to its batches (one corpus: the name ""). In a mixture each source's loss
    is reported (``val_loss/<name>``) and ``val_loss`` is their average under the mixture's ``weights`` (the loss
    on the distribution the run trains on)."""

    def __init__(self, every: int, model: ShardedModel, batches: Mapping[str, Sequence[dict]], reporter: Reporter,
                 clock: Clock, unigram_loss: float, bytes_per_token: float,
                 weights: Mapping[str, float] | None = None):
        self.every, self.model, self.reporter, self.clock = every, model, reporter, clock
        self.sources = dict(batches)
        total = sum((weights or {}).values()) or 1.0
        self.weights = {n: (weights[n] / total if weights else 1.0) for n in self.sources}
        self.unigram_loss, self.bytes_per_token = unigram_loss, bytes_per_token
        self.last, self.last_by_source = None, {}

    def __call__(self, params: Any) -> float:
        return self.losses(params)[0]

    def losses(self, params: Any) -> tuple[float, dict[str, float]]:
        """The validation loss, and each source's (empty for one source)."""
        per = {n: evaluate(self.model, params, b) for n, b in self.sources.items()}
        total = float(sum(self.weights[n] * loss for n, loss in per.items()))
        return total, ({} if list(per) == [""] else per)

    def bits_per_byte(self, loss: float) -> float:
        """``loss`` (nats per validation token) as bits per byte of the text those tokens stand for."""
        return loss / (np.log(2) * self.bytes_per_token)

    def after_step(self, step, end, state, metrics):
        if step % self.every and step != end:
            return
        with self.clock.paused(state):
            self.last, self.last_by_source = self.losses(state["params"])
            self.reporter.eval(step, val_loss=self.last, val_ppl=float(np.exp(self.last)),
                               val_bpb=self.bits_per_byte(self.last), unigram_loss=self.unigram_loss,
                               **{f"val_loss/{n}": v for n, v in self.last_by_source.items()})


class TaskEvalHook(Hook):
    """Every ``every`` steps (not at the end, which the trainer scores in full): zero-shot accuracy on the first
    ``examples`` test examples of each task (``<task>_acc``, ``<task>_acc_norm``) and the seconds it took
    (``task_eval_s``), paused out of throughput. One :class:`Scorer` for the run, so the scoring compiles once."""

    def __init__(self, every: int, model: ShardedModel, tokenizer: Any, tasks: Sequence[Task], examples: int,
                 reporter: Reporter, clock: Clock):
        self.every, self.tokenizer, self.tasks, self.examples = every, tokenizer, tasks, examples
        self.reporter, self.clock = reporter, clock
        self.scorer = Scorer(model, None)

    def scores(self, params: Any, shots: int, examples: int) -> list[TaskScore]:
        self.scorer.params = params
        return [evaluate_task(self.scorer, self.tokenizer, t, shots, limit=examples) for t in self.tasks]

    def after_step(self, step, end, state, metrics):
        if not self.every or not self.tasks or step % self.every or step == end:
            return
        with self.clock.paused(state):
            t = time.perf_counter()
            scores = self.scores(state["params"], 0, self.examples)
            took = time.perf_counter() - t
        accuracies = {f"{s.task}_{name}": v for s in scores for name, v in (("acc", s.acc), ("acc_norm", s.acc_norm))
                      if v is not None}
        self.reporter.eval(step, **accuracies, task_eval_s=round(took, 3))


class NonFiniteHook(Hook):
    """Stops the run once more than ``max_skips`` steps in a row had a non-finite loss or gradient norm (the train
    step already skipped their updates). Checked when metrics are read anyway (log steps), before every
    checkpoint and at the end, so it adds no per-step host sync."""

    def __init__(self, max_skips: int, log_every: int, policy: CheckpointPolicy, reporter: Reporter,
                 setting: str = "train.max_nonfinite_skips",
                 advice: str = "Lower optim.lr, raise optim.warmup_steps, or check the data."):
        """``setting``: the name of ``max_skips`` in the run's config; ``advice``: what to change, in its terms."""
        self.max_skips, self.log_every, self.policy, self.reporter = max_skips, log_every, policy, reporter
        self.setting, self.advice = setting, advice

    def after_step(self, step, end, state, metrics):
        if step % self.log_every and not self.policy.due(step, end):
            return
        nf = jax.device_get(state["nonfinite"])
        streak, since = int(nf["streak"]), int(nf["since"])
        if streak > self.max_skips:
            kept = self.policy.checkpointer.all_steps()
            raise NonFiniteStop(
                f"stopped at step {step}: the loss or gradient norm was not finite at every step from step {since} "
                f"({streak} in a row, more than {self.setting}={self.max_skips}); those steps applied "
                f"no update, and no non-finite state was saved (checkpoints: {kept or 'none'}). {self.advice}")
        if streak:
            self.reporter.message(f"step {step}: skipped {streak} non-finite step(s) in a row since step {since}")


class CheckpointHook(Hook):
    def __init__(self, policy: CheckpointPolicy, data_iterator: Any, clock: Clock, reporter: Reporter):
        self.policy, self.data_iterator, self.clock, self.reporter = policy, data_iterator, clock, reporter

    def after_step(self, step, end, state, metrics):
        if self.policy.due(step, end):
            with self.clock.paused(state):
                stall = self.policy.save(step, state, self.data_iterator)
            self.reporter.metrics.write(step, checkpoint_stall_s=round(stall, 4))


class _Position:
    """A data iterator's state taken earlier, saved as if it were the iterator."""

    def __init__(self, state: Any):
        self.state = state

    def get_state(self) -> Any:
        return self.state


class LastGoodStep(Hook):
    """The last completed step's state and data position: what a run stopped by unreadable data saves (a damaged
    shard surfaced as a Riegeli traceback mid-training, and the steps since the last checkpoint were lost). The
    iterator's state is taken after every step (a dict of counters), since the failed read may have moved it."""

    def __init__(self, policy: CheckpointPolicy, data_iterator: Any):
        self.policy, self.data_iterator = policy, data_iterator
        self.step: int | None = None

    def after_step(self, step, end, state, metrics):
        self.step, self.state, self.position = step, state, self.data_iterator.get_state()

    def stop(self, error: Exception) -> DataStop:
        """Save the last good step where it is not saved yet; the stop that names ``error`` and the step."""
        if self.step is None:
            return DataStop(f"{error}; no step was trained")
        if self.policy.last_saved != self.step:
            self.policy.save(self.step, self.state, _Position(self.position))
        self.policy.checkpointer.wait()
        return DataStop(f"{error}; training stopped after step {self.step}, saved in "
                        f"{self.policy.checkpointer.directory}: continue with --resume once the data is whole")


class ProfileHook(Hook):
    """A JAX profiler trace of steps ``first`` to ``last`` (``train.profile``) into ``directory`` (TensorBoard's
    profile plugin or XProf read it): tracing starts once step ``first - 1`` is done (before the loop when the run
    starts at it) and stops once step ``last`` is, its work finished. Paused out of the throughput."""

    def __init__(self, steps: tuple[int, int] | None, start: int, directory: Any, reporter: Reporter, clock: Clock):
        self.first, self.last = steps or (0, -1)
        self.directory, self.reporter, self.clock = directory, reporter, clock
        self.active = False
        if steps and self.first <= start + 1 <= self.last:
            self._start()

    def _start(self) -> None:
        jax.profiler.start_trace(str(self.directory))
        self.active = True

    def after_step(self, step, end, state, metrics):
        if step == self.first - 1 and not self.active:
            with self.clock.paused(state):
                self._start()
        elif self.active and (step == self.last or step == end):
            with self.clock.paused(state):
                jax.block_until_ready(state)
                self.close()
            self.reporter.message(f"profile of steps {max(self.first, 1)}-{step}: {self.directory} (tensorboard "
                                  f"--logdir {self.directory}, the Profile tab)")

    def close(self) -> None:
        if self.active:
            self.active = False
            jax.profiler.stop_trace()


class PreemptionHook(Hook):
    """SIGTERM (what schedulers and TPU pre-emption send) and SIGINT (Ctrl-C) set a flag; at the next step
    boundary the run saves a checkpoint and stops with ``Preempted`` (exit code 75). With several processes they
    agree on the step through JAX's pre-emption sync point (the notice reaches every process; each stops at the
    same step), so the collective save cannot deadlock."""

    def __init__(self, policy: CheckpointPolicy, data_iterator: Any, clock: Clock):
        self.policy, self.data_iterator, self.clock = policy, data_iterator, clock
        self.received: int | None = None
        self.multi = jax.process_count() > 1
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            # with several processes JAX's pre-emption service owns SIGTERM; SIGINT is turned into one
            for sig in ((signal.SIGINT,) if self.multi else (signal.SIGINT, signal.SIGTERM)):
                self.previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.received = signum
        if self.multi and signum == signal.SIGINT:
            os.kill(os.getpid(), signal.SIGTERM)

    def requested(self, step: int) -> bool:
        if self.multi:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.received is not None

    def after_step(self, step, end, state, metrics):
        if not self.requested(step):
            return
        with self.clock.paused(state):
            self.policy.save(step, state, self.data_iterator)
            self.policy.checkpointer.wait()
        name = signal.Signals(self.received).name if self.received else "SIGTERM"
        raise Preempted(f"pre-empted ({name}) at step {step}: checkpoint saved in {self.policy.checkpointer.directory};"
                        f" continue with --resume")

    def close(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
