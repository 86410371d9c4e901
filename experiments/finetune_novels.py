"""GPT-1's comparison on a task from real text: which of Austen's six novels a passage comes from
(``gptjax/finetune/novels.py``), after the default run (``make train``: runs/austen).

    python experiments/finetune_novels.py [--pretrained runs/austen] [--epochs 3] [--lr 3e-4]

Five fine-tuning runs with the same data, steps and seed: the pretrained model fine-tuned with and without the
auxiliary LM loss (lm_coef 0.5 / 0), the same architecture from random initialisation (with and without), and a
linear probe on the pretrained model's frozen features (their mean over the text, standardised; lr --probe-lr).
Writes experiments/results/finetune_novels.json and prints the table. Runs that finished are not run again (each
is a gptjax-finetune run directory under runs/novels/).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from gptjax.finetune import FinetuneConfig, finetune, novels

ROOT = Path(__file__).resolve().parents[1]
ARMS = [("finetune", 0.5), ("finetune", 0.0), ("scratch", 0.5), ("scratch", 0.0), ("probe", 0.0)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained", default="runs/austen")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--probe-lr", type=float, default=1e-2, help="the probe trains a linear head alone: a larger lr")
    p.add_argument("--out", default=str(ROOT / "experiments" / "results" / "finetune_novels.json"))
    a = p.parse_args()
    data = novels.write("runs/novels/data")
    rows = []
    for mode, lm_coef in ARMS:
        cfg = FinetuneConfig(a.pretrained, "classification", str(data["train"]), str(data["test"]),
                             f"runs/novels/{mode}-lm{lm_coef}", mode=mode, lm_coef=lm_coef,
                             lr=a.probe_lr if mode == "probe" else a.lr,
                             epochs=a.epochs, batch_size=32)
        t = time.perf_counter()
        r = finetune(cfg)
        rows.append({"mode": mode, "lm_coef": lm_coef, "lr": cfg.lr, "accuracy": r.accuracy,
                     "stderr": r.accuracy_stderr,
                     "n_test": r.n_test, "chance": r.chance, "steps": r.step, "train_loss": r.train_loss,
                     "seconds": None if r.complete_already else round(time.perf_counter() - t, 1)})
        print(f"{mode:8s} lm_coef {lm_coef:.1f}: accuracy {r.accuracy:.3f} ± {r.accuracy_stderr:.3f} "
              f"(chance {r.chance:.3f}, n={r.n_test}, {r.step} steps)", flush=True)
    Path(a.out).write_text(json.dumps({"pretrained": a.pretrained, "epochs": a.epochs, "runs": rows}, indent=2)
                           + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
