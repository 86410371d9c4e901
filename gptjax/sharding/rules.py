"""Logical-axis rules: the one place where partitioning is decided.

Every parameter carries logical axis names (``logical_axes`` metadata, e.g. ``("embed", "mlp")``) and every
constrained activation names its axes at the call site (``constrain(x_BxLxD, ("batch", "length", "act_embed"))``).
This table maps logical names to mesh axes. With the default table the mesh shape alone selects the
strategy:

=========================  ======================================================================
mesh (data,fsdp,ctx,tensor)  what the default rules give
=========================  ======================================================================
(N, 1, 1, 1)               DDP: params replicated, batch split, one gradient all-reduce
(1, N, 1, 1)               FSDP / ZeRO-3: params, grads and optimizer state sharded on ``embed``
(1, 1, 1, N)               Megatron tensor parallelism: heads / mlp / vocab split
(G, N/G, 1, 1)             hybrid: FSDP inside groups of N/G devices, replicated across G groups
(1, F, C, 1)               context parallelism: activations split along the sequence over C devices
                           (attention all-gathers keys and values over ``context``, or passes them
                           around the ring: ``mesh.context_strategy``; ``sharding/context.py``), FSDP over F
=========================  ======================================================================

Override single entries through ``MeshConfig.rules`` (e.g. ``{"embed": None}`` turns the fsdp axis into
plain data parallelism) — change the rules, not the model.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gptjax.config import ContextStrategy
from gptjax.config import axes as ax

log = logging.getLogger(__name__)

MeshAxes = str | tuple[str, ...] | None

DEFAULT_RULES: dict[str, MeshAxes] = {
    # activations
    ax.BATCH: (ax.DATA, ax.FSDP),
    ax.LENGTH: ax.CONTEXT,
    ax.ACT_EMBED: None,
    ax.ACT_HEADS: ax.TENSOR,
    ax.ACT_KV_HEADS: ax.TENSOR,
    ax.ACT_MLP: ax.TENSOR,
    ax.ACT_VOCAB: ax.TENSOR,
    # parameters
    ax.EMBED: ax.FSDP,
    ax.VOCAB: ax.TENSOR,
    ax.HEADS: ax.TENSOR,
    ax.KV_HEADS: ax.TENSOR,
    ax.MLP: ax.TENSOR,
    ax.HEAD_DIM: None,
    ax.LAYERS: None,
    ax.POS: None,
    ax.NORM: None,
    # the KV cache (its batch / kv-head / head_dim axes are the activations')
    ax.CACHE_LENGTH: None,
}


def make_rules(overrides: Mapping[str, Any] | None = None) -> dict[str, MeshAxes]:
    rules = dict(DEFAULT_RULES)
    for k, v in (overrides or {}).items():
        if k not in rules:
            raise ValueError(f"unknown logical axis {k!r} in mesh.rules; known: {', '.join(rules)}")
        rules[k] = tuple(v) if isinstance(v, list) else v
    return rules


def spec_axes(entry: MeshAxes) -> tuple[str, ...]:
    """The mesh axes of one rule or ``PartitionSpec`` entry, as a tuple: ``"fsdp"`` -> ``("fsdp",)``,
    ``("data", "fsdp")`` as is, ``None`` -> ``()``."""
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def axes_size(mesh: Mesh | Mapping[str, int], axes: Sequence[str]) -> int:
    """How many devices the mesh ``axes`` span together (1 for none)."""
    sizes = mesh.shape if isinstance(mesh, Mesh) else mesh
    return math.prod(sizes[a] for a in axes)


def logical_to_pspec(names: Sequence[str | None], rules: Mapping[str, MeshAxes],
                     mesh: Mesh | Mapping[str, int] | None = None, shape: Sequence[int] | None = None,
                     what: str = "") -> P:
    """PartitionSpec for logical axis ``names``. With ``mesh`` (a Mesh or just its axis sizes) and ``shape``:
    mesh axes of size 1 are dropped, a mesh axis is used at most once, and a dimension that the mesh axes do
    not divide is replicated (logged)."""
    sizes = mesh.shape if isinstance(mesh, Mesh) else mesh
    used: set[str] = set()
    out = []
    for i, name in enumerate(names):
        if name is not None and name not in rules:
            raise ValueError(f"logical axis {name!r} of {what or 'an array'} has no rule; add it to the rules table")
        axes = spec_axes(rules.get(name) if name is not None else None)
        axes = tuple(a for a in axes if a not in used and (sizes is None or sizes[a] > 1))
        if sizes is not None and shape is not None and axes:
            size = axes_size(sizes, axes)
            if shape[i] % size:
                log.warning("replicating dim %d (%s, size %d) of %s: not divisible by mesh axes %s (size %d)",
                            i, name, shape[i], what or "array", axes, size)
                axes = ()
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def logical_sharding(names: Sequence[str | None], mesh: Mesh, rules: Mapping[str, MeshAxes],
                     shape: Sequence[int] | None = None, what: str = "") -> NamedSharding:
    return NamedSharding(mesh, logical_to_pspec(names, rules, mesh.shape, shape, what))


def tree_shardings(names_tree: Any, shapes_tree: Any, mesh: Mesh, rules: Mapping[str, MeshAxes]) -> Any:
    """``NamedSharding`` for every leaf of ``shapes_tree`` (anything with ``.shape``) from the matching tuple of
    logical names in ``names_tree`` (the same structure, tuples as leaves)."""
    return jax.tree.map(lambda names, s: logical_sharding(names, mesh, rules, s.shape, "/".join(map(str, names))),
                        names_tree, shapes_tree, is_leaf=lambda x: isinstance(x, tuple))


# ---- activation constraints -------------------------------------------------------------------------------
_ctx = threading.local()


class Placement(NamedTuple):
    """Where activations live while a model is traced: the mesh, the rules, and how attention reaches the keys
    of a sequence split over the context axis (a mesh setting, not the model's)."""

    mesh: Mesh
    rules: Mapping[str, MeshAxes]
    context_strategy: ContextStrategy = ContextStrategy.GATHER


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None, rules: Mapping[str, MeshAxes],
                        context_strategy: ContextStrategy | str = ContextStrategy.GATHER) -> Iterator[None]:
    """While tracing inside this context, ``constrain`` pins activations to the mesh by the rules (and attention
    splits its work per :class:`Placement`)."""
    prev = getattr(_ctx, "value", None)
    _ctx.value = Placement(mesh, rules, ContextStrategy(context_strategy)) if mesh is not None else None
    try:
        yield
    finally:
        _ctx.value = prev


def current() -> Placement | None:
    """The :class:`Placement` of the enclosing ``activation_sharding``, or None (also on a 1-device mesh)."""
    value = getattr(_ctx, "value", None)
    return None if value is None or value.mesh.size == 1 else value


def placement_key() -> tuple | None:
    """The enclosing :class:`Placement` as a hashable value (None off a mesh). A function whose traced form JAX
    caches (a module-level ``jax.checkpoint`` or ``custom_vjp`` function) and that calls :func:`constrain` takes it
    as a static argument: JAX's cache keys on the function and its arguments, not on this context, and handed a
    second mesh of the same shape (another device order: a multi-slice layout) the cached trace pinned the
    activations to the first one's devices ("incompatible devices for jitted computation")."""
    value = current()
    if value is None:
        return None
    return value.mesh, tuple(sorted(value.rules.items(), key=lambda kv: kv[0])), value.context_strategy


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical names; identity outside ``activation_sharding`` or on 1 device."""
    value = current()
    if value is None:
        return x
    return jax.lax.with_sharding_constraint(x, logical_sharding(names, value.mesh, value.rules, x.shape))
