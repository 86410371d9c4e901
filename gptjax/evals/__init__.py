"""Evaluation (imports ``config``, ``sharding``, ``model``): held-out loss over fixed batches."""

from gptjax.evals.loss import evaluate, local_rows

__all__ = ["evaluate", "local_rows"]
