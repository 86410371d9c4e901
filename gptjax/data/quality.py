"""A quality filter as GPT-3's (Brown et al. 2020, Appendix A): logistic regression on hashed n-gram features,
"good" reference text against the raw pool, documents kept by the Pareto rule ``np.random.pareto(9) > 1 - score``.

Features: lower-cased alphanumeric words (read as contamination reads them) and word pairs, hashed (CRC-32) into
``2**18`` buckets, counts scaled to unit length (GPT-3 used Spark's HashingTF). The classifier is L2-regularised
logistic regression fitted with L-BFGS (scipy, which JAX already needs). The Pareto draw of a document is seeded by
a hash of its text, so a preparation keeps the same documents every time it runs (and resumes). Most documents the
classifier doubts are dropped, and some survive: the Pareto rule keeps a document of score ``s`` with probability
``(2 - s)^-9``.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

from gptjax.data.contamination import words
from gptjax.data.sources import SourceError

FEATURES = 1 << 18
PARETO_ALPHA = 9.0


def features(texts: Sequence[str], n_features: int = FEATURES):
    """The hashed, unit-length n-gram count rows of ``texts`` (a scipy CSR matrix)."""
    from scipy import sparse

    rows, cols, vals = [], [], []
    for i, text in enumerate(texts):
        words_ = words(text)
        grams = words_ + [a + " " + b for a, b in zip(words_, words_[1:])]
        if not grams:
            continue
        idx, counts = np.unique([zlib.crc32(g.encode()) % n_features for g in grams], return_counts=True)
        rows.append(np.full(len(idx), i))
        cols.append(idx)
        vals.append(counts / np.sqrt(np.sum(counts.astype(np.float64) ** 2)))
    if not rows:
        return sparse.csr_matrix((len(texts), n_features))
    return sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                             shape=(len(texts), n_features))


class QualityClassifier:
    """``score(texts)``: the probability that each text is like the good reference; ``keep(text)``: the Pareto
    rule."""

    def __init__(self, weights: np.ndarray, bias: float, meta: dict | None = None):
        self.weights, self.bias, self.meta = weights.astype(np.float32), float(bias), meta or {}

    @classmethod
    def fit(cls, good: Sequence[str], raw: Sequence[str], l2: float = 1e-6) -> "QualityClassifier":
        from scipy.optimize import minimize

        if not good or not raw:
            raise SourceError(f"the quality filter needs good and raw documents (got {len(good)} and {len(raw)})")
        X = features([*good, *raw])
        y = np.concatenate([np.ones(len(good)), np.zeros(len(raw))])
        sample_weight = np.where(y == 1, 0.5 / len(good), 0.5 / len(raw))  # the two classes weigh the same

        def loss(wb):
            w, b = wb[:-1], wb[-1]
            z = X @ w + b
            p = 1 / (1 + np.exp(-z))
            nll = np.sum(sample_weight * (np.logaddexp(0, z) - y * z))
            g = sample_weight * (p - y)
            return nll + 0.5 * l2 * w @ w, np.concatenate([X.T @ g + l2 * w, [g.sum()]])

        result = minimize(loss, np.zeros(X.shape[1] + 1), jac=True, method="L-BFGS-B", options={"maxiter": 300})
        return cls(result.x[:-1], result.x[-1], {"good": len(good), "raw": len(raw), "l2": l2,
                                                 "converged": bool(result.success)})

    def score(self, texts: Sequence[str]) -> np.ndarray:
        z = features(texts) @ self.weights.astype(np.float64) + self.bias
        return 1 / (1 + np.exp(-z))

    def keep(self, text: str, score: float | None = None) -> bool:
        """GPT-3's rule, with the Pareto draw seeded by the text."""
        s = float(self.score([text])[0]) if score is None else score
        seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
        return bool(np.random.default_rng(seed).pareto(PARETO_ALPHA) > 1 - s)

    def save(self, path: str | Path) -> None:
        with open(path, "wb") as f:
            np.savez_compressed(f, weights=self.weights, bias=np.float64(self.bias), meta=json.dumps(self.meta))

    @classmethod
    def load(cls, path: str | Path) -> "QualityClassifier":
        path = Path(path)
        try:
            z = np.load(path)
            return cls(z["weights"], float(z["bias"]), json.loads(str(z["meta"])))
        except (OSError, KeyError, ValueError) as e:
            raise SourceError(f"{path} is not a quality classifier (gptjax-data quality-train writes one): {e}") \
                from None


def train_quality_classifier(good_paths: Sequence[str | Path], raw_paths: Sequence[str | Path], *,
                             text_field: str = "text", held_out: float = 0.2, max_docs: int = 50_000,
                             seed: int = 0) -> QualityClassifier:
    """GPT-3's classifier fitted on all but a ``held_out`` share of each side (at most ``max_docs`` documents of
    each, shuffled with ``seed``), with its held-out accuracy and the share of each side the Pareto rule keeps in
    ``meta`` (``held_out_accuracy``, ``kept_by_pareto``) when both held-out shares are non-empty."""
    import itertools
    import random

    from gptjax.data.sources import read_documents

    def docs(paths):
        texts = [d.text for p in paths for d in itertools.islice(read_documents(p, text_field=text_field),
                                                                 max_docs)][:max_docs]
        random.Random(seed).shuffle(texts)
        cut = int(len(texts) * (1 - held_out))
        return texts[:cut], texts[cut:]

    (good, good_test), (raw, raw_test) = docs(good_paths), docs(raw_paths)
    clf = QualityClassifier.fit(good, raw)
    if good_test and raw_test:
        sg, sr = clf.score(good_test), clf.score(raw_test)
        clf.meta["held_out_accuracy"] = float((np.sum(sg > 0.5) + np.sum(sr <= 0.5)) / (len(sg) + len(sr)))
        clf.meta["held_out"] = {"good": len(good_test), "raw": len(raw_test)}
        clf.meta["kept_by_pareto"] = {"good": float(np.mean([clf.keep(t, s) for t, s in zip(good_test, sg)])),
                                      "raw": float(np.mean([clf.keep(t, s) for t, s in zip(raw_test, sr)]))}
    return clf
