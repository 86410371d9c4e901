"""The KV cache for incremental decoding.

One buffer per layer and tensor, in the layouts the attention kernels read, so that a decode step writes its new
keys and values in place and reads each layer's buffers as they are: keys ``[batch, kv_heads, head_dim, slots]``
(transposed: the score matmul ``q . k`` then reads them along its fast axis), values ``[batch, kv_heads, slots,
head_dim]``. (Measured on the tiny model, 16 rows x 768 slots, 2 CPU cores: one ``[layers, batch, slots,
kv_heads, head_dim]`` array per tensor made every decode step copy each layer's slice out, transpose it to
heads-major and stack the layers back: 47 ms a step; per-layer heads-major buffers 10 ms; with the keys
transposed, the score matmul went from 0.94 to 0.3 ms a layer.) Scanned models decode with their layers unrolled
over the same per-layer buffers. Slots are filled in order: a call that feeds ``L`` tokens writes slots
``index .. index+L-1`` and advances ``index``. A query in slot ``i`` sees key
slot ``j`` iff ``j <= i``, ``i - j < window`` (banded layers) and both carry the same segment id, which is what
the full forward pass computes, so prefill + decode equals one forward pass over the whole sequence.

``index`` is one number for the whole batch (rows advance together), or one per row (``per_row=True``): then each
row is its own sequence at its own length, which is what continuous batching needs (a finished row's slot takes
the next request while the others go on; speculative decoding rewinds each row by what it rejected). Writing per
row and masking by per-row offsets is the dense attention kernel's (``gptjax/model/kernels.py``).

Positions (RoPE angles, learned position rows) are separate from slots: a caller may give any positions
(e.g. left-padded prompts), by default ``index + arange(L)``.

The cache's logical axes (``KEY_CACHE_BxKxHxS``, ``VALUE_CACHE_BxKxSxH``) are the activations' names, so the one
rules table shards it like the keys and values it holds (batch over data/fsdp, kv heads over tensor).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from gptjax.config import ModelConfig
from gptjax.config import axes as ax
from gptjax.config.dtypes import DTYPES
from gptjax.sharding.rules import MeshAxes, logical_sharding


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k_BxKxHxS: tuple[jax.Array, ...]  # one buffer per layer
    v_BxKxSxH: tuple[jax.Array, ...]
    segment_ids_BxS: jax.Array  # int32 segment id of the token in each slot
    index: jax.Array  # int32: the next slot to write, scalar (the whole batch) or [B] (per row)

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, slots: int | None = None, dtype: str | None = None,
             per_row: bool = False) -> "KVCache":
        """An empty cache of ``slots`` positions (default ``max_seq_len``) in ``dtype`` (default: compute), with
        one index for the batch or (``per_row``) one per row."""
        slots = cfg.max_seq_len if slots is None else slots
        K, H = cfg.kv_heads, cfg.resolved_head_dim
        dt = DTYPES[dtype or cfg.dtype]
        layers = lambda shape: tuple(jnp.zeros(shape, dt) for _ in range(cfg.n_layers))  # noqa: E731
        return cls(layers((batch, K, H, slots)), layers((batch, K, slots, H)), jnp.zeros((batch, slots), jnp.int32),
                   jnp.zeros((batch,) if per_row else (), jnp.int32))

    @property
    def per_row(self) -> bool:
        return self.index.ndim == 1

    @property
    def slots(self) -> int:
        return self.segment_ids_BxS.shape[1]

    def shardings(self, mesh: Mesh, rules: dict[str, MeshAxes]) -> "KVCache":
        """The cache's shardings under the logical-axis rules (a ``KVCache`` of ``NamedSharding``)."""
        k = tuple(logical_sharding(ax.KEY_CACHE_BxKxHxS, mesh, rules, x.shape, "key cache") for x in self.k_BxKxHxS)
        v = tuple(logical_sharding(ax.VALUE_CACHE_BxKxSxH, mesh, rules, x.shape, "value cache")
                  for x in self.v_BxKxSxH)
        index = (logical_sharding((ax.BATCH,), mesh, rules, self.index.shape) if self.per_row
                 else logical_sharding((), mesh, rules))
        return KVCache(k, v, logical_sharding(ax.TOKENS_BxL, mesh, rules, self.segment_ids_BxS.shape), index)


def write_at(buffer: jax.Array, new: jax.Array, index: jax.Array, axis: int = 1) -> jax.Array:
    """``buffer`` (batch first) with ``new`` written at slot ``index`` along ``axis``: the same slot for every
    row (a scalar index) or each row's own (an index per row)."""
    new = new.astype(buffer.dtype)
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice(buffer, new, (0,) * axis + (index,) + (0,) * (buffer.ndim - axis - 1))
    row = lambda b, n, i: jax.lax.dynamic_update_slice(  # noqa: E731
        b, n, (0,) * (axis - 1) + (i,) + (0,) * (b.ndim - axis))
    return jax.vmap(row)(buffer, new, index)
