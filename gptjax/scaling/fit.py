"""One entry point for every approach: ``fit_points(points, approaches, bootstrap)`` -> a :class:`FitResult` (what
``gptjax-scaling fit`` writes to fit.json: ``FitResult.write`` / ``FitResult.read``), and ``predict(fit, flops)``.

Bootstrap: ``bootstrap`` resamples; 95% percentile intervals for every fitted quantity. Approach 3 resamples
points and refits each resample from the 8 grid initialisations that reached the lowest objective on the full
data (refitting every resample from all 4,500 would take hours); vpnls resamples points and repeats its whole
grid search; approach 2 resamples points within each budget; approach 1 resamples whole runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np

from gptjax.runs import write_atomic
from gptjax.scaling import parametric
from gptjax.scaling.isoflop import (Bootstrap, EnvelopeFit, IsoFLOPFit, bootstrap_envelope, bootstrap_isoflop,
                                    check_envelope, check_isoflop, fit_envelope, fit_isoflop)
from gptjax.scaling.parametric import ParametricFit, ParametricResult
from gptjax.scaling.points import Points, ScalingInputError

APPROACHES = ("1", "2", "3", "vpnls")
PARAMETRIC_APPROACHES = ("3", "vpnls")  # the fits with a loss L(N, D), which predict reads
BOOTSTRAP_STARTS = 8
CI = (2.5, 97.5)
# approach 3's values that fit.json also carries at its top level (what readers of older fit files use)
TOP_LEVEL = ("E", "A", "B", "alpha", "beta", "a", "b", "G", "objective", "n_points")


@dataclasses.dataclass
class FitResult:
    """Every fitted approach on one table of points, and how it was fitted."""

    n_points: int  # final points the fits used (after drop_highest)
    n_rows: int
    source: str
    drop_highest: int = 0
    bootstrap: int = 0
    timings_s: dict[str, float] = dataclasses.field(default_factory=dict)
    warnings: list[str] = dataclasses.field(default_factory=list)
    approach3: ParametricResult | None = None
    vpnls: ParametricResult | None = None
    approach2: IsoFLOPFit | None = None
    approach1: EnvelopeFit | None = None

    def parametric(self, approach: str = "3") -> ParametricResult:
        """Approach 3's or the variable-projection fit: an error naming the approaches fitted if it is missing."""
        if approach not in PARAMETRIC_APPROACHES:
            raise ScalingInputError(f"approach {approach!r} has no L(N, D); choose "
                                    f"{' or '.join(PARAMETRIC_APPROACHES)}")
        key = "approach3" if approach == "3" else "vpnls"
        fit = getattr(self, key)
        if fit is None:
            fitted = [k for k in ("approach1", "approach2", "approach3", "vpnls") if getattr(self, k) is not None]
            raise ScalingInputError(f"the fit has no {key} section (fitted approaches: {', '.join(fitted)})")
        return fit

    def to_dict(self) -> dict:
        out = {"n_points": self.n_points, "n_rows": self.n_rows, "source": self.source,
               "drop_highest": self.drop_highest, "bootstrap": self.bootstrap, "timings_s": dict(self.timings_s),
               "warnings": list(self.warnings)}
        if self.approach3 is not None:
            out["approach3"] = self.approach3.to_dict()
            out.update({k: out["approach3"][k] for k in TOP_LEVEL})
        for key in ("vpnls", "approach2", "approach1"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key).to_dict()
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "FitResult":
        def section(key, kind):
            return kind.from_dict(d[key]) if d.get(key) is not None else None

        return cls(n_points=d["n_points"], n_rows=d["n_rows"], source=d["source"],
                   drop_highest=d.get("drop_highest", 0), bootstrap=d.get("bootstrap", 0),
                   timings_s=dict(d.get("timings_s", {})), warnings=list(d.get("warnings", [])),
                   approach3=section("approach3", ParametricResult), vpnls=section("vpnls", ParametricResult),
                   approach2=section("approach2", IsoFLOPFit), approach1=section("approach1", EnvelopeFit))

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def read(cls, path: str | Path) -> "FitResult":
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ScalingInputError(f"cannot read fit file {path}: {type(e).__name__}: {e}") from None

    def summary(self) -> str:
        """The fits in a few lines, with 95% intervals where bootstrapped."""
        lines = [f"{self.n_points} points"]
        for fit, name in ((self.approach3, "approach 3 (Huber/L-BFGS)"), (self.vpnls, "vpnls")):
            if fit is not None:
                ci = lambda k, fit=fit: _interval(fit.ci, k)  # noqa: E731
                lines.append(f"{name}: E={fit.E:.4g}{ci('E')} A={fit.A:.4g}{ci('A')} B={fit.B:.4g}{ci('B')} "
                             f"alpha={fit.alpha:.4f}{ci('alpha')} beta={fit.beta:.4f}{ci('beta')}")
                lines.append(f"  N_opt ~ C^{fit.a:.4f}{ci('a')}  D_opt ~ C^{fit.b:.4f}{ci('b')}  tokens/param at "
                             f"C={fit.reference_flops:.3g}: {fit.tokens_per_param_at_ref:.3g}"
                             f"{ci('tokens_per_param_at_ref')}  objective={fit.objective:.4g}")
        for fit, name in ((self.approach2, "approach 2 (IsoFLOP)"), (self.approach1, "approach 1 (envelope)")):
            if fit is not None:
                lines.append(f"{name}: N_opt ~ C^{fit.a:.4f}{_interval(fit.ci, 'a')}  D_opt ~ C^{fit.b:.4f}"
                             f"{_interval(fit.ci, 'b')}")
        if self.timings_s:
            lines.append("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in self.timings_s.items()))
        return "\n".join(lines)


@dataclasses.dataclass
class Prediction:
    """What a fit says at compute ``flops`` (the compute-optimal ``params``, ``tokens`` and the loss there), or
    at one run's (``params``, ``tokens``)."""

    params: float
    tokens: float
    flops: float
    loss: float
    tokens_per_param: float
    approach: str = "3"
    approach2: dict[str, float] | None = None  # approach 2's power laws at the same compute, where fitted
    # 95% bootstrap intervals (name -> [lo, hi]) of params, tokens and loss, where the fit stored its refits
    ci: dict[str, list[float]] | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def _interval(ci: dict | None, key: str) -> str:
    bounds = (ci or {}).get(key)
    return f" [{bounds[0]:.4g}, {bounds[1]:.4g}]" if bounds else ""


def _ci(samples) -> list[float] | None:
    s = np.asarray([x for x in samples if x is not None and np.isfinite(x)], float)
    return [float(np.percentile(s, CI[0])), float(np.percentile(s, CI[1]))] if len(s) >= 10 else None


def _param_samples(rows_RxF: np.ndarray, c_ref: float) -> dict[str, np.ndarray]:
    """Bootstrap rows of (E, A, B, alpha, beta) -> samples of every reported quantity."""
    E, A, B, al, be = rows_RxF.T
    with np.errstate(all="ignore"):
        a, b = be / (al + be), al / (al + be)
        G = (al * A / (be * B)) ** (1 / (al + be))
        n_opt, d_opt = G * (c_ref / 6) ** a, (c_ref / 6) ** b / G
    return {"E": E, "A": A, "B": B, "alpha": al, "beta": be, "a": a, "b": b, "G": G,
            "tokens_per_param_at_ref": d_opt / n_opt}


def _parametric_result(fit: ParametricFit, c_ref: float, samples: np.ndarray | None) -> ParametricResult:
    extra = {"reference_flops": c_ref, "tokens_per_param_at_ref": float(fit.optimal(c_ref)["tokens_per_param"])}
    if samples is not None:
        extra["ci"] = {k: _ci(v) for k, v in _param_samples(samples, c_ref).items()}
        extra["bootstrap_n"] = int(len(samples))
        extra["samples"] = [[float(f"{x:.6g}") for x in row] for row in np.asarray(samples, float)
                            if np.all(np.isfinite(row))]
    return ParametricResult(**dataclasses.asdict(fit), **extra)


def _with_intervals(fit, bs: Bootstrap):
    """An approach-1/2 fit with 95% intervals of its exponents from ``bs`` (and the count of failed resamples)."""
    return dataclasses.replace(fit, ci={"a": _ci(bs.a), "b": _ci(bs.b)}, bootstrap_failed=bs.failed)


def check_parametric(points: Points) -> None:
    if len(points) < 5:
        raise ScalingInputError(f"{points.source}: approach 3 fits 5 parameters (E, A, B, alpha, beta); it needs "
                                f"at least 5 points, got {len(points)}")
    if len(np.unique(points.params)) < 2 or len(np.unique(points.tokens)) < 2:
        raise ScalingInputError(f"{points.source}: approach 3 needs points at 2 or more distinct N and D")


def fit_points(points: Points, approaches=APPROACHES, bootstrap: int = 0, drop_highest: int = 0,
               seed: int = 0, skip_inapplicable: bool = False) -> FitResult:
    """Fit the requested approaches; approaches 2, 3 and vpnls use the final rows, approach 1 the whole curves.
    ``drop_highest`` removes the K highest-loss final points before approaches 2/3/vpnls. With
    ``skip_inapplicable`` an approach the points cannot support (no curves for 1, no IsoFLOP groups for 2) is
    left out with a warning instead of raising."""
    bad = [a for a in approaches if a not in APPROACHES]
    if bad:
        raise ScalingInputError(f"unknown approach(es) {bad}; choose from {', '.join(APPROACHES)} or 'all'")
    finals = points.finals().drop_highest(drop_highest)
    c_ref = float(np.max(finals.flops)) if len(finals) else float(np.max(points.flops))
    rng = np.random.default_rng(seed)
    out = FitResult(n_points=len(finals), n_rows=len(points), source=points.source, drop_highest=drop_highest,
                    bootstrap=bootstrap)
    out.warnings += duplicate_points(finals)
    if "3" in approaches or "vpnls" in approaches:
        check_parametric(finals)
    weights = rng.multinomial(len(finals), np.full(len(finals), 1 / len(finals)), size=bootstrap).astype(float) \
        if bootstrap and len(finals) else None
    if "3" in approaches:
        t = time.perf_counter()
        fit, thetas, values = parametric.fit_parametric(finals.params, finals.tokens, finals.loss, return_all=True)
        out.timings_s["approach3_fit"] = time.perf_counter() - t
        samples = None
        if weights is not None:
            t = time.perf_counter()
            starts = parametric.grid_starts()[np.argsort(values, kind="stable")[:BOOTSTRAP_STARTS]]
            samples = parametric.refit_weighted(starts, finals.params, finals.tokens, finals.loss, weights)
            out.timings_s["approach3_bootstrap"] = time.perf_counter() - t
        out.approach3 = _parametric_result(fit, c_ref, samples)
        out.warnings += at_a_bound(out.approach3, "approach 3")
    if "vpnls" in approaches:
        t = time.perf_counter()
        fit = parametric.fit_vpnls(finals.params, finals.tokens, finals.loss)
        samples = None if weights is None else parametric.fit_vpnls(finals.params, finals.tokens, finals.loss,
                                                                     weights)
        out.timings_s["vpnls"] = time.perf_counter() - t
        out.vpnls = _parametric_result(fit, c_ref, samples)
        out.warnings += at_a_bound(out.vpnls, "vpnls")
    if "2" in approaches and _applicable(check_isoflop, finals, "2", skip_inapplicable, out):
        t = time.perf_counter()
        fit = fit_isoflop(finals)
        if bootstrap:
            bs = bootstrap_isoflop(finals, bootstrap, seed)
            fit = _with_intervals(fit, bs)
            for p in fit.profiles:
                p.x_opt_ci = _ci(bs.n_opt.get(p.budget, []))
        out.timings_s["approach2"] = time.perf_counter() - t
        out.warnings += fit.warnings
        out.approach2 = fit
    if "1" in approaches and _applicable(check_envelope, points, "1", skip_inapplicable, out):
        t = time.perf_counter()
        fit = fit_envelope(points)
        if bootstrap:
            fit = _with_intervals(fit, bootstrap_envelope(points, bootstrap, seed))
        out.timings_s["approach1"] = time.perf_counter() - t
        out.approach1 = fit
    return out


# The exponents' search space: the paper's grid of initial values for approach 3 (0 to 2), the grid vpnls searches.
EXPONENT_RANGE = (0.02, 2.0)


def at_a_bound(fit: ParametricFit, name: str) -> list[str]:
    """Warnings for exponents at the edge of the search space: the points do not pin them (a degenerate fit,
    e.g. one (N, D) measured under two loss definitions, lands there), so nothing derived from them can be read."""
    lo, hi = EXPONENT_RANGE
    return [f"{name}: {k}={v:.4g} is at the edge of the search space [{lo}, {hi}]; the points do not determine "
            f"it (and N_opt, D_opt, tokens per parameter follow from it): check the points for duplicates or "
            f"mixed loss definitions" for k, v in (("alpha", fit.alpha), ("beta", fit.beta))
            if not lo * 1.01 < v < hi * 0.99]


def duplicate_points(points: Points) -> list[str]:
    """Warnings for an (N, D) that appears with different losses (relative spread above 1%): two runs of one
    size and length differ by noise, not by that; two loss definitions (nats and bits, with and without the
    z-loss) in one table do."""
    groups: dict[tuple[float, float], list[int]] = {}
    for i, key in enumerate(zip(points.params.round(6), points.tokens.round(6))):
        groups.setdefault(key, []).append(i)
    out = []
    for (n, d), rows in groups.items():
        losses = points.loss[rows]
        if len(rows) > 1 and (losses.max() - losses.min()) / losses.min() > 0.01:
            out.append(f"{points.source}: N={n:.4g}, D={d:.4g} appears {len(rows)} times with losses "
                       f"{losses.min():.4g} to {losses.max():.4g}: two loss definitions in one table? The fits take "
                       "the difference for noise")
    if len(out) > 3:
        out = out[:3] + [f"... and {len(out) - 3} more (N, D) with different losses"]
    return out


def _applicable(check, points: Points, name: str, skip: bool, out: FitResult) -> bool:
    try:
        check(points)
    except ScalingInputError as e:
        if not skip:
            raise
        out.warnings.append(f"approach {name} skipped: {e}")
        return False
    return True


def predict(fit: FitResult, flops: float | None = None, params: float | None = None, tokens: float | None = None,
            approach: str = "3") -> Prediction:
    """At compute ``flops``: N_opt, D_opt, tokens per parameter and the loss there; or, given ``params`` and
    ``tokens``, the predicted loss of that run. Approach 2's power laws are added where the fit has them."""
    if flops is None and (params is None or tokens is None):
        raise ScalingInputError("give --flops, or both --params and --tokens")
    pf = fit.parametric(approach)
    if flops is None:
        ci = {"loss": pf.interval(lambda f: float(f.loss(params, tokens)))}
        return Prediction(params=params, tokens=tokens, flops=6.0 * params * tokens,
                          loss=float(pf.loss(params, tokens)), tokens_per_param=tokens / params, approach=approach,
                          ci=ci if ci["loss"] else None)
    if not (flops > 0 and math.isfinite(flops)):
        raise ScalingInputError(f"--flops must be a positive number, got {flops}")
    opt = {k: float(v) for k, v in pf.optimal(flops).items()}
    a2 = None
    if fit.approach2 is not None:
        a2 = {k: float(v) for k, v in fit.approach2.optimal(flops).items()}
    ci = {k: pf.interval(lambda f, k=k: float(f.optimal(flops)[k])) for k in ("params", "tokens", "loss")}
    return Prediction(params=opt["params"], tokens=opt["tokens"], flops=opt["flops"], loss=opt["loss"],
                      tokens_per_param=opt["tokens_per_param"], approach=approach, approach2=a2,
                      ci=ci if all(ci.values()) else None)
