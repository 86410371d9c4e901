"""Attention kernels behind one call, the table of them, and the rule that picks one.

Every kernel is ``kernel(q_BxKxGxLxH, k_BxKxSxH, v_BxKxSxH, mask, options) -> o_BxKxGxLxH`` (the call, the
:class:`~gptjax.model.kernel_api.MaskSpec` and the :class:`~gptjax.model.kernel_api.KernelOptions` are in
``kernel_api.py``). The table, :data:`KERNELS`:

==========  =====================================================================================================
kernel      what it is
==========  =====================================================================================================
dense       ``[L x S]`` scores and probabilities per head (saved for the backward pass): the fastest on CPU
            for short sequences, quadratic memory
blockwise   :mod:`gptjax.model.flash`: tiles with an online softmax and a hand-written VJP, linear memory,
            skips tiles above the diagonal and outside the band (any backend; expresses every mask)
cudnn       ``jax.nn.dot_product_attention(implementation="cudnn")``: GPU, causal / banded without segments, bf16 /
            fp16 only (cuDNN's fused attention has no float32 kernel: float32 runs blockwise)
splash      JAX's Pallas splash-attention TPU kernel: causal / banded, segment ids
==========  =====================================================================================================

``ModelConfig.attention_impl="auto"`` chooses (:func:`choose_kernel`): GPU -> cudnn, TPU -> splash, CPU -> dense up to
``DENSE_MAX_LEN_CPU`` query tokens and blockwise beyond (measured by ``bench/attention_bench.py``: see
``docs/performance.md``). A kernel that cannot express a call's mask falls back to blockwise. Adding a kernel is
one row of the table (its name is also a value of ``gptjax.config.AttentionImpl``; a test checks they agree).

On a mesh, :func:`attend` runs the chosen kernel per device under ``shard_map``; with the sequence split over
the context axis (the layout: ``gptjax/sharding/context.py``) it gathers the other slices' keys and values, or
runs the ring (``gptjax/model/ring.py``), by ``mesh.context_strategy``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from gptjax.config import axes as ax
from gptjax.model import flash, ring
from gptjax.model.kernel_api import KernelOptions, MaskSpec
from gptjax.model.ops import einsum, softmax
from gptjax.sharding.context import ContextLayout
from gptjax.sharding.rules import Placement, axes_size, current, logical_to_pspec, spec_axes

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


def dense_attention(q_BxKxGxLxH, k_BxKxSxH, v_BxKxSxH, mask: MaskSpec, options: KernelOptions) -> jax.Array:
    """Scores for all ``L x S`` pairs; the G query heads sharing a key/value head are stacked along the query
    axis, so both matmuls are plain batched matmuls over (batch, kv head)."""
    B, K, G, L, H = q_BxKxGxLxH.shape
    dtype = options.dtype
    q_BxKxGLxH = q_BxKxGxLxH.reshape(B, K, G * L, H)
    if options.keys_transposed:  # a KV cache's keys, [B, K, H, S]: the matmul reads them along its fast axis
        S = k_BxKxSxH.shape[3]
        s_BxKxGLxS = einsum("bkqh,bkhm->bkqm", q_BxKxGLxH, k_BxKxSxH, dtype, jnp.float32, name="attention")
    else:
        S = k_BxKxSxH.shape[2]
        s_BxKxGLxS = einsum("bkqh,bkmh->bkqm", q_BxKxGLxH, k_BxKxSxH, dtype, jnp.float32, name="attention")
    # additive mask (0 or the most negative float): cheaper on CPU than a select before the softmax
    bias = jnp.where(mask.allowed(L, S), 0.0, NEG_INF)
    bias = jnp.tile(bias, (G, 1)) if bias.ndim == 2 else jnp.tile(bias, (1, G, 1))[:, None]
    p_BxKxGLxS = softmax(s_BxKxGLxS + bias).astype(dtype)
    o_BxKxGLxH = einsum("bkqm,bkmh->bkqh", p_BxKxGLxS, v_BxKxSxH, dtype, name="attention")
    return o_BxKxGLxH.reshape(B, K, G, L, H)


def cudnn_attention(q_BxKxGxLxH, k_BxKxSxH, v_BxKxSxH, mask: MaskSpec, options: KernelOptions) -> jax.Array:
    """``jax.nn.dot_product_attention`` (self-attention, no segments); ``options.portable`` runs the same call
    through XLA's implementation (the tests check the layout and the band that way on CPU)."""
    q, k, v = (x.astype(options.dtype) for x in (q_BxKxGxLxH, k_BxKxSxH, v_BxKxSxH))
    B, K, G, L, H = q.shape
    q_BxLxNxH = q.transpose(0, 3, 1, 2, 4).reshape(B, L, K * G, H)
    k_BxSxKxH, v_BxSxKxH = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    def call(window: int) -> jax.Array:
        o_BxLxNxH = jax.nn.dot_product_attention(
            q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, scale=1.0, is_causal=True,
            local_window_size=None if window >= L else (window - 1, 0),
            implementation="xla" if options.portable else "cudnn")
        return o_BxLxNxH.reshape(B, L, K, G, H).transpose(0, 2, 3, 1, 4)

    return mask.static_window(call)


def splash_attention(q_BxKxGxLxH, k_BxKxSxH, v_BxKxSxH, mask: MaskSpec, options: KernelOptions) -> jax.Array:
    """JAX's Pallas splash-attention kernel (TPU; ``options.portable`` runs it in the Pallas interpreter,
    anywhere, slowly): one MQA kernel per key/value head, vmapped over batch and kv heads."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    q, k, v = (x.astype(options.dtype) for x in (q_BxKxGxLxH, k_BxKxSxH, v_BxKxSxH))
    B, K, G, L, H = q.shape
    shape = (L, k.shape[2])
    bq, bk = min(options.block_q, L), min(options.block_k, shape[1])
    sizes = sk.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                          block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
    if mask.segments:
        segs = sk.SegmentIds(q=mask.q_segment_ids_BxL.astype(jnp.int32), kv=mask.k_segment_ids_BxS.astype(jnp.int32))
    else:
        segs = jnp.zeros((B,), jnp.int32)  # unused placeholder to vmap over

    def call(window: int) -> jax.Array:
        head = sm.CausalMask(shape) if window >= L else sm.LocalMask(shape, (window - 1, 0), offset=0)
        kernel = sk.make_splash_mqa(sm.MultiHeadMask([head] * G), block_sizes=sizes, head_shards=1,
                                    q_seq_shards=1, interpret=options.portable)

        def per_head(q_GxLxH, k_SxH, v_SxH, seg):
            return kernel(q_GxLxH, k_SxH, v_SxH, segment_ids=seg) if mask.segments else kernel(q_GxLxH, k_SxH, v_SxH)

        return jax.vmap(jax.vmap(per_head, in_axes=(0, 0, 0, None)))(q, k, v, segs)

    return mask.static_window(call)


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A row of the table: the kernel call, whether it can express a call's mask (``self_attention``: queries and
    keys are the same slots, no cache offset or context slice; ``segments``: packed documents), the tile it takes
    along an axis of a given length for the configured ``attention_block``, the backends it runs natively on
    (none: every backend; elsewhere it runs portably) and the compute dtypes it has (none: every dtype)."""

    run: Callable[..., jax.Array]
    expresses: Callable[[bool, bool], bool] = lambda self_attention, segments: True
    tile: Callable[[int, int], int] = balanced_block
    backends: tuple[str, ...] = ()
    dtypes: tuple[str, ...] = ()

    def computes(self, dtype) -> bool:
        return not self.dtypes or dtype is None or jnp.dtype(dtype).name in self.dtypes

    def options(self, backend: str, dtype, block: int, q_len: int, k_len: int) -> KernelOptions:
        return KernelOptions(dtype=dtype, block_q=self.tile(q_len, block), block_k=self.tile(k_len, block),
                             lanes=CPU_LANES if backend == "cpu" else 1,
                             portable=bool(self.backends) and backend not in self.backends)


KERNELS: dict[str, Kernel] = {
    "dense": Kernel(dense_attention),
    "blockwise": Kernel(flash.blockwise_attention),
    "cudnn": Kernel(cudnn_attention, lambda self_attention, segments: self_attention and not segments,
                    backends=("gpu", "cuda"), dtypes=("bfloat16", "float16")),
    "splash": Kernel(splash_attention, lambda self_attention, segments: self_attention,
                     tile=lambda length, block: min(block, length), backends=("tpu",)),
}
FALLBACK = "blockwise"  # expresses every mask
AUTO = {"gpu": "cudnn", "cuda": "cudnn", "tpu": "splash"}  # by backend; CPU: dense or blockwise by length


def choose_kernel(impl: str, backend: str, q_len: int, self_attention: bool, segments: bool,
                  row_offsets: bool = False, dtype=None) -> str:
    """The kernel a call runs: ``impl`` unless it cannot express the call or has no kernel for the compute
    ``dtype`` (then blockwise); "auto" by backend and length (module docstring). Queries at a different offset per
    row (a per-row KV cache: continuous batching, speculative decoding) are the dense kernel's, whose mask is an
    array."""
    if row_offsets:
        return "dense"
    if impl == "auto":
        impl = AUTO.get(backend) or ("dense" if q_len <= DENSE_MAX_LEN_CPU else "blockwise")
    kernel = KERNELS[impl]
    return impl if kernel.expresses(self_attention, segments) and kernel.computes(dtype) else FALLBACK


def attend(q_BxKxGxLxH: jax.Array, k_BxKxSxH: jax.Array, v_BxKxSxH: jax.Array, mask: MaskSpec, *, impl: str,
           block: int, dtype, keys_transposed: bool = False) -> jax.Array:
    """Scaled queries, keys and values -> attention output ``[B, K, G, L, H]`` in ``dtype``, by kernel ``impl``
    (resolved with :func:`choose_kernel`) with tiles of about ``block``. Inside ``activation_sharding`` on a mesh the
    kernel runs per device (:func:`_per_device`). ``keys_transposed``: the keys are ``[B, K, H, S]`` (a KV cache's
    layout); the dense kernel reads them so, any other gets them transposed back. (A transposed view instead was
    copied by XLA:CPU at every decode step: 0.33 vs 0.06 ms a layer for gpt2ish at batch 1.)"""
    placement = current()
    if placement is None:
        return _local(q_BxKxGxLxH, k_BxKxSxH, v_BxKxSxH, mask, impl, block, dtype, True, keys_transposed)
    return _per_device(q_BxKxGxLxH, k_BxKxSxH, v_BxKxSxH, mask, placement, impl, block, dtype, keys_transposed)


def _local(q, k, v, mask: MaskSpec, impl: str, block: int, dtype, self_attention: bool,
           keys_transposed: bool = False) -> jax.Array:
    """One device's attention (the whole call off a mesh)."""
    backend = jax.default_backend()
    S = k.shape[3] if keys_transposed else k.shape[2]
    self_attention = self_attention and mask.no_offset and q.shape[3] == S
    name = choose_kernel(impl, backend, q.shape[3], self_attention, mask.segments, mask.row_offsets, dtype)
    kernel = KERNELS[name]
    options = kernel.options(backend, dtype, block, q.shape[3], S)
    if keys_transposed and name == "dense":
        options = dataclasses.replace(options, keys_transposed=True)
    elif keys_transposed:
        k = k.transpose(0, 1, 3, 2)
    return kernel.run(q, k, v, mask, options)


def _per_device(q, k, v, mask: MaskSpec, placement: Placement, impl: str, block: int, dtype,
                keys_transposed: bool = False) -> jax.Array:
    """The kernel per device under ``shard_map``: batch and heads split as the rules say. With the sequence split
    over the context axis each device keeps its slice of the queries and, for self-attention, reaches the other
    slices' keys by the strategy: all-gathers keys, values and key segment ids (the backward pass
    reduce-scatters their gradients) and attends with its slice's slot offset, or passes the slices around the
    ring. A KV cache is never split along its slots."""
    mesh, rules = placement.mesh, placement.rules
    B, K, G, L, H = q.shape
    spec = _query_spec(q.shape, mesh, rules)
    batch, heads, length = spec[0], spec[1], spec[3]
    layout = ContextLayout(spec_axes(length), axes_size(mesh, spec_axes(length)), placement.context_strategy)
    if layout.chunks > 1 and layout != ContextLayout.of(mesh, rules, (B, L), placement.context_strategy):
        raise ValueError(f"mesh.context_strategy={layout.strategy}: attention splits the sequence over "
                         f"{layout.axes} but the tokens are laid out for another split")
    self_attention = mask.no_offset and L == k.shape[3 if keys_transposed else 2]
    kv_length = length if self_attention else None

    def body(q, k, v, offset, q_seg, k_seg):
        local = dataclasses.replace(mask, offset=offset, q_segment_ids_BxL=q_seg, k_segment_ids_BxS=k_seg)
        if self_attention and layout.passes_slices:
            chunk = q.shape[3] // layout.chunks
            options = KernelOptions(dtype, balanced_block(chunk, block), balanced_block(chunk, block))
            return ring.ring_attention(q, k, v, dataclasses.replace(local, context=layout), options)
        if self_attention and layout.split:
            k, v = (jax.lax.all_gather(x, layout.axes, axis=2, tiled=True) for x in (k, v))
            k_seg = None if k_seg is None else jax.lax.all_gather(k_seg, layout.axes, axis=1, tiled=True)
            local = dataclasses.replace(local, k_segment_ids_BxS=k_seg)
        if layout.split:  # this device's slice of the sequence starts at slot offset + index * L_local
            local = dataclasses.replace(local, offset=offset + layout.device_index() * q.shape[3])
        elif self_attention:
            local = dataclasses.replace(local, offset=0)  # static: kernels that need self-attention stay selectable
        return _local(q, k, v, local, impl, block, dtype, self_attention and not layout.split, keys_transposed)

    kv_spec = P(batch, heads, kv_length, None)
    k_spec = P(batch, heads, None, kv_length) if keys_transposed else kv_spec
    seg_specs = (P(batch, length), P(batch, kv_length)) if mask.segments else (None, None)
    offset_spec = P(batch) if mask.row_offsets else P()
    f = jax.shard_map(body, mesh=mesh, in_specs=(P(*spec), k_spec, kv_spec, offset_spec, *seg_specs),
                      out_specs=P(*spec))
    return f(q, k, v, jnp.asarray(mask.offset, jnp.int32), mask.q_segment_ids_BxL, mask.k_segment_ids_BxS)


def _query_spec(shape, mesh, rules) -> tuple:
    """All five entries of the queries' ``PartitionSpec`` (None where unsplit): batch, kv heads (or, with fewer
    kv heads than tensor shards, as in MQA / narrow GQA, the query groups), length."""
    def spec_of(names) -> tuple:
        return (tuple(logical_to_pspec(names, rules, mesh, shape)) + (None,) * 5)[:5]

    spec = spec_of((ax.BATCH, ax.ACT_KV_HEADS, None, ax.LENGTH, None))
    return spec if spec[1] is not None else spec_of((ax.BATCH, None, ax.ACT_HEADS, ax.LENGTH, None))
