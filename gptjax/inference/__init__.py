"""Inference (imports ``config``, ``sharding``, ``model``): sampling with greedy, temperature, top-k and top-p."""

from gptjax.inference.sample import filter_logits, generate, sample_token

__all__ = ["filter_logits", "generate", "sample_token"]
