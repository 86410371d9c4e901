"""Attention kernels, one signature, and the rule that picks one.

Every kernel takes queries grouped by the key/value head they share, ``q_BxKxGxLxH`` (already scaled by
``1/sqrt(H)``), keys and values ``[B, K, S, H]`` (never repeated for GQA / MQA), the layer's ``window`` and a
:class:`MaskSpec`, and returns ``o_BxKxGxLxH``. Query ``i`` sits in slot ``offset + i`` and sees key slot ``j``
iff ``j <= offset + i``, ``offset + i - j < window`` and, with segment ids, the two segments are equal.

==========  =====================================================================================================
kernel      what it is
==========  =====================================================================================================
dense       ``[L x S]`` scores and probabilities per head (saved for the backward pass): the fastest on CPU
            for short sequences, quadratic memory
blockwise   :mod:`gptjax.model.flash`: tiles with an online softmax and a hand-written VJP, linear memory,
            skips tiles above the diagonal and outside the band (any backend)
cudnn       ``jax.nn.dot_product_attention(implementation="cudnn")``: GPU, causal / banded without segments
splash      JAX's Pallas splash-attention TPU kernel: causal / banded, segment ids
==========  =====================================================================================================

``ModelConfig.attention_impl="auto"`` chooses (:func:`choose`): GPU -> cudnn where it supports the mask, TPU ->
splash, CPU -> dense up to ``DENSE_MAX_LEN_CPU`` query tokens and blockwise beyond (measured by
``bench/attention_bench.py``: see the README). A kernel that cannot express a call's mask falls back to
blockwise, which expresses all of them.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import PartitionSpec as P

from gptjax.config import axes as ax
from gptjax.config.schema import RING_STRATEGIES
from gptjax.model.flash import blockwise_attention
from gptjax.model.ring import ring_attention, slice_chunks
from gptjax.model.ops import einsum, softmax
from gptjax.sharding.rules import current, logical_to_pspec

NEG_INF = jnp.finfo(jnp.float32).min  # additive mask value of the dense kernel: exp underflows to exactly 0

# Above this many query tokens "auto" leaves the dense kernel on CPU. bench/attention_bench.py (one gpt2ish layer,
# fp32, forward + backward, best of 5; blockwise with balanced tiles): dense / blockwise 7.9 / 12.8 ms at 256
# tokens, 33.5 / 40.7 ms at 512, 47.9 / 45.1 ms at 640, 80 / 56 ms at 768, 211 / 105 ms at 1024 (and dense
# memory is quadratic: 1.5 GB vs 81 MB at 4k).
DENSE_MAX_LEN_CPU = 512
# Independent blockwise kernels per call on CPU (heads split between them; see flash.blockwise_attention).
CPU_LANES = 2


def balanced_block(length: int, block: int) -> int:
    """The tile the blockwise kernel uses along an axis of ``length`` for a configured ``block``: as many tiles
    as ``block`` needs, but at least two, of equal size (rounded up to a multiple of 8). A length just over a
    block then does not pad a nearly empty tile (768 tokens: two tiles of 384, not 512 + a padded 512; one
    gpt2ish layer forward + backward 92 -> 59 ms), and a causal square is never one tile, half of it masked."""
    n = max(2, -(-length // block))
    per_tile = -(-length // n)
    return max(8, -(-per_tile // 8) * 8)


def causal_mask(q_len: int, k_len: int, window: jax.Array | int, offset: jax.Array | int | None = None) -> jax.Array:
    """``[q_len, k_len]`` bool: query i (in slot ``offset + i``; default: the last ``q_len`` of ``k_len`` slots)
    sees key slot j iff ``j <= slot`` and ``slot - j < window``."""
    i = jnp.arange(q_len)[:, None] + (k_len - q_len if offset is None else offset)
    j = jnp.arange(k_len)[None, :]
    return (j <= i) & (i - j < window)


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """What a query may see besides causality and the window: its slot offset (the cache index, 0 without a
    cache) and, for packed sequences, the segment ids of queries and keys (equal ids see each other)."""

    offset: jax.Array | int = 0
    q_segment_ids_BxL: jax.Array | None = None
    k_segment_ids_BxS: jax.Array | None = None

    def bias(self, q_len: int, k_len: int, window: jax.Array | int) -> jax.Array:
        """Additive float32 mask: ``[L, S]``, or ``[B, L, S]`` with segment ids."""
        allowed_LxS = causal_mask(q_len, k_len, window, self.offset)
        if self.q_segment_ids_BxL is None:
            return jnp.where(allowed_LxS, 0.0, NEG_INF)
        same_BxLxS = self.q_segment_ids_BxL[:, :, None] == self.k_segment_ids_BxS[:, None, :]
        return jnp.where(allowed_LxS[None] & same_BxLxS, 0.0, NEG_INF)

    @property
    def no_offset(self) -> bool:
        return isinstance(self.offset, int) and self.offset == 0


def dense_attention(q_BxKxGxLxH, k_BxKxSxH, v_BxKxSxH, window, mask: MaskSpec, dtype) -> jax.Array:
    """Scores for all ``L x S`` pairs; the G query heads sharing a key/value head are stacked along the query
    axis, so both matmuls are plain batched matmuls over (batch, kv head)."""
    B, K, G, L, H = q_BxKxGxLxH.shape
    S = k_BxKxSxH.shape[2]
    q_BxKxGLxH = q_BxKxGxLxH.reshape(B, K, G * L, H)
    s_BxKxGLxS = einsum("bkqh,bkmh->bkqm", q_BxKxGLxH, k_BxKxSxH, dtype, jnp.float32, name="attention")
    # additive mask (0 or the most negative float): cheaper on CPU than a select before the softmax
    bias = mask.bias(L, S, window)
    bias = jnp.tile(bias, (G, 1)) if bias.ndim == 2 else jnp.tile(bias, (1, G, 1))[:, None]
    p_BxKxGLxS = softmax(s_BxKxGLxS + bias).astype(dtype)
    o_BxKxGLxH = einsum("bkqm,bkmh->bkqh", p_BxKxGLxS, v_BxKxSxH, dtype, name="attention")
    return o_BxKxGLxH.reshape(B, K, G, L, H)


def _static_windows(window, windows: tuple[int, ...], kernel):
    """Run ``kernel(static_window)``: directly for a Python int, else by switching on the traced window over
    the config's distinct ``windows`` (the scanned layer stack passes each layer's window as an array)."""
    if isinstance(window, (int, np.integer)):
        return kernel(int(window))
    options = sorted(set(windows))
    if len(options) == 1:
        return kernel(options[0])
    index = jnp.argmax(jnp.asarray(options) == window)
    return jax.lax.switch(index, [functools.partial(kernel, w) for w in options])


def cudnn_attention(q_BxKxGxLxH, k_BxKxSxH, v_BxKxSxH, window: int, implementation: str = "cudnn") -> jax.Array:
    """``jax.nn.dot_product_attention`` (self-attention, no segments). ``implementation="xla"`` runs the same
    call on any backend (the tests check the layout and the band that way)."""
    B, K, G, L, H = q_BxKxGxLxH.shape
    q_BxLxNxH = q_BxKxGxLxH.transpose(0, 3, 1, 2, 4).reshape(B, L, K * G, H)
    k_BxSxKxH, v_BxSxKxH = k_BxKxSxH.transpose(0, 2, 1, 3), v_BxKxSxH.transpose(0, 2, 1, 3)
    band = None if window >= L else (window - 1, 0)
    o_BxLxNxH = jax.nn.dot_product_attention(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, scale=1.0, is_causal=True,
                                             local_window_size=band, implementation=implementation)
    return o_BxLxNxH.reshape(B, L, K, G, H).transpose(0, 2, 3, 1, 4)


def splash_attention(q_BxKxGxLxH, k_BxKxSxH, v_BxKxSxH, window: int, mask: MaskSpec, block: int,
                     interpret: bool = False) -> jax.Array:
    """JAX's Pallas splash-attention kernel (TPU; ``interpret=True`` runs it anywhere, slowly): one MQA kernel
    per key/value head, vmapped over batch and kv heads."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    B, K, G, L, H = q_BxKxGxLxH.shape
    shape = (L, k_BxKxSxH.shape[2])
    head = sm.CausalMask(shape) if window >= L else sm.LocalMask(shape, (window - 1, 0), offset=0)
    bq, bk = min(block, L), min(block, shape[1])
    sizes = sk.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                          block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
    kernel = sk.make_splash_mqa(sm.MultiHeadMask([head] * G), block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                interpret=interpret)
    if mask.q_segment_ids_BxL is None:
        per_head = lambda q_GxLxH, k_SxH, v_SxH, seg: kernel(q_GxLxH, k_SxH, v_SxH)
        segs = jnp.zeros((B,), jnp.int32)  # unused placeholder to vmap over
    else:
        per_head = lambda q_GxLxH, k_SxH, v_SxH, seg: kernel(q_GxLxH, k_SxH, v_SxH, segment_ids=seg)
        segs = sk.SegmentIds(q=mask.q_segment_ids_BxL.astype(jnp.int32), kv=mask.k_segment_ids_BxS.astype(jnp.int32))
    over_heads = jax.vmap(per_head, in_axes=(0, 0, 0, None))
    return jax.vmap(over_heads)(q_BxKxGxLxH, k_BxKxSxH, v_BxKxSxH, segs)


def choose(impl: str, backend: str, q_len: int, self_attention: bool, segments: bool) -> str:
    """The kernel a call runs: ``impl`` unless it cannot express the call (then blockwise); "auto" by backend
    and length (module docstring). ``self_attention``: queries and keys are the same slots (no cache offset,
    no context-parallel slice)."""
    if impl == "auto":
        impl = {"gpu": "cudnn", "cuda": "cudnn", "tpu": "splash"}.get(backend, "cpu")
        if impl == "cpu":
            return "dense" if q_len <= DENSE_MAX_LEN_CPU else "blockwise"
    if impl == "cudnn" and (not self_attention or segments):
        return "blockwise"
    if impl == "splash" and not self_attention:
        return "blockwise"
    return impl


def _local(q, k, v, window, mask: MaskSpec, impl: str, block: int, windows: tuple[int, ...], dtype,
           self_attention: bool) -> jax.Array:
    """One device's attention (the whole call off a mesh)."""
    backend = jax.default_backend()
    self_attention = self_attention and mask.no_offset and q.shape[3] == k.shape[2]
    kind = choose(impl, backend, q.shape[3], self_attention, mask.q_segment_ids_BxL is not None)
    if kind == "dense":
        return dense_attention(q, k, v, window, mask, dtype)
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    if kind == "blockwise":
        return blockwise_attention(q, k, v, window=window, offset=mask.offset, q_segment_ids_BxL=mask.q_segment_ids_BxL,
                                   k_segment_ids_BxS=mask.k_segment_ids_BxS,
                                   block_q=balanced_block(q.shape[3], block), block_k=balanced_block(k.shape[2], block),
                                   lanes=CPU_LANES if backend == "cpu" else 1)
    if kind == "cudnn":
        implementation = "cudnn" if backend in ("gpu", "cuda") else "xla"
        return _static_windows(window, windows, lambda w: cudnn_attention(q, k, v, w, implementation))
    if kind == "splash":
        interpret = backend != "tpu"
        return _static_windows(window, windows, lambda w: splash_attention(q, k, v, w, mask, block, interpret))
    raise ValueError(f"unknown attention kernel {kind!r}")


def _axes(spec_entry) -> tuple[str, ...]:
    return (spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry or ())


def _mesh_size(mesh, axes: tuple[str, ...]) -> int:
    return int(np.prod([mesh.shape[a] for a in axes]))


def context_size(mesh, rules, shape_BxL: tuple[int, int]) -> int:
    """How many devices a ``[B, L]`` sequence's length is split over on ``mesh`` by ``rules`` (1: none)."""
    spec = tuple(logical_to_pspec(ax.TOKENS_BxL, rules, mesh, shape_BxL)) + (None, None)
    return _mesh_size(mesh, _axes(spec[1]))


def attend(q_BxKxGxLxH: jax.Array, k_BxKxSxH: jax.Array, v_BxKxSxH: jax.Array, window, mask: MaskSpec, *,
           impl: str, block: int, windows: tuple[int, ...], dtype, context_strategy: str = "gather") -> jax.Array:
    """Scaled queries, keys and values -> attention output ``[B, K, G, L, H]`` in ``dtype``, by kernel ``impl``
    (resolved with :func:`choose`; ``windows`` are the static windows the traced ``window`` can take).

    On a mesh (inside ``activation_sharding``) the kernel runs per device under ``shard_map``: batch and heads
    split as the rules say, and with context parallelism (the ``length`` rule on a mesh axis of size > 1) each
    device keeps its slice of the queries, all-gathers keys, values and key segment ids over that axis (the
    backward pass reduce-scatters their gradients) and attends with its slice's slot offset; with
    ``context_strategy="ring"`` the slices are passed around the devices instead (:mod:`gptjax.model.ring`,
    the blockwise kernel per slice), and with ``"zigzag"`` so are the slices of the zig-zag layout, which the
    caller has laid the sequence out in (:meth:`gptjax.model.sharded.ShardedModel.layout`)."""
    kw = dict(impl=impl, block=block, windows=windows, dtype=dtype)
    ctx = current()
    if ctx is None:
        return _local(q_BxKxGxLxH, k_BxKxSxH, v_BxKxSxH, window, mask, self_attention=True, **kw)
    mesh, rules = ctx
    B, K, G, L, H = q_BxKxGxLxH.shape
    S = k_BxKxSxH.shape[2]

    def q_spec_of(names) -> tuple:  # all five entries, None where unsplit
        return (tuple(logical_to_pspec(names, rules, mesh, q_BxKxGxLxH.shape)) + (None,) * 5)[:5]

    q_spec = q_spec_of((ax.BATCH, ax.ACT_KV_HEADS, None, ax.LENGTH, None))
    if q_spec[1] is None:  # fewer kv heads than tensor shards (MQA, narrow GQA): split the query groups
        q_spec = q_spec_of((ax.BATCH, None, ax.ACT_HEADS, ax.LENGTH, None))
    batch, heads, length = q_spec[0], q_spec[1], q_spec[3]
    split = _axes(length)  # the mesh axes the queries' sequence is split over
    self_attention = mask.no_offset and L == S
    k_length = length if self_attention else None  # a KV cache is not split along its slots
    kv_spec = P(batch, heads, k_length, None)
    gather = _axes(k_length)
    has_seg = mask.q_segment_ids_BxL is not None
    size = _mesh_size(mesh, gather)
    zigzag = context_strategy == "zigzag"
    if gather and zigzag and size != context_size(mesh, rules, (B, L)):
        raise ValueError(f"context_strategy=zigzag: attention splits the sequence over {gather} ({size} devices) "
                         "but the tokens are laid out for another split")

    def body(q, k, v, offset, q_seg, k_seg):
        if gather and context_strategy in RING_STRATEGIES:
            q, k, v = (x.astype(dtype) for x in (q, k, v))
            chunk = q.shape[3] // slice_chunks(zigzag)
            return ring_attention(q, k, v, window=window, axes=gather, size=size, q_segment_ids_BxL=q_seg,
                                  k_segment_ids_BxL=k_seg, zigzag=zigzag,
                                  block_q=balanced_block(chunk, block), block_k=balanced_block(chunk, block))
        if gather:
            k, v = (jax.lax.all_gather(x, gather, axis=2, tiled=True) for x in (k, v))
            k_seg = None if k_seg is None else jax.lax.all_gather(k_seg, gather, axis=1, tiled=True)
        if split:  # this device's slice of the sequence starts at slot offset + index * L_local
            index = 0
            for a in split:
                index = index * mesh.shape[a] + jax.lax.axis_index(a)
            offset = offset + index * q.shape[3]
        elif self_attention:
            offset = 0  # static: kernels that need self-attention (cudnn, splash) stay selectable
        local = MaskSpec(offset, q_seg, k_seg)
        return _local(q, k, v, window, local, self_attention=self_attention and not split, **kw)

    seg_specs = (P(batch, length), P(batch, k_length)) if has_seg else (None, None)
    offset = jnp.asarray(mask.offset, jnp.int32)
    f = jax.shard_map(body, mesh=mesh, in_specs=(P(*q_spec), kv_spec, kv_spec, P(), *seg_specs),
                      out_specs=P(*q_spec))
    return f(q_BxKxGxLxH, k_BxKxSxH, v_BxKxSxH, offset, mask.q_segment_ids_BxL, mask.k_segment_ids_BxS)
