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
or the ring's two in flight). The price is C sequential exchanges a layer and pass instead of one all-gather, which GPUs / TPUs can
overlap with the step's compute. Each slice pair runs the blockwise kernel (XLA tiles), also where the local
kernel would be cuDNN or splash. A device's queries see no key of a later slice (causality): those steps
visit no tile (the kernel's loop bounds are empty) but still pass the slice on. The work is unbalanced as with the
gathered strategy (the last slice's queries see all C slices); a zig-zag slice order would balance it.
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


def _kv_blocks(k, v, kseg, block_k: int):
    kseg_b = None if kseg is None else flash._blocks(kseg, 1, block_k, fill=-1)
    return flash._k_tiles(k, block_k), flash._k_tiles(v, block_k), kseg_b


def _ring_forward(q, k, v, qseg, kseg, window, axes, size, block_q, block_k):
    """Local q [B, K, G, L, H], k / v [B, K, L, H] -> (o like q, lse [B, K, G, L] f32)."""
    me = jax.lax.axis_index(axes)
    L, G = q.shape[3], q.shape[2]
    qt = flash._q_tiles(q, block_q)
    qseg_b = None if qseg is None else flash._blocks(qseg, 1, block_q, fill=-1)

    def step(s, carry):
        o, lse, k, v, kseg = carry
        src = (me - s) % size  # whose slice this device holds at step s
        kt, vt, kseg_b = _kv_blocks(k, v, kseg, block_k)
        o_s, lse_s = flash._forward(qt, kt, vt, qseg_b, kseg_b, window, (me - src) * L, block_q, block_k, G,
                                    k_len=L, unseen_lse=flash.MASKED, out_dtype=jnp.float32)
        merged = jnp.logaddexp(lse, lse_s)
        o = o * jnp.exp(lse - merged)[..., None] + o_s * jnp.exp(lse_s - merged)[..., None]
        return (o, merged) + _rotate((k, v, kseg), axes, size)

    o0 = jnp.zeros_like(qt, jnp.float32)  # *_like: the carries vary over the mesh axes as the inputs do
    o, lse, *_ = jax.lax.fori_loop(0, size, step, (o0, o0[..., 0] + flash.MASKED, k, v, kseg))
    return flash._q_untile(o, q).astype(q.dtype), flash._q_untile(lse, q)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _ring(q, k, v, qseg, kseg, window, axes, size, block_q, block_k):
    return _ring_forward(q, k, v, qseg, kseg, window, axes, size, block_q, block_k)[0]


def _ring_fwd(q, k, v, qseg, kseg, window, axes, size, block_q, block_k):
    o, lse = _ring_forward(q, k, v, qseg, kseg, window, axes, size, block_q, block_k)
    return o, (q, k, v, qseg, kseg, window, o, lse)


def _ring_bwd(axes, size, block_q, block_k, res, do):
    q, k, v, qseg, kseg, window, o, lse = res
    me = jax.lax.axis_index(axes)
    L, G = q.shape[3], q.shape[2]
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # [B, K, G, L]
    qt, dot, delta_t = (flash._q_tiles(x, block_q) for x in (q, do, delta))
    lse_t = flash._q_tiles(lse, block_q, fill=-flash.MASKED)
    qseg_b = None if qseg is None else flash._blocks(qseg, 1, block_q, fill=-1)

    def step(s, carry):
        dq, k, v, kseg, dk, dv = carry
        src = (me - s) % size
        kt, vt, kseg_b = _kv_blocks(k, v, kseg, block_k)
        dq_s, dk_s, dv_s = flash._backward(qt, kt, vt, qseg_b, kseg_b, window, (me - src) * L, block_q, block_k, G,
                                           delta_t, lse_t, dot, k_len=L)
        dk = dk + flash._k_untile(dk_s, k).astype(jnp.float32)
        dv = dv + flash._k_untile(dv_s, k).astype(jnp.float32)
        return (dq + dq_s.astype(jnp.float32),) + _rotate((k, v, kseg, dk, dv), axes, size)

    zeros_k = jnp.zeros_like(k, jnp.float32)
    dq, _, _, _, dk, dv = jax.lax.fori_loop(0, size, step, (jnp.zeros_like(qt, jnp.float32), k, v, kseg,
                                                             zeros_k, zeros_k))
    return (flash._q_untile(dq, q).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None)


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
    block_q, block_k = min(block_q, L), min(block_k, L)
    segs = [None if x is None else x.astype(jnp.int32) for x in (q_segment_ids_BxL, k_segment_ids_BxL)]
    return _ring(q_BxKxGxLxH, k_BxKxLxH, v_BxKxLxH, *segs, jnp.asarray(window, jnp.int32), tuple(axes), size,
                 block_q, block_k)
