"""The one next-token loss, used by training, evaluation and fine-tuning alike."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


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


def fused_next_token_loss(hidden_BxLxD: jax.Array, head: jax.Array, targets_BxL: jax.Array,
                          loss_mask_BxL: jax.Array | None, *, vocab_major: bool, chunk: int, dtype,
                          z_coef: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``next_token_loss`` of ``hidden @ head`` without ever holding the ``[B, L, V]`` float32 logits.

    The unembedding and the cross-entropy run ``chunk`` positions at a time (``lax.scan``), and the gradient is
    formed in the same pass: a loss is the last op of a step, so ``dlogits = mask * ((1 + 2 z lse) p - onehot)``
    is known in the forward pass up to the scalar cotangent, and only ``d hidden`` and ``d head`` are kept for the
    backward (Liger kernel / Apple's cut cross-entropy do the same). The matmul FLOPs are those of the plain path
    (one forward, two backward products); what goes is every pass over the float32 logits, which on an H200 was
    40.7% of a GPT-2-small step (50,304-wide vocabulary; bench/results/gpu-2026-11-26.jsonl).

    ``head`` is ``[V, D]`` (tied embedding, ``vocab_major``) or ``[D, V]``. Returns ``(loss, aux)`` with
    ``loss = nll + z_coef * z_loss`` and ``aux`` as ``next_token_loss``'s plus ``loss`` (the nll); only ``loss``
    is differentiable (aux is logged, never differentiated).
    """
    B, L, _ = hidden_BxLxD.shape
    w_BxL = (jnp.ones((B, L), jnp.float32) if loss_mask_BxL is None else loss_mask_BxL.astype(jnp.float32))
    pad = -L % chunk
    if pad:  # padded positions carry weight 0: they add nothing to the loss or the gradients
        hidden_BxLxD = jnp.pad(hidden_BxLxD, ((0, 0), (0, pad), (0, 0)))
        targets_BxL, w_BxL = jnp.pad(targets_BxL, ((0, 0), (0, pad))), jnp.pad(w_BxL, ((0, 0), (0, pad)))
    total, nll_sum, z_sum = _fused_sums(hidden_BxLxD, head, targets_BxL.astype(jnp.int32), w_BxL,
                                        (vocab_major, chunk, jnp.dtype(dtype), float(z_coef)))
    tokens = jnp.sum(w_BxL)
    denom = jnp.maximum(tokens, 1.0)
    nll_sum, z_sum = jax.lax.stop_gradient(nll_sum), jax.lax.stop_gradient(z_sum)
    return total / denom, {"z_loss": z_sum / denom, "nll_sum": nll_sum, "tokens": tokens, "loss": nll_sum / denom}


def _chunks(x_BxLx_: jax.Array, chunk: int) -> jax.Array:
    """``[B, L, ...] -> [L / chunk, B, chunk, ...]``, the scan's leading axis."""
    B, L = x_BxLx_.shape[:2]
    return jnp.swapaxes(x_BxLx_.reshape(B, L // chunk, chunk, *x_BxLx_.shape[2:]), 0, 1)


def _unchunk(x_NxBxCx_: jax.Array) -> jax.Array:
    n, B, C = x_NxBxCx_.shape[:3]
    return jnp.swapaxes(x_NxBxCx_, 0, 1).reshape(B, n * C, *x_NxBxCx_.shape[3:])


def _chunk_logits(h_BxCxD, head, vocab_major, dtype):
    spec = "bcd,vd->bcv" if vocab_major else "bcd,dv->bcv"
    return jnp.einsum(spec, h_BxCxD.astype(dtype), head.astype(dtype), preferred_element_type=jnp.float32)


def _chunk_stats(logits_BxCxV, t_BxC):
    lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
    tgt_BxC = jnp.take_along_axis(logits_BxCxV, t_BxC[..., None], axis=-1)[..., 0]
    return lse_BxC, tgt_BxC


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused_sums(h_BxLxD, head, t_BxL, w_BxL, static):
    """``(sum w (lse - tgt + z lse^2), sum w (lse - tgt), sum w lse^2)``; only the first has a gradient."""
    vocab_major, chunk, dtype, z = static

    def body(_, xs):
        h, t, w = xs
        lse, tgt = _chunk_stats(_chunk_logits(h, head, vocab_major, dtype), t)
        return None, (jnp.sum(w * (lse - tgt)), jnp.sum(w * lse * lse))

    _, (nll, zz) = jax.lax.scan(body, None, (_chunks(h_BxLxD, chunk), _chunks(t_BxL, chunk), _chunks(w_BxL, chunk)))
    return jnp.sum(nll) + z * jnp.sum(zz), jnp.sum(nll), jnp.sum(zz)


def _fused_fwd(h_BxLxD, head, t_BxL, w_BxL, static):
    vocab_major, chunk, dtype, z = static
    V = head.shape[0] if vocab_major else head.shape[1]

    def body(dhead, xs):
        h, t, w = xs
        logits_BxCxV = _chunk_logits(h, head, vocab_major, dtype)
        lse, tgt = _chunk_stats(logits_BxCxV, t)
        p_BxCxV = jnp.exp(logits_BxCxV - lse[..., None])
        onehot_BxCxV = jax.nn.one_hot(t, V, dtype=jnp.float32)
        g_BxCxV = (w[..., None] * ((1.0 + 2.0 * z * lse)[..., None] * p_BxCxV - onehot_BxCxV)).astype(dtype)
        hd = h.astype(dtype)
        if vocab_major:
            dh = jnp.einsum("bcv,vd->bcd", g_BxCxV, head.astype(dtype), preferred_element_type=jnp.float32)
            dhead = dhead + jnp.einsum("bcv,bcd->vd", g_BxCxV, hd, preferred_element_type=jnp.float32)
        else:
            dh = jnp.einsum("bcv,dv->bcd", g_BxCxV, head.astype(dtype), preferred_element_type=jnp.float32)
            dhead = dhead + jnp.einsum("bcd,bcv->dv", hd, g_BxCxV, preferred_element_type=jnp.float32)
        return dhead, (jnp.sum(w * (lse - tgt)), jnp.sum(w * lse * lse), dh.astype(h_BxLxD.dtype))

    dhead, (nll, zz, dh_NxBxCxD) = jax.lax.scan(
        body, jnp.zeros(head.shape, jnp.float32),
        (_chunks(h_BxLxD, chunk), _chunks(t_BxL, chunk), _chunks(w_BxL, chunk)))
    out = (jnp.sum(nll) + z * jnp.sum(zz), jnp.sum(nll), jnp.sum(zz))
    return out, (_unchunk(dh_NxBxCxD), dhead.astype(head.dtype), t_BxL, w_BxL)


def _fused_bwd(static, res, g):
    dh_BxLxD, dhead, t_BxL, w_BxL = res
    g_total = g[0]  # the other two outputs are stop_gradient'ed by the only caller
    zeros_t = np.zeros(t_BxL.shape, jax.dtypes.float0)
    return ((g_total * dh_BxLxD).astype(dh_BxLxD.dtype), (g_total * dhead).astype(dhead.dtype), zeros_t,
            jnp.zeros_like(w_BxL))


_fused_sums.defvjp(_fused_fwd, _fused_bwd)
