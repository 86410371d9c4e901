"""One entry point for every approach: ``fit_points(points, approaches, bootstrap)`` -> a JSON-ready dict (what
``gptjax-scaling fit`` writes to fit.json), and ``predict(fit, flops)`` from such a dict.

Bootstrap: ``bootstrap`` resamples; 95% percentile intervals for every fitted quantity. Approach 3 resamples
points and refits each resample from the 8 grid initialisations that reached the lowest objective on the full
data (refitting every resample from all 4,500 would take hours); vpnls resamples points and repeats its whole
grid search; approach 2 resamples points within each budget; approach 1 resamples whole runs.
"""

from __future__ import annotations

import math
import time

import numpy as np

from gptjax.scaling import parametric
from gptjax.scaling.isoflop import check_envelope, check_isoflop, fit_envelope, fit_isoflop
from gptjax.scaling.parametric import ParametricFit
from gptjax.scaling.points import Points, ScalingInputError

APPROACHES = ("1", "2", "3", "vpnls")
BOOTSTRAP_STARTS = 8
CI = (2.5, 97.5)


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


def _parametric_section(fit: ParametricFit, c_ref: float, samples: np.ndarray | None) -> dict:
    out = fit.to_dict()
    opt = fit.optimal(c_ref)
    out["reference_flops"] = c_ref
    out["tokens_per_param_at_ref"] = float(opt["tokens_per_param"])
    if samples is not None:
        ss = _param_samples(samples, c_ref)
        out["ci"] = {k: _ci(v) for k, v in ss.items()}
        out["bootstrap_n"] = int(len(samples))
    return out


def check_parametric(points: Points) -> None:
    if len(points) < 5:
        raise ScalingInputError(f"{points.source}: approach 3 fits 5 parameters (E, A, B, alpha, beta); it needs "
                                f"at least 5 points, got {len(points)}")
    if len(np.unique(points.params)) < 2 or len(np.unique(points.tokens)) < 2:
        raise ScalingInputError(f"{points.source}: approach 3 needs points at 2 or more distinct N and D")


def fit_points(points: Points, approaches=APPROACHES, bootstrap: int = 0, drop_highest: int = 0,
               seed: int = 0, skip_inapplicable: bool = False) -> dict:
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
    out: dict = {"n_points": len(finals), "n_rows": len(points), "source": points.source,
                 "drop_highest": drop_highest, "bootstrap": bootstrap, "timings_s": {}, "warnings": []}
    if "3" in approaches or "vpnls" in approaches:
        check_parametric(finals)
    weights = rng.multinomial(len(finals), np.full(len(finals), 1 / len(finals)), size=bootstrap).astype(float) \
        if bootstrap and len(finals) else None
    if "3" in approaches:
        t = time.perf_counter()
        fit, thetas, values = parametric.fit_parametric(finals.params, finals.tokens, finals.loss, return_all=True)
        out["timings_s"]["approach3_fit"] = time.perf_counter() - t
        samples = None
        if weights is not None:
            t = time.perf_counter()
            starts = parametric.grid_starts()[np.argsort(values, kind="stable")[:BOOTSTRAP_STARTS]]
            samples = parametric.refit_weighted(starts, finals.params, finals.tokens, finals.loss, weights)
            out["timings_s"]["approach3_bootstrap"] = time.perf_counter() - t
        out["approach3"] = _parametric_section(fit, c_ref, samples)
        out.update({k: out["approach3"][k] for k in ("E", "A", "B", "alpha", "beta", "a", "b", "G", "objective",
                                                     "n_points")})
    if "vpnls" in approaches:
        t = time.perf_counter()
        fit = parametric.fit_vpnls(finals.params, finals.tokens, finals.loss)
        samples = None if weights is None else parametric.fit_vpnls(finals.params, finals.tokens, finals.loss,
                                                                     weights)
        out["timings_s"]["vpnls"] = time.perf_counter() - t
        out["vpnls"] = _parametric_section(fit, c_ref, samples)
    if "2" in approaches and _applicable(check_isoflop, finals, "2", skip_inapplicable, out):
        t = time.perf_counter()
        r = fit_isoflop(finals, bootstrap=bootstrap, seed=seed)
        bs = _exponent_intervals(r)
        if bs:
            for p in r["profiles"]:
                p["x_opt_ci"] = _ci(bs["n_opt"].get(str(p["budget"]), []))
        out["timings_s"]["approach2"] = time.perf_counter() - t
        out["warnings"] += r["warnings"]
        out["approach2"] = r
    if "1" in approaches and _applicable(check_envelope, points, "1", skip_inapplicable, out):
        t = time.perf_counter()
        r = fit_envelope(points, bootstrap=bootstrap, seed=seed)
        _exponent_intervals(r)
        out["timings_s"]["approach1"] = time.perf_counter() - t
        out["approach1"] = r
    return out


def _exponent_intervals(result: dict) -> dict | None:
    """Replace an approach-1/2 result's raw bootstrap samples by intervals of its exponents (and the count of
    failed resamples); returns the samples for approach-specific extras."""
    bs = result.pop("bootstrap", None)
    if bs:
        result["ci"] = {"a": _ci(bs["a"]), "b": _ci(bs["b"])}
        result["bootstrap_failed"] = bs["failed"]
    return bs


def _applicable(check, points: Points, name: str, skip: bool, out: dict) -> bool:
    try:
        check(points)
    except ScalingInputError as e:
        if not skip:
            raise
        out["warnings"].append(f"approach {name} skipped: {e}")
        return False
    return True


def parametric_from(fit: dict, approach: str = "3") -> ParametricFit:
    key = "approach3" if approach == "3" else "vpnls"
    if key not in fit:
        raise ScalingInputError(f"the fit has no {key} section (fitted approaches: "
                                f"{', '.join(k for k in fit if k.startswith(('approach', 'vpnls')))})")
    return ParametricFit.from_dict(fit[key])


def predict(fit: dict, flops: float | None = None, params: float | None = None, tokens: float | None = None,
            approach: str = "3") -> dict:
    """At compute ``flops``: N_opt, D_opt, tokens per parameter and the loss there; or, given ``params`` and
    ``tokens``, the predicted loss of that run. Approach 2's power laws are added where the fit has them."""
    if flops is None and (params is None or tokens is None):
        raise ScalingInputError("give --flops, or both --params and --tokens")
    pf = parametric_from(fit, approach)
    if flops is None:
        return {"params": params, "tokens": tokens, "flops": 6.0 * params * tokens,
                "loss": float(pf.loss(params, tokens))}
    if not (flops > 0 and math.isfinite(flops)):
        raise ScalingInputError(f"--flops must be a positive number, got {flops}")
    opt = {k: float(v) for k, v in pf.optimal(flops).items()}
    out = {"approach": approach, **opt}
    if "approach2" in fit:
        a2 = fit["approach2"]
        out["approach2"] = {"params": a2["k_params"] * flops ** a2["a"], "tokens": a2["k_tokens"] * flops ** a2["b"]}
    return out
