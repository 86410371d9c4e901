"""Ring attention: context parallelism that passes key/value slices around the devices instead of gathering them
(Liu, Zaharia & Abbeel 2023, "Ring Attention with Blockwise Transformers").

Runs per device under ``shard_map`` (:func:`gptjax.model.kernels.attend` calls it when
``ModelConfig.context_strategy="ring"``). Each of the C devices on the context axes holds one slice of the
sequence: its queries, keys and values, slice ``i`` covering slots ``[i * L, (i + 1) * L)``.

* **Forward**: C steps. Device ``me`` attends its queries to the key/value slice it holds (at step ``s`` the slice
  of device ``me - s``) with the blockwise kernel's forward pass, merges that partial output into its running one
  by the row log-sum-exps, and passes the slice on to device ``me + 1`` (``ppermute``). Only the local q / k / v,
  the output and the row log-sum-exp are saved for the backward pass.
* **Backward**: the ring again. Each step adds the held slice's contribution to dQ (with the final log-sum-exp,
  as FlashAttention-2's backward pass does per tile) and to the slice's dK / dV accumulators, which travel with
  the slice; after C steps they are back on the slice's own device.

A device never holds more than the slice it computes with and the one arriving, where the gathered strategy keeps
all C slices of every layer for the backward pass (``plan`` counts both: every layer's C - 1 gathered slices,
or the ring's two in flight). The price is C sequential exchanges a layer and pass instead of one all-gather,
which GPUs / TPUs can overlap with the step's compute. Each slice pair runs the blockwise kernel (XLA tiles),
also where the local kernel would be cuDNN or splash. A device's queries see no key of a later slice
(causality): those steps visit no tile (the kernel's loop bounds are empty) but still pass the slice on. The
work is unbalanced as with the gathered strategy (the last slice's queries see all C slices); a zig-zag slice
order would balance it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gptjax.model import flash


def _rotate(xs, axes: tuple[str, ...], size: int):
    """Pass every array in ``xs`` to the next device of the ring (device i -> i + 1 mod size)."""
    perm = [(i, (i + 1) % size) for i in range(size)]
    return jax.tree.map(lambda x: jax.lax.ppermute(x, axes, perm), xs)


def _offset(axes, s, size: int, L: int):
    """Slot offset of this device's queries relative to the key slice it holds at step ``s`` (the slice of
    device ``me - s``): negative for a later slice, whose keys the queries never see."""
    me = jax.lax.axis_index(axes)
    return (me - (me - s) % size) * L


# Both passes block q and the local k / v slice once and pass the key tiles (and their gradients) around the
# ring as tiles: every step runs the kernel on them directly, and only the final dK / dV are unblocked.
def _ring_forward(q, k, v, qseg, kseg, window, axes, size, block_q, block_k):
    """Local q [B, K, G, L, H], k / v [B, K, L, H] -> (o like q, lse [B, K, G, L] f32)."""
    L, G = q.shape[3], q.shape[2]
    qt, qseg_t = flash._q_tiles(q, block_q), flash._segment_tiles(qseg, block_q)

    def step(s, carry):
        o, lse, kt, vt, kseg_t = carry
        o_s, lse_s = flash._forward(qt, kt, vt, qseg_t, kseg_t, window, _offset(axes, s, size, L), block_q,
                                    block_k, G, k_len=L, unseen_lse=flash.MASKED, out_dtype=jnp.float32)
        merged = jnp.logaddexp(lse, lse_s)
        o = o * jnp.exp(lse - merged)[..., None] + o_s * jnp.exp(lse_s - merged)[..., None]
        return (o, merged) + _rotate((kt, vt, kseg_t), axes, size)

    o0 = jnp.zeros_like(qt, jnp.float32)  # *_like: the carries vary over the mesh axes as the inputs do
    init = (o0, o0[..., 0] + flash.MASKED, flash._k_tiles(k, block_k), flash._k_tiles(v, block_k),
            flash._segment_tiles(kseg, block_k))
    o, lse, *_ = jax.lax.fori_loop(0, size, step, init)
    return flash._q_untile(o, q).astype(q.dtype), flash._q_untile(lse, q)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _ring(q, k, v, qseg, kseg, window, axes, size, block_q, block_k):
    return _ring_forward(q, k, v, qseg, kseg, window, axes, size, block_q, block_k)[0]


def _ring_fwd(q, k, v, qseg, kseg, window, axes, size, block_q, block_k):
    o, lse = _ring_forward(q, k, v, qseg, kseg, window, axes, size, block_q, block_k)
    return o, (q, k, v, qseg, kseg, window, o, lse)


def _ring_bwd(axes, size, block_q, block_k, res, do):
    q, k, v, qseg, kseg, window, o, lse = res
    L, G = q.shape[3], q.shape[2]
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # [B, K, G, L]
    qt, dot, delta_t = (flash._q_tiles(x, block_q) for x in (q, do, delta))
    lse_t = flash._q_tiles(lse, block_q, fill=-flash.MASKED)
    qseg_t = flash._segment_tiles(qseg, block_q)

    def step(s, carry):
        dq, kt, vt, kseg_t, dk, dv = carry
        dq_s, dk_s, dv_s = flash._backward(qt, kt, vt, qseg_t, kseg_t, window, _offset(axes, s, size, L), block_q,
                                           block_k, G, delta_t, lse_t, dot, k_len=L)
        dk, dv = dk + dk_s.astype(jnp.float32), dv + dv_s.astype(jnp.float32)
        return (dq + dq_s.astype(jnp.float32),) + _rotate((kt, vt, kseg_t, dk, dv), axes, size)

    kt, vt = flash._k_tiles(k, block_k), flash._k_tiles(v, block_k)
    zeros_k = jnp.zeros_like(kt, jnp.float32)
    init = (jnp.zeros_like(qt, jnp.float32), kt, vt, flash._segment_tiles(kseg, block_k), zeros_k, zeros_k)
    dq, _, _, _, dk, dv = jax.lax.fori_loop(0, size, step, init)
    return (flash._q_untile(dq, q).astype(q.dtype), flash._k_untile(dk, k).astype(k.dtype),
            flash._k_untile(dv, k).astype(v.dtype), None, None, None)


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention(q_BxKxGxLxH: jax.Array, k_BxKxLxH: jax.Array, v_BxKxLxH: jax.Array, *, window: jax.Array | int,
                   axes: tuple[str, ...], size: int, q_segment_ids_BxL: jax.Array | None = None,
                   k_segment_ids_BxL: jax.Array | None = None, block_q: int = 512,
                   block_k: int = 512) -> jax.Array:
    """This device's attention output ``[B, K, G, L, H]`` (q's dtype) for its slice of a sequence split over the
    ``size`` devices of mesh ``axes`` (inside ``shard_map``; slice ``axis_index(axes)`` holds slots
    ``[index * L, (index + 1) * L)``). Masks as :func:`gptjax.model.flash.blockwise_attention` (self-attention:
    no cache offset); ``q`` already carries the ``1/sqrt(H)`` scale."""
    L = q_BxKxGxLxH.shape[3]
    return _ring(q_BxKxGxLxH, k_BxKxLxH, v_BxKxLxH, q_segment_ids_BxL, k_segment_ids_BxL,
                 jnp.asarray(window, jnp.int32), tuple(axes), size, min(block_q, L), min(block_k, L))
