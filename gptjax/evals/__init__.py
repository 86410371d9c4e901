"""Evaluation (imports ``config``, ``sharding``, ``model``): held-out loss over fixed batches and the unigram
baseline; perplexity and bits-per-byte of a text with a sliding window."""

from gptjax.evals.loss import evaluate, local_rows, unigram_cross_entropy
from gptjax.evals.perplexity import TextScore, score_ids, score_text

__all__ = ["TextScore", "evaluate", "local_rows", "score_ids", "score_text", "unigram_cross_entropy"]
