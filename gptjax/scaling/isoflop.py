"""Approach 2 of Hoffmann et al. (2022), IsoFLOP profiles, and approach 1, the minimum-loss envelope of whole
training curves. Both end in the power laws N_opt = k_N C^a and D_opt = k_D C^b, fitted by least squares in
log-log space.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from gptjax.scaling.points import Points, ScalingInputError


@dataclasses.dataclass
class PowerLaw:
    """y = k x^exponent."""
    exponent: float
    k: float

    def __call__(self, x):
        return self.k * np.asarray(x, float) ** self.exponent

    @classmethod
    def fit(cls, x, y) -> "PowerLaw":
        slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
        return cls(float(slope), float(math.exp(intercept)))


ENVELOPE_POINTS = 250  # log-spaced compute values approach 1's envelope is read at


def _without_none(d: dict) -> dict:
    """A result as JSON-ready data: optional entries that were not computed (None) are left out."""
    return {k: v for k, v in d.items() if v is not None}


@dataclasses.dataclass
class Profile:
    """One budget's IsoFLOP profile: loss = p0 + p1 u + p2 u^2 with u = log(x), x = N (or D)."""
    budget: float
    coef: tuple[float, float, float]  # (p2, p1, p0)
    x_opt: float
    log_x_opt_sd: float  # standard error of log(x_opt) by the delta method (NaN with no residual dof)
    loss_opt: float
    x_min: float
    x_max: float
    n_points: int
    x_opt_ci: list[float] | None = None  # 95% bootstrap interval of x_opt (approach 2 with a bootstrap)

    @property
    def bracketed(self) -> bool:
        """The parabola is convex and its minimum lies inside the sampled range."""
        return self.coef[0] > 0 and self.x_min <= self.x_opt <= self.x_max

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["coef"] = list(self.coef)
        ci = d.pop("x_opt_ci")
        return _without_none({**d, "bracketed": self.bracketed, "x_opt_ci": ci})

    @classmethod
    def from_dict(cls, d: dict) -> "Profile":
        return cls(**{**{f.name: d.get(f.name) for f in dataclasses.fields(cls)}, "coef": tuple(d["coef"])})


@dataclasses.dataclass
class PowerLawFit:
    """Approach 1 or 2's result: N_opt = k_params C^a and D_opt = k_tokens C^b, with 95% bootstrap intervals of
    the exponents (``ci``: {"a": [lo, hi], "b": ...}) and the count of resamples that could not be fitted."""
    a: float
    b: float
    k_params: float
    k_tokens: float
    ci: dict[str, list[float] | None] | None = None
    bootstrap_failed: int | None = None

    def optimal(self, flops) -> dict:
        """N_opt and D_opt at compute ``flops`` by the power laws."""
        c = np.asarray(flops, float)
        return {"params": self.k_params * c ** self.a, "tokens": self.k_tokens * c ** self.b}


@dataclasses.dataclass
class IsoFLOPFit(PowerLawFit):
    """Approach 2: each budget's profile in N (``profiles``) and in D (``token_profiles``) and the power laws
    through the minima of those that bracket theirs (the others are named in ``warnings``)."""
    profiles: list[Profile] = dataclasses.field(default_factory=list)
    token_profiles: list[Profile] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return _without_none({"a": self.a, "b": self.b, "k_params": self.k_params, "k_tokens": self.k_tokens,
                              "profiles": [p.to_dict() for p in self.profiles],
                              "token_profiles": [p.to_dict() for p in self.token_profiles],
                              "warnings": list(self.warnings), "ci": self.ci,
                              "bootstrap_failed": self.bootstrap_failed})

    @classmethod
    def from_dict(cls, d: dict) -> "IsoFLOPFit":
        return cls(a=d["a"], b=d["b"], k_params=d["k_params"], k_tokens=d["k_tokens"], ci=d.get("ci"),
                   bootstrap_failed=d.get("bootstrap_failed"),
                   profiles=[Profile.from_dict(p) for p in d["profiles"]],
                   token_profiles=[Profile.from_dict(p) for p in d["token_profiles"]],
                   warnings=list(d.get("warnings", [])))


@dataclasses.dataclass
class EnvelopeFit(PowerLawFit):
    """Approach 1: the minimum-loss envelope of the runs' curves (``envelope``: flops, params, tokens, loss at
    each compute value where two curves meet) and the power laws through it."""
    envelope: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    n_runs: int = 0

    def to_dict(self) -> dict:
        return _without_none({"a": self.a, "b": self.b, "k_params": self.k_params, "k_tokens": self.k_tokens,
                              "envelope": self.envelope, "n_runs": self.n_runs, "ci": self.ci,
                              "bootstrap_failed": self.bootstrap_failed})

    @classmethod
    def from_dict(cls, d: dict) -> "EnvelopeFit":
        return cls(**{f.name: d.get(f.name) for f in dataclasses.fields(cls)})


@dataclasses.dataclass
class Bootstrap:
    """Resampled exponents of approach 1 or 2 (and approach 2's per-budget N_opt); ``failed`` resamples gave no
    fit."""
    a: list[float]
    b: list[float]
    failed: int
    n_opt: dict[float, list[float]] = dataclasses.field(default_factory=dict)


def fit_profile(budget: float, x, loss) -> Profile:
    u, y = np.log(np.asarray(x, float)), np.asarray(loss, float)
    X = np.stack([u * u, u, np.ones_like(u)], 1)
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    p2, p1, p0 = (float(c) for c in coef)
    u_opt = -p1 / (2 * p2) if p2 != 0 else math.nan
    dof = len(u) - 3
    sd = math.nan
    if dof > 0 and p2 > 0:
        s2 = float(np.sum((X @ coef - y) ** 2)) / dof
        cov = s2 * np.linalg.inv(X.T @ X)
        J = np.array([p1 / (2 * p2 * p2), -1 / (2 * p2), 0.0])  # d u_opt / d(p2, p1, p0)
        sd = float(math.sqrt(max(J @ cov @ J, 0.0)))
    loss_opt = p0 + p1 * u_opt + p2 * u_opt * u_opt if p2 > 0 else float(np.min(y))
    return Profile(budget=float(budget), coef=(p2, p1, p0), x_opt=float(math.exp(u_opt)) if p2 > 0 else math.nan,
                   log_x_opt_sd=sd, loss_opt=float(loss_opt), x_min=float(np.min(x)), x_max=float(np.max(x)),
                   n_points=len(u))


def _groups(points: Points) -> list[tuple[float, np.ndarray]]:
    g = points.budgets()
    return [(float(b), np.flatnonzero(g == b)) for b in np.unique(g)]


def check_isoflop(points: Points) -> None:
    usable = [b for b, idx in _groups(points) if len(np.unique(points.params[idx])) >= 3]
    if len(usable) < 2:
        raise ScalingInputError(f"{points.source}: approach 2 needs at least 2 compute budgets with 3 or more "
                                f"model sizes each; found {len(usable)} (group points with a 'budget' column, or "
                                "give points of equal compute)")


def fit_isoflop(points: Points) -> IsoFLOPFit:
    """Approach 2 on final points: a parabola per budget in log N (and in log D), its minimum, then power laws
    of the minima against compute. Warns for each profile whose minimum is outside its sampled range."""
    check_isoflop(points)
    out, warnings = {}, []
    for var, xs in (("params", points.params), ("tokens", points.tokens)):
        profiles = [fit_profile(b, xs[idx], points.loss[idx]) for b, idx in _groups(points)
                    if len(np.unique(xs[idx])) >= 3]
        good = [p for p in profiles if p.bracketed]
        for p in profiles:
            if not p.bracketed and var == "params":
                where = ("not convex" if p.coef[0] <= 0 else
                         f"at N={p.x_opt:.3g}, outside the sampled {p.x_min:.3g}..{p.x_max:.3g}")
                warnings.append(f"budget {p.budget:.3g}: the IsoFLOP minimum is {where}; the profile does not "
                                "bracket its optimum (add sizes on that side); left out of the power law")
        if len(good) < 2:
            raise ScalingInputError(f"{points.source}: approach 2 needs at least 2 budgets whose profile brackets "
                                    f"its minimum; {len(good)} of {len(profiles)} do")
        out[var] = (profiles, PowerLaw.fit([p.budget for p in good], [p.x_opt for p in good]))
    (profiles, law_n), (token_profiles, law_d) = out["params"], out["tokens"]
    return IsoFLOPFit(a=law_n.exponent, b=law_d.exponent, k_params=law_n.k, k_tokens=law_d.k, profiles=profiles,
                      token_profiles=token_profiles, warnings=warnings)


def bootstrap_isoflop(points: Points, n: int, seed: int = 0) -> Bootstrap:
    """Resample the points within each budget (with replacement) and refit: samples of a, b, and each budget's
    N_opt. Resamples whose profiles do not give two bracketed minima are dropped (their count is reported)."""
    rng = np.random.default_rng(seed)
    groups = _groups(points)
    resolved = dataclasses.replace(points, budget=points.budgets())  # the groups, fixed before resampling
    a, b, failed = [], [], 0
    nopt = {bud: [] for bud, _ in groups}
    for _ in range(n):
        sel = np.concatenate([rng.choice(idx, len(idx)) for _, idx in groups])
        try:
            r = fit_isoflop(resolved.take(sel))
        except ScalingInputError:
            failed += 1
            continue
        a.append(r.a)
        b.append(r.b)
        for p in r.profiles:
            nopt[p.budget].append(p.x_opt)
    return Bootstrap(a, b, failed, nopt)


# ---- approach 1 -----------------------------------------------------------------------------------------------------
def check_envelope(points: Points) -> None:
    curves = _curves(points)
    if len(curves) < 2 or len({c["params"] for c in curves}) < 2:
        raise ScalingInputError(f"{points.source}: approach 1 needs loss curves (2 or more rows per 'run') of at "
                                f"least 2 model sizes; found {len(curves)} such run(s)")


def fit_envelope(points: Points, n_flops: int = ENVELOPE_POINTS) -> EnvelopeFit:
    """Approach 1: at log-spaced compute values, the run whose (interpolated) curve has the lowest loss there
    gives (N_opt, D_opt); power laws are fitted to those. Curves are interpolated linearly in log compute and
    only inside their range; a compute value counts if at least two curves cover it."""
    check_envelope(points)
    curves = _curves(points)
    env = _envelope(curves, n_flops)
    if len(env["flops"]) < 2 or len(np.unique(env["params"])) < 2:
        raise ScalingInputError(f"{points.source}: approach 1: the curves' compute ranges overlap too little "
                                "(fewer than 2 compute values where two curves meet, or one size wins everywhere)")
    law_n, law_d = PowerLaw.fit(env["flops"], env["params"]), PowerLaw.fit(env["flops"], env["tokens"])
    return EnvelopeFit(a=law_n.exponent, b=law_d.exponent, k_params=law_n.k, k_tokens=law_d.k,
                       envelope={k: v.tolist() for k, v in env.items()}, n_runs=len(curves))


def bootstrap_envelope(points: Points, n: int, seed: int = 0, n_flops: int = ENVELOPE_POINTS) -> Bootstrap:
    """Resample whole runs (with replacement) and refit the envelope's exponents."""
    curves = _curves(points)
    rng = np.random.default_rng(seed)
    a, b, failed = [], [], 0
    for _ in range(n):
        pick = [curves[i] for i in rng.choice(len(curves), len(curves))]
        e = _envelope(pick, n_flops)
        if len(e["flops"]) < 2 or len(np.unique(e["params"])) < 2:
            failed += 1
            continue
        a.append(PowerLaw.fit(e["flops"], e["params"]).exponent)
        b.append(PowerLaw.fit(e["flops"], e["tokens"]).exponent)
    return Bootstrap(a, b, failed)


def _curves(points: Points) -> list[dict]:
    curves = []
    for run in dict.fromkeys(points.run):
        idx = np.asarray([i for i, r in enumerate(points.run) if r == run])
        idx = idx[np.argsort(points.flops[idx])]
        if len(idx) >= 2:
            curves.append({"params": float(points.params[idx[0]]), "flops": points.flops[idx],
                           "tokens": points.tokens[idx], "loss": points.loss[idx]})
    return curves


def _envelope(curves: list[dict], n_flops: int) -> dict[str, np.ndarray]:
    lo = min(c["flops"][0] for c in curves)
    hi = max(c["flops"][-1] for c in curves)
    grid = np.exp(np.linspace(math.log(lo), math.log(hi), n_flops))
    rows = {"flops": [], "params": [], "tokens": [], "loss": []}
    for c in grid:
        best, count = None, 0
        for cur in curves:
            if not cur["flops"][0] <= c <= cur["flops"][-1]:
                continue
            count += 1
            lc = np.log(cur["flops"])
            loss = float(np.interp(math.log(c), lc, cur["loss"]))
            if best is None or loss < best[0]:
                best = (loss, cur["params"], float(np.exp(np.interp(math.log(c), lc, np.log(cur["tokens"])))))
        if count >= 2:
            rows["flops"].append(c)
            rows["loss"].append(best[0])
            rows["params"].append(best[1])
            rows["tokens"].append(best[2])
    return {k: np.asarray(v) for k, v in rows.items()}
