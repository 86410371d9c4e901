"""Logical-axis rules: the one place where partitioning is decided.

Every parameter carries logical axis names (``logical_axes`` metadata, e.g. ``("embed", "mlp")``) and every
constrained activation names its axes at the call site (``constrain(x_BxLxD, ("batch", "length", "act_embed"))``).
This table maps logical names to mesh axes. With the default table the mesh shape alone selects the
strategy:

====================  ======================================================================
mesh (data,fsdp,tensor)  what the default rules give
====================  ======================================================================
(N, 1, 1)             DDP: params replicated, batch split, one gradient all-reduce
(1, N, 1)             FSDP / ZeRO-3: params, grads and optimizer state sharded on ``embed``
(1, 1, N)             Megatron tensor parallelism: heads / mlp / vocab split
(G, N/G, 1)           hybrid: FSDP inside groups of N/G devices, replicated across G groups
====================  ======================================================================

Override single entries through ``MeshConfig.rules`` (e.g. ``{"embed": None}`` turns the fsdp axis into
plain data parallelism) — change the rules, not the model.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any, Iterator, Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

MeshAxes = str | tuple[str, ...] | None

DEFAULT_RULES: dict[str, MeshAxes] = {
    # activations
    "batch": ("data", "fsdp"),
    "length": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    # parameters
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "layers": None,
    "pos": None,
    "norm": None,
}


def make_rules(overrides: Mapping[str, Any] | None = None) -> dict[str, MeshAxes]:
    rules = dict(DEFAULT_RULES)
    for k, v in (overrides or {}).items():
        if k not in rules:
            raise ValueError(f"unknown logical axis {k!r} in mesh.rules; known: {', '.join(rules)}")
        rules[k] = tuple(v) if isinstance(v, list) else v
    return rules


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
        axes = rules.get(name) if name is not None else None
        if name is not None and name not in rules:
            raise ValueError(f"logical axis {name!r} of {what or 'an array'} has no rule; add it to the rules table")
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if a not in used and (sizes is None or sizes[a] > 1))
        if sizes is not None and shape is not None and axes:
            size = 1
            for a in axes:
                size *= sizes[a]
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


def param_logical_axes(abstract_vars: Any) -> dict:
    """Nested dict (the params' structure) of each parameter's logical axis names, read from the
    ``logical_axes`` metadata of the (abstract) ``nnx.State`` of a model."""
    from flax import nnx

    out: dict = {}
    for path, var in nnx.to_flat_state(abstract_vars):
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = tuple(var.get_metadata()["logical_axes"])
    return out


# ---- activation constraints -------------------------------------------------------------------------------
_ctx = threading.local()


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None, rules: Mapping[str, MeshAxes]) -> Iterator[None]:
    """While tracing inside this context, ``constrain`` pins activations to the mesh by the rules."""
    prev = getattr(_ctx, "value", None)
    _ctx.value = (mesh, rules) if mesh is not None else None
    try:
        yield
    finally:
        _ctx.value = prev


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical names; identity outside ``activation_sharding`` or on 1 device."""
    value = getattr(_ctx, "value", None)
    if value is None:
        return x
    mesh, rules = value
    if mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, logical_sharding(names, mesh, rules, x.shape))
