"""Evaluation (imports ``config``, ``sharding``, ``model``): held-out loss over fixed batches and the unigram
baseline."""

from gptjax.evals.loss import evaluate, local_rows, unigram_cross_entropy

__all__ = ["evaluate", "local_rows", "unigram_cross_entropy"]
