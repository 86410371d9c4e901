"""TensorBoard event files (tensorboardX), so a run opens in ``tensorboard --logdir runs/``."""

from __future__ import annotations

import sys
from pathlib import Path

from gptjax.reporting.metrics import finite_scalars


def _summary_writer_class():
    """tensorboardX's ``SummaryWriter``, imported without torch. tensorboardX imports torch whenever it is installed
    (the interop extra installs it), only to accept torch tensors, which scalars never are; that import was 3.2 s of
    every training run's start here, against 0.2 s without it. torch is hidden for this one import unless a caller
    has already loaded it, and can be imported normally afterwards."""
    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX catches
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class TensorBoardWriter:
    def __init__(self, logdir: str | Path, purge_step: int | None = None):
        """``purge_step``: hide events at or after this step written by an earlier attempt (a resumed run)."""
        self.writer = _summary_writer_class()(logdir=str(logdir), flush_secs=30, purge_step=purge_step)

    def scalars(self, step: int, prefix: str, values: dict) -> None:
        for name, v in finite_scalars(values).items():
            self.writer.add_scalar(f"{prefix}/{name}", v, step)

    def close(self) -> None:
        self.writer.close()
