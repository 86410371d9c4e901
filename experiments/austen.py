"""Experiment file: the default run, written out as a user would write their own.

    python -m gptjax.train --config experiments/austen.py
    python experiments/austen.py              # same thing

An experiment file is plain Python: ``config()`` returns a ``RunConfig`` (the CLI's ``--config`` loads it and
still accepts ``--set`` overrides); running the file trains it.
"""

from gptjax import DataConfig, OptimConfig, RunConfig, TrainConfig, model_preset


def config() -> RunConfig:
    return RunConfig(
        model=model_preset("tiny"),  # ~4M params: LLaMA-style, GQA 8/4 heads, RoPE, RMSNorm, SwiGLU
        data=DataConfig(corpus="default"),  # the embedded Jane Austen corpus, split into chapters
        optim=OptimConfig(lr=3e-3, warmup_steps=30, min_lr_ratio=0.1, weight_decay=0.1),
        train=TrainConfig(run_dir="runs/austen-experiment", steps=300, batch_size=16, seq_len=256,
                          eval_every=100, checkpoint_every=200),
    )


if __name__ == "__main__":
    from gptjax.training.loop import train

    train(config())
