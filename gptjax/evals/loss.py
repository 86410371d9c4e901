"""Held-out loss: the token-weighted mean next-token loss of a model over fixed batches, and the unigram baseline
it is read against."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import numpy as np

from gptjax.model.sharded import ShardedModel


def local_rows(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's rows of a global host batch (every process holds the same evaluation batches)."""
    n, i = jax.process_count(), jax.process_index()
    rows = next(iter(batch.values())).shape[0] // n
    return {k: v[i * rows: (i + 1) * rows] for k, v in batch.items()}


def evaluate(model: ShardedModel, params: Any, batches: Sequence[Mapping[str, np.ndarray]]) -> float:
    """Mean next-token loss (nats per target token where ``loss_mask`` is set) over ``batches``."""
    out = jax.device_get([model.eval_step(params, model.global_batch(local_rows(b))) for b in batches])
    tokens = sum(float(o["tokens"]) for o in out)
    return sum(float(o["nll_sum"]) for o in out) / max(tokens, 1.0)


def target_bytes(batches: Sequence[Mapping[str, np.ndarray]], tokenizer: Any) -> int:
    """UTF-8 bytes of the text the scored targets of ``batches`` stand for (``loss_mask`` set), so that
    ``nll_sum / (ln 2 * bytes)`` is bits per byte: each token counts its piece's bytes, less the word-start space
    sentencepiece adds at the start of a document (after ``</s>``), which is not in the text."""
    size_V, word_start_V = tokenizer.piece_bytes()
    total = 0
    for b in batches:
        t, mask = b["targets"], np.asarray(b["loss_mask"]) > 0
        after_eos = np.asarray(b["inputs"]) == tokenizer.eos_id
        total += int(((size_V[t] - (after_eos & word_start_V[t])) * mask).sum())
    return total


def unigram_cross_entropy(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of the validation tokens under the train split's unigram distribution
    (add-one smoothed): the loss of the best model that ignores context."""
    counts = np.bincount(train.astype(np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[val.astype(np.int64)].mean())
