"""TensorBoard event files (tensorboardX), so a run opens in ``tensorboard --logdir runs/``."""

from __future__ import annotations

import math
from pathlib import Path


class TensorBoardWriter:
    def __init__(self, logdir: str | Path, purge_step: int | None = None):
        """``purge_step``: hide events at or after this step written by an earlier attempt (a resumed run)."""
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(logdir=str(logdir), flush_secs=30, purge_step=purge_step)

    def scalars(self, step: int, prefix: str, values: dict) -> None:
        for name, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self.writer.add_scalar(f"{prefix}/{name}", v, step)

    def close(self) -> None:
        self.writer.close()
