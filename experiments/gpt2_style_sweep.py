"""Experiment file: a small width sweep of GPT-2-style models (learned positions, LayerNorm, GELU, biases)
on the embedded corpus, one run directory per size; prints final validation loss against parameters.

    python experiments/gpt2_style_sweep.py --steps 200
"""

import argparse
import json

from gptjax import DataConfig, OptimConfig, RunConfig, TrainConfig, model_preset
from gptjax.model import count_params

WIDTHS = (128, 192, 256)


def config(d_model: int, steps: int) -> RunConfig:
    model = model_preset("tiny-gpt2", d_model=d_model, n_heads=d_model // 32, d_ff=4 * d_model)
    return RunConfig(model=model, data=DataConfig(corpus="default"),
                     optim=OptimConfig(lr=2e-3, warmup_steps=steps // 10),
                     train=TrainConfig(run_dir=f"runs/gpt2-sweep/d{d_model}", steps=steps, batch_size=16,
                                       seq_len=256, eval_every=max(steps // 2, 1), checkpoint_every=steps,
                                       sample_tokens=0, tasks=""))


if __name__ == "__main__":
    from gptjax.training import train

    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=200)
    a = p.parse_args()
    rows = []
    for d in WIDTHS:
        cfg = config(d, a.steps)
        r = train(cfg, resume="auto")  # re-running the sweep continues finished/partial runs
        rows.append({"d_model": d, "params": count_params(cfg.model), "val_loss": r.val_loss})
    print(json.dumps(rows, indent=2))
