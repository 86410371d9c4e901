"""Ring attention: context parallelism that passes key/value slices around the devices instead of gathering them
(Liu, Zaharia & Abbeel 2023, "Ring Attention with Blockwise Transformers").

Runs per device under ``shard_map`` (:func:`gptjax.model.kernels.attend` calls it when
``mesh.context_strategy`` is ``"ring"`` or ``"zigzag"``), with the kernel call of every attention kernel; the
mask's ``context`` is the layout (``gptjax/sharding/context.py``). Each of the C devices on the context axes holds
one slice of the sequence: its queries, keys and values, slice ``i`` covering slots ``[i * L, (i + 1) * L)``; in
the zig-zag layout two chunks of ``L / 2``, ``i`` and ``2C - 1 - i`` of 2C (``ContextLayout.chunk_ids``). Each
step runs the blockwise kernel's tile passes (:func:`gptjax.model.flash.forward_tiles`, ``backward_tiles``).

* **Forward**: C steps. Device ``me`` attends its queries to the key/value slice it holds (at step ``s`` the slice
  of device ``me - s``) with the blockwise kernel's forward pass, merges that partial output into its running one
  by the row log-sum-exps, and passes the slice on to device ``me + 1`` (``ppermute``), but for the last one,
  which no device needs: C - 1 exchanges. Only the local q / k / v, the output and the row log-sum-exp are saved
  for the backward pass.
* **Backward**: the ring again. Each step adds the held slice's contribution to dQ (with the final log-sum-exp,
  as FlashAttention-2's backward pass does per tile) and to the slice's dK / dV accumulators, which travel with
  the slice: C - 1 exchanges of K / V, and C of dK / dV, which end on the slice's own device.

A device never holds more than the slice it computes with and the one arriving, where the gathered strategy keeps
all C slices of every layer for the backward pass (``plan`` counts both: every layer's C - 1 gathered slices,
or the ring's two in flight). The price is C - 1 sequential exchanges a layer and pass instead of one all-gather
(and C of dK / dV), which GPUs / TPUs can overlap with the step's compute. Each slice pair runs the blockwise
kernel (XLA tiles), also where the local kernel would be cuDNN or splash. A device's queries see no key of a later slice
(causality): those steps visit no tile (the kernel's loop bounds are empty) but still pass the slice on. With
contiguous slices the work is unbalanced (at step s the first s devices idle and the step lasts a whole slice
pair, the last device's); in the zig-zag layout every device has the same work at every step, and the pass's
critical path is ~(C + 1) / 2C of it (:func:`tiles_per_step` counts it). The model lays the sequence out in that
order (``ContextLayout.order``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.model import flash
from gptjax.model.kernel_api import KernelOptions, MaskSpec
from gptjax.sharding.context import ContextLayout


def _rotate(xs, layout: ContextLayout):
    """Pass every array in ``xs`` to the next device of the ring (device i -> i + 1 mod size)."""
    perm = [(i, (i + 1) % layout.size) for i in range(layout.size)]
    return jax.tree.map(lambda x: jax.lax.ppermute(x, layout.axes, perm), xs)


def _pairs(layout: ContextLayout, me, s, Lc: int):
    """The (query chunk, key chunk, slot offset) triples of device ``me`` at ring step ``s``, where it holds the
    key slice of device ``me - s``: the offset of the query chunk's first slot from the key chunk's (negative for
    a later chunk, whose keys the queries never see: the kernel then visits no tile)."""
    q_ids, k_ids = layout.chunk_ids(me), layout.chunk_ids((me - s) % layout.size)
    chunks = layout.chunks
    return [(a, b, (q_ids[a] - k_ids[b]) * Lc) for a in range(chunks) for b in range(chunks)]


def tiles_per_step(layout: ContextLayout, length: int, block: int, window: int | None = None) -> np.ndarray:
    """``[step, device]``: how many (query block, key block) tiles each device's forward kernel visits at each
    ring step for a ``length``-token sequence split by ``layout``, by the kernel's own loop bounds (causal,
    ``window``-banded). A step takes as long as its busiest device: ``.max(axis=1).sum()`` is the pass's critical
    path in tiles."""
    size = layout.size
    Lc = length // (size * layout.chunks)
    block = min(block, Lc)
    n = -(-Lc // block)
    out = np.zeros((size, size), np.int64)
    for s in range(size):
        for me in range(size):
            for _, _, offset in _pairs(layout, me, s, Lc):
                t = flash.TileBounds(block, block, n, n, window or length, offset, False, Lc)
                out[s, me] += sum(max(0, int(hi) - int(lo)) for lo, hi in map(t.k_range, range(n)))
    return out


def _split(x, chunks: int, axis: int) -> list:
    return [x] if chunks == 1 else jnp.split(x, chunks, axis=axis)


def _k_side(k, v, kseg, chunks: int, block_k: int):
    """Key tiles stacked by chunk ``[chunks, nk, BK, Bk, H]`` (and segment ids), the arrays the ring passes on."""
    kt, vt = (jnp.stack([flash.k_tiles(c, block_k) for c in _split(x, chunks, 2)]) for x in (k, v))
    kseg_t = None if kseg is None else jnp.stack([flash.segment_tiles(c, block_k) for c in _split(kseg, chunks, 1)])
    return kt, vt, kseg_t


def _q_side(x, chunks: int, block_q: int, fill=0) -> list:
    return [flash.q_tiles(c, block_q, fill) for c in _split(x, chunks, 3)]


def _q_segments(qseg, chunks: int, block_q: int) -> list:
    return [None] * chunks if qseg is None else [flash.segment_tiles(c, block_q) for c in _split(qseg, chunks, 1)]


def _q_join(tiles: list, like, chunks: int):
    return jnp.concatenate([flash.q_untile(t, c) for t, c in zip(tiles, _split(like, chunks, 3))], axis=3)


# Both passes block q and the local k / v slice once and pass the key tiles (and their gradients) around the
# ring as tiles: every step runs the kernel on them directly, and only the final dK / dV are unblocked. The
# slice is ``chunks`` equal chunks (1, or 2 in the zig-zag layout); each step runs the kernel on every
# (query chunk, key chunk) pair with that pair's slot offset.
def _ring_forward(q, k, v, qseg, kseg, window, layout, block_q, block_k):
    """Local q [B, K, G, L, H], k / v [B, K, L, H] -> (o like q, lse [B, K, G, L] f32)."""
    chunks = layout.chunks
    Lc, G = q.shape[3] // chunks, q.shape[2]
    qt = _q_side(q, chunks, block_q)
    qseg_t = _q_segments(qseg, chunks, block_q)

    def attend(s, o, lse, kt, vt, kseg_t):
        o, lse = list(o), list(lse)
        for a, b, offset in _pairs(layout, layout.device_index(), s, Lc):
            o_s, lse_s = flash.forward_tiles(qt[a], kt[b], vt[b], qseg_t[a], None if kseg_t is None else kseg_t[b],
                                             window, offset, block_q, block_k, G, k_len=Lc, unseen_lse=flash.MASKED,
                                             out_dtype=jnp.float32)
            merged = jnp.logaddexp(lse[a], lse_s)
            o[a] = o[a] * jnp.exp(lse[a] - merged)[..., None] + o_s * jnp.exp(lse_s - merged)[..., None]
            lse[a] = merged
        return tuple(o), tuple(lse)

    def step(s, carry):
        o, lse, *held = carry
        return attend(s, o, lse, *held) + _rotate(tuple(held), layout)

    o0 = [jnp.zeros_like(t, jnp.float32) for t in qt]  # *_like: the carries vary over the mesh axes as the inputs do
    init = (tuple(o0), tuple(x[..., 0] + flash.MASKED for x in o0)) + _k_side(k, v, kseg, chunks, block_k)
    carry = jax.lax.fori_loop(0, layout.size - 1, step, init)
    o, lse = attend(layout.size - 1, *carry)  # the last slice held goes nowhere: C - 1 exchanges, not C
    return _q_join(o, q, chunks).astype(q.dtype), _q_join(lse, q, chunks)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _ring(q, k, v, qseg, kseg, window, layout, block_q, block_k):
    return _ring_forward(q, k, v, qseg, kseg, window, layout, block_q, block_k)[0]


def _ring_fwd(q, k, v, qseg, kseg, window, layout, block_q, block_k):
    o, lse = _ring_forward(q, k, v, qseg, kseg, window, layout, block_q, block_k)
    return o, (q, k, v, qseg, kseg, window, o, lse)


def _ring_bwd(layout, block_q, block_k, res, do):
    q, k, v, qseg, kseg, window, o, lse = res
    chunks = layout.chunks
    Lc, G = q.shape[3] // chunks, q.shape[2]
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # [B, K, G, L]
    qt, dot, delta_t = (_q_side(x, chunks, block_q) for x in (q, do, delta))
    lse_t = _q_side(lse, chunks, block_q, fill=-flash.MASKED)
    qseg_t = _q_segments(qseg, chunks, block_q)

    def attend(s, dq, kt, vt, kseg_t, dk, dv):
        dq, dk, dv = list(dq), list(dk), list(dv)
        for a, b, offset in _pairs(layout, layout.device_index(), s, Lc):
            dq_s, dk_s, dv_s = flash.backward_tiles(qt[a], kt[b], vt[b], qseg_t[a],
                                                    None if kseg_t is None else kseg_t[b], window, offset, block_q,
                                                    block_k, G, delta_t[a], lse_t[a], dot[a], k_len=Lc)
            dq[a] = dq[a] + dq_s.astype(jnp.float32)
            dk[b], dv[b] = dk[b] + dk_s.astype(jnp.float32), dv[b] + dv_s.astype(jnp.float32)
        return tuple(dq), jnp.stack(dk), jnp.stack(dv)

    def step(s, carry):
        _, kt, vt, kseg_t, _, _ = carry
        dq, dk, dv = attend(s, *carry)
        return (dq,) + _rotate((kt, vt, kseg_t, dk, dv), layout)

    kt, vt, kseg_t = _k_side(k, v, kseg, chunks, block_k)
    zeros_k = jnp.zeros_like(kt, jnp.float32)
    init = (tuple(jnp.zeros_like(t, jnp.float32) for t in qt), kt, vt, kseg_t, zeros_k, zeros_k)
    carry = jax.lax.fori_loop(0, layout.size - 1, step, init)
    dq, dk, dv = attend(layout.size - 1, *carry)
    dk, dv = _rotate((dk, dv), layout)  # the gradients go home to their slice's device; the keys need not
    dk, dv = ([flash.k_untile(x[b], c) for b, c in enumerate(_split(k, chunks, 2))] for x in (dk, dv))
    return (_q_join(dq, q, chunks).astype(q.dtype), jnp.concatenate(dk, axis=2).astype(k.dtype),
            jnp.concatenate(dv, axis=2).astype(v.dtype), None, None, None)


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention(q_BxKxGxLxH: jax.Array, k_BxKxLxH: jax.Array, v_BxKxLxH: jax.Array, mask: MaskSpec,
                   options: KernelOptions) -> jax.Array:
    """The kernel call (``gptjax/model/kernel_api.py``) for this device's slice of a sequence split by
    ``mask.context`` (inside ``shard_map`` over its axes): output ``[B, K, G, L, H]`` in ``options.dtype``. The
    slice holds slots ``[index * L, (index + 1) * L)``, or the chunks the zig-zag layout gives it (the caller has
    laid the sequence out in ``ContextLayout.order``). Self-attention: the mask's window and segment ids, no cache
    offset; ``options.block_q`` / ``block_k`` tile a chunk."""
    layout = mask.context
    if layout is None or not layout.split:
        raise ValueError("ring_attention needs mask.context: the layout of a sequence split over devices")
    q, k, v = (x.astype(options.dtype) for x in (q_BxKxGxLxH, k_BxKxLxH, v_BxKxLxH))
    Lc = q.shape[3] // layout.chunks
    return _ring(q, k, v, mask.q_segment_ids_BxL, mask.k_segment_ids_BxS, jnp.asarray(mask.window, jnp.int32),
                 layout, min(options.block_q, Lc), min(options.block_k, Lc))
