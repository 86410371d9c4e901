"""μP's workflow on the IsoFLOP sweep's models: tune the learning rate once, on the model at the base width, and
transfer it to every size (``isoflop_sweep.py --mup LR``).

    python experiments/mup_base_lr.py --jobs 2

The proxy is the sweep's base-width run at a middle budget (C = 4e10: d_model 32 = mup_base_width, 1 layer,
N = 11,872, 1,097 steps; under μP at its base width it is the standard model exactly), trained at lr 2^-10 to
2^-5 with everything else as in the sweep. Writes experiments/results/isoflop_mup/base_lr.json; the lr with the
lowest final validation loss is the one to transfer.
"""
import argparse
import json
from pathlib import Path

from gptjax.experiments import Run, Sweep
from gptjax.runs import RunDir, write_atomic
from isoflop_sweep import MUP_BASE, RESULTS, ROOT, config

BUDGET, N, LOG2_LRS = 4e10, 11_872, range(-10, -4)


def sweep() -> Sweep:
    runs = [Run(f"lr{k}", config("", N, BUDGET / (6 * N), mup=2.0 ** k), meta={"log2_lr": k}) for k in LOG2_LRS]
    assert all(r.config.model.d_model == MUP_BASE for r in runs), "the proxy is the base-width model"
    return Sweep(ROOT / "runs/isoflop_mup_lr", runs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=2)
    a = p.parse_args(argv)
    s = sweep()
    s.run(a.jobs, label="base-width lr")
    rows = [{"lr": r.config.optim.lr, "log2_lr": r.meta["log2_lr"],
             "val_loss": RunDir(r.config.train.run_dir).read_summary()["val_loss"]} for r in s.runs]
    best = min(rows, key=lambda r: r["val_loss"])
    out = Path(f"{RESULTS}_mup")
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "base_lr.json", json.dumps({"command": "python experiments/mup_base_lr.py", "budget": BUDGET,
                                                   "params": N, "rows": rows, "best_lr": best["lr"]}, indent=1))
    for r in rows:
        print(f"lr 2^{r['log2_lr']} = {r['lr']:.4g}: val_loss {r['val_loss']:.4f}" + (" <- best" if r is best else ""))


if __name__ == "__main__":
    main()
