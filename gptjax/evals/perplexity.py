"""Perplexity and bits-per-byte of a text, with a sliding window for texts longer than the context.

The text is tokenized and preceded by the end-of-sequence token, which is what the model saw before every
document in training (documents are separated by it), so every token of the text is scored, the first one
included, and bits-per-byte divide the whole text's log-loss by its UTF-8 bytes: ``bpb = nll_nats / (ln 2 *
bytes)``. Unlike perplexity, bits-per-byte do not depend on the tokenizer, so runs with different vocabularies
compare.

Sliding window (the evaluation of Hugging Face's perplexity guide and of GPT-2's long-text numbers): windows of
``context`` tokens start every ``stride`` tokens; each scores only the tokens no earlier window scored, so every
token is scored exactly once, and every token after the first window has at least ``context - stride`` tokens
before it. ``stride = context`` gives disjoint windows (fast, the least context); a smaller stride more context
at ``context / stride`` times the cost. Windows are scored ``batch_size`` at a time in one compiled shape.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np

from gptjax.evals.loss import evaluate
from gptjax.model.sharded import ShardedModel


@dataclasses.dataclass(frozen=True)
class TextScore:
    """The summed negative log-likelihood (nats) of ``tokens`` tokens covering ``bytes`` UTF-8 bytes."""

    nll: float
    tokens: int
    bytes: int
    context: int
    stride: int
    windows: int

    @property
    def loss(self) -> float:
        """Nats per token."""
        return self.nll / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / (math.log(2) * self.bytes)

    def as_dict(self) -> dict:
        return {"loss": self.loss, "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte,
                **dataclasses.asdict(self)}


def windows(n_targets: int, context: int, stride: int) -> list[tuple[int, int]]:
    """``(start, first_scored)`` of each window over a sequence with ``n_targets`` tokens to predict (inputs
    ``ids[start:start + context]`` predict ``ids[start + 1:start + context + 1]``; the window scores the targets
    from index ``first_scored`` on, those its predecessors did not)."""
    if not 0 < stride <= context:
        raise ValueError(f"stride must be in [1, context={context}], got {stride}")
    out, scored, start = [], 0, 0
    while scored < n_targets:
        out.append((start, scored))
        scored = min(start + context, n_targets)
        start += stride
    return out


def score_ids(model: ShardedModel, params: Any, ids: Sequence[int], context: int | None = None,
              stride: int | None = None, batch_size: int = 8, n_bytes: int = 0) -> TextScore:
    """The summed log-loss of ``ids[1:]`` given what precedes each (``ids[0]`` is context only), through windows
    of ``context`` tokens (default the model's ``max_seq_len``) every ``stride`` (default ``context // 2``)."""
    context = model.cfg.max_seq_len if context is None else context
    stride = max(1, context // 2) if stride is None else stride
    if context > model.cfg.max_seq_len:
        raise ValueError(f"context={context} is longer than the model's max_seq_len={model.cfg.max_seq_len}")
    ids = np.asarray(ids, np.int32)
    n_targets = len(ids) - 1
    if n_targets < 1:
        raise ValueError("the text has no token to score")
    rows = []
    for start, first in windows(n_targets, context, stride):
        inputs, targets, mask = (np.zeros(context, np.int32), np.zeros(context, np.int32),
                                 np.zeros(context, np.float32))
        end = min(start + context, n_targets)
        inputs[:end - start] = ids[start:end]
        targets[:end - start] = ids[start + 1:end + 1]
        mask[first - start:end - start] = 1.0  # target index t sits at position t - start
        rows.append((inputs, targets, mask))
    batches = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        chunk += [(np.zeros(context, np.int32),) * 2 + (np.zeros(context, np.float32),)] * (batch_size - len(chunk))
        batches.append({k: np.stack([r[j] for r in chunk]) for j, k in enumerate(("inputs", "targets", "loss_mask"))})
    nll = evaluate(model, params, batches) * n_targets  # evaluate's token-weighted mean, times the tokens
    return TextScore(nll, n_targets, n_bytes, context, stride, len(rows))


def score_text(model: ShardedModel, params: Any, tokenizer: Any, text: str, context: int | None = None,
               stride: int | None = None, batch_size: int = 8) -> TextScore:
    """Perplexity and bits-per-byte of ``text`` (every token scored, after the end-of-sequence token that
    precedes a document in training)."""
    if not text:
        raise ValueError("the text is empty")
    ids = [tokenizer.eos_id] + list(tokenizer.encode(text))
    return score_ids(model, params, ids, context, stride, batch_size, n_bytes=len(text.encode("utf-8")))


def score_split(run: Any, split: str = "val", context: int | None = None, stride: int | None = None,
                batch_size: int = 8) -> TextScore:
    """Perplexity and bits-per-byte of a loaded run's (``checkpoint.load_run``) prepared ``split``: its token
    stream after an end-of-sequence token, the bytes counted as the tokens' text (``target_bytes``)."""
    from gptjax.data import run_corpus
    from gptjax.evals.loss import target_bytes

    cfg, tokenizer = run.config, run.tokenizer
    stream = run_corpus(cfg.data, cfg.model.vocab_size, run.run_dir).stream(split)
    ids = np.concatenate([[tokenizer.eos_id], stream])
    whole = {"inputs": ids[None, :-1], "targets": ids[None, 1:], "loss_mask": np.ones((1, len(ids) - 1))}
    return score_ids(run.model, run.params, ids, context, stride, batch_size, target_bytes([whole], tokenizer))
