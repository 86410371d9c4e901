"""The one call every attention kernel takes::

    kernel(q_BxKxGxLxH, k_BxKxSxH, v_BxKxSxH, mask: MaskSpec, options: KernelOptions) -> o_BxKxGxLxH

Queries come grouped by the key/value head they share (``[B, K, G, L, H]``, already scaled by ``1/sqrt(H)``), keys
and values are ``[B, K, S, H]`` (never repeated for GQA / MQA), and the output has the queries' shape. The mask
says *what* each query sees, as one object; the options say *how* to compute it (dtype, tiles, lanes), never
what. The kernels and the table that picks one are in ``gptjax/model/kernels.py``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.sharding.context import ContextLayout

# A window that bands nothing: every causal distance of any sequence gptjax runs is below it (and it stays far
# from int32 overflow in the kernels' loop-bound arithmetic).
NO_BAND = 1 << 30


def causal_mask(q_len: int, k_len: int, window: jax.Array | int, offset: jax.Array | int | None = None) -> jax.Array:
    """``[q_len, k_len]`` bool (``[B, q_len, k_len]`` for an offset per row): query i (in slot ``offset + i``;
    default: the last ``q_len`` of ``k_len`` slots) sees key slot j iff ``j <= slot`` and ``slot - j < window``."""
    offset = k_len - q_len if offset is None else offset
    if jnp.ndim(offset) == 1:
        offset = offset[:, None, None]
    i = jnp.arange(q_len)[:, None] + offset
    j = jnp.arange(k_len)[None, :]
    return (j <= i) & (i - j < window)


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """What a query may see. Query ``i`` sits in slot ``offset + i`` (the cache index; 0 without a cache) and sees
    key slot ``j`` iff ``j <= offset + i``, ``offset + i - j < window`` and, for packed sequences, the two segment
    ids are equal.

    ``window`` may be traced (the scanned layer stack passes each layer's as an array); ``windows`` are then the
    static values it can take, for kernels that need a static band. ``context``: the sequence is split over
    devices in this layout and the call runs on one device's slice (the ring kernel; inside ``shard_map``)."""

    offset: jax.Array | int = 0
    q_segment_ids_BxL: jax.Array | None = None
    k_segment_ids_BxS: jax.Array | None = None
    window: jax.Array | int = NO_BAND
    windows: tuple[int, ...] = ()
    context: ContextLayout | None = None

    def with_window(self, window: jax.Array | int, windows: tuple[int, ...] = ()) -> "MaskSpec":
        return dataclasses.replace(self, window=window, windows=tuple(windows))

    @property
    def no_offset(self) -> bool:
        return isinstance(self.offset, int) and self.offset == 0

    @property
    def row_offsets(self) -> bool:
        """Each row's queries start at its own slot (a per-row KV cache index)."""
        return jnp.ndim(self.offset) == 1

    @property
    def segments(self) -> bool:
        return self.q_segment_ids_BxL is not None

    def allowed(self, q_len: int, k_len: int) -> jax.Array:
        """``[L, S]`` bool, or ``[B, L, S]`` with segment ids: may query row see key column."""
        allowed = causal_mask(q_len, k_len, self.window, self.offset)  # [L, S], or [B, L, S] per row
        if not self.segments:
            return allowed
        same_BxLxS = self.q_segment_ids_BxL[:, :, None] == self.k_segment_ids_BxS[:, None, :]
        return (allowed if allowed.ndim == 3 else allowed[None]) & same_BxLxS

    def static_window(self, kernel: Callable[[int], jax.Array]) -> jax.Array:
        """``kernel(window)`` with the window as a Python int: directly, or by switching on a traced window over
        the static ``windows`` it can take."""
        if isinstance(self.window, (int, np.integer)):
            return kernel(int(self.window))
        options = sorted(set(self.windows))
        if len(options) == 1:
            return kernel(options[0])
        index = jnp.argmax(jnp.asarray(options) == self.window)
        return jax.lax.switch(index, [functools.partial(kernel, w) for w in options])


@dataclasses.dataclass(frozen=True)
class KernelOptions:
    """How a kernel computes: the compute ``dtype`` (scores, softmax statistics and accumulators stay float32),
    the tiles of the tiled kernels (``block_q`` queries x ``block_k`` keys), independent ``lanes`` (heads split
    into that many kernels, which XLA:CPU may run concurrently), and ``portable``: run a platform kernel on any
    backend (cuDNN's call through XLA, splash in the Pallas interpreter), slowly, as the tests do.
    ``keys_transposed``: the keys arrive ``[B, K, H, S]``, as a KV cache holds them (only the dense kernel is
    called so; see ``attend``)."""

    dtype: Any = jnp.float32
    block_q: int = 512
    block_k: int = 512
    lanes: int = 1
    portable: bool = False
    keys_transposed: bool = False
