"""Metrics to a JSONL file (one object per line) and to the console."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from gptjax.runs import read_metrics, write_atomic  # noqa: F401  (read_metrics lives with the run directory)


def _clean(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def finite_scalars(values: dict) -> dict:
    """The entries of ``values`` that a chart can plot: finite numbers (not bools). TensorBoard and W&B take these."""
    return {k: v for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class MetricsLog:
    """Appends ``{"step": ..., "time": ..., **metrics}`` lines to ``path`` (append mode, so resumed runs continue);
    rows a resumed run replaces go to ``dropped``."""

    def __init__(self, path: str | Path | None, dropped: str | Path | None = None):
        self.path = Path(path) if path else None
        self.dropped = Path(dropped) if dropped else None
        self.rows: list[dict] = []  # this session's rows
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, step: int, **metrics: Any) -> dict:
        row = {"step": int(step), "time": round(time.time(), 3), **{k: _clean(v) for k, v in metrics.items()}}
        if self.path:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        self.rows.append(row)
        return row


    def truncate_after(self, step: int) -> int:
        """Keep the rows up to ``step`` (a resumed run writes the later ones again); the dropped rows are
        appended to ``dropped`` (if given). Returns how many were dropped."""
        if not (self.path and self.path.exists()):
            return 0
        lines = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
        keep, drop = [], []
        for ln in lines:
            try:
                (keep if json.loads(ln)["step"] <= step else drop).append(ln)
            except (ValueError, KeyError, TypeError):
                drop.append(ln)  # a line cut short by a crash
        if drop:
            if self.dropped:
                with self.dropped.open("a") as f:
                    f.write("\n".join(drop) + "\n")
            write_atomic(self.path, "".join(ln + "\n" for ln in keep))
        return len(drop)


def format_row(row: dict) -> str:
    parts = []
    for k, v in row.items():
        if k == "time":
            continue
        parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)
