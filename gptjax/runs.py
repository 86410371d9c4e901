"""A run directory, in one place: the name of everything in it, reading and writing its files, and the one way a
file or a directory is written so that a crash never leaves half of it (a temporary sibling, renamed into place).

::

    runs/austen/
      config.json             the RunConfig the run trains with (the source of truth on resume)
      tokenizer.model         its sentencepiece tokenizer
      data/                   the tokenized corpus cache
      checkpoints/<step>/     orbax checkpoints: state/ and each process's grain iterator state (data/)
      metrics.jsonl           one JSON object per logged or evaluated step
      metrics.dropped.jsonl   rows a resumed run replaced
      tensorboard/            TensorBoard event files
      summary.json            what the finished run reported
      curves.png              loss and throughput curves
      import.json             where an imported run's parameters came from

Everything that reads or writes these (training, checkpointing, interop, ``gptjax-scaling collect``, the
experiments) names them through :class:`RunDir`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Iterator

from gptjax.config import RunConfig

__all__ = ["CheckpointNotFound", "RunDir", "atomic_directory", "write_atomic"]


class CheckpointNotFound(FileNotFoundError):
    """A run directory, or the checkpoint asked for in it, is not there; the message names what is missing."""


def _entry(name: str) -> property:
    return property(lambda self: self.path / name, doc=f"``<run>/{name}``")


class RunDir:
    """The files of one run directory (nothing is created by naming them): ``RunDir.METRICS`` is a name,
    ``RunDir(path).metrics`` its path in that run."""

    CONFIG = "config.json"
    TOKENIZER = "tokenizer.model"
    DATA = "data"
    CHECKPOINTS = "checkpoints"
    METRICS = "metrics.jsonl"
    DROPPED_METRICS = "metrics.dropped.jsonl"
    TENSORBOARD = "tensorboard"
    SUMMARY = "summary.json"
    CURVES = "curves.png"
    IMPORT_RECORD = "import.json"

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    config = _entry(CONFIG)
    tokenizer = _entry(TOKENIZER)
    data = _entry(DATA)
    checkpoints = _entry(CHECKPOINTS)
    metrics = _entry(METRICS)
    dropped_metrics = _entry(DROPPED_METRICS)
    tensorboard = _entry(TENSORBOARD)
    summary = _entry(SUMMARY)
    curves = _entry(CURVES)
    import_record = _entry(IMPORT_RECORD)

    def read_config(self) -> RunConfig:
        """The ``config.json`` the run was trained with (migrated if it predates a field's move)."""
        if not self.config.is_file():
            raise CheckpointNotFound(f"{self.config} not found: is {self.path} a gptjax run directory?")
        return RunConfig.from_dict(json.loads(self.config.read_text()))

    def write_config(self, cfg: RunConfig) -> Path:
        return write_atomic(self.config, cfg.to_json())

    def read_summary(self) -> dict | None:
        return json.loads(self.summary.read_text()) if self.summary.is_file() else None

    def write_summary(self, summary: dict) -> Path:
        return write_atomic(self.summary, json.dumps(summary, indent=2))

    def is_finished(self, steps: int) -> bool:
        """The run's summary reports step ``steps`` as its final step."""
        summary = self.read_summary()
        return summary is not None and summary.get("final_step") == steps


def _sibling(path: Path, kind: str) -> Path:
    """A hidden name beside ``path`` that no other process or call uses."""
    return path.parent / f".{path.name}.{kind}-{os.getpid()}-{time.time_ns()}"


def write_atomic(path: str | Path, content: str | bytes) -> Path:
    """Write a file whole or not at all: a temporary sibling, then a rename over ``path``."""
    path = Path(path)
    tmp = _sibling(path, "tmp")
    try:
        tmp.write_bytes(content) if isinstance(content, bytes) else tmp.write_text(content)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def atomic_directory(dest: str | Path) -> Iterator[Path]:
    """Build directory ``dest`` whole or not at all: the block fills a temporary sibling, which is renamed to
    ``dest`` when the block ends without an error (a previous ``dest`` is replaced only once the new one is in
    place: moved aside, then removed); on an error the sibling is removed and ``dest`` is as it was. Whether an
    existing ``dest`` may be replaced is the caller's decision."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(dest, "tmp")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = _sibling(dest, "old") if dest.exists() else None
    if old is not None:
        dest.rename(old)
    try:
        tmp.rename(dest)
    except BaseException:
        if old is not None:
            old.rename(dest)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
