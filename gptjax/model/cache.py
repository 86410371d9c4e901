"""The KV cache for incremental decoding.

One buffer per tensor for all layers (``k``/``v``: ``[layers, batch, slots, kv_heads, head_dim]``), so the
scanned and the unrolled layer layouts read and write the same cache. Slots are filled in order: a call that
feeds ``L`` tokens writes slots ``index .. index+L-1`` and advances ``index``. A query in slot ``i`` sees key
slot ``j`` iff ``j <= i``, ``i - j < window`` (banded layers) and both carry the same segment id, which is what
the full forward pass computes, so prefill + decode equals one forward pass over the whole sequence.

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
    index: jax.Array  # int32 scalar: the next slot to write

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, slots: int | None = None, dtype: str | None = None) -> "KVCache":
        """An empty cache of ``slots`` positions (default ``max_seq_len``) in ``dtype`` (default: compute)."""
        slots = cfg.max_seq_len if slots is None else slots
        shape = (cfg.n_layers, batch, slots, cfg.kv_heads, cfg.resolved_head_dim)
        dt = DTYPES[dtype or cfg.dtype]
        return cls(jnp.zeros(shape, dt), jnp.zeros(shape, dt), jnp.zeros((batch, slots), jnp.int32),
                   jnp.zeros((), jnp.int32))

    @property
    def slots(self) -> int:
        return self.k_LxBxSxKxH.shape[2]

    def shardings(self, mesh: Mesh, rules: dict[str, MeshAxes]) -> "KVCache":
        """The cache's shardings under the logical-axis rules (a ``KVCache`` of ``NamedSharding``)."""
        kv = logical_sharding(ax.KV_CACHE_LxBxSxKxH, mesh, rules, self.k_LxBxSxKxH.shape, "kv cache")
        return KVCache(kv, kv, logical_sharding(ax.TOKENS_BxL, mesh, rules, self.segment_ids_BxS.shape),
                       logical_sharding((), mesh, rules))
