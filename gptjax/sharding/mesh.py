"""Build the ``jax.sharding.Mesh`` of a run from its ``MeshConfig``."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from gptjax.config import ConfigError, MeshConfig
from gptjax.config.axes import MESH_AXES


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    """A (data, fsdp, context, tensor) mesh over ``devices`` (default: all devices of all processes).

    Axes are ``AxisType.Auto``: shardings are given at jit boundaries and by ``constrain`` and XLA's SPMD
    partitioner propagates the rest (``jax.make_mesh`` would default to Explicit axes).

    Over several slices (``mesh.slices``) each slice's devices are laid out as one slice's mesh (the physical
    topology inside it, as on one slice) and the slices are placed along the axes that span them
    (``mesh.dcn``): an axis of size ``n`` split ``k`` ways over slices holds slice ``i``'s devices at indices
    ``i * n / k ... (i + 1) * n / k - 1``, so only that axis's collectives cross the slow links (what
    ``mesh_utils.create_hybrid_device_mesh`` builds on TPUs, with the slices found as :func:`slice_groups` says).
    """
    devices = jax.devices() if devices is None else devices
    sizes = cfg.resolve(len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    if cfg.slices == 1:
        dev_array = _one_slice(shape, devices)
    else:
        dcn = cfg.dcn_sizes()
        dcn_shape = tuple(dcn[a] for a in MESH_AXES)
        ici_shape = tuple(n // k for n, k in zip(shape, dcn_shape))
        per_slice = [_one_slice(ici_shape, group) for group in slice_groups(devices, cfg.slices)]
        blocks = np.stack(per_slice).reshape(dcn_shape + ici_shape)  # slice k at dcn index unravel(k)
        n = len(MESH_AXES)
        interleaved = [i for axis in range(n) for i in (axis, n + axis)]  # (dcn_a, ici_a) per axis, dcn outer
        dev_array = blocks.transpose(interleaved).reshape(shape)
    return Mesh(dev_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(shape))


def _one_slice(shape: tuple[int, ...], devices: list) -> np.ndarray:
    try:
        return jax.experimental.mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # simulated or unusual topologies: plain row-major order
        return np.asarray(devices).reshape(shape)


def slice_groups(devices: list, slices: int) -> list[list]:
    """The devices of each slice, in slice order: by ``slice_index`` (TPU multi-slice), else by process (GPU nodes,
    processes on loopback: one slice each), else, all of one process, ``slices`` equal groups in device order
    (simulated slices). A ``ConfigError`` when the devices do not form ``slices`` equal slices."""
    for key in (lambda d: getattr(d, "slice_index", None), lambda d: d.process_index):
        ids = [key(d) for d in devices]
        if None not in ids and len(set(ids)) == slices:
            groups = [[d for d in devices if key(d) == i] for i in sorted(set(ids))]
            break
    else:
        processes = len({d.process_index for d in devices})
        if processes > 1:
            raise ConfigError(f"mesh.slices={slices}: the {len(devices)} devices belong to {processes} processes "
                              f"(and no slice_index says otherwise); set mesh.slices to {processes}, or 1")
        if len(devices) % slices:
            raise ConfigError(f"mesh.slices={slices} does not divide the {len(devices)} devices")
        ordered, n = sorted(devices, key=lambda d: d.id), len(devices) // slices
        groups = [ordered[i * n:(i + 1) * n] for i in range(slices)]
    if len({len(g) for g in groups}) != 1:
        raise ConfigError(f"mesh.slices={slices}: the slices hold unequal device counts {[len(g) for g in groups]}")
    return groups


def single_device_mesh() -> Mesh:
    """A one-device mesh over this process's first device (sampling, evaluation, export of small models)."""
    return make_mesh(MeshConfig(data=1), jax.local_devices()[:1])


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def describe(mesh: Mesh, cfg: MeshConfig | None = None) -> str:
    """``data=2 x fsdp=4 x context=1 x tensor=1 (8 devices)``; over several slices (``cfg``) also which axes span
    them: ``, 2 slices: data 2-way over DCN``."""
    text = " x ".join(f"{k}={v}" for k, v in mesh.shape.items()) + f" ({mesh.size} devices"
    if cfg is not None and cfg.slices > 1:
        over = ", ".join(f"{a} {k}-way" for a, k in cfg.dcn_sizes().items() if k > 1)
        text += f", {cfg.slices} slices: {over} over DCN"
    return text + ")"
