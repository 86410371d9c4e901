"""Blockwise (flash-style) attention in plain XLA, with a hand-written VJP.

``blockwise_attention(q, k, v, mask, options)`` computes ``softmax(q k^T + mask) v`` one ``[block_q x block_k]`` tile of
scores at a time with an online softmax (Rabe & Staats 2021; Dao et al. 2022), so neither pass ever holds more
than one tile of scores per (batch, head). The forward pass saves only the output and the row log-sum-exp; the
backward pass (FlashAttention-2's) recomputes each tile's probabilities from them. Memory is therefore linear in
the sequence length.

* **Masks**: causal, banded (a query sees itself and ``window - 1`` earlier keys: GPT-3's local layers) and
  segment ids (packed documents). Tiles entirely above the diagonal or entirely outside the band are never
  visited (the key-block loop bounds are computed per query block, so the work of a banded layer is linear in
  the length); tiles entirely below the diagonal and inside the band skip the mask; segment masks are applied
  inside the visited tiles.
* **GQA / MQA**: queries come grouped by the key/value head they share (``[B, K, G, L, H]``), and each tile is a
  batched matmul over (batch, kv head) with ``G * block_q`` rows: keys and values are never repeated.
* Block sizes need not divide the lengths: inputs are padded to whole blocks; padded keys sit after every real
  query and so are masked by causality, padded queries are dropped.
* ``window`` and ``offset`` may be traced (the scanned layer stack passes each layer's window as an array):
  loop bounds are dynamic, which the hand-written VJP allows.

Scores, the softmax statistics and every accumulator are float32; the two matmuls per tile take their inputs in
the compute dtype (bf16 probabilities times bf16 values, float32 accumulation), as fused kernels do.

The tile level is public, for kernels built from these tiles (the ring, ``gptjax/model/ring.py``): the layout
(:func:`q_tiles`, :func:`k_tiles`, :func:`segment_tiles` and their inverses), the loop bounds
(:class:`TileBounds`), and one pass over a set of tiles each way (:func:`forward_tiles`, :func:`backward_tiles`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gptjax.model.kernel_api import KernelOptions, MaskSpec

# Masked score: finite, so a row whose tile is entirely masked gets exp(MASKED - max) = 1 garbage that the next
# tile's correction factor exp(MASKED - real max) = 0 wipes out; every real query sees itself, so a real maximum
# always arrives. 0.7 * max keeps ``MASKED - m`` finite.
MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def _blocks(x: jax.Array, axis: int, block: int, fill=0) -> jax.Array:
    """Pad ``axis`` to whole blocks and move the block index to the front: ``[..., n*block, ...]`` ->
    ``[n, ..., block, ...]``."""
    n = -(-x.shape[axis] // block)
    pad = n * block - x.shape[axis]
    if pad:
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, pad)
        x = jnp.pad(x, widths, constant_values=fill)
    x = x.reshape(x.shape[:axis] + (n, block) + x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def _unblock(x: jax.Array, axis: int, length: int) -> jax.Array:
    """Inverse of :func:`_blocks` (``axis`` counted without the leading block index)."""
    x = jnp.moveaxis(x, 0, axis)
    x = x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2:])
    return jax.lax.slice_in_dim(x, 0, length, axis=axis)


class TileBounds:
    """Index arithmetic shared by both passes: which tiles are visited and each tile's mask."""

    def __init__(self, block_q: int, block_k: int, nq: int, nk: int, window, offset, segments: bool,
                 k_len: int | None = None):
        self.bq, self.bk, self.nq, self.nk = block_q, block_k, nq, nk
        self.window, self.offset, self.segments = window, offset, segments
        # Padded keys sit after every query when the queries start at or before key 0 (causality masks them);
        # with ``k_len`` (the real key count) they are masked explicitly, for queries placed after the keys (a
        # ring-attention step over an earlier slice).
        self.k_len = None if k_len is None or k_len == nk * block_k else k_len

    def k_range(self, i):
        """Key blocks ``[lo, hi)`` that query block ``i`` sees."""
        first_q = self.offset + i * self.bq
        last_q = first_q + self.bq - 1
        lo = jnp.maximum(first_q - self.window + 1, 0) // self.bk
        hi = jnp.minimum(last_q // self.bk + 1, self.nk)
        return lo, hi

    def q_range(self, j):
        """Query blocks ``[lo, hi)`` that see key block ``j``."""
        first_k, last_k = j * self.bk, j * self.bk + self.bk - 1
        lo = jnp.maximum(first_k - self.offset, 0) // self.bq
        hi = jnp.minimum(jnp.maximum(last_k + self.window - 1 - self.offset, -1) // self.bq + 1, self.nq)
        return lo, hi

    def k_runs(self, i):
        """``k_range(i)`` cut into (masked, unmasked, masked) runs: the middle run's tiles are entirely visible
        (below the diagonal and inside the band), so they skip the mask. With segment ids every tile is masked."""
        lo, hi = self.k_range(i)
        first_q = self.offset + i * self.bq
        full_lo = (first_q + self.bq - 1 - self.window) // self.bk + 1  # first j with last_q - first_k < window
        full_hi = (first_q + 1) // self.bk  # j < full_hi: last_k <= first_q
        if self.k_len is not None:
            full_hi = jnp.minimum(full_hi, self.k_len // self.bk)  # the partly padded key block is masked
        return _runs(lo, hi, full_lo, full_hi, self.segments)

    def q_runs(self, j):
        """``q_range(j)`` cut into (masked, unmasked, masked) runs, as :meth:`k_runs`."""
        lo, hi = self.q_range(j)
        first_k, last_k = j * self.bk, j * self.bk + self.bk - 1
        full_lo = -((self.offset - last_k) // self.bq)  # first i with first_q >= last_k
        full_hi = -(-(self.window + first_k - self.offset - self.bq + 1) // self.bq)  # i < it: last_q - first_k < w
        if self.k_len is not None:
            full_lo = jnp.where(last_k >= self.k_len, hi, full_lo)  # a partly padded key block: every tile masked
        return _runs(lo, hi, full_lo, full_hi, self.segments)

    def mask(self, i, j, qseg, kseg):
        """``[Bq, Bk]`` (or ``[B, 1, 1, Bq, Bk]`` with segment ids) bool: may query row see key column."""
        qpos = self.offset + i * self.bq + jnp.arange(self.bq)[:, None]
        kpos = j * self.bk + jnp.arange(self.bk)[None, :]
        allowed = (kpos <= qpos) & (qpos - kpos < self.window)
        if self.k_len is not None:
            allowed = allowed & (kpos < self.k_len)
        if not self.segments:
            return allowed
        same = qseg[i][:, :, None] == kseg[j][:, None, :]  # [B, Bq, Bk]
        return (allowed[None] & same)[:, None, None]


def _runs(lo, hi, full_lo, full_hi, segments: bool):
    """``[(lo, a, True), (a, b, False), (b, hi, True)]`` with ``[a, b)`` = ``[full_lo, full_hi)`` clipped into
    ``[lo, hi)`` (empty with segment ids): loop ranges and whether their tiles need the mask."""
    a = jnp.clip(full_lo, lo, hi)
    b = jnp.clip(full_hi, a, hi)
    if segments:
        a = b = hi
    return [(lo, a, True), (a, b, False), (b, hi, True)]


def _loop(runs, step, carry):
    """``fori_loop`` over each run, with ``step(index, carry, masked)``."""
    for lo, hi, masked in runs:
        carry = jax.lax.fori_loop(lo, hi, functools.partial(_masked_step, step, masked), carry)
    return carry


def _masked_step(step, masked, index, carry):
    return step(index, carry, masked)


def _tile_mask(t: TileBounds, i, j, qseg, kseg, BK: int, G: int):
    """:meth:`TileBounds.mask` for a tile whose rows are ``G`` query heads of ``Bq`` queries: ``[G*Bq, Bk]``, or
    ``[BK, G*Bq, Bk]`` (``BK`` = batch x kv heads) with segment ids."""
    allowed = t.mask(i, j, qseg, kseg)
    if qseg is None:
        return jnp.tile(allowed, (G, 1))
    B, _, _, Bq, Bk = allowed.shape
    return jnp.broadcast_to(allowed, (B, BK // B, G, Bq, Bk)).reshape(BK, G * Bq, Bk)


# Tiles are 3-D (batch x kv head, G * Bq query rows, Bk keys) and no matmul contracts over a tile's leading axis
# (the backward pass accumulates dQ transposed, as K^T dS^T), so XLA:CPU never transposes a tile-sized array.
# With 5-D tiles it did, for the contractions over the query-group axis and the dQ matmul: those copies were
# about a third of the kernel's time (gpt2ish layer, forward + backward: 0.40 -> 0.27 s at 2k, 5.8 -> 3.6 s at 8k).
def forward_tiles(q, k, v, qseg, kseg, window, offset, block_q, block_k, G, k_len=None, unseen_lse=-MASKED,
                  out_dtype=None):
    """Blocked rows q [nq, BK, G*Bq, H], k / v [nk, BK, Bk, H] -> (out [nq, BK, G*Bq, H] in ``out_dtype``
    (default q's), lse [nq, BK, G*Bq] f32). A row that saw no key gets output 0 and lse ``unseen_lse``; a row
    that saw only masked keys of a visited tile gets an lse near ``MASKED`` (both weigh 0 in a ring merge)."""
    nq, nk, BK = q.shape[0], k.shape[0], q.shape[1]
    t = TileBounds(block_q, block_k, nq, nk, window, offset, qseg is not None, k_len)

    def row(i):
        q_i = q[i]

        def step(j, carry, masked):
            m, l, acc = carry
            s = jnp.einsum("bqh,bch->bqc", q_i, k[j], preferred_element_type=jnp.float32)
            if masked:
                s = jnp.where(_tile_mask(t, i, j, qseg, kseg, BK, G), s, MASKED)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            p = jnp.exp(s - m_new[..., None])
            corr = jnp.exp(m - m_new)
            l = l * corr + jnp.sum(p, axis=-1)
            pv = jnp.einsum("bqc,bch->bqh", p.astype(v.dtype), v[j], preferred_element_type=jnp.float32)
            return m_new, l, acc * corr[..., None] + pv

        # *_like: the carries inherit the inputs' varying mesh axes under shard_map
        stats = jnp.zeros_like(q_i[..., 0], jnp.float32)
        init = (stats + MASKED, stats, jnp.zeros_like(q_i, jnp.float32))
        m, l, acc = _loop(t.k_runs(i), step, init)
        # a row that saw no tile at all (only a padded query can, or any query in a ring step over a later
        # slice): output 0, and an lse that zeroes its probabilities in the backward pass
        seen = l > 0
        l = jnp.where(seen, l, 1.0)
        return (acc / l[..., None]).astype(out_dtype or q.dtype), jnp.where(seen, m + jnp.log(l), unseen_lse)

    return jax.lax.map(row, jnp.arange(nq))


def backward_tiles(q, k, v, qseg, kseg, window, offset, block_q, block_k, G, delta, lse, do, k_len=None):
    """Blocked rows as :func:`forward_tiles`; ``delta`` = rowsum(o * do) and ``lse`` as ``[nq, BK, G*Bq]``."""
    nq, nk, BK = q.shape[0], k.shape[0], q.shape[1]
    t = TileBounds(block_q, block_k, nq, nk, window, offset, qseg is not None, k_len)

    def column(j, carry):
        dqt, dk_all, dv_all = carry
        k_j, v_j = k[j], v[j]
        kt_j = jnp.swapaxes(k_j, -1, -2)

        # Tiles are transposed ([Bk, G*Bq]): dK and dV contract over their last axis, and dQ^T = K^T dS^T.
        def step(i, carry, masked):
            dk, dv, dqt = carry
            st = jnp.einsum("bch,bqh->bcq", k_j, q[i], preferred_element_type=jnp.float32)
            if masked:
                st = jnp.where(jnp.swapaxes(_tile_mask(t, i, j, qseg, kseg, BK, G), -1, -2), st, MASKED)
            pt = jnp.exp(st - lse[i][..., None, :])
            dv = dv + jnp.einsum("bcq,bqh->bch", pt.astype(do.dtype), do[i], preferred_element_type=jnp.float32)
            dpt = jnp.einsum("bch,bqh->bcq", v_j, do[i], preferred_element_type=jnp.float32)
            dst = (pt * (dpt - delta[i][..., None, :])).astype(q.dtype)
            dk = dk + jnp.einsum("bcq,bqh->bch", dst, q[i], preferred_element_type=jnp.float32)
            dqt = dqt.at[i].add(jnp.einsum("bhc,bcq->bhq", kt_j, dst, preferred_element_type=jnp.float32))
            return dk, dv, dqt

        zeros = jnp.zeros_like(k_j, jnp.float32)
        dk, dv, dqt = _loop(t.q_runs(j), step, (zeros, zeros, dqt))
        return dqt, dk_all.at[j].set(dk.astype(k.dtype)), dv_all.at[j].set(dv.astype(v.dtype))

    # The accumulators are zeros that depend on ``do``: plain broadcast zeros have no operands, and XLA:CPU's
    # scheduler then materialised every layer's accumulators at the start of the step, all held through the
    # activation peak (75 MB a layer at gpt2ish, 8k tokens).
    anchor = do.reshape(-1)[0] * 0
    anchored_zeros = lambda x, dtype: jnp.zeros(x.shape, dtype) + anchor.astype(dtype)  # noqa: E731
    dqt = anchored_zeros(jnp.swapaxes(q, -1, -2), jnp.float32)  # [nq, BK, H, G*Bq]
    init = (dqt, anchored_zeros(k, k.dtype), anchored_zeros(v, v.dtype))
    dqt, dk, dv = jax.lax.fori_loop(0, nk, column, init)
    return jnp.swapaxes(dqt, -1, -2).astype(q.dtype), dk, dv


def _split(lanes: int, K: int, G: int):
    """How ``lanes`` independent kernels divide the heads: over kv heads (axis 1) if they divide, else over the
    query groups (axis 2, keys and values shared), else not at all (``None``)."""
    if lanes > 1 and K % lanes == 0:
        return 1
    if lanes > 1 and G % lanes == 0:
        return 2
    return None


def _lane_inputs(axis, lanes: int, q, k, v):
    """Per-lane ``(q, k, v)`` slices (one lane: the inputs themselves)."""
    if axis is None:
        return [(q, k, v)]
    qs = jnp.split(q, lanes, axis)
    ks, vs = (jnp.split(k, lanes, 1), jnp.split(v, lanes, 1)) if axis == 1 else ([k] * lanes, [v] * lanes)
    return list(zip(qs, ks, vs))


def q_tiles(x: jax.Array, block: int, fill=0) -> jax.Array:
    """Unblocked ``[B, K, G, L, ...]`` -> tile rows ``[nq, B*K, G*Bq, ...]`` (after the blocking transpose, a free
    reshape): each tile is then one batched matmul over (batch, kv head) whose rows are the query heads sharing
    the key/value head."""
    x = _blocks(x, 3, block, fill)
    n, B, K, G, Bq = x.shape[:5]
    return x.reshape((n, B * K, G * Bq) + x.shape[5:])


def segment_tiles(ids_BxL: jax.Array | None, block: int) -> jax.Array | None:
    """Segment ids ``[B, L]`` -> ``[n, B, block]`` (``None`` stays ``None``). Padded queries and keys share
    segment -1: a padded row sees itself."""
    return None if ids_BxL is None else _blocks(ids_BxL.astype(jnp.int32), 1, block, fill=-1)


def k_tiles(x: jax.Array, block: int) -> jax.Array:
    """Unblocked ``[B, K, S, H]`` -> ``[nk, B*K, Bk, H]``."""
    x = _blocks(x, 2, block)
    return x.reshape((x.shape[0], -1) + x.shape[3:])


def q_untile(x: jax.Array, like: jax.Array) -> jax.Array:
    """Inverse of :func:`q_tiles`, to ``like``'s leading ``[B, K, G, L]``."""
    B, K, G, L = like.shape[:4]
    return _unblock(x.reshape((x.shape[0], B, K, G, x.shape[2] // G) + x.shape[3:]), 3, L)


def k_untile(x: jax.Array, like: jax.Array) -> jax.Array:
    """Inverse of :func:`k_tiles`, to ``like``'s ``[B, K, S, H]``."""
    B, K, S = like.shape[:3]
    return _unblock(x.reshape((x.shape[0], B, K) + x.shape[2:]), 2, S)


def _forward_lanes(q, k, v, qseg, kseg, window, offset, block_q, block_k, lanes):
    """Unblocked q [B, K, G, L, H], k / v [B, K, S, H] -> (o like q, per-lane ``(q, k, v, lse)``)."""
    axis = _split(lanes, q.shape[1], q.shape[2])
    saved, outs = [], []
    for q_i, k_i, v_i in _lane_inputs(axis, lanes, q, k, v):
        o, lse = forward_tiles(q_tiles(q_i, block_q), k_tiles(k_i, block_k), k_tiles(v_i, block_k), qseg, kseg,
                          window, offset, block_q, block_k, q_i.shape[2])
        saved.append((q_i, k_i, v_i, q_untile(lse, q_i)))
        outs.append(q_untile(o, q_i))
    return (outs[0] if axis is None else jnp.concatenate(outs, axis)), saved


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _attention(q, k, v, qseg, kseg, window, offset, block_q, block_k, lanes):
    return _forward_lanes(q, k, v, qseg, kseg, window, offset, block_q, block_k, lanes)[0]


def _attention_fwd(q, k, v, qseg, kseg, window, offset, block_q, block_k, lanes):
    # Residuals: the per-lane q / k / v slices and row statistics, unblocked (the backward pass re-blocks them: a
    # cheap transpose), and the whole output, which is the very array the output projection keeps for its own
    # backward pass. Saving the whole q / k / v would keep the slices too (XLA merges the backward's identical
    # slicing with the forward's); blocked or per-lane copies of the output would be a second output a layer.
    o, saved = _forward_lanes(q, k, v, qseg, kseg, window, offset, block_q, block_k, lanes)
    return o, (saved, o, qseg, kseg, window, offset)


def _attention_bwd(block_q, block_k, lanes, res, do):
    saved, o, qseg, kseg, window, offset = res
    axis = _split(lanes, do.shape[1], do.shape[2])  # as the forward pass split q (do has q's shape)
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # [B, K, G, L]
    dos, deltas = ([do], [delta]) if axis is None else (jnp.split(do, lanes, axis), jnp.split(delta, lanes, axis))
    grads = []
    for (q, k, v, lse), do_i, delta_i in zip(saved, dos, deltas):
        dq, dk, dv = backward_tiles(q_tiles(q, block_q), k_tiles(k, block_k), k_tiles(v, block_k), qseg, kseg,
                               window, offset, block_q, block_k, q.shape[2], q_tiles(delta_i, block_q),
                               q_tiles(lse, block_q, fill=-MASKED), q_tiles(do_i, block_q))
        grads.append((q_untile(dq, q), k_untile(dk, k), k_untile(dv, k)))
    if axis is None:
        dq, dk, dv = grads[0]
    elif axis == 1:
        dq, dk, dv = (jnp.concatenate(parts, 1) for parts in zip(*grads))
    else:  # lanes over query groups share keys and values: their gradients add up
        dq = jnp.concatenate([g[0] for g in grads], 2)
        dk, dv = (sum(g[i].astype(jnp.float32) for g in grads).astype(grads[0][i].dtype) for i in (1, 2))
    return dq, dk, dv, None, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def blockwise_attention(q_BxKxGxLxH: jax.Array, k_BxKxSxH: jax.Array, v_BxKxSxH: jax.Array, mask: MaskSpec,
                        options: KernelOptions) -> jax.Array:
    """The kernel call (``gptjax/model/kernel_api.py``): attention output ``[B, K, G, L, H]`` in
    ``options.dtype``, tiles of ``options.block_q`` x ``options.block_k`` (clipped to the lengths). Expresses
    every mask: causal, banded (traced windows too), an offset, segment ids.

    ``options.lanes > 1`` splits the heads (kv heads, else query groups) into that many independent kernels,
    which XLA:CPU may run concurrently. The result does not change. Measured with 12 heads, forward + backward, 1
    vs 2 lanes: 0.58 -> 0.47 s at 2k tokens with 5-D tiles; with 3-D tiles 292 vs 302 ms at 2k (noise) and
    3.88 -> 3.64 s at 8k (median of 6, interleaved)."""
    q, k, v = (x.astype(options.dtype) for x in (q_BxKxGxLxH, k_BxKxSxH, v_BxKxSxH))
    L, S = q.shape[3], k.shape[2]
    block_q, block_k = min(options.block_q, L), min(options.block_k, S)
    qseg, kseg = segment_tiles(mask.q_segment_ids_BxL, block_q), segment_tiles(mask.k_segment_ids_BxS, block_k)
    return _attention(q, k, v, qseg, kseg, jnp.asarray(mask.window, jnp.int32), jnp.asarray(mask.offset, jnp.int32),
                      block_q, block_k, options.lanes)
