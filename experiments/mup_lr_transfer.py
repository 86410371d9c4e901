"""Does the best learning rate transfer across width? lr x width on the embedded Austen corpus, under the standard
parametrisation and under μP (base width 32), the experiment of the μP paper's figure 1.

    python experiments/mup_lr_transfer.py --jobs 2            # 72 runs; re-running skips finished ones
    python experiments/mup_lr_transfer.py --long              # widths 32 and 256 only, 1,000 steps

Design: widths 32, 64, 128, 256 (8x) at fixed depth 2 and 4 heads (head_dim and d_ff = 4 d grow with the
width: ``gptjax.experiments.mup.width_model``), 512-piece BPE, batch 8 x 128, 300 steps of AdamW (5% warmup,
cosine to 10%), lr on a grid of factors of 2 from 2^-12 to 2^-4. At width 32 the two parametrisations are the same
model. Writes experiments/results/mup/lr_transfer.{json,png}: each run's final validation loss, and each width's
best lr.
"""
import argparse
import json
from pathlib import Path

from gptjax import DataConfig, OptimConfig, RunConfig, TrainConfig
from gptjax.data import prepare_corpus
from gptjax.experiments import Run, Sweep, width_model
from gptjax.runs import RunDir, write_atomic

VOCAB, SEQ, BATCH, STEPS, BASE = 512, 128, 8, 300, 32
WIDTHS, LOG2_LRS = (32, 64, 128, 256), range(-12, -3)
LONG_STEPS, LONG_LRS = 1000, range(-9, -3)
ROOT = Path(__file__).resolve().parents[1]
RESULTS, RUNS = ROOT / "experiments/results/mup", ROOT / "runs/mup_lr_transfer"


def config(parametrization: str, width: int, log2_lr: int, steps: int = STEPS) -> RunConfig:
    model = width_model(width, parametrization, BASE, vocab_size=VOCAB, max_seq_len=SEQ)
    train = TrainConfig(steps=steps, batch_size=BATCH, seq_len=SEQ, eval_every=steps // 2, eval_batches=32,
                        checkpoint_every=steps, sample_tokens=0, tasks="", progress=False, peak_flops=1e11,
                        log_every=steps // 4, async_checkpoint=False)
    return RunConfig(model=model, optim=OptimConfig(lr=2.0 ** log2_lr, warmup_steps=steps // 20), train=train,
                     data=DataConfig(tokenizer=str(RUNS / "tokenizer.model")))


def sweep(long: bool = False) -> Sweep:
    if long:  # do the optima agree between the base and 8x its width once the runs leave the plateau?
        return Sweep(f"{RUNS}_long", [Run(f"{p}_w{w}_lr{k}", config(p, w, k, LONG_STEPS), meta={
            "parametrization": p, "width": w, "log2_lr": k}) for p in ("mup", "standard")
            for w in (WIDTHS[0], WIDTHS[-1]) for k in LONG_LRS])
    return Sweep(RUNS, [Run(f"{p}_w{w}_lr{k}", config(p, w, k), meta={"parametrization": p, "width": w,
                                                                       "log2_lr": k})
                        for p in ("standard", "mup") for w in WIDTHS for k in LOG2_LRS])


def table(s: Sweep) -> dict:
    """Final validation loss per run; per parametrisation, each width's best lr (on the grid) and how many grid
    steps it moves from the smallest width to the largest."""
    rows = [{**r.meta, "lr": 2.0 ** r.meta["log2_lr"], "val_loss": RunDir(r.config.train.run_dir).read_summary()[
        "val_loss"]} for r in s.runs if s.finished(r)]
    out, widths = {"rows": rows, "best": {}}, sorted({r["width"] for r in rows})
    for p in sorted({r["parametrization"] for r in rows}, reverse=True):
        best = {}
        for w in widths:
            mine = [r for r in rows if r["parametrization"] == p and r["width"] == w and r["val_loss"] == r["val_loss"]]
            if mine:
                best[w] = min(mine, key=lambda r: r["val_loss"])["log2_lr"]
        # how far apart the widths' losses are at each lr (μP's promise: the same curve at every width)
        spread = {}
        for k in sorted({r["log2_lr"] for r in rows}):
            at = [r["val_loss"] for r in rows if r["parametrization"] == p and r["log2_lr"] == k]
            if len(at) == len(widths):
                spread[k] = max(at) - min(at)
        out["best"][p] = {"log2_lr": best, "grid_steps_moved": max(best.values()) - min(best.values())
                          if best else None, "loss_spread_across_widths": spread}
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, p in zip(axes, ("standard", "mup")):
        for i, w in enumerate(WIDTHS):
            rows = sorted((r for r in result["rows"] if r["parametrization"] == p and r["width"] == w),
                          key=lambda r: r["lr"])
            color = plt.cm.viridis(i / (len(WIDTHS) - 1))
            ax.plot([r["lr"] for r in rows], [r["val_loss"] for r in rows], "o-", color=color, label=f"width {w}")
            best = result["best"][p]["log2_lr"].get(w)
            if best is not None:
                [b] = [r for r in rows if r["log2_lr"] == best]
                ax.plot(b["lr"], b["val_loss"], "*", color=color, markersize=16, markeredgecolor="k")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("learning rate")
        moved = result["best"][p]["grid_steps_moved"]
        ax.set_title(f"{f'μP (base width {BASE})' if p == 'mup' else 'standard'}: best lr moves {moved} grid step(s)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"validation loss after {STEPS} steps")
    lo, hi = min(r["val_loss"] for r in result["rows"]), max(r["val_loss"] for r in result["rows"])
    axes[0].set_ylim(lo - 0.05, hi + 0.05)
    axes[1].legend()
    fig.suptitle("lr x width, Austen corpus (stars: each width's best lr)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=2, help="runs trained at once")
    p.add_argument("--long", action="store_true", help=f"widths 32 and 256 for {LONG_STEPS} steps")
    a = p.parse_args(argv)
    if not (RUNS / "tokenizer.model").is_file():
        prepare_corpus(DataConfig(), VOCAB, RunDir(RUNS))
    s = sweep(a.long)
    s.run(a.jobs, label="lr x width")
    result = table(s)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "lr_transfer_long" if a.long else "lr_transfer"
    write_atomic(RESULTS / f"{name}.json", json.dumps({"command": "python experiments/mup_lr_transfer.py" +
                                                       " --long" * a.long, **result}, indent=1) + "\n")
    if not a.long:
        plot(result, RESULTS / "lr_transfer.png")
    for par in ("standard", "mup"):
        print(par, "best log2 lr by width:", result["best"][par]["log2_lr"],
              "moved", result["best"][par]["grid_steps_moved"], "grid steps")


if __name__ == "__main__":
    main()
