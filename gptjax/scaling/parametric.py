"""Approach 3 of Hoffmann et al. (2022): the parametric loss L(N, D) = E + A / N^alpha + B / D^beta.

Fitted as the paper (appendix D.2) describes: minimise over theta = (a, b, e, alpha, beta)

    sum_i Huber_delta( LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i ),   delta = 1e-3,

with A = e^a, B = e^b, E = e^e, by L-BFGS from every point of the paper's grid of initialisations
(alpha, beta in {0, 0.5, ..., 2}; e in {-1, -0.5, ..., 1}; a, b in {0, 5, ..., 25}: 4,500 starts), keeping the
best. All starts run at once (``jax.vmap`` of ``lbfgs.minimize`` under ``jit``) in float64.

Also here: the variable-projection fit (for fixed alpha, beta the model is linear in (E, A, B) >= 0: an exact
non-negative least-squares solve on L, searched over a refined grid of exponents), and the compute-optimal
frontier a fit implies (for C = 6 N D).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.scaling import lbfgs

HUBER_DELTA = 1e-3
LBFGS_ITERS = 200  # value-and-gradient evaluations per start (enough for >1,000 of 4,500 starts to reach the best)
# The paper's grid of initialisations, in the order of theta = (a, b, e, alpha, beta)
GRID = {"a": np.arange(0, 26, 5.0), "b": np.arange(0, 26, 5.0), "e": np.arange(-1, 1.01, 0.5),
        "alpha": np.arange(0, 2.01, 0.5), "beta": np.arange(0, 2.01, 0.5)}
FIELDS = ("E", "A", "B", "alpha", "beta")


@dataclasses.dataclass(frozen=True)
class ParametricFit:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float
    n_points: int
    method: str = "huber-lbfgs"

    def law(self) -> dict[str, float]:
        """The fitted law and its exponents of compute: ``E, A, B, alpha, beta, a, b``."""
        return {k: float(getattr(self, k)) for k in ("E", "A", "B", "alpha", "beta", "a", "b")}

    def loss(self, n, d):
        """Predicted loss at parameters ``n`` and tokens ``d`` (scalars or arrays)."""
        n, d = np.asarray(n, float), np.asarray(d, float)
        return self.E + self.A / n ** self.alpha + self.B / d ** self.beta

    @property
    def a(self) -> float:
        """N_opt grows as C^a."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """D_opt grows as C^b."""
        return self.alpha / (self.alpha + self.beta)

    @property
    def G(self) -> float:
        return (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))

    def optimal(self, flops) -> dict:
        """N_opt = G (C/6)^a, D_opt = (C/6)^b / G, tokens per parameter and predicted loss at compute ``flops``."""
        c = np.asarray(flops, float) / 6.0
        n, d = self.G * c ** self.a, c ** self.b / self.G
        return {"flops": flops, "params": n, "tokens": d, "tokens_per_param": d / n, "loss": self.loss(n, d)}

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(a=self.a, b=self.b, G=self.G)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "ParametricFit":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})

    @classmethod
    def from_theta(cls, theta, objective: float, n_points: int, method: str = "huber-lbfgs") -> "ParametricFit":
        a, b, e, alpha, beta = (float(x) for x in theta)
        return cls(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta,
                   objective=float(objective), n_points=n_points, method=method)


@dataclasses.dataclass(frozen=True)
class ParametricResult(ParametricFit):
    """A parametric fit as ``gptjax-scaling fit`` reports it: the fit, read at ``reference_flops`` (the largest
    fitted budget: tokens per parameter there), with 95% bootstrap intervals of every quantity (``ci``: name ->
    [lo, hi] or None) from ``bootstrap_n`` resamples."""

    reference_flops: float = math.nan
    tokens_per_param_at_ref: float = math.nan
    ci: dict[str, list[float] | None] | None = None
    bootstrap_n: int | None = None
    # the bootstrap's refits, rows of (E, A, B, alpha, beta) to 6 significant digits: what intervals of anything
    # derived from the law (N_opt, D_opt or the loss at a given compute, gptjax-plan) are read from
    samples: list[list[float]] | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in super().to_dict().items() if v is not None}

    def interval(self, fn, pct: tuple[float, float] = (2.5, 97.5)) -> list[float] | None:
        """The 95% bootstrap interval of ``fn(fit)`` over the stored refits (``fn`` takes a ``ParametricFit``),
        or None for a fit without them (fitted with no bootstrap, or by a version before they were stored)."""
        if not self.samples:
            return None
        with np.errstate(all="ignore"):
            values = np.asarray([fn(ParametricFit(*row, objective=math.nan, n_points=self.n_points))
                                 for row in self.samples], float)
        values = values[np.isfinite(values)]
        return [float(np.percentile(values, pct[0])), float(np.percentile(values, pct[1]))] \
            if len(values) >= 10 else None


def huber(r, delta=HUBER_DELTA):
    abs_r = jnp.abs(r)
    return jnp.where(abs_r <= delta, 0.5 * r * r, delta * (abs_r - 0.5 * delta))


def log_loss_pred(theta, log_n, log_d):
    """log L(N, D) at ``theta = (a, b, e, alpha, beta)``: LSE(a - alpha log N, b - beta log D, e)."""
    a, b, e, alpha, beta = theta[0], theta[1], theta[2], theta[3], theta[4]
    terms = jnp.stack([a - alpha * log_n, b - beta * log_d, jnp.broadcast_to(e, log_n.shape)])
    return jax.nn.logsumexp(terms, axis=0)


def objective(theta, log_n, log_d, log_l, weights=None, delta=HUBER_DELTA):
    """The paper's objective; ``weights`` (point multiplicities, e.g. bootstrap counts) default to ones."""
    h = huber(log_loss_pred(theta, log_n, log_d) - log_l, delta)
    return jnp.sum(h if weights is None else weights * h)


def grid_starts() -> np.ndarray:
    """The 4,500 initialisations, rows of (a, b, e, alpha, beta)."""
    return np.asarray(list(itertools.product(GRID["a"], GRID["b"], GRID["e"], GRID["alpha"], GRID["beta"])))


def _logs(n, d, loss):
    return tuple(jnp.asarray(np.log(np.asarray(x, np.float64))) for x in (n, d, loss))


@functools.partial(jax.jit, static_argnames=("iters", "delta"))
def _solve_jit(starts_SxT, weights_SxP, log_n, log_d, log_l, iters, delta):
    def one(theta0, w):
        th, v = lbfgs.minimize(lambda t: objective(t, log_n, log_d, log_l, w, delta), theta0, iters=iters)
        return th, jnp.where(jnp.isfinite(v), v, jnp.inf)

    return jax.vmap(one)(starts_SxT, weights_SxP)


def _solve(starts_SxT, weights_SxP, logs, iters, delta):
    """Minimise from each start (row) with its own point weights; returns (thetas, values), both on host."""
    out = _solve_jit(jnp.asarray(starts_SxT), jnp.asarray(weights_SxP), *logs, iters=iters, delta=float(delta))
    return jax.device_get(out)


def fit_parametric(n, d, loss, *, starts: np.ndarray | None = None, iters: int = LBFGS_ITERS,
                   delta: float = HUBER_DELTA, return_all: bool = False):
    """Approach 3 on points (parameters ``n``, tokens ``d``, final loss ``loss``): the best of all grid starts.
    With ``return_all``, also every start's (theta, objective) so callers can reuse the best starts."""
    starts = grid_starts() if starts is None else np.asarray(starts, np.float64)
    with jax.enable_x64(True):
        logs = _logs(n, d, loss)
        weights = np.ones((len(starts), len(logs[0])))
        thetas, values = _solve(starts, weights, logs, iters, delta)
    best = int(np.argmin(values))
    fit = ParametricFit.from_theta(thetas[best], values[best], len(logs[0]))
    return (fit, thetas, values) if return_all else fit


def refit_weighted(starts_KxT: np.ndarray, n, d, loss, weights_RxP: np.ndarray, iters: int = LBFGS_ITERS,
                   delta: float = HUBER_DELTA) -> np.ndarray:
    """Refits with point weights (a row per resample, e.g. bootstrap counts), each from every one of the K
    starts, keeping each resample's best: rows of (E, A, B, alpha, beta)."""
    R, K = len(weights_RxP), len(starts_KxT)
    with jax.enable_x64(True):
        logs = _logs(n, d, loss)
        starts = np.repeat(np.asarray(starts_KxT, np.float64)[None], R, 0).reshape(R * K, -1)
        weights = np.repeat(np.asarray(weights_RxP, np.float64), K, 0)
        thetas, values = _solve(starts, weights, logs, iters, delta)
    best = np.argmin(values.reshape(R, K), axis=1)
    th = thetas.reshape(R, K, -1)[np.arange(R), best]
    a, b, e, alpha, beta = th.T
    return np.stack([np.exp(e), np.exp(a), np.exp(b), alpha, beta], axis=1)


# ---- variable projection ------------------------------------------------------------------------------------------
_ACTIVE_SETS = [m for m in itertools.product((0, 1), repeat=3) if any(m)]


def _solve3(M, v):
    """M^-1 v for a symmetric 3x3 M by Cramer's rule (no LAPACK call inside the vmapped grid search)."""
    c0, c1, c2 = M[:, 0], M[:, 1], M[:, 2]
    det = jnp.dot(c0, jnp.cross(c1, c2))
    det = jnp.where(jnp.abs(det) > 0, det, jnp.inf)
    return jnp.stack([jnp.dot(v, jnp.cross(c1, c2)), jnp.dot(c0, jnp.cross(v, c2)),
                      jnp.dot(c0, jnp.cross(c1, v))]) / det


def _nnls3(G_3x3, h_3, yy):
    """Exact NNLS in normal-equation form (min c'Gc - 2h'c + yy, c >= 0) over the 7 active sets."""
    best_res, best_coef = jnp.inf, jnp.zeros(3, G_3x3.dtype)
    for mask in _ACTIVE_SETS:
        m = jnp.asarray(mask, G_3x3.dtype)
        # solve on the active columns: the inactive ones get an identity row, and zero right-hand side
        Gm = G_3x3 * m[:, None] * m[None, :] + jnp.diag(1.0 - m)
        coef = _solve3(Gm, h_3 * m)
        res = coef @ G_3x3 @ coef - 2 * h_3 @ coef + yy
        ok = jnp.all(coef >= 0) & (res < best_res)
        best_res, best_coef = jnp.where(ok, res, best_res), jnp.where(ok, coef, best_coef)
    return best_coef, best_res


def _vp_grid(n, d, loss, weights, a_grid, b_grid):
    """NNLS coefficients (E, A, B) and weighted residual sum of squares for every (alpha, beta) on the grid.

    The normal equations' entries are sums over points; the only one that depends on both exponents,
    sum w N^-alpha D^-beta, is one matmul over the grid, so a whole grid costs about as much as a few points."""
    Na, Db = n[None, :] ** -a_grid[:, None], d[None, :] ** -b_grid[:, None]  # [Ga, P], [Gb, P]
    wl = weights * loss
    s1, hl, yy = jnp.sum(weights), jnp.sum(wl), jnp.sum(wl * loss)
    sN, sNN, hN = Na @ weights, (Na * Na) @ weights, Na @ wl
    sD, sDD, hD = Db @ weights, (Db * Db) @ weights, Db @ wl
    sND = (Na * weights) @ Db.T

    def solve(i, j):
        G = jnp.stack([jnp.stack([s1, sN[i], sD[j]]), jnp.stack([sN[i], sNN[i], sND[i, j]]),
                       jnp.stack([sD[j], sND[i, j], sDD[j]])])
        return _nnls3(G, jnp.stack([hl, hN[i], hD[j]]), yy)

    ii, jj = jnp.arange(a_grid.shape[0]), jnp.arange(b_grid.shape[0])
    return jax.vmap(jax.vmap(solve, (None, 0)), (0, None))(ii, jj)


@jax.jit
def _vp_search(n, d, loss, weights, coarse):
    """Coarse grid, then three refinements (10x finer each) around the best point; returns (E, A, B, alpha,
    beta, rss)."""
    coefs, res = _vp_grid(n, d, loss, weights, coarse, coarse)
    i, j = jnp.unravel_index(jnp.argmin(res), res.shape)
    center, step = jnp.stack([coarse[i], coarse[j]]), coarse[1] - coarse[0]
    best = (coefs[i, j], res[i, j])
    offsets = jnp.arange(-10, 11, dtype=n.dtype)
    for _ in range(3):
        step = step / 10
        a_grid = jnp.maximum(center[0] + step * offsets, 1e-6)
        b_grid = jnp.maximum(center[1] + step * offsets, 1e-6)
        coefs, res = _vp_grid(n, d, loss, weights, a_grid, b_grid)
        i, j = jnp.unravel_index(jnp.argmin(res), res.shape)
        center = jnp.stack([a_grid[i], b_grid[j]])
        best = (coefs[i, j], res[i, j])
    return jnp.concatenate([best[0], center, best[1][None]])


VP_GRID = np.arange(0.02, 2.0001, 0.02)


def fit_vpnls(n, d, loss, weights_RxP: np.ndarray | None = None):
    """Variable projection with NNLS (squared error on L). Without weights: a ``ParametricFit``; with a row of
    point weights per resample: rows of (E, A, B, alpha, beta)."""
    with jax.enable_x64(True):
        n, d, loss = (jnp.asarray(np.asarray(x, np.float64)) for x in (n, d, loss))
        coarse = jnp.asarray(VP_GRID)
        if weights_RxP is None:
            E, A, B, alpha, beta, rss = (float(x) for x in _vp_search(n, d, loss, jnp.ones_like(n), coarse))
            return ParametricFit(E=E, A=A, B=B, alpha=alpha, beta=beta, objective=rss, n_points=int(n.shape[0]),
                                 method="vpnls")
        # batches of 32 resamples bound the memory (a whole grid per resample)
        out = jax.jit(lambda w: jax.lax.map(lambda wi: _vp_search(n, d, loss, wi, coarse), w, batch_size=32))(
            jnp.asarray(weights_RxP, jnp.float64))
        return np.asarray(out)[:, :5]
