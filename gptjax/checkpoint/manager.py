"""Orbax checkpoints of the train state and the grain iterator state.

Each checkpoint step holds two items: ``state`` (params, optimizer state, step; written collectively by every
process, each writing its own shards) and ``data`` (one JSON file per process with its grain iterator state).
Restoring takes an abstract target (``ShapeDtypeStruct`` with shardings), so a checkpoint written on one mesh
restores onto another mesh shape.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import grain
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointNotFound(FileNotFoundError):
    pass


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int = 3, create: bool = True):
        self.directory = Path(directory).absolute()
        if not create and not self.directory.is_dir():
            raise CheckpointNotFound(f"no checkpoint in {self.directory}")
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=create, enable_async_checkpointing=False),
            item_names=("state", "data"),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def _existing_step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointNotFound(f"no checkpoint in {self.directory}")
        if step not in self.all_steps():
            raise CheckpointNotFound(f"no checkpoint for step {step} in {self.directory}; "
                                     f"available: {self.all_steps()}")
        return step

    def save(self, step: int, state: Any, data_iterator: Any | None = None) -> None:
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        self.manager.wait_until_finished()

    def restore(self, abstract_state: Any, data_iterator: Any | None = None, step: int | None = None) -> Any:
        """Restore the train state onto ``abstract_state``'s shardings (and the iterator in place).
        Returns the state."""
        step = self._existing_step(step)
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        log.info("restored step %d from %s", step, self.directory)
        return restored["state"]

    def restore_params(self, abstract_params: Any, step: int | None = None) -> Any:
        """Only the parameters of a saved train state (orbax partial restore: optimizer moments are never read),
        placed by ``abstract_params``' shardings."""
        step = self._existing_step(step)
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_params)
        item = ocp.args.PyTreeRestore(item={"params": abstract_params}, restore_args={"params": restore_args},
                                      partial_restore=True)
        restored = self.manager.restore(step, args=ocp.args.Composite(state=item))
        log.info("restored the parameters of step %d from %s", step, self.directory)
        return restored["state"]["params"]

    def close(self) -> None:
        self.manager.close()
