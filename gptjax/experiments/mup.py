"""μP's coordinate check (Yang et al. 2022, Tensor Programs V, fig. 5): train the same model at several widths for a
few steps and measure each layer's activation size. Under μP (``model.parametrization=mup``) the sizes stay flat
across width; under the standard parametrization the logits (and the hidden states' updates) grow with it, which is
why a learning rate tuned at one width does not transfer to another.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from gptjax.config import MeshConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig, model_preset

__all__ = ["WIDTHS", "coord_check", "plot", "spread", "width_model"]

WIDTHS = (64, 128, 256, 512, 1024)


def width_model(width: int, parametrization: str, base_width: int = 64, **kw) -> ModelConfig:
    """The check's model at ``width``: depth, heads, vocabulary fixed (head_dim and d_ff grow with the width)."""
    fields = dict(vocab_size=512, n_layers=2, n_heads=4, max_seq_len=64, d_model=width, d_ff=4 * width,
                  parametrization=parametrization, mup_base_width=base_width)
    return model_preset("nano", **{**fields, **kw})


def coord_check(widths: Sequence[int] = WIDTHS, parametrizations: Sequence[str] = ("standard", "mup"),
                steps: int = 4, lr: float = 1e-2, batch: int = 8, seq_len: int = 64, seed: int = 0,
                base_width: int = 64) -> list[dict]:
    """Rows ``{parametrization, width, step, layer, rms}``: each layer's activation RMS (embedding output, each
    block's residual stream, logits) on a fixed batch, at initialisation (step 0) and after each of ``steps``
    Adam steps at ``lr`` (the same for every width: the point of the check)."""
    import jax
    from flax import nnx

    from gptjax.sharding import make_mesh
    from gptjax.training import Program

    rng = np.random.default_rng(seed)
    data = rng.integers(0, 512, (batch, seq_len + 1)).astype(np.int32)
    rows = []
    for p in parametrizations:
        for w in widths:
            model = width_model(w, p, base_width)
            # a constant lr for these steps (a cosine over 10^6 steps), no clipping or decay: Adam alone
            cfg = RunConfig(model=model, optim=OptimConfig(lr=lr, warmup_steps=0, schedule_steps=10**6,
                                                           grad_clip=0.0, weight_decay=0.0),
                            mesh=MeshConfig(data=1), train=TrainConfig(steps=steps, batch_size=batch, seq_len=seq_len))
            prog = Program(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
            state = prog.init(jax.random.key(seed))
            b = prog.global_batch({"inputs": data[:, :-1], "targets": data[:, 1:],
                                   "loss_mask": np.ones((batch, seq_len), np.float32)})

            @jax.jit
            def coordinates(params, tokens):
                trace = nnx.merge(prog.model.graphdef, params).coordinates(tokens)
                return {k: jax.numpy.sqrt(jax.numpy.mean(jax.numpy.square(v.astype("float32"))))
                        for k, v in trace.items()}

            for t in range(steps + 1):
                if t:
                    state, _ = prog.train_step(state, b)
                for layer, rms in coordinates(state["params"], b["inputs"]).items():
                    rows.append({"parametrization": p, "width": w, "step": t, "layer": layer, "rms": float(rms)})
    return rows


def spread(rows: list[dict], parametrization: str, step: int) -> dict[str, float]:
    """Per layer: the largest RMS over widths divided by the smallest, at ``step``."""
    out: dict[str, float] = {}
    for layer in sorted({r["layer"] for r in rows}):
        v = [r["rms"] for r in rows if r["parametrization"] == parametrization and r["step"] == step
             and r["layer"] == layer]
        if v:
            out[layer] = max(v) / min(v)
    return out


def plot(rows: list[dict], path: str | Path) -> Path:
    """The paper's figure: per parametrization, each layer's RMS against width (log-log), one line per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = sorted({r["parametrization"] for r in rows}, key=["standard", "mup"].index)
    layers = sorted({r["layer"] for r in rows}, key=lambda s: (s != "embedding", s == "logits", s))
    steps = sorted({r["step"] for r in rows})
    fig, axes = plt.subplots(len(params), len(layers), figsize=(3.2 * len(layers), 2.8 * len(params)),
                             squeeze=False, sharex=True)
    for i, p in enumerate(params):
        for j, layer in enumerate(layers):
            ax = axes[i][j]
            for t in steps:
                pts = sorted((r["width"], r["rms"]) for r in rows if r["parametrization"] == p and r["layer"] == layer
                             and r["step"] == t)
                ax.plot(*zip(*pts), marker="o", ms=3, label=f"step {t}", color=plt.cm.viridis(t / max(steps)))
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{'μP' if p == 'mup' else 'standard'}: {layer}", fontsize=9)
            if i == len(params) - 1:
                ax.set_xlabel("width (d_model)")
            if j == 0:
                ax.set_ylabel("activation RMS")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


