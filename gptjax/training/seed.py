"""Start a run directory from given parameters (an imported checkpoint): ``config.json``, the tokenizer, and a
step-0 checkpoint holding the full train state (the parameters, a fresh optimizer state, a fresh data position),
so that ``gptjax-train --run-dir R --resume`` continues from it and ``gptjax-sample --run-dir R`` samples it.

The directory is assembled beside its destination and renamed into place when complete
(:func:`gptjax.runs.atomic_directory`). Seeding the same source again is a no-op (``import.json`` records it); any
other existing non-empty directory is refused.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import numpy as np

from gptjax import storage
from gptjax.checkpoint.manager import Checkpointer
from gptjax.checkpoint.restore import params_for
from gptjax.config import RunConfig
from gptjax.data.batches import train_dataset
from gptjax.runs import RunDir, WriterLock, atomic_directory, deferred_interrupt
from gptjax.sharding.mesh import single_device_mesh
from gptjax.training.program import Program


class AlreadySeeded(Exception):
    """The run directory already holds this very import."""


def seed_run(cfg: RunConfig, params: Any, tokenizer_proto: bytes | None, source: dict) -> str:
    """Write run directory ``cfg.train.run_dir`` from per-layer ``params`` of ``cfg.model``'s architecture;
    ``source`` (JSON-able) says where they came from. Returns where the run is."""
    run = RunDir(cfg.train.run_dir)
    _check_empty(run, source)
    lock = WriterLock(run, command="gptjax-import")  # no training or other import starts meanwhile
    try:
        with deferred_interrupt():  # taken whole, so that the cleanup below always knows what it holds
            lock.acquire()
        _check_empty(run, source)
        return _seed(cfg, params, tokenizer_proto, source, run)
    finally:
        with deferred_interrupt():
            lock.release()
            run.remove_if_empty(directory=lock.created_dir)


def _check_empty(run: RunDir, source: dict) -> None:
    if run.path.exists() and (not run.path.is_dir() or {p.name for p in run.path.iterdir()} - {run.LOCK}):
        if run.import_record.is_file() and json.loads(run.import_record.read_text()) == source:
            raise AlreadySeeded(f"{run} already holds this import (step 0); nothing to do")
        raise FileExistsError(f"{run} exists and is not empty; choose another --run-dir")


def _seed(cfg: RunConfig, params: Any, tokenizer_proto: bytes | None, source: dict, run: RunDir) -> str:
    t = cfg.train
    program = Program(cfg, single_device_mesh())
    model = program.model
    per_layer = params_for(model, dataclasses.replace(cfg.model, scan_layers=False), params)
    state = program.init_from_params(jax.tree.map(lambda a, s: a.astype(s.dtype), per_layer, model.abstract_params))
    # a fresh iterator's position: the data item of a step-0 checkpoint (its state does not depend on the tokens)
    data = iter(train_dataset(np.zeros(t.batch_size * (t.seq_len + 1) + 1, np.int32), t.seq_len, t.batch_size,
                              t.seed))
    if run.url:  # a bucket has no directory to rename: the checkpoint first (committed by its marker), then the
        storage.remove_tree(run.checkpoints)  # files that make it a run (a killed import left only a checkpoint)
        _write(run, cfg, state, data, tokenizer_proto, source)
        run.push()
        return str(run)
    with atomic_directory(run.path) as tmp:  # an existing empty directory is replaced
        _write(RunDir(tmp), cfg, state, data, tokenizer_proto, source)
    return str(run)


def _write(run: RunDir, cfg: RunConfig, state: Any, data: Any, tokenizer_proto: bytes | None, source: dict) -> None:
    checkpointer = Checkpointer(run.checkpoints, keep=cfg.train.keep_checkpoints)
    try:
        checkpointer.save(0, state, data)
    finally:
        checkpointer.close()
    run.write_config(cfg)
    if tokenizer_proto is not None:
        run.tokenizer.write_bytes(tokenizer_proto)
    run.import_record.write_text(json.dumps(source, indent=2))
