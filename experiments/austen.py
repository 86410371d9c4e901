"""Experiment file: the default run (the ``austen`` run preset), written as a user would start their own.

    gptjax-train --config experiments/austen.py
    python experiments/austen.py              # same thing

An experiment file is plain Python: ``config()`` returns a ``RunConfig`` (the CLI's ``--config`` loads it and
still accepts ``--set`` overrides); running the file trains it. The preset is the one definition of the default
run; an experiment states only what it changes.
"""

from gptjax import RunConfig, build_run_config


def config() -> RunConfig:
    # ~4M params: LLaMA-style, GQA 8/4 heads, RoPE, RMSNorm, SwiGLU, on the embedded Jane Austen corpus
    return build_run_config("austen", overrides=["train.run_dir=runs/austen-experiment"])


if __name__ == "__main__":
    from gptjax.training import train

    train(config())
