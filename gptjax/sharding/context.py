"""The context-parallel layout, in one place: how a ``[B, L]`` sequence is split over the devices of the mesh's
context axis (which mesh axes, how many devices), which chunks of it each device holds, the order the tokens run
in, and where each device's slice starts.

Two layouts, by ``mesh.context_strategy`` (:class:`gptjax.config.ContextStrategy`):

* contiguous (``gather``, ``ring``): device ``d`` of C holds slots ``[d * L/C, (d + 1) * L/C)``; the tokens run
  in their own order.
* zig-zag (``zigzag``): the sequence is cut into 2C chunks and device ``d`` holds chunks ``d`` and
  ``2C - 1 - d``, an early and a late one, so every device has the same causal attention work. The tokens run in
  :meth:`ContextLayout.order` (``ShardedModel`` lays a batch out in it and the logits back).

The attention kernels (``gptjax/model/kernels.py``, ``gptjax/model/ring.py``), ``ShardedModel`` and the memory
planner all take the layout from here.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import numpy as np
from jax.sharding import Mesh

from gptjax.config import ContextStrategy
from gptjax.config import axes as ax
from gptjax.sharding.rules import MeshAxes, axes_size, logical_to_pspec, spec_axes


@dataclasses.dataclass(frozen=True)
class ContextLayout:
    """The split of one sequence: over the mesh ``axes`` (``size`` devices in all), by ``strategy``."""

    axes: tuple[str, ...] = ()
    size: int = 1
    strategy: ContextStrategy = ContextStrategy.GATHER

    def __post_init__(self) -> None:
        object.__setattr__(self, "axes", tuple(self.axes))
        object.__setattr__(self, "strategy", ContextStrategy(self.strategy))

    @classmethod
    def of(cls, mesh: Mesh | Mapping[str, int], rules: Mapping[str, MeshAxes], shape_BxL: tuple[int, int],
           strategy: ContextStrategy | str = ContextStrategy.GATHER) -> "ContextLayout":
        """The layout the rules give a ``[B, L]`` token array on ``mesh`` (the ``length`` rule's mesh axes,
        where they divide the length)."""
        spec = tuple(logical_to_pspec(ax.TOKENS_BxL, rules, mesh, shape_BxL)) + (None, None)
        axes = spec_axes(spec[1])
        return cls(axes, axes_size(mesh, axes), strategy)

    @property
    def split(self) -> bool:
        """The sequence is split over more than one device."""
        return self.size > 1

    @property
    def passes_slices(self) -> bool:
        """Attention passes key / value slices around a ring of devices (``gptjax/model/ring.py``)."""
        return self.split and self.strategy.passes_slices

    @property
    def chunks(self) -> int:
        """Equal chunks of the sequence a device's slice is made of: 2 in the zig-zag layout, else 1."""
        return self.strategy.chunks_per_device if self.split else 1

    def check(self, length: int) -> None:
        """A ``ValueError`` unless a ``length``-token sequence divides into this layout's equal chunks."""
        n = self.size * self.chunks
        if length % n:
            raise ValueError(f"mesh.context_strategy={self.strategy} splits the sequence into {self.chunks} x "
                             f"{self.size} equal chunks; {length} tokens do not divide into {n}")

    def chunk_ids(self, device: int | jax.Array) -> list:
        """Which chunks (of ``size * chunks``) device ``device`` holds, in its slice's order: ``[d]`` for
        contiguous slices, ``[d, 2C - 1 - d]`` in the zig-zag layout."""
        return [device] if self.chunks == 1 else [device, 2 * self.size - 1 - device]

    def order(self, length: int) -> np.ndarray | None:
        """The order the sequence runs in on the devices: position ``i`` of the split sequence is slot
        ``order[i]``; ``None`` when it is the sequence's own order (no split, or contiguous slices)."""
        if self.chunks == 1:
            return None
        self.check(length)
        c = length // (self.size * self.chunks)
        return np.concatenate([np.arange(i * c, (i + 1) * c) for d in range(self.size) for i in self.chunk_ids(d)])

    def device_index(self) -> jax.Array:
        """This device's position along the layout's axes (inside ``shard_map`` over them)."""
        return jax.lax.axis_index(self.axes)
