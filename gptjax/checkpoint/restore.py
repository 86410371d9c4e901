"""A run directory loaded for use, for everything that does not train (:func:`load_run`): sampling, serving,
evaluation, the harness, fine-tuning, and starting a new run from another (``TrainConfig.init_from``)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import jax
from jax.sharding import Mesh

from gptjax.checkpoint.manager import Checkpointer, CheckpointNotFound, step_problem
from gptjax.checkpoint.pinned import pinned
from gptjax.config import ConfigError, ModelConfig, RunConfig
from gptjax.data.tokenizer import Tokenizer
from gptjax.model.decoder import stack_layers, unstack_layers
from gptjax.model.sharded import ShardedModel
from gptjax.runs import RunDir, fault_reason
from gptjax.sharding.mesh import single_device_mesh


@dataclass
class LoadedRun:
    """A run's checkpoint ready for use: where the run is, its config, the model on the mesh it was loaded onto, the
    parameters placed by the run's sharding rules, its tokenizer (None when not asked for), and the step read."""

    run_dir: RunDir
    config: RunConfig
    model: ShardedModel
    params: Any
    tokenizer: Tokenizer | None
    step: int


def load_run(run_dir: str | Path, step: int | None = None, mesh: Mesh | None = None,
             tokenizer: bool = True) -> LoadedRun:
    """The one way to load a run for use (sampling, serving, evaluation, the harness, ``init_from``, fine-tuning):
    the latest intact checkpoint (or ``step``), parameters only (no optimizer state is read), sharded by the run's
    rules over ``mesh`` (default: this process's first device), and with ``tokenizer`` its ``tokenizer.model``
    (read first: a run without one is refused before any parameter is). The step is pinned while it is read
    (``checkpoint/pinned.py``), so a run writing this directory cannot delete it mid-read; with several processes
    they read the step in place, together."""
    run = RunDir(run_dir)
    cfg = run.read_config()
    tok = Tokenizer.load(run.tokenizer) if tokenizer else None
    model = ShardedModel(cfg.model, mesh or single_device_mesh(), cfg.mesh.rules)
    with (pinned(run, step) if jax.process_count() == 1 else _in_place(run, step)) as (found, root):
        checkpointer = Checkpointer(root, create=False)
        try:
            params = checkpointer.restore_params(model.abstract_params, found)
        except (ValueError, OSError) as e:  # a file that fails to read: tensorstore / orbax errors vary
            raise CheckpointNotFound(f"checkpoint step {found} in {run.checkpoints} cannot be read: {fault_reason(e)}; "
                                     "read an earlier one with --step") from None
        finally:
            checkpointer.close()
    return LoadedRun(run, cfg, model, params, tok, found)


@contextlib.contextmanager
def _in_place(run: RunDir, step: int | None) -> Iterator[tuple[int, Path]]:
    checkpointer = Checkpointer(run.checkpoints, create=False)
    try:
        found = checkpointer.existing_step(step)
    finally:
        checkpointer.close()
    why = step_problem(run.checkpoints / str(found), ("state",))
    if why is not None:
        raise CheckpointNotFound(f"checkpoint step {found} in {run.checkpoints} cannot be read: {why}; "
                                 f"read another one with --step")
    yield found, run.checkpoints


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
    source = load_run(run_dir, step, model.mesh, tokenizer=False)
    return params_for(model, source.config.model, source.params)
