"""Parameters out of a run directory, for everything that does not train: sampling, evaluation, export, and
starting a new run from another (``TrainConfig.init_from``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jax.sharding import Mesh

from gptjax.checkpoint.manager import Checkpointer
from gptjax.config import ConfigError, ModelConfig, RunConfig
from gptjax.model.decoder import stack_layers, unstack_layers
from gptjax.model.sharded import ShardedModel
from gptjax.runs import RunDir
from gptjax.sharding.mesh import single_device_mesh


def restore_params(run_dir: str | Path, step: int | None = None, mesh: Mesh | None = None) -> tuple[RunConfig, Any]:
    """``(RunConfig, params)`` of a run's checkpoint (latest, or ``step``), parameters only (no optimizer state is
    read), sharded by the run's rules over ``mesh`` (default: this process's first device)."""
    run = RunDir(run_dir)
    cfg = run.read_config()
    model = ShardedModel(cfg.model, mesh or single_device_mesh(), cfg.mesh.rules)
    checkpointer = Checkpointer(run.checkpoints, create=False)
    try:
        return cfg, checkpointer.restore_params(model.abstract_params, step)
    finally:
        checkpointer.close()


def params_for(model: ShardedModel, src: ModelConfig, params: Any) -> Any:
    """``params`` of a model configured as ``src``, converted to ``model``'s layer layout (scan-stacked or
    per-layer) and placed on its shardings; a clear error when the fields that define the parameters differ (the
    others, e.g. compute dtype, remat, z-loss, attention band, rope base, may)."""
    dst = model.cfg
    diff = src.parameter_differences(dst)
    if diff:
        raise ConfigError("the parameters come from a different architecture: " +
                          ", ".join(f"model.{k}: {a!r} there, {b!r} here" for k, a, b in
                                    ((k, *v) for k, v in diff.items())))
    if src.scan_layers and not dst.scan_layers:
        params = unstack_layers(params, dst.n_layers)
    elif dst.scan_layers and not src.scan_layers:
        params = stack_layers(params)
    return model.put_params(params)


def init_params_from(run_dir: str | Path, model: ShardedModel, step: int | None = None) -> Any:
    """Parameters of another run's checkpoint for ``model`` (same architecture; layout and mesh may differ)."""
    src_cfg, params = restore_params(run_dir, step, model.mesh)
    return params_for(model, src_cfg.model, params)
