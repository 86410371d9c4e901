"""Checkpoints (imports ``config``, ``sharding``, ``model``): orbax train-state checkpoints with the grain iterator,
and params-only restore for sampling, evaluation, export and ``init_from``."""

from gptjax.checkpoint.manager import (CHECKSUMS, Checkpointer, CheckpointNotFound, CheckpointWriteError, step_problem,
                                       write_checksums)
from gptjax.checkpoint.restore import init_params_from, params_for, restore_params
from gptjax.checkpoint.tensors import CheckpointTensors

__all__ = ["CHECKSUMS", "CheckpointNotFound", "CheckpointTensors", "CheckpointWriteError", "Checkpointer",
           "init_params_from", "params_for", "restore_params", "step_problem", "write_checksums"]
