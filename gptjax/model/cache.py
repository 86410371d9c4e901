"""The KV cache for incremental decoding.

One buffer per tensor for all layers (``k``/``v``: ``[layers, batch, slots, kv_heads, head_dim]``), so the
scanned and the unrolled layer layouts read and write the same cache. Slots are filled in order: a call that
feeds ``L`` tokens writes slots ``index .. index+L-1`` and advances ``index``. A query in slot ``i`` sees key
slot ``j`` iff ``j <= i``, ``i - j < window`` (banded layers) and both carry the same segment id, which is what
the full forward pass computes, so prefill + decode equals one forward pass over the whole sequence.

``index`` is one number for the whole batch (rows advance together), or one per row (``per_row=True``): then each
row is its own sequence at its own length, which is what continuous batching needs (a finished row's slot takes
the next request while the others go on; speculative decoding rewinds each row by what it rejected). Writing per
row and masking by per-row offsets is the dense attention kernel's (``gptjax/model/kernels.py``).

Positions (RoPE angles, learned position rows) are separate from slots: a caller may give any positions
(e.g. left-padded prompts), by default ``index + arange(L)``.

The cache's logical axes (``KV_CACHE_LxBxSxKxH``) are the activations' names, so the one rules table shards
it like the keys and values it holds (batch over data/fsdp, kv heads over tensor).
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
    k_LxBxSxKxH: jax.Array
    v_LxBxSxKxH: jax.Array
    segment_ids_BxS: jax.Array  # int32 segment id of the token in each slot
    index: jax.Array  # int32: the next slot to write, scalar (the whole batch) or [B] (per row)

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, slots: int | None = None, dtype: str | None = None,
             per_row: bool = False) -> "KVCache":
        """An empty cache of ``slots`` positions (default ``max_seq_len``) in ``dtype`` (default: compute), with
        one index for the batch or (``per_row``) one per row."""
        slots = cfg.max_seq_len if slots is None else slots
        shape = (cfg.n_layers, batch, slots, cfg.kv_heads, cfg.resolved_head_dim)
        dt = DTYPES[dtype or cfg.dtype]
        return cls(jnp.zeros(shape, dt), jnp.zeros(shape, dt), jnp.zeros((batch, slots), jnp.int32),
                   jnp.zeros((batch,) if per_row else (), jnp.int32))

    @property
    def per_row(self) -> bool:
        return self.index.ndim == 1

    @property
    def slots(self) -> int:
        return self.k_LxBxSxKxH.shape[2]

    def shardings(self, mesh: Mesh, rules: dict[str, MeshAxes]) -> "KVCache":
        """The cache's shardings under the logical-axis rules (a ``KVCache`` of ``NamedSharding``)."""
        kv = logical_sharding(ax.KV_CACHE_LxBxSxKxH, mesh, rules, self.k_LxBxSxKxH.shape, "kv cache")
        index = (logical_sharding((ax.BATCH,), mesh, rules, self.index.shape) if self.per_row
                 else logical_sharding((), mesh, rules))
        return KVCache(kv, kv, logical_sharding(ax.TOKENS_BxL, mesh, rules, self.segment_ids_BxS.shape), index)


def write_at(buffer_BxS: jax.Array, new_BxL: jax.Array, index: jax.Array) -> jax.Array:
    """``buffer_BxS...`` with ``new_BxL...`` written at slot ``index`` along axis 1: the same slot for every row
    (a scalar index) or each row's own (an index per row)."""
    new_BxL = new_BxL.astype(buffer_BxS.dtype)
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice(buffer_BxS, new_BxL, (0, index) + (0,) * (buffer_BxS.ndim - 2))
    row = lambda b, n, i: jax.lax.dynamic_update_slice(b, n, (i,) + (0,) * (b.ndim - 1))  # noqa: E731
    return jax.vmap(row)(buffer_BxS, new_BxL, index)
