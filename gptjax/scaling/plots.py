"""Figures of a scaling fit (matplotlib, Agg): one PNG with six panels, one function each.

1. IsoFLOP profiles: loss against N per budget, the fitted parabolas and their minima (+- 1 sd; none is drawn
   for a profile that does not bracket its minimum).
2. N_opt against C: approach 2 minima with its power law and bootstrap band, approach 1's envelope, and the
   approach-3 (and vpnls) frontiers.
3. D_opt against C, likewise.
4. Loss against compute: every point, and approach 3's loss on its compute-optimal frontier.
5. Approach 3's contours of L(N, D) with the efficient frontier and the points.
6. Residuals of approach 3: log L observed - log L predicted, against compute.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np

from gptjax.runs import write_atomic
from gptjax.scaling.fit import FitResult
from gptjax.scaling.points import Points


@dataclasses.dataclass
class _Figure:
    """What every panel draws from: the fit, the final points it used, held-out points, and a compute axis."""
    fit: FitResult
    finals: Points
    heldout: Points | None
    c_line: np.ndarray


def plot_fit(points: Points, fit: FitResult, out: str | Path, title: str | None = None,
             heldout: Points | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    finals = points.finals().drop_highest(fit.drop_highest)
    c_all = np.concatenate([finals.flops] + ([heldout.flops] if heldout is not None else []))
    c_line = np.exp(np.linspace(np.log(c_all.min()) - 0.5, np.log(c_all.max()) + 1.0, 100))
    figure = _Figure(fit, finals, heldout, c_line)
    fig, axes = plt.subplots(2, 3, figsize=(17, 10))
    _profiles(fig, axes[0, 0], figure)
    _optimum(axes[0, 1], figure, "params")
    _optimum(axes[0, 2], figure, "tokens")
    _loss_vs_compute(fig, axes[1, 0], figure)
    _contours(axes[1, 1], figure)
    _residuals(axes[1, 2], figure)
    for ax in axes.flat:  # decade labels only: minor log-tick labels overlap on narrow ranges
        if ax.get_xscale() == "log":
            ax.xaxis.set_minor_formatter(NullFormatter())
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, format="png")
    plt.close(fig)
    return write_atomic(out, buf.getvalue())


def _profiles(fig, ax, f: _Figure) -> None:
    """1. IsoFLOP profiles (without approach 2: the points, coloured by tokens)."""
    import matplotlib.pyplot as plt

    a2, finals, heldout = f.fit.approach2, f.finals, f.heldout
    budgets = finals.budgets()
    if a2 is None:
        sc = ax.scatter(finals.params, finals.loss, c=np.log10(finals.tokens), cmap="viridis", s=18)
        fig.colorbar(sc, ax=ax, label="log10 D")
    ub = np.unique(budgets) if a2 is not None else []
    cmap = plt.get_cmap("viridis")
    for i, b in enumerate(ub):
        col = cmap(i / max(len(ub) - 1, 1))
        m = budgets == b
        ax.scatter(finals.params[m], finals.loss[m], color=col, s=18, label=f"C={b:.2g}")
        prof = next((p for p in a2.profiles if np.isclose(p.budget, b)), None)
        if prof is None or prof.coef[0] <= 0:
            continue
        u = np.linspace(np.log(finals.params[m].min()) - 0.3, np.log(finals.params[m].max()) + 0.3, 60)
        p2, p1, p0 = prof.coef
        ax.plot(np.exp(u), p0 + p1 * u + p2 * u * u, color=col, lw=1)
        if not prof.bracketed:  # warned about, and left out of the power law: no minimum to show
            continue
        sd = prof.log_x_opt_sd
        xerr = None if not np.isfinite(sd) else [[prof.x_opt * (1 - np.exp(-sd))], [prof.x_opt * (np.exp(sd) - 1)]]
        ax.errorbar([prof.x_opt], [prof.loss_opt], xerr=xerr, color=col, marker="*", ms=10, mec="k", capsize=3)
    if heldout is not None:
        ax.scatter(heldout.params, heldout.loss, marker="x", color="red", s=40, label="held out")
    ax.set(xscale="log", xlabel="parameters N", ylabel="final validation loss",
           title="IsoFLOP profiles" if a2 is not None else "final loss against N")
    if a2 is not None or heldout is not None:
        ax.legend(fontsize=7)


def _optimum(ax, f: _Figure, var: str) -> None:
    """2-3. N_opt (``var="params"``) or D_opt (``"tokens"``) against compute, by every approach fitted."""
    fit, c_line = f.fit, f.c_line
    key = "a" if var == "params" else "b"
    a2, a1 = fit.approach2, fit.approach1
    if a2 is not None:
        ok = [p for p in (a2.profiles if var == "params" else a2.token_profiles) if p.bracketed]
        ax.scatter([p.budget for p in ok], [p.x_opt for p in ok], color="C0", zorder=3, label="approach 2 minima")
        exp, ci = getattr(a2, key), (a2.ci or {}).get(key)
        ax.plot(c_line, a2.optimal(c_line)[var], color="C0", label=f"approach 2: C^{exp:.3f}" + _ci_text(ci))
        if ci:  # band: exponent interval pivoting on the data's geometric-mean compute
            c0 = np.exp(np.mean(np.log([p.budget for p in ok])))
            y0 = a2.optimal(c0)[var]
            lo, hi = y0 * (c_line / c0) ** ci[0], y0 * (c_line / c0) ** ci[1]
            ax.fill_between(c_line, np.minimum(lo, hi), np.maximum(lo, hi), color="C0", alpha=0.15)
    if a1 is not None:
        env = a1.envelope
        ax.scatter(env["flops"][::5], env[var][::5], s=6, color="C2", label="approach 1 envelope")
        ax.plot(c_line, a1.optimal(c_line)[var], color="C2", ls=":", label=f"approach 1: C^{getattr(a1, key):.3f}")
    for pf, col, name in ((fit.approach3, "C3", "approach 3"), (fit.vpnls, "C1", "vpnls")):
        if pf is not None:
            ax.plot(c_line, pf.optimal(c_line)[var], color=col, ls="--", label=f"{name}: C^{getattr(pf, key):.3f}")
    ax.set(xscale="log", yscale="log", xlabel="compute C (FLOPs)",
           ylabel="N_opt" if var == "params" else "D_opt (tokens)",
           title=f"compute-optimal {'parameters' if var == 'params' else 'tokens'}")
    ax.legend(fontsize=7)


def _loss_vs_compute(fig, ax, f: _Figure) -> None:
    """4. Loss against compute, with approach 3's loss on its frontier and its irreducible E."""
    finals, heldout, p3 = f.finals, f.heldout, f.fit.approach3
    sc = ax.scatter(finals.flops, finals.loss, c=np.log10(finals.params), cmap="viridis", s=18)
    fig.colorbar(sc, ax=ax, label="log10 N")
    if heldout is not None:
        ax.scatter(heldout.flops, heldout.loss, marker="x", color="red", s=40, label="held out (measured)")
    if p3 is not None:
        ax.plot(f.c_line, p3.optimal(f.c_line)["loss"], color="C3", label="approach 3 frontier")
        ax.axhline(p3.E, color="grey", ls=":", lw=1, label=f"E = {p3.E:.3f}")
    ax.set(xscale="log", xlabel="compute C (FLOPs)", ylabel="final validation loss", title="loss vs compute")
    ax.legend(fontsize=7)


def _contours(ax, f: _Figure) -> None:
    """5. Approach 3's L(N, D) as contours, with the efficient frontier and the points."""
    finals, heldout, p3 = f.finals, f.heldout, f.fit.approach3
    if p3 is not None:
        n_all = np.concatenate([finals.params] + ([heldout.params] if heldout is not None else []))
        d_all = np.concatenate([finals.tokens] + ([heldout.tokens] if heldout is not None else []))
        nn, dd = np.meshgrid(np.exp(np.linspace(np.log(n_all.min()) - 0.7, np.log(n_all.max()) + 0.7, 120)),
                             np.exp(np.linspace(np.log(d_all.min()) - 0.7, np.log(d_all.max()) + 0.7, 120)))
        cs = ax.contour(nn, dd, p3.loss(nn, dd), levels=14, cmap="magma", linewidths=0.8)
        ax.clabel(cs, fontsize=6)
        opt = p3.optimal(f.c_line)
        ax.plot(opt["params"], opt["tokens"], color="C3", label="efficient frontier")
        ax.scatter(finals.params, finals.tokens, s=10, color="k", label="points")
        ax.set(xlim=(nn.min(), nn.max()), ylim=(dd.min(), dd.max()))
        ax.legend(fontsize=7)
    ax.set(xscale="log", yscale="log", xlabel="parameters N", ylabel="tokens D", title="approach 3: L(N, D)")


def _residuals(ax, f: _Figure) -> None:
    """6. Approach 3's residuals, log L observed - log L fitted, against compute."""
    finals, heldout, p3 = f.finals, f.heldout, f.fit.approach3
    if p3 is not None:
        res = np.log(finals.loss) - np.log(p3.loss(finals.params, finals.tokens))
        ax.scatter(finals.flops, res, s=14, c=np.log10(finals.params), cmap="viridis", label="fitted points")
        if heldout is not None:
            hr = np.log(heldout.loss) - np.log(p3.loss(heldout.params, heldout.tokens))
            ax.scatter(heldout.flops, hr, marker="x", color="red", s=40, label="held out")
        ax.axhline(0, color="grey", lw=1)
        ax.legend(fontsize=7)
    ax.set(xscale="log", xlabel="compute C (FLOPs)", ylabel="log L - log L_fit", title="approach 3 residuals")


def _ci_text(ci) -> str:
    return f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
