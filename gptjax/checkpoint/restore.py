"""Parameters out of a run directory, for everything that does not train: sampling, evaluation, export, and
starting a new run from another (``TrainConfig.init_from``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jax.sharding import Mesh

from gptjax.checkpoint.manager import Checkpointer, CheckpointNotFound
from gptjax.config import ConfigError, ModelConfig, RunConfig
from gptjax.model.decoder import stack_layers, unstack_layers
from gptjax.model.sharded import ShardedModel
from gptjax.sharding.mesh import single_device_mesh


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The ``config.json`` a run directory was trained with."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise CheckpointNotFound(f"{path} not found: is {run_dir} a gptjax run directory?")
    return RunConfig.from_dict(json.loads(path.read_text()))


def restore_params(run_dir: str | Path, step: int | None = None, mesh: Mesh | None = None) -> tuple[RunConfig, Any]:
    """``(RunConfig, params)`` of a run's checkpoint (latest, or ``step``), parameters only (no optimizer state is
    read), sharded by the run's rules over ``mesh`` (default: this process's first device)."""
    cfg = load_run_config(run_dir)
    model = ShardedModel(cfg.model, mesh or single_device_mesh(), cfg.mesh.rules)
    checkpointer = Checkpointer(Path(run_dir) / "checkpoints", create=False)
    try:
        return cfg, checkpointer.restore_params(model.abstract_params, step)
    finally:
        checkpointer.close()


# Fields that change the parameters' shapes or meaning; the others (compute dtype, remat, scan layout, z-loss,
# attention band, rope base, ...) may differ between a run and one initialised from it.
_PARAM_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "positions",
                 "norm", "mlp", "use_bias", "qkv_bias", "tie_embeddings", "qk_norm", "param_dtype")


def params_for(model: ShardedModel, src: ModelConfig, params: Any) -> Any:
    """``params`` of a model configured as ``src``, converted to ``model``'s layer layout (scan-stacked or
    per-layer) and placed on its shardings; a clear error when the architectures differ."""
    dst = model.cfg
    diff = {f: (getattr(src, f), getattr(dst, f)) for f in _PARAM_FIELDS if getattr(src, f) != getattr(dst, f)}
    if src.positions == "learned" and src.max_seq_len != dst.max_seq_len:
        diff["max_seq_len"] = (src.max_seq_len, dst.max_seq_len)
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
