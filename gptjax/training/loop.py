"""The training loop: data, sharded state, jitted steps, evaluation, metrics, checkpoints, a sample."""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from gptjax.checkpoint.manager import Checkpointer, CheckpointNotFound
from gptjax.config import ConfigError, RunConfig
from gptjax.data.pipeline import eval_batches, prepare_corpus, train_dataset, unigram_cross_entropy
from gptjax.eval.plots import plot_runs
from gptjax.eval.sample import generate
from gptjax.model.accounting import count_params, flops_per_token
from gptjax.sharding.mesh import describe, make_mesh
from gptjax.training.metrics import MetricsLog, format_row
from gptjax.training.perf import measure_peak_flops, mfu
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


def _local_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's rows of a global host batch (every process holds the same eval batches)."""
    n, i = jax.process_count(), jax.process_index()
    rows = batch["inputs"].shape[0] // n
    return {k: v[i * rows: (i + 1) * rows] for k, v in batch.items()}


def evaluate(program: Program, params: Any, batches: list[dict[str, np.ndarray]]) -> float:
    losses = [program.eval_step(params, program.global_batch(_local_rows(b))) for b in batches]
    return float(np.mean(jax.device_get(losses)))


def _emit(pbar: tqdm, message: str) -> None:
    if jax.process_index() != 0:
        return
    if pbar.disable:
        print(message, flush=True)
    else:
        pbar.write(message)


def train(cfg: RunConfig, resume: bool | str = False, devices: list | None = None,
          stop_after: int | None = None) -> TrainResult:
    """Train per ``cfg``.

    ``resume=True`` continues from the run directory's latest checkpoint (an error if there is none);
    ``resume="auto"`` continues if there is one and starts fresh otherwise (sweeps). A run directory that
    already holds checkpoints is never silently overwritten. ``stop_after=N`` checkpoints and stops once step N
    is done (a job with a time limit; the schedule still spans ``train.steps``)."""
    t_cfg = cfg.train
    run_dir = Path(t_cfg.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    is_main = jax.process_index() == 0
    mesh = make_mesh(cfg.mesh, devices)
    if t_cfg.batch_size % (mesh.shape["data"] * mesh.shape["fsdp"]):
        raise ConfigError(f"train.batch_size={t_cfg.batch_size} must be divisible by the batch-parallel devices "
                          f"(data x fsdp = {mesh.shape['data'] * mesh.shape['fsdp']})")

    # Data: process 0 tokenizes (training the tokenizer if needed); the others then load its cache.
    if is_main:
        corpus = prepare_corpus(cfg.data, cfg.model.vocab_size, run_dir)
    multihost_utils.sync_global_devices("gptjax:data")
    if not is_main:
        corpus = prepare_corpus(cfg.data, cfg.model.vocab_size, run_dir)

    checkpointer = Checkpointer(ckpt_dir, keep=t_cfg.keep_checkpoints)
    latest = checkpointer.latest_step()
    if latest is not None and not resume:
        raise FileExistsError(f"{run_dir} already holds checkpoints (latest step {latest}); pass --resume to "
                              "continue that run, or choose another train.run_dir")
    if resume is True and latest is None:
        raise CheckpointNotFound(f"--resume: no checkpoint in {ckpt_dir}; run without --resume to start this run")
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(cfg.to_json())

    program = Program(cfg, mesh)
    data_iter = iter(train_dataset(corpus.train, t_cfg.seq_len, t_cfg.batch_size, t_cfg.seed,
                                   jax.process_index(), jax.process_count()))
    if resume and latest is not None:
        state = checkpointer.restore(program.abstract_state, data_iter)
    else:
        state = program.init(jax.random.key(t_cfg.seed))
    start = int(jax.device_get(state["step"]))
    val = eval_batches(corpus.val, t_cfg.seq_len, t_cfg.batch_size, t_cfg.eval_batches)

    n_params = count_params(cfg.model)
    fpt = flops_per_token(cfg.model, t_cfg.seq_len)
    peak = t_cfg.peak_flops or measure_peak_flops(cfg.model.dtype)
    unigram = unigram_cross_entropy(corpus.train, corpus.val, cfg.model.vocab_size)
    metrics = MetricsLog(run_dir / "metrics.jsonl" if is_main else None)
    tokens_per_step = t_cfg.batch_size * t_cfg.seq_len
    header = (f"gptjax: {n_params / 1e6:.2f}M params ({cfg.model.attention_kind}, {cfg.model.positions}, "
              f"{cfg.model.norm}, {cfg.model.mlp}, {cfg.model.dtype}) | mesh {describe(mesh)} | "
              f"train {len(corpus.train):,} / val {len(corpus.val):,} tokens | unigram baseline "
              f"{unigram:.3f} nats | peak {peak / 1e9:.0f} GFLOP/s/device | steps {start}->{t_cfg.steps}")

    result = TrainResult(run_dir=run_dir, final_step=start, unigram_loss=unigram)
    show_bar = t_cfg.progress and is_main and sys.stderr.isatty()
    pbar = tqdm(total=t_cfg.steps, initial=start, disable=not show_bar, dynamic_ncols=True, desc="train")
    _emit(pbar, header)
    window_t, window_steps, last = time.perf_counter(), 0, None
    end = t_cfg.steps if stop_after is None else min(stop_after, t_cfg.steps)
    for step in range(start, end):
        batch = program.global_batch(next(data_iter))
        state, m = program.train_step(state, batch)
        window_steps += 1
        done = step + 1
        if done % t_cfg.log_every == 0 or done == end:
            m = jax.device_get(m)
            dt = time.perf_counter() - window_t
            tps = window_steps * tokens_per_step / dt
            row = metrics.write(done, loss=float(m["loss"]), grad_norm=float(m["grad_norm"]), lr=float(m["lr"]),
                                z_loss=float(m["z_loss"]), tokens_per_sec=tps, step_time=dt / window_steps,
                                mfu=mfu(tps, fpt, peak, mesh.size), tokens=done * tokens_per_step)
            result.history.append(row)
            result.train_loss = row["loss"]
            pbar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{tps:,.0f}", mfu=f"{row['mfu']:.1%}")
            if pbar.disable:  # no bar (not a terminal, or progress off): the same numbers as lines
                _emit(pbar, format_row({k: row[k] for k in ("step", "loss", "tokens_per_sec", "mfu", "lr")}))
            window_t, window_steps = time.perf_counter(), 0
        evaluating = done % t_cfg.eval_every == 0 or done == end
        saving = done % t_cfg.checkpoint_every == 0 or done == end
        if evaluating or saving:  # their time is not training throughput: finish the step first, then pause
            jax.block_until_ready(state["step"])
        pause = time.perf_counter()
        if evaluating:
            v = evaluate(program, state["params"], val)
            row = metrics.write(done, val_loss=v, val_ppl=float(np.exp(v)), unigram_loss=unigram)
            result.history.append(row)
            result.val_loss = v
            _emit(pbar, format_row(row))
        if saving:
            checkpointer.save(done, state, data_iter)
        window_t += time.perf_counter() - pause
        pbar.update(1)
        last = done
    pbar.close()
    result.final_step = last if last is not None else start
    if result.val_loss is None:
        result.val_loss = evaluate(program, state["params"], val)

    if t_cfg.sample_tokens > 0 and is_main and jax.process_count() == 1:
        tok = corpus.tokenizer
        prompt = tok.encode(t_cfg.sample_prompt)
        ids = generate(program.forward, state["params"], prompt, t_cfg.sample_tokens, cfg.model.max_seq_len,
                       temperature=0.8, top_k=50, seed=t_cfg.seed)
        result.sample = tok.decode(prompt + ids)  # decoded together so the joining space survives
        print("\n--- sample (temperature 0.8, top-k 50) ---\n" + result.sample + "\n---", flush=True)
    if is_main:
        summary = {"final_step": result.final_step, "train_loss": result.train_loss, "val_loss": result.val_loss,
                   "unigram_loss": unigram, "params": n_params, "checkpoints": str(ckpt_dir)}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if result.history:
            summary["curves"] = str(plot_runs([run_dir], run_dir / "curves.png"))
        print("summary: " + json.dumps(summary), flush=True)
    checkpointer.close()
    result.state = state
    return result
