"""Sweeps as a library: declare runs, run them resumably (local worker processes or a SLURM job array), collect.

An experiment file declares its runs, a ``Sweep`` runs what is not finished, and ``collect`` reads the points::

    from gptjax.experiments import Sweep, isoflop_runs
    sweep = Sweep("runs/isoflop", isoflop_runs(budgets, make_config, vocab_size=352, seq_len=128))
    sweep.run(workers=2)                     # or: sweep.slurm(submit=True) on a cluster
    rows = sweep.collect()                   # scaling-law rows (gptjax.scaling), each with its run's meta

* A run is a name, a ``RunConfig`` and optional ``meta`` (e.g. its FLOP budget), carried into the collected rows.
  Its run directory is ``<root>/<name>``, whatever the config said.
* Resumable: a finished run is skipped (its summary reports the last step); a killed one continues from its
  latest checkpoint (``resume="auto"``), so running the sweep again finishes it.
* ``branch=(run, step)``: start from another run's checkpoint at ``step`` (a WSD cooldown branched off a constant-lr
  run); branches run after the runs they branch from.
* ``Sweep.slurm`` writes every run's config under ``<root>/.sweep/`` and an ``sbatch --array`` job through
  ``gptjax.launch`` (one array task per run, one process each; branches in a second array that waits for the
  first), each task running ``python -m gptjax.experiments <root> <index>``.
"""

from gptjax.experiments.mup import coord_check, width_model  # μP: the coordinate check and its models
from gptjax.experiments.sweep import (SWEEP_DIR, Run, Sweep, branch_from, fit_rows, isoflop_runs, predict, run_index,
                                      train_run)

__all__ = ["Run", "SWEEP_DIR", "Sweep", "branch_from", "coord_check", "fit_rows", "isoflop_runs", "predict",
           "run_index", "train_run", "width_model"]
