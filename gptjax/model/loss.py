"""The one next-token loss, used by training, evaluation and fine-tuning alike."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def next_token_loss(logits_BxLxV: jax.Array, targets_BxL: jax.Array,
                    loss_mask_BxL: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean next-token cross-entropy over the tokens where ``loss_mask_BxL`` is set (all when ``None``).

    Returns ``(nll, aux)`` in float32: ``aux`` has ``z_loss`` (the masked mean of log(Z)^2, PaLM's auxiliary
    term: the caller weights it), ``nll_sum`` and ``tokens`` (the masked sum and count, so losses over
    several batches can be combined exactly, weighted by tokens). A mask with no tokens gives 0, not NaN.
    """
    logits_BxLxV = logits_BxLxV.astype(jnp.float32)
    lse_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
    target_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None].astype(jnp.int32), axis=-1)[..., 0]
    w_BxL = jnp.ones_like(lse_BxL) if loss_mask_BxL is None else loss_mask_BxL.astype(jnp.float32)
    tokens = jnp.sum(w_BxL)
    denom = jnp.maximum(tokens, 1.0)
    nll_sum = jnp.sum((lse_BxL - target_BxL) * w_BxL)
    z = jnp.sum(jnp.square(lse_BxL) * w_BxL) / denom
    return nll_sum / denom, {"z_loss": z, "nll_sum": nll_sum, "tokens": tokens}
