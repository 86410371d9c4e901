"""``train(cfg)``: wires a run together — mesh, data, program, starting state, hooks, the step loop — then
finishes it (summary, a sample, curves). Each part lives in its own module; this one only connects them."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
from jax.experimental import multihost_utils

from gptjax import storage
from gptjax.config import RunConfig
from gptjax.data.batches import ShardReadError, data_position, eval_batches, train_dataset
from gptjax.data.run_data import MixtureCorpus, PreparedCorpus, prepare_corpus
from gptjax.evals.loss import target_bytes, unigram_cross_entropy
from gptjax.evals.tasks import load_task
from gptjax.inference import Engine, GenerationConfig
from gptjax.model.accounting import count_params, flops_per_token
from gptjax.reporting.plots import plot_runs
from gptjax.reporting.reporter import Reporter
from gptjax.reporting.wandb_run import WandbRun
from gptjax.runs import RunDir
from gptjax.sharding.mesh import describe, make_mesh
from gptjax.training.checkpointing import CheckpointPolicy, RunComplete, RunSpec
from gptjax.training.hooks import (CheckpointHook, Clock, EvalHook, LastGoodStep, LogHook, NonFiniteHook,
                                   PreemptionHook, ProfileHook, TaskEvalHook)
from gptjax.training.job import run_job
from gptjax.training.loop import run_steps
from gptjax.training.perf import measure_peak_flops
from gptjax.training.program import Program

log = logging.getLogger("gptjax")


@dataclass
class TrainResult:
    run_dir: Path
    final_step: int
    train_loss: float | None = None
    val_loss: float | None = None
    unigram_loss: float | None = None
    sample: str | None = None
    history: list[dict] = field(default_factory=list)
    state: Any = None
    complete_already: bool = False  # the run directory held this finished run; nothing was trained
    checkpoint_stalls: list[float] = field(default_factory=list)  # seconds training paused per save
    tasks: list = field(default_factory=list)  # TaskScore of each in-context task at the end (0- and K-shot)


def prepare_data(cfg: RunConfig, run: RunDir) -> PreparedCorpus | MixtureCorpus:
    """Process 0 tokenizes (training the tokenizer if needed); the others then load its cache (a run on a bucket:
    from there, as no directory is shared)."""
    is_main = jax.process_index() == 0
    corpus = prepare_corpus(cfg.data, cfg.model.vocab_size, run) if is_main else None
    if is_main and jax.process_count() > 1:
        run.push()
    multihost_utils.sync_global_devices("gptjax:data")
    if not is_main:
        run.pull()
    return corpus if is_main else prepare_corpus(cfg.data, cfg.model.vocab_size, run)


def train(cfg: RunConfig, resume: bool | str = False, devices: list | None = None,
          stop_after: int | None = None, resume_step: int | None = None) -> TrainResult:
    """Train per ``cfg``.

    ``resume=True`` continues from the run directory's latest intact checkpoint (or ``resume_step``; an error if
    there is none) and requires ``cfg`` to agree with the run's ``config.json`` (``training/checkpointing.py``);
    ``resume="auto"`` continues if there is one and starts fresh otherwise (sweeps). A run directory that
    already holds checkpoints is never overwritten; if it holds this very run, finished, the result is its
    summary (``complete_already``). ``stop_after=N`` checkpoints and stops once step N is done (a job with a
    time limit; the schedule still spans ``train.steps``). SIGTERM / SIGINT checkpoint and raise ``Preempted``;
    a diverged run raises ``NonFiniteStop``."""
    mesh = make_mesh(cfg.mesh, devices)
    cfg.check_mesh_split(mesh.shape)
    try:
        return run_job(RunSpec.of(cfg), resume, resume_step, lambda policy: _train(cfg, policy, mesh, stop_after))
    except RunComplete as done:
        if jax.process_index() == 0:
            print(f"{done}\nsummary: {json.dumps(done.summary)}", flush=True)
        return TrainResult(run_dir=storage.as_path(cfg.train.run_dir), final_step=done.step,
                           train_loss=done.summary.get("train_loss"), val_loss=done.summary.get("val_loss"),
                           unigram_loss=done.summary.get("unigram_loss"), complete_already=True)


def prediction_report(prediction: dict, val_loss: float) -> dict:
    """A plan's predicted loss (``train.prediction``) against the measured final validation loss: the relative
    error (predicted - measured) / measured, as the sweeps' held-out predictions report it, and whether the
    measurement fell inside the predicted interval."""
    predicted, interval = float(prediction["loss"]), prediction.get("interval")
    out = {"predicted_loss": predicted, "measured_val_loss": float(val_loss),
           "relative_error": (predicted - float(val_loss)) / float(val_loss)}
    within = ""
    if interval:
        out["interval"] = [float(x) for x in interval]
        out["within_interval"] = bool(interval[0] <= val_loss <= interval[1])
        within = f" [{interval[0]:.4f}, {interval[1]:.4f}], {'inside' if out['within_interval'] else 'outside'}"
    out["line"] = (f"predicted val_loss {predicted:.4f}{within}; measured {val_loss:.4f} (prediction error "
                   f"{100 * out['relative_error']:+.2f}%)")
    return {**{k: v for k, v in prediction.items() if k not in ("loss", "interval")}, **out}


def end_of_training_sample(model, params, tokenizer, t) -> str:
    """A sample of ``train.sample_tokens`` tokens after ``train.sample_prompt`` (temperature 0.8, top-k 50) from the
    generation engine; cut to what fits the context after the prompt (it is a look at the model, not a request)."""
    engine = Engine(model, params, tokenizer, slots=1)
    prompt = tokenizer.encode(t.sample_prompt)
    room = engine.max_len - len(prompt)
    if room < 1:
        return f"(no sample: the prompt has {len(prompt)} tokens, the context {engine.max_len})"
    config = GenerationConfig(max_new_tokens=min(t.sample_tokens, room), temperature=0.8, top_k=50, seed=t.seed,
                              stop_at_eos=False)
    completion = engine.generate([prompt], config)[0]
    return tokenizer.decode(prompt + completion.token_ids)  # decoded together so the joining space survives


def _train(cfg: RunConfig, policy: CheckpointPolicy, mesh, stop_after: int | None) -> TrainResult:
    """The run, logged to W&B too when ``train.wandb_project`` names a project (process 0); a run that stops
    early closes its W&B run with the stop's exit code."""
    wandb_run = None
    if cfg.train.wandb_project and jax.process_index() == 0:
        wandb_run = WandbRun(RunDir(cfg.train.run_dir), cfg.train.wandb_project, cfg.to_dict())
    try:
        result = _train_steps(cfg, policy, mesh, stop_after, wandb_run)
    except BaseException as e:
        if wandb_run is not None:
            wandb_run.finish(exit_code=getattr(e, "exit_code", 1))
        raise
    if wandb_run is not None:  # (a run that trained: finish() has recorded its summary already)
        wandb_run.finish()
    return result


def _train_steps(cfg: RunConfig, policy: CheckpointPolicy, mesh, stop_after: int | None,
                 wandb_run: WandbRun | None) -> TrainResult:
    t = cfg.train
    run = RunDir(t.run_dir)
    is_main = jax.process_index() == 0
    corpus = prepare_data(cfg, run)
    if is_main:
        run.write_config(cfg)

    program = Program(cfg, mesh)
    windows = corpus.windows(t.seq_len)
    data_iter = iter(train_dataset(windows, t.seq_len, t.batch_size, t.seed, jax.process_index(),
                                   jax.process_count(), cfg.data.loader_workers))
    state = policy.initial_state(program, data_iter)
    start = int(jax.device_get(state["step"]))
    end = t.steps if stop_after is None else min(stop_after, t.steps)

    n_params = count_params(cfg.model)
    fpt = flops_per_token(cfg.model, t.seq_len)
    peak = t.peak_flops or measure_peak_flops(cfg.model.dtype)
    # the baseline's counts from the first 10M tokens of each split (a mixture: an equal share of each source's)
    unigram = unigram_cross_entropy(corpus.stream("train", 10_000_000), corpus.stream("val", 10_000_000),
                                    cfg.model.vocab_size)
    reporter = Reporter(run, enabled=is_main, progress=t.progress, total_steps=t.steps, initial_step=start,
                        wandb=wandb_run)
    reporter.message(f"gptjax: {n_params / 1e6:.2f}M params ({cfg.model.attention_kind}, {cfg.model.positions}, "
                     f"{cfg.model.norm}, {cfg.model.mlp}, {cfg.model.dtype}) | mesh {describe(mesh, cfg.mesh)} | "
                     f"train {corpus.tokens[0]:,} / val {corpus.tokens[1]:,} tokens | unigram baseline "
                     f"{unigram:.3f} nats | peak {peak / 1e9:.0f} GFLOP/s/device | steps {start}->{t.steps}")

    if isinstance(corpus, MixtureCorpus):
        total = sum(corpus.weights)
        reporter.message("mixture: " + ", ".join(
            f"{n} {w / total:.0%} of the windows ({p.tokens[0]:,} train tokens)"
            for n, w, p in zip(corpus.names, corpus.weights, corpus.parts)))
    for warning in cfg.warnings():
        reporter.message(f"warning: {warning}")
    clock = Clock()
    log_hook = LogHook(t.log_every, reporter, clock, t.batch_size * t.seq_len, fpt, peak, mesh.size,
                       lambda step: data_position(windows, step * t.batch_size, t.seq_len))
    val = corpus.eval_windows(t.seq_len)  # a mixture: each source's, by name
    val_batches = {n: eval_batches(w, t.seq_len, t.batch_size, t.eval_batches)
                   for n, w in (val.items() if isinstance(val, dict) else [("", val)])}
    every_batch = [b for bs in val_batches.values() for b in bs]
    bytes_per_token = target_bytes(every_batch, corpus.tokenizer) / sum(float(b["loss_mask"].sum())
                                                                         for b in every_batch)
    weights = dict(zip(corpus.names, corpus.weights)) if isinstance(corpus, MixtureCorpus) else None
    eval_hook = EvalHook(t.eval_every, program.model, val_batches, reporter, clock, unigram, bytes_per_token, weights)
    task_hook = TaskEvalHook(t.task_eval_every, program.model, corpus.tokenizer,
                             [load_task(name) for name in t.task_names], t.task_examples, reporter, clock)
    preemption = PreemptionHook(policy, data_iter, clock)
    last_good = LastGoodStep(policy, data_iter)
    profile = ProfileHook(t.profile_steps, start, run.profile, reporter, clock)
    hooks = [profile, log_hook, NonFiniteHook(t.max_nonfinite_skips, t.log_every, policy, reporter), eval_hook,
             task_hook, CheckpointHook(policy, data_iter, clock, reporter), preemption, last_good]
    try:
        state, final_step = run_steps(program, data_iter, state, start, end, hooks, reporter, clock)
    except ShardReadError as e:
        raise last_good.stop(e) from None
    finally:
        data_iter.close()  # its reader processes, with data.loader_workers
        profile.close()
        preemption.close()
        reporter.close()

    result = TrainResult(run_dir=storage.as_path(str(run)), final_step=final_step, train_loss=log_hook.last_loss,
                         val_loss=eval_hook.last if eval_hook.last is not None else eval_hook(state["params"]),
                         unigram_loss=unigram, history=reporter.metrics.rows, state=state,
                         checkpoint_stalls=policy.stalls)
    task_scores = []
    if task_hook.tasks and t.final_task_examples and final_step > start:
        for shots in sorted({0, t.task_shots}):
            task_scores += task_hook.scores(state["params"], shots, t.final_task_examples)
        result.tasks = task_scores
        if is_main:
            print("--- in-context tasks ---\n" + "\n".join(s.line() for s in task_scores), flush=True)
    if t.sample_tokens > 0 and is_main and jax.process_count() == 1:
        result.sample = end_of_training_sample(program.model, state["params"], corpus.tokenizer, t)
        print("\n--- sample (temperature 0.8, top-k 50) ---\n" + result.sample + "\n---", flush=True)
    policy.checkpointer.wait()  # the summary describes a run whose final checkpoint is written
    if is_main and final_step > start:  # a call that trained nothing leaves the run's summary as it was
        summary = {"final_step": result.final_step, "train_loss": result.train_loss, "val_loss": result.val_loss,
                   "val_bpb": eval_hook.bits_per_byte(result.val_loss), "unigram_loss": unigram,
                   "params": n_params, "checkpoints": str(run.checkpoints)}
        if eval_hook.last_by_source:
            summary["val_loss_by_source"] = eval_hook.last_by_source
        if task_scores:
            summary["tasks"] = [s.as_dict() for s in task_scores]
        if t.prediction is not None:
            summary["prediction"] = prediction_report(t.prediction, result.val_loss)
            print("plan: " + summary["prediction"]["line"], flush=True)
        run.write_summary(summary)
        if result.history:
            plot_runs([run], run.curves)
            summary["curves"] = run.where(run.CURVES)
        print("summary: " + json.dumps(summary), flush=True)
        if wandb_run is not None:
            wandb_run.finish(summary, run.curves if result.history else None)
    return result
