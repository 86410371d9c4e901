"""Build the ``jax.sharding.Mesh`` of a run from its ``MeshConfig``."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from gptjax.config import MeshConfig
from gptjax.config.axes import MESH_AXES


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    """A (data, fsdp, context, tensor) mesh over ``devices`` (default: all devices of all processes).

    Axes are ``AxisType.Auto``: shardings are given at jit boundaries and by ``constrain`` and XLA's SPMD
    partitioner propagates the rest (``jax.make_mesh`` would default to Explicit axes).
    """
    devices = jax.devices() if devices is None else devices
    sizes = cfg.resolve(len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        dev_array = jax.experimental.mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # simulated or unusual topologies: plain row-major order
        dev_array = np.asarray(devices).reshape(shape)
    return Mesh(dev_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(shape))


def single_device_mesh() -> Mesh:
    """A one-device mesh over this process's first device (sampling, evaluation, export of small models)."""
    return make_mesh(MeshConfig(data=1), jax.local_devices()[:1])


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def describe(mesh: Mesh) -> str:
    return " x ".join(f"{k}={v}" for k, v in mesh.shape.items()) + f" ({mesh.size} devices)"
