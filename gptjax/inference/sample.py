"""Sampling from a trained model: greedy, temperature, top-k and top-p (nucleus).

The whole generation runs as one jitted ``lax.fori_loop`` over a fixed-size token buffer (no KV cache: each
step recomputes the forward pass over the buffer, which is simple and fine for short samples).
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def filter_logits(logits_V: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """Logits with everything outside top-k / the top-p nucleus set to -inf, scaled by 1/temperature."""
    logits_V = logits_V.astype(jnp.float32) / max(temperature, 1e-6)
    neg = jnp.finfo(jnp.float32).min
    if top_k > 0:
        kth = jax.lax.top_k(logits_V, min(top_k, logits_V.shape[-1]))[0][..., -1:]
        logits_V = jnp.where(logits_V < kth, neg, logits_V)
    if 0.0 < top_p < 1.0:
        sorted_V = jnp.sort(logits_V, axis=-1)[..., ::-1]
        cum_V = jnp.cumsum(jax.nn.softmax(sorted_V, axis=-1), axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least the best token)
        n_keep = jnp.sum(cum_V - jax.nn.softmax(sorted_V, axis=-1) < top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_V, n_keep - 1, axis=-1)
        logits_V = jnp.where(logits_V < cutoff, neg, logits_V)
    return logits_V


def sample_token(logits_V: jax.Array, key: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    if temperature <= 0:
        return jnp.argmax(logits_V, axis=-1)
    return jax.random.categorical(key, filter_logits(logits_V, temperature, top_k, top_p), axis=-1)


@partial(jax.jit, static_argnums=(0, 3, 4, 5, 6, 7))
def _generate(forward: Callable, params, buffer_L: jax.Array, prompt_len: int, n_new: int,
              temperature: float, top_k: int, top_p: float, key: jax.Array) -> jax.Array:
    def step(i, carry):
        buf, key = carry
        pos = prompt_len + i
        logits = forward(params, buf[None])[0, pos - 1]
        key, sub = jax.random.split(key)
        tok = sample_token(logits, sub, temperature, top_k, top_p).astype(buf.dtype)
        return buf.at[pos].set(tok), key

    buf, _ = jax.lax.fori_loop(0, n_new, step, (buffer_L, key))
    return buf


def check_sampling(temperature: float, top_k: int, top_p: float, n_new: int = 1) -> None:
    """A ``ValueError`` naming the argument when a sampling setting would silently mean something else."""
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if not (isinstance(top_k, int) and top_k >= 0):
        raise ValueError(f"top_k must be an integer >= 0 (0 keeps every token), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 keeps every token), got {top_p}")
    if not (isinstance(n_new, int) and n_new >= 0):
        raise ValueError(f"the number of tokens to generate must be >= 0, got {n_new}")


def generate(forward: Callable, params, prompt_ids: list[int], n_new: int, max_seq_len: int,
             temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> list[int]:
    """Continue ``prompt_ids`` by ``n_new`` tokens. ``forward(params, tokens_BxL) -> logits_BxLxV``.
    The prompt is cut from the left so that prompt + continuation fits ``max_seq_len``."""
    check_sampling(temperature, top_k, top_p, n_new)
    if not prompt_ids:
        raise ValueError("the prompt is empty; give at least one token")
    n_new = max(0, min(n_new, max_seq_len - 1))
    prompt_ids = list(prompt_ids)[-(max_seq_len - n_new):]
    buf = np.zeros(len(prompt_ids) + n_new, np.int32)
    buf[: len(prompt_ids)] = prompt_ids
    out = _generate(forward, params, jnp.asarray(buf), len(prompt_ids), n_new, float(temperature), int(top_k),
                    float(top_p), jax.random.key(seed))
    return [int(t) for t in np.asarray(out)[len(prompt_ids):]]

