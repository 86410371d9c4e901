"""IsoFLOP sweep on the embedded Austen corpus, sized for a 2-core CPU: Chinchilla approaches 1, 2, 3, a held-out
prediction of the largest budget, a warmup-stable-decay (WSD) variant, plots. Re-running skips finished runs.

    python experiments/isoflop_sweep.py --jobs 2              # everything, two runs at a time
    python experiments/isoflop_sweep.py --slurm --only cosine # the grid as a SLURM job array; again when it is done
    python experiments/isoflop_sweep.py --mup 2e-3            # cosine + held-out under μP (base width 32), this lr

Design: 352-piece BPE (3.2M train tokens; no run sees more than ~1 epoch), N = non-embedding parameters, C = 6ND,
models from the sizing rule; batch 4 x 128, AdamW 3e-3, 5% warmup, cosine to 0.1x over each run's own length;
5 sizes 1.6x apart around 50 tokens/parameter per budget. The held-out budget's losses are predicted (written to
prediction.json) before its runs are trained. WSD: one constant-lr run per size, 20% cooldowns branched off it.
"""
import argparse
import json
from pathlib import Path

from gptjax import DataConfig, OptimConfig, RunConfig, TrainConfig
from gptjax.data import prepare_corpus
from gptjax.experiments import Run, Sweep, fit_rows, isoflop_runs, predict
from gptjax.runs import RunDir, write_atomic
from gptjax.scaling import model_for_params, plot_fit, points_from_rows, scaling_params, write_points

VOCAB, SEQ, BATCH, LR, TRAIN_TOKENS = 352, 128, 4, 3e-3, 3_213_552
BUDGETS, HELDOUT = (6e9, 1.5e10, 4e10, 1e11, 2e11), 5e11
WSD_SIZES, WSD_STEPS, WSD_FRACTIONS = (6_000, 10_000, 16_000, 26_000, 42_000), 6_000, (0.125, 0.25, 0.5)
ROOT = Path(__file__).resolve().parents[1]
RESULTS, RUNS, MUP_BASE = ROOT / "experiments/results/isoflop", str(ROOT / "runs/isoflop"), 32


def config(name, n, tokens, schedule="cosine", steps=None, warmup=None, checkpoint_every=None, mup=None) -> RunConfig:
    steps = steps or max(20, round(tokens / (SEQ * BATCH)))
    optim = OptimConfig(mup or LR, warmup_steps=warmup or max(1, steps // 20), schedule=schedule, decay_fraction=0.2)
    fields = dict(parametrization="mup", mup_base_width=MUP_BASE) if mup else {}  # --mup: μP at lr = its value
    train = TrainConfig(steps=steps, batch_size=BATCH, seq_len=SEQ, eval_every=max(1, steps // 4), eval_batches=64,
                        checkpoint_every=checkpoint_every or steps, keep_checkpoints=10, sample_tokens=0, tasks="",
                        progress=False, peak_flops=1e11, log_every=max(1, steps // 4), async_checkpoint=False)
    return RunConfig(model=model_for_params(n, VOCAB, SEQ, **fields), optim=optim, train=train,
                     data=DataConfig(tokenizer=str(Path(RUNS, "tokenizer.model"))))


def grid(budgets, sizes=5, mup=None) -> Sweep:
    return Sweep(RUNS + "_mup" * bool(mup), isoflop_runs(budgets, lambda *a: config(*a, mup=mup), VOCAB, SEQ, sizes,
                                                         1.6, 50.0, max_tokens=1.05 * TRAIN_TOKENS))


def wsd() -> Sweep:  # per size: the constant-lr run to WSD_STEPS (its own cooldown), shorter cooldowns off it
    runs, kw = [], dict(schedule="wsd", warmup=WSD_STEPS // 20)
    for n in (scaling_params(model_for_params(t, VOCAB, SEQ)) for t in WSD_SIZES):
        runs.append(Run(f"wsd_N{n}", config("", n, 0, steps=WSD_STEPS, checkpoint_every=600, **kw)))
        runs += [Run(f"wsd_N{n}_T{s}", config("", n, 0, steps=s, **kw), branch=(f"wsd_N{n}", round(0.8 * s)))
                 for s in (round(WSD_STEPS * f) for f in WSD_FRACTIONS)]
    return Sweep(RUNS, runs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=2, help="runs trained at once")
    p.add_argument("--only", choices=["cosine", "heldout", "wsd"], help="stop after this stage")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--slurm", action="store_true", help="submit a stage's unfinished runs as a SLURM job array")
    p.add_argument("--mup", type=float, metavar="LR", help="μP at this lr; runs and results in *_mup")
    a = p.parse_args(argv)
    Path(RUNS, "tokenizer.model").is_file() or prepare_corpus(DataConfig(), VOCAB, RunDir(RUNS))  # one tokenizer
    results = Path(f"{RESULTS}_mup") if a.mup else RESULTS
    summary, fit = {"command": "python experiments/isoflop_sweep.py" + (f" --mup {a.mup:g}" if a.mup else "")}, None
    stages = (("cosine", grid(BUDGETS, mup=a.mup)), ("heldout", grid([HELDOUT], 3, mup=a.mup)), ("wsd", wsd()))
    for stage, sweep in stages[:2] if a.mup else stages:
        if stage == "heldout":  # predicted once, before its runs are trained
            predict(sweep, fit.approach3, results / "prediction.json")
        if a.slurm and sweep.pending():
            return print(f"{stage}: submitted SLURM job(s)", *sweep.slurm(submit=True, name=stage))
        sweep.run(a.jobs, label=stage)
        if stage == "cosine":
            points, fit = fit_rows(sweep.collect(), results, "fit", ("1", "2", "3", "vpnls"), a.bootstrap,
                                   f"IsoFLOP sweep (cosine{', μP' * bool(a.mup)})", points_file="points.csv")
            summary.update(cosine=fit.approach3.law(), cosine_ci=fit.approach3.ci, vpnls=fit.vpnls.law())
        elif stage == "heldout":
            pred, held = predict(sweep, fit.approach3, results / "prediction.json"), sweep.collect()
            write_points(held, results / "heldout_points.csv")
            plot_fit(points, fit, results / "fit.png", title=f"IsoFLOP sweep (cosine{', μP' * bool(a.mup)}), Austen "
                     "corpus; x: held-out budget", heldout=points_from_rows(held, where="held-out runs").finals())
            summary["heldout_max_abs_relative_error"] = pred["max_abs_relative_error"]
        else:
            wsd_points, wsd_fit = fit_rows(sweep.collect(finals_only=True), results, "wsd_fit", ("3", "vpnls"),
                                           a.bootstrap, "WSD cooldown branches", points_file="wsd_points.csv")
            # compute: the branches start at their branch step; separate cosine runs would train every point whole
            steps = [(scaling_params(r.config.model) * r.config.train.steps, scaling_params(r.config.model) *
                      (r.branch or ("", 0))[1]) for r in sweep.runs]
            summary.update(wsd=wsd_fit.approach3.law(), wsd_ci=wsd_fit.approach3.ci, wsd_points=len(wsd_points),
                           wsd_compute_saved_fraction=sum(b for _, b in steps) / sum(w for w, _ in steps))
        print(stage, json.dumps({k: v for k, v in summary.items() if not k.endswith("_ci")}))
        if a.only == stage:
            return
    write_atomic(results / "summary.json", json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
