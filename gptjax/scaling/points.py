"""The table the scaling fits work on: one row per (run, evaluation) with parameters N, tokens D, compute C and
loss L. Rows flagged ``final`` (a run's last evaluation) feed approaches 2 and 3; whole runs (every row of a
``run``) are the loss curves approach 1 uses.

CSV columns (names configurable): ``params``, ``tokens``, ``loss``, optionally ``flops`` (default 6 N D),
``run``, ``final`` (1/0; default: every row is final), ``budget`` (the nominal compute an IsoFLOP point was
planned for; default: points are grouped by their compute, within 5%).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from gptjax.reporting.metrics import read_metrics
from gptjax.runs import RunDir, write_atomic
from gptjax.scaling.sizing import scaling_params


class ScalingInputError(ValueError):
    """The points (or a fit file) cannot be used; the message says which row, column or file, and why."""


def flops_6nd(params, tokens):
    return 6.0 * np.asarray(params, float) * np.asarray(tokens, float)


@dataclasses.dataclass
class Points:
    params: np.ndarray
    tokens: np.ndarray
    flops: np.ndarray
    loss: np.ndarray
    run: list[str]
    final: np.ndarray  # bool
    budget: np.ndarray | None = None
    source: str = "points"

    def __len__(self) -> int:
        return len(self.loss)

    def take(self, rows) -> "Points":
        """The points at integer ``rows`` (repeats allowed: bootstrap resamples)."""
        rows = np.asarray(rows, int)
        return dataclasses.replace(
            self, params=self.params[rows], tokens=self.tokens[rows], flops=self.flops[rows], loss=self.loss[rows],
            run=[self.run[i] for i in rows], final=self.final[rows],
            budget=None if self.budget is None else self.budget[rows])

    def select(self, mask) -> "Points":
        return self.take(np.flatnonzero(np.asarray(mask, bool)))

    def finals(self) -> "Points":
        return self.select(self.final)

    def drop_highest(self, k: int) -> "Points":
        """Without the ``k`` highest-loss points (the usual outlier rule for approach 3)."""
        if k <= 0:
            return self
        keep = np.ones(len(self), bool)
        keep[np.argsort(-self.loss, kind="stable")[:k]] = False
        return self.select(keep)

    def budgets(self, rel_tol: float = 0.05) -> np.ndarray:
        """The IsoFLOP group of each point: its ``budget`` if given, else its compute clustered within
        ``rel_tol`` (sorted compute values closer than that in log space join a group)."""
        if self.budget is not None:
            return self.budget
        order = np.argsort(self.flops)
        group = np.empty(len(self))
        start = 0
        for i in range(1, len(order) + 1):
            if i == len(order) or math.log(self.flops[order[i]] / self.flops[order[i - 1]]) > rel_tol:
                members = order[start:i]
                group[members] = float(np.exp(np.mean(np.log(self.flops[members]))))
                start = i
        return group


def _num(value: str, col: str, row: int, where: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ScalingInputError(f"{where}: row {row}, column {col!r}: {value!r} is not a number") from None
    if not math.isfinite(x):
        raise ScalingInputError(f"{where}: row {row}, column {col!r} is {value} (NaN/inf); remove or fix the row")
    return x


def points_from_rows(rows: Sequence[dict], *, params_col: str = "params", tokens_col: str = "tokens",
                     loss_col: str = "loss", flops_col: str | None = None, run_col: str = "run",
                     final_col: str = "final", budget_col: str = "budget", where: str = "points") -> Points:
    """Validate rows (dicts of strings or numbers) into ``Points``: one clear error for a missing column or a
    missing, non-numeric, NaN or non-positive value."""
    if not rows:
        raise ScalingInputError(f"{where}: no rows")
    columns = list(rows[0].keys())
    required = [params_col, tokens_col, loss_col] + ([flops_col] if flops_col else [])
    missing = [c for c in required if c not in columns]
    if missing:
        raise ScalingInputError(f"{where}: missing column(s) {', '.join(map(repr, missing))}; the columns are "
                                f"{', '.join(columns)} (name yours with --params-col/--tokens-col/--loss-col/"
                                "--flops-col)")
    cols = {k: [] for k in ("params", "tokens", "loss", "flops", "budget")}
    names = {"params": params_col, "tokens": tokens_col, "loss": loss_col, "flops": flops_col}
    for i, r in enumerate(rows, start=2 if where.endswith(".csv") else 1):  # CSV: row 1 is the header
        for key, col in names.items():
            if col is None:
                continue
            x = _num(r.get(col), col, i, where)
            if x <= 0:
                raise ScalingInputError(f"{where}: row {i}, column {col!r} is {x:g}; parameters, tokens, compute "
                                        "and loss must be > 0")
            cols[key].append(x)
        if budget_col in columns and r.get(budget_col) not in (None, ""):
            cols["budget"].append(_num(r[budget_col], budget_col, i, where))
    n, d, loss = (np.asarray(cols[k], float) for k in ("params", "tokens", "loss"))
    flops = np.asarray(cols["flops"], float) if flops_col else flops_6nd(n, d)
    run = [str(r.get(run_col, i)) for i, r in enumerate(rows)]
    final = np.asarray([str(r.get(final_col, "1")).strip().lower() in ("1", "true", "yes", "1.0")
                        for r in rows]) if final_col in columns else np.ones(len(rows), bool)
    budget = np.asarray(cols["budget"], float) if len(cols["budget"]) == len(rows) else None
    return Points(n, d, flops, loss, run, final, budget, source=where)


def read_points(path: str | Path, **cols) -> Points:
    path = Path(path)
    if not path.is_file():
        raise ScalingInputError(f"points file {path} does not exist")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return points_from_rows(rows, where=str(path), **cols)


POINT_COLUMNS = ("run", "params", "tokens", "flops", "loss", "final", "step", "budget")


def write_points(rows: Iterable[dict], path: str | Path) -> Path:
    rows = list(rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = [c for c in POINT_COLUMNS if any(c in r for r in rows)]
    cols += sorted({k for r in rows for k in r} - set(cols))
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    return write_atomic(path, buf.getvalue())


def collect_run(run_dir: str | Path, params_fn=None, flops_fn=None) -> list[dict]:
    """The rows of one finished run directory: every validation evaluation (tokens = step x batch x seq_len),
    the last flagged ``final``. ``params_fn(ModelConfig)`` gives N (default: non-embedding parameters);
    ``flops_fn(cfg, params, tokens)`` gives C (default 6 N D)."""
    run = RunDir(run_dir)
    if not run.config.is_file() or not run.metrics.is_file():
        raise ScalingInputError(f"{run} is not a gptjax run directory (no {run.CONFIG} or {run.METRICS})")
    cfg = run.read_config()
    evals = [r for r in read_metrics(run.metrics) if "val_loss" in r]
    if not evals:
        raise ScalingInputError(f"{run} has no validation loss yet ({run.METRICS} has no val_loss rows)")
    n = (params_fn or scaling_params)(cfg.model)
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
    rows = []
    for i, r in enumerate(evals):
        d = r["step"] * tokens_per_step
        c = flops_fn(cfg, n, d) if flops_fn else 6.0 * n * d
        rows.append({"run": run.name, "params": n, "tokens": d, "flops": c, "loss": r["val_loss"],
                     "final": int(i == len(evals) - 1 and r["step"] >= cfg.train.steps), "step": r["step"]})
    return rows
