"""Checkpoints (imports ``config``, ``runs``, ``sharding``, ``model``, and ``data`` for a run's tokenizer): orbax
train-state checkpoints with the grain iterator, and a run loaded for use (:func:`load_run`: sampling, serving,
evaluation, fine-tuning, ``init_from``)."""

from gptjax.checkpoint.manager import (CHECKSUMS, Checkpointer, CheckpointNotFound, CheckpointWriteError, step_problem,
                                       write_checksums)
from gptjax.checkpoint.restore import LoadedRun, init_params_from, load_run, params_for
from gptjax.checkpoint.tensors import CheckpointTensors

__all__ = ["CHECKSUMS", "CheckpointNotFound", "CheckpointTensors", "CheckpointWriteError", "Checkpointer",
           "LoadedRun", "init_params_from", "load_run", "params_for", "step_problem", "write_checksums"]
