"""Training curves as a picture: loss against tokens (train, validation, each source's validation in a mixture,
unigram baseline) and throughput."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

from gptjax.reporting.metrics import read_metrics
from gptjax.runs import RunDir, write_atomic


def plot_runs(run_dirs: Sequence[RunDir | str | Path], out: str | Path) -> Path:
    """Write a PNG with one curve per run: loss vs tokens (left), tokens/s and MFU (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_speed) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, run in enumerate(run_dirs):
        run = RunDir(run)
        rows = read_metrics(run.metrics)
        train = [r for r in rows if "loss" in r]
        val = [r for r in rows if "val_loss" in r]
        tokens_per_step = train[0]["tokens"] / train[0]["step"] if train else 1
        color = f"C{i}"
        label = run.name if len(run_dirs) > 1 else "train"
        ax_loss.plot([r["tokens"] for r in train], [r["loss"] for r in train], color=color, alpha=0.6, label=label)
        if val:
            ax_loss.plot([r["step"] * tokens_per_step for r in val], [r["val_loss"] for r in val], "o-",
                         color=color, label=f"{run.name} validation" if len(run_dirs) > 1 else "validation")
            ax_loss.axhline(val[0]["unigram_loss"], color=color, ls="--", lw=1,
                            label="unigram baseline" if i == 0 else None)
            # a mixture: each source's validation loss, dotted, marked by source
            for j, key in enumerate(sorted({k for r in val for k in r if k.startswith("val_loss/")})):
                per = [r for r in val if key in r]
                ax_loss.plot([r["step"] * tokens_per_step for r in per], [r[key] for r in per], ":",
                             marker="sdv^<>"[j % 6], color=color, label=f"{run.name + ' ' if len(run_dirs) > 1 else ''}"
                             f"validation: {key.split('/', 1)[1]}")
        ax_speed.plot([r["step"] for r in train], [r["tokens_per_sec"] for r in train], color=color, label=label)
        if len(run_dirs) == 1 and train and train[0]["tokens_per_sec"] > 0:
            k = 100 * train[0]["mfu"] / train[0]["tokens_per_sec"]  # MFU is proportional to tokens/s
            ax_speed.secondary_yaxis("right", functions=(lambda t, k=k: t * k, lambda m, k=k: m / k)).set_ylabel(
                "MFU %")
    ax_loss.set(xlabel="training tokens", ylabel="cross-entropy (nats/token)", title="loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_speed.set(xlabel="step", ylabel="tokens / s", title="throughput")
    ax_speed.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, format="png")
    plt.close(fig)
    return write_atomic(out, buf.getvalue())  # whole or not at all: a full disk leaves no 0-byte picture
