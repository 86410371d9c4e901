"""Start a run directory from given parameters (an imported checkpoint): ``config.json``, the tokenizer, and a
step-0 checkpoint holding the full train state (the parameters, a fresh optimizer state, a fresh data position),
so that ``gptjax-train --run-dir R --resume`` continues from it and ``gptjax-sample --run-dir R`` samples it.

The directory is assembled beside its destination and renamed into place when complete. Seeding the same source
again is a no-op (``import.json`` records it); any other existing non-empty directory is refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from gptjax.checkpoint.manager import Checkpointer
from gptjax.checkpoint.restore import params_for
from gptjax.config import RunConfig
from gptjax.data.pipeline import train_dataset
from gptjax.sharding.mesh import single_device_mesh
from gptjax.training.program import Program

RECORD = "import.json"


class AlreadySeeded(Exception):
    """The run directory already holds this very import."""


def seed_run(cfg: RunConfig, params: Any, tokenizer_proto: bytes | None, source: dict) -> Path:
    """Write run directory ``cfg.train.run_dir`` from per-layer ``params`` of ``cfg.model``'s architecture;
    ``source`` (JSON-able) says where they came from."""
    run_dir = Path(cfg.train.run_dir)
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        record = run_dir / RECORD
        if record.is_file() and json.loads(record.read_text()) == source:
            raise AlreadySeeded(f"{run_dir} already holds this import (step 0); nothing to do")
        raise FileExistsError(f"{run_dir} exists and is not empty; choose another --run-dir")
    t = cfg.train
    program = Program(cfg, single_device_mesh())
    model = program.model
    per_layer = params_for(model, dataclasses.replace(cfg.model, scan_layers=False), params)
    state = program.init_from_params(jax.tree.map(lambda a, s: a.astype(s.dtype), per_layer, model.abstract_params))
    # a fresh iterator's position: the data item of a step-0 checkpoint (its state does not depend on the tokens)
    data = iter(train_dataset(np.zeros(t.batch_size * (t.seq_len + 1) + 1, np.int32), t.seq_len, t.batch_size,
                              t.seed))
    tmp = run_dir.parent / f".{run_dir.name}.tmp-{os.getpid()}-{int(time.time())}"
    tmp.mkdir(parents=True)
    try:
        checkpointer = Checkpointer(tmp / "checkpoints", keep=t.keep_checkpoints)
        try:
            checkpointer.save(0, state, data)
        finally:
            checkpointer.close()
        (tmp / "config.json").write_text(cfg.to_json())
        if tokenizer_proto is not None:
            (tmp / "tokenizer.model").write_bytes(tokenizer_proto)
        (tmp / RECORD).write_text(json.dumps(source, indent=2))
        if run_dir.exists():
            run_dir.rmdir()
        tmp.rename(run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return run_dir
