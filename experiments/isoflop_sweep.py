"""IsoFLOP sweep on the embedded Austen corpus, sized for this 2-core CPU; then Chinchilla approaches 2 and 3,
a held-out prediction of the largest budget, a warmup-stable-decay (WSD) variant, and the plots.

    python experiments/isoflop_sweep.py                 # everything; re-running skips finished runs
    python experiments/isoflop_sweep.py --jobs 2        # two runs at a time (one thread each)
    python experiments/isoflop_sweep.py --only cosine   # just the IsoFLOP grid (no held-out budget, no WSD)

Design (stated, so the numbers can be read):
- Data: the embedded corpus with a 352-piece BPE vocabulary (the smallest byte-fallback vocabulary it trains):
  3.2M training tokens, 171k validation tokens. Every run sees at most ~1 epoch (``MAX_EPOCHS``, checked): no budget is
  large enough that a size bracketing its optimum would repeat data (Muennighoff et al. 2023).
- N is the non-embedding parameter count (``gptjax.scaling.sizing``); C = 6 N D. Models follow the sizing rule
  there (LLaMA-style, d_model ~ 32 x n_layers, 16-wide heads, SwiGLU 8/3).
- Each run: batch 4 x 128 tokens (a pilot at 16 x 128 left the larger models of a budget with ~100 steps, far
  from converged), AdamW lr 3e-3 (b2 0.95, wd 0.1, clip 1), warmup 5% of steps, cosine decay to 0.1 x lr over
  exactly the run's own length (the Chinchilla lesson: a cycle longer than the run overstates its loss).
  Validation loss on the first 64 x 4 validation windows (33k tokens), at each quarter of the run.
- Budgets ``BUDGETS`` (6e9 to 2e11 FLOPs, 33x) x ``SIZES`` sizes spaced ``SIZE_STEP`` (1.6x) apart around the
  size with ``TOKENS_PER_PARAM`` (50) tokens per parameter, where a pilot profile at 2e11 put the optimum.
- Held-out: approach 3 is fitted on ``BUDGETS`` and its predictions for the ``HELDOUT_BUDGET`` runs (the largest
  budget, 2.5x the largest fitted one) are written to ``prediction.json`` before those runs are trained; then
  they are trained and the error is reported.
- WSD: per size in ``WSD_SIZES``, one constant-lr run of ``WSD_STEPS`` steps with 20% linear cooldowns branched
  off its checkpoints at several token counts (Hägele et al. 2024): many (N, D) points per size for one
  long run, fitted with approach 3 and compared with the cosine grid.

Outputs (committed): experiments/results/isoflop/{points.csv, wsd_points.csv, fit.json, prediction.json,
summary.json, *.png}; run directories go to runs/isoflop/ (not committed).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import multiprocessing
import os
import shutil
import time
from pathlib import Path

from gptjax import DataConfig, OptimConfig, RunConfig, TrainConfig
from gptjax.runs import RunDir, atomic_directory, write_atomic
from gptjax.scaling import (FitResult, Points, collect_run, fit_points, model_for_params, plot_fit, points_from_rows,
                            scaling_params, write_points)

ROOT = Path(__file__).resolve().parents[1]
VOCAB, SEQ, BATCH, LR = 352, 128, 4, 3e-3
TOKENS_PER_STEP = SEQ * BATCH
TRAIN_TOKENS = 3_213_552  # the training split at VOCAB
MAX_EPOCHS = 1.05  # "about one epoch": every run's tokens are checked against it
BUDGETS = (6e9, 1.5e10, 4e10, 1e11, 2e11)
HELDOUT_BUDGET, HELDOUT_SIZES = 5e11, 3
TOKENS_PER_PARAM = 50.0
SIZES = 5
SIZE_STEP = 1.6
WSD_SIZES = (6_000, 10_000, 16_000, 26_000, 42_000)
WSD_STEPS = 6_000  # the longest branch: 6,000 steps of 512 tokens = 3.07M tokens, 0.96 epoch
WSD_BRANCH_FRACTIONS = (0.125, 0.25, 0.5, 1.0)
WSD_CHECKPOINT_EVERY = 600  # every branch point (0.8 x 750, 1500, 3000, 6000 steps) is a multiple
WSD_DECAY = 0.2
EVAL_BATCHES = 64

RESULTS = ROOT / "experiments" / "results" / "isoflop"
RUNS = ROOT / "runs" / "isoflop"
TOKENIZER = RunDir(RUNS)  # the sweep's shared tokenizer lives at runs/isoflop/tokenizer.model

Job = tuple[str, dict, tuple[str, int] | None]  # (name, config dict, (stable run, step) for a cooldown branch)


def run_config(name: str, target_n: float, tokens: float, schedule: str = "cosine", evals: int = 4,
               checkpoint_every: int | None = None, steps_override: int | None = None,
               warmup: int | None = None) -> RunConfig:
    model = model_for_params(target_n, VOCAB, SEQ)
    steps = steps_override or max(20, round(tokens / TOKENS_PER_STEP))
    optim = OptimConfig(lr=LR, warmup_steps=warmup or max(1, steps // 20), schedule=schedule, decay_fraction=WSD_DECAY)
    train = TrainConfig(run_dir=str(RUNS / name), steps=steps, batch_size=BATCH, seq_len=SEQ,
                        eval_every=max(1, steps // evals), eval_batches=EVAL_BATCHES,
                        checkpoint_every=checkpoint_every or steps, keep_checkpoints=10, sample_tokens=0, tasks="",
                        progress=False, peak_flops=1e11, log_every=max(1, steps // 4), async_checkpoint=False)
    return RunConfig(model=model, data=DataConfig(tokenizer=str(TOKENIZER.tokenizer)), optim=optim, train=train)


def grid(budgets, sizes: int = SIZES) -> list[tuple[str, float, RunConfig]]:
    """(name, budget, config) for every IsoFLOP run: ``sizes`` sizes spaced SIZE_STEP apart around the size
    that gets TOKENS_PER_PARAM tokens per parameter (where the pilot profile put the optimum)."""
    out = []
    for c in budgets:
        n_guess = math.sqrt(c / (6 * TOKENS_PER_PARAM))
        seen = set()
        for k in range(sizes):
            target = n_guess * SIZE_STEP ** (k - (sizes - 1) / 2)
            n = scaling_params(model_for_params(target, VOCAB, SEQ))
            if n in seen:
                continue
            seen.add(n)
            tokens = c / (6 * n)
            if tokens > MAX_EPOCHS * TRAIN_TOKENS:
                raise SystemExit(f"budget {c:.3g}: a {n}-parameter model would see {tokens / TRAIN_TOKENS:.2f} "
                                 f"epochs (> {MAX_EPOCHS}); lower the budget or the size spread")
            name = f"C{c:.0e}_N{n}".replace("+", "")
            out.append((name, c, run_config(name, n, tokens)))
    return out


def is_finished(cfg: RunConfig) -> bool:
    return RunDir(cfg.train.run_dir).is_finished(cfg.train.steps)


def _init_worker():  # one XLA thread per process when several runs share the cores
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()


def _train(cfg_dict: dict, resume_from: tuple[str, int] | None = None) -> str:
    import logging

    from gptjax.training import train

    logging.getLogger("gptjax").setLevel(logging.WARNING)
    cfg = RunConfig.from_dict(cfg_dict)
    if resume_from is not None:  # a WSD cooldown branch: start from the stable run's checkpoint
        _branch_from(cfg, *resume_from)
        train(cfg, resume=True, resume_step=resume_from[1])
    else:
        train(cfg, resume="auto")
    return cfg.train.run_dir


def _branch_from(cfg: RunConfig, stable_dir: str, step: int) -> None:
    """Make ``cfg``'s run directory a copy of the stable run at ``step`` (its checkpoint, tokenizer, data cache,
    metrics up to that step) with ``cfg`` as its config, so resuming continues the same optimizer state and data
    order. Built whole or not at all; a branch that already holds the step is left as it is."""
    run, stable = RunDir(cfg.train.run_dir), RunDir(stable_dir)
    if (run.checkpoints / str(step)).is_dir():
        return
    with atomic_directory(run.path) as tmp:
        new = RunDir(tmp)
        shutil.copytree(stable.checkpoints / str(step), new.checkpoints / str(step))
        if stable.data.is_dir():
            shutil.copytree(stable.data, new.data)
        if stable.tokenizer.is_file():
            shutil.copy(stable.tokenizer, new.tokenizer)
        lines = [ln for ln in stable.metrics.read_text().splitlines() if json.loads(ln).get("step", 0) <= step]
        new.metrics.write_text("".join(ln + "\n" for ln in lines))
        new.write_config(cfg)


def run_all(jobs: list[Job], n_procs: int, label: str) -> None:
    from tqdm import tqdm

    todo = [j for j in jobs if not is_finished(RunConfig.from_dict(j[1]))]
    print(f"{label}: {len(jobs)} runs, {len(jobs) - len(todo)} already finished", flush=True)
    if not todo:
        return
    bar = tqdm(total=len(todo), desc=label, unit="run")
    if n_procs <= 1:
        for name, cfg, branch in todo:
            _train(cfg, branch)
            bar.update()
    else:
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(n_procs, mp_context=ctx, initializer=_init_worker) as ex:
            for fut in cf.as_completed([ex.submit(_train, cfg, branch) for name, cfg, branch in todo]):
                fut.result()
                bar.update()
    bar.close()


def prepare_tokenizer() -> None:
    from gptjax.data import prepare_corpus

    RUNS.mkdir(parents=True, exist_ok=True)
    if not TOKENIZER.tokenizer.is_file():
        scratch = RunDir(RUNS / "_tokenizer")
        corpus = prepare_corpus(DataConfig(), VOCAB, scratch)
        shutil.copy(scratch.tokenizer, TOKENIZER.tokenizer)
        print(f"tokenizer: {VOCAB} pieces, {corpus.tokens[0]:,} train / {corpus.tokens[1]:,} val tokens")


def collect(names_budgets) -> list[dict]:
    return [{**r, "budget": budget} for name, budget in names_budgets for r in collect_run(RUNS / name)]


def collect_finals(names) -> list[dict]:
    return [r for name in names for r in collect_run(RUNS / name) if r["final"]]


def wsd_jobs() -> tuple[list[Job], list[Job]]:
    """Stable runs (one per size; each is also the longest cooldown branch) and the shorter branches."""
    total = WSD_STEPS
    warmup = total // 20
    stable, branches = [], []
    for target in WSD_SIZES:
        n = scaling_params(model_for_params(target, VOCAB, SEQ))
        base = f"wsd_N{n}"
        cfg = run_config(base, n, 0, schedule="wsd", checkpoint_every=WSD_CHECKPOINT_EVERY, steps_override=total,
                         warmup=warmup)
        stable.append((base, cfg.to_dict(), None))
        for f in WSD_BRANCH_FRACTIONS:
            steps = round(total * f)
            if steps == total:
                continue
            name = f"{base}_T{steps}"
            b = run_config(name, n, 0, schedule="wsd", steps_override=steps, warmup=warmup)
            branch_at = round(steps * (1 - WSD_DECAY))
            assert branch_at % WSD_CHECKPOINT_EVERY == 0, (steps, branch_at)
            branches.append((name, b.to_dict(), (str(RUNS / base), branch_at)))
    return stable, branches


def fit_and_plot(points: Points, name: str, title: str, bootstrap: int, approaches,
                 heldout: Points | None = None) -> FitResult:
    """Fit, and write ``<name>.json`` and ``<name>.png`` into the results."""
    fit = fit_points(points, approaches, bootstrap=bootstrap)
    fit.write(RESULTS / f"{name}.json")
    plot_fit(points, fit, RESULTS / f"{name}.png", title=title, heldout=heldout)
    return fit


# ---- the stages ---------------------------------------------------------------------------------------------
def cosine_stage(a) -> tuple[Points, FitResult]:
    """The IsoFLOP grid: train, collect the points, fit every approach."""
    runs = grid(tuple(a.budgets) if a.budgets else BUDGETS)
    run_all([(n, c.to_dict(), None) for n, _, c in runs], a.jobs, "isoflop")
    rows = collect([(n, b) for n, b, _ in runs])
    write_points(rows, RESULTS / "points.csv")
    points = points_from_rows(rows, where=str(RESULTS / "points.csv"))
    fit = fit_and_plot(points, "fit", "IsoFLOP sweep (cosine), Austen corpus", a.bootstrap, ("1", "2", "3", "vpnls"))
    print(fit.summary())
    return points, fit


def heldout_stage(a, points: Points, fit: FitResult) -> dict:
    """Predict the held-out budget's losses first (once: the file records whether the runs existed), then train
    those runs and compare."""
    held = grid([HELDOUT_BUDGET], HELDOUT_SIZES)
    pred_path = RESULTS / "prediction.json"
    if not pred_path.is_file():
        preds = []
        for name, _, cfg in held:
            n, d = scaling_params(cfg.model), cfg.train.steps * TOKENS_PER_STEP
            preds.append({"run": name, "params": n, "tokens": d, "flops": 6.0 * n * d,
                          "predicted_loss": float(fit.approach3.loss(n, d)),
                          "predicted_loss_vpnls": float(fit.vpnls.loss(n, d)),
                          "trained_before_prediction": is_finished(cfg)})
        write_atomic(pred_path, json.dumps({"made_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "fit": "fit.json",
                                            "budget": HELDOUT_BUDGET, "runs": preds}, indent=2) + "\n")
    run_all([(n, c.to_dict(), None) for n, _, c in held], a.jobs, "held-out")
    pred = json.loads(pred_path.read_text())
    held_rows = collect([(n, HELDOUT_BUDGET) for n, _, _ in held])
    measured = {r["run"]: r["loss"] for r in held_rows if r["final"]}
    for r in pred["runs"]:
        r["measured_loss"] = measured[r["run"]]
        r["relative_error"] = (r["predicted_loss"] - r["measured_loss"]) / r["measured_loss"]
        r["relative_error_vpnls"] = (r["predicted_loss_vpnls"] - r["measured_loss"]) / r["measured_loss"]
    pred["max_abs_relative_error"] = max(abs(r["relative_error"]) for r in pred["runs"])
    write_atomic(pred_path, json.dumps(pred, indent=2) + "\n")
    write_points(held_rows, RESULTS / "heldout_points.csv")
    plot_fit(points, fit, RESULTS / "fit.png", title="IsoFLOP sweep (cosine), Austen corpus; x: held-out budget",
             heldout=points_from_rows(held_rows, where="heldout").finals())
    for r in pred["runs"]:
        print(f"held out {r['run']}: predicted {r['predicted_loss']:.4f}, measured {r['measured_loss']:.4f} "
              f"({100 * r['relative_error']:+.2f}%)")
    return pred


def wsd_stage(a) -> tuple[Points, FitResult, dict]:
    """Stable runs (with checkpoints at the branch points), then the cooldown branches; their fit, and the
    compute they took against separate cosine runs for the same points."""
    stable, branches = wsd_jobs()
    run_all(stable, a.jobs, "wsd stable")
    run_all(branches, a.jobs, "wsd branches")
    wsd_rows = collect_finals(name for name, _, _ in stable + branches)
    write_points(wsd_rows, RESULTS / "wsd_points.csv")
    wsd_points = points_from_rows(wsd_rows, where=str(RESULTS / "wsd_points.csv"))
    wsd_fit = fit_and_plot(wsd_points, "wsd_fit", "WSD cooldown branches, Austen corpus", a.bootstrap,
                           ("3", "vpnls"))
    print("WSD:", wsd_fit.summary())
    cos_flops = sum(6.0 * scaling_params(model_for_params(t, VOCAB, SEQ)) * WSD_STEPS * f * TOKENS_PER_STEP
                    for t in WSD_SIZES for f in WSD_BRANCH_FRACTIONS)
    wsd_flops = sum(6.0 * scaling_params(RunConfig.from_dict(c).model) * TOKENS_PER_STEP *
                    (RunConfig.from_dict(c).train.steps - (b[1] if b else 0)) for _, c, b in stable + branches)
    return wsd_points, wsd_fit, {"wsd_flops": wsd_flops, "same_points_by_separate_cosine_runs_flops": cos_flops,
                                 "wsd_compute_saved_fraction": 1 - wsd_flops / cos_flops}


def write_summary(fit: FitResult, pred: dict, wsd_points: Points, wsd_fit: FitResult, compute: dict,
                  seconds: float) -> None:
    law = lambda f: {k: getattr(f, k) for k in ("E", "A", "B", "alpha", "beta", "a", "b")}  # noqa: E731
    summary = {
        "command": "python experiments/isoflop_sweep.py",
        "cosine": law(fit.approach3),
        "cosine_ci": fit.approach3.ci,
        "approach2": {"a": fit.approach2.a, "b": fit.approach2.b, "ci": fit.approach2.ci},
        "approach1": {"a": fit.approach1.a, "b": fit.approach1.b, "ci": fit.approach1.ci},
        "vpnls": law(fit.vpnls),
        "tokens_per_param_at_largest_fitted_budget": fit.approach3.tokens_per_param_at_ref,
        "heldout_max_abs_relative_error": pred["max_abs_relative_error"],
        "wsd": law(wsd_fit.approach3),
        "wsd_ci": wsd_fit.approach3.ci,
        "wsd_points": len(wsd_points),
        **compute,
        "fit_seconds": fit.timings_s,
        "wall_seconds_this_invocation": seconds,
    }
    write_atomic(RESULTS / "summary.json", json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if not k.endswith("_ci")}, indent=2))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=2, help="runs trained at once (separate processes)")
    p.add_argument("--only", choices=["cosine", "heldout", "wsd"], default=None,
                   help="stop after this stage (stages run in the order cosine, heldout, wsd)")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--budgets", type=float, nargs="*", default=None, help=argparse.SUPPRESS)  # pilots
    p.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--runs-dir", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    global BATCH, TOKENS_PER_STEP, RUNS, TOKENIZER
    if a.batch:
        BATCH, TOKENS_PER_STEP = a.batch, a.batch * SEQ
    if a.runs_dir:
        RUNS = Path(a.runs_dir)
        TOKENIZER = RunDir(RUNS)
    prepare_tokenizer()
    RESULTS.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    points, fit = cosine_stage(a)
    if a.only == "cosine":
        return
    pred = heldout_stage(a, points, fit)
    if a.only == "heldout":
        return
    wsd_points, wsd_fit, compute = wsd_stage(a)
    write_summary(fit, pred, wsd_points, wsd_fit, compute, time.time() - t_start)


if __name__ == "__main__":
    main()
