"""A small batched L-BFGS for the scaling fits, made to run under ``jax.vmap`` over thousands of starting points
in one compiled program on a CPU.

Each iteration costs exactly one value-and-gradient evaluation per start: a start whose trial step satisfies the
Armijo condition accepts it (and takes a new L-BFGS direction with a unit step); one that does not halves its
step and tries again on the next iteration. A conventional line search nested in a ``while_loop`` would, under
``vmap``, run every start for as many trials as the slowest one needs (``optax.lbfgs`` with its zoom search took
minutes for the 4,500-start Chinchilla fit here; this takes seconds, ``bench/scaling_fit_bench.py``).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

ARMIJO_C1 = 1e-4
MIN_STEP = 1e-12


def _two_loop(g, S, Y, rho):
    """-H_k g by the two-loop recursion; rows of S, Y are the stored pairs, newest last (zero rows are inert)."""
    m = S.shape[0]

    def back(q, i):
        a = rho[i] * jnp.dot(S[i], q)
        return q - a * Y[i], a

    q, alphas = jax.lax.scan(back, g, jnp.arange(m - 1, -1, -1))
    sy, yy = jnp.dot(S[-1], Y[-1]), jnp.dot(Y[-1], Y[-1])
    r = q * jnp.where(yy > 0, sy / jnp.where(yy > 0, yy, 1.0), 1.0)

    def forward(r, i):
        b = rho[i] * jnp.dot(Y[i], r)
        return r + S[i] * (alphas[m - 1 - i] - b), None

    r, _ = jax.lax.scan(forward, r, jnp.arange(m))
    return -r


def _direction(g, S, Y, rho):
    """The L-BFGS direction, or steepest descent where it is not a descent direction; and its slope g.d."""
    d = _two_loop(g, S, Y, rho)
    slope = jnp.dot(g, d)
    bad = ~(slope < 0) | ~jnp.all(jnp.isfinite(d))
    d = jnp.where(bad, -g, d)
    return d, jnp.where(bad, -jnp.dot(g, g), slope)


def minimize(f: Callable, x0: jax.Array, iters: int = 300, memory: int = 10):
    """Minimise ``f`` from ``x0`` with ``iters`` function-and-gradient evaluations; returns ``(x, f(x))``."""
    vg = jax.value_and_grad(f)
    fx0, g0 = vg(x0)
    zeros = jnp.zeros((memory, x0.shape[0]), x0.dtype)
    rho0 = jnp.zeros((memory,), x0.dtype)
    d0 = -g0
    # no curvature yet: a first trial step of unit length along -g
    t0 = 1.0 / jnp.maximum(jnp.linalg.norm(g0), 1e-30)

    def step(carry, _):
        x, fx, g, d, slope, t, S, Y, rho = carry
        x_try = x + t * d
        f_try, g_try = vg(x_try)
        ok = jnp.isfinite(f_try) & (f_try <= fx + ARMIJO_C1 * t * slope) & (t > MIN_STEP)
        s, y = t * d, g_try - g
        sy = jnp.dot(s, y)
        push = ok & (sy > 1e-12 * jnp.dot(y, y))
        S = jnp.where(push, jnp.concatenate([S[1:], s[None]]), S)
        Y = jnp.where(push, jnp.concatenate([Y[1:], y[None]]), Y)
        rho = jnp.where(push, jnp.concatenate([rho[1:], (1.0 / jnp.where(push, sy, 1.0))[None]]), rho)
        x, fx, g = jnp.where(ok, x_try, x), jnp.where(ok, f_try, fx), jnp.where(ok, g_try, g)
        d_new, slope_new = _direction(g, S, Y, rho)
        d, slope = jnp.where(ok, d_new, d), jnp.where(ok, slope_new, slope)
        t = jnp.where(ok, jnp.where(jnp.any(rho != 0), 1.0, t), t / 2)
        return (x, fx, g, d, slope, t, S, Y, rho), None

    carry = (x0, fx0, g0, d0, -jnp.dot(g0, g0), t0, zeros, zeros, rho0)
    (x, fx, *_), _ = jax.lax.scan(step, carry, None, length=iters)
    return x, fx
