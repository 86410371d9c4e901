"""Exact and near-duplicate documents, in one streaming pass (GPT-3 §2.2: fuzzy deduplication with MinHash LSH).

A document is an *exact* duplicate when its text, lower-cased with whitespace collapsed, was seen before; a *near*
duplicate when the Jaccard similarity of its word 5-gram sets with an earlier kept document, estimated from
``num_perm`` MinHash values, is at least ``threshold``. Candidates come from locality-sensitive hashing (the
signature cut into ``bands`` of ``rows``, chosen for the threshold as datasketch does: the least weighted sum of
the false-positive and false-negative probabilities), and every candidate is verified on the signatures, so a
band collision alone never drops a document. The first occurrence is kept, later ones dropped: the result depends
only on the order of the stream, which makes it resumable. Own numpy code rather than datasketch: one vectorised
hash over all of a document's shingles and permutations (no per-shingle Python update), no dependency; the
measured precision and recall on planted near-duplicates are in ``docs/training.md``.
"""

from __future__ import annotations

import hashlib
import re
import zlib

import numpy as np

SHINGLE_WORDS = 5


def shingles(text: str, n: int = SHINGLE_WORDS) -> np.ndarray:
    """The 32-bit hashes of the document's word ``n``-grams (the whole text when shorter), lower-cased."""
    words = text.lower().split()
    grams = [" ".join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))]
    return np.unique(np.fromiter((zlib.crc32(g.encode()) for g in grams), np.uint64, len(grams)))


def jaccard(a: str, b: str) -> float:
    """The exact Jaccard similarity of two documents' shingle sets (what the signatures estimate)."""
    x, y = set(shingles(a).tolist()), set(shingles(b).tolist())
    return len(x & y) / max(1, len(x | y))


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """``(bands, rows)`` with ``bands * rows <= num_perm`` minimising the false-positive probability below the
    threshold plus the false-negative probability above it (integrated over the similarity)."""
    s = np.linspace(0, 1, 1001)
    best, out = np.inf, (1, num_perm)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            p = 1 - (1 - s ** r) ** b  # probability that a pair of similarity s shares a band
            fp = np.trapezoid(np.where(s < threshold, p, 0), s)
            fn = np.trapezoid(np.where(s >= threshold, 1 - p, 0), s)
            if fp + fn < best:
                best, out = fp + fn, (b, r)
    return out


class Deduplicator:
    """Feed documents in stream order to :meth:`check`; it says whether each is a duplicate of an earlier one."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 256, seed: int = 0):
        if not 0 < threshold <= 1:
            raise ValueError(f"dedup threshold {threshold} must be in (0, 1]")
        self.threshold, self.num_perm = threshold, num_perm
        rng = np.random.default_rng(seed)  # multiply-shift hashing (Dietzfelbinger): 64-bit a (odd) and b
        self.a = rng.integers(0, np.iinfo(np.uint64).max, num_perm, dtype=np.uint64, endpoint=True) | np.uint64(1)
        self.b = rng.integers(0, np.iinfo(np.uint64).max, num_perm, dtype=np.uint64, endpoint=True)
        self.bands, self.rows = lsh_bands(threshold, num_perm)
        self.buckets: list[dict[bytes, list[int]]] = [{} for _ in range(self.bands)]
        self.signatures: list[np.ndarray] = []
        self.exact: set[bytes] = set()
        self.dropped = {"exact duplicate": 0, "near duplicate": 0}

    def signature(self, text: str) -> np.ndarray:
        x = shingles(text)[:, None]
        with np.errstate(over="ignore"):  # the products wrap modulo 2^64, as the hash family means them to
            return ((self.a * x + self.b) >> np.uint64(32)).min(axis=0).astype(np.uint32)

    def check(self, text: str) -> str | None:
        """None: keep the document (it is remembered); else why it is dropped."""
        key = hashlib.blake2b(re.sub(r"\s+", " ", text.strip().lower()).encode(), digest_size=16).digest()
        if key in self.exact:
            self.dropped["exact duplicate"] += 1
            return "exact duplicate"
        sig = self.signature(text)
        keys = [sig[i * self.rows:(i + 1) * self.rows].tobytes() for i in range(self.bands)]
        candidates = {c for band, k in zip(self.buckets, keys) for c in band.get(k, ())}
        for c in sorted(candidates):
            if np.mean(self.signatures[c] == sig) >= self.threshold:
                self.dropped["near duplicate"] += 1
                return "near duplicate"
        self.exact.add(key)
        doc = len(self.signatures)
        self.signatures.append(sig)
        for band, k in zip(self.buckets, keys):
            band.setdefault(k, []).append(doc)
        return None


def plant_near_duplicates(bases: list[str], rates: tuple[float, ...], seed: int = 0) -> tuple[list[str], list[int]]:
    """A corpus to measure deduplication on: ``bases`` followed, for each base, by one copy per edit rate in
    ``rates`` (each word replaced, with that probability, by a word drawn from the bases' vocabulary); and, for each
    document, the index of its base (-1 for the bases themselves)."""
    import random

    rng = random.Random(seed)
    vocab = sorted({w for b in bases for w in b.split()})
    docs, origin = list(bases), [-1] * len(bases)
    for i, b in enumerate(bases):
        for r in rates:
            docs.append(" ".join(rng.choice(vocab) if rng.random() < r else w for w in b.split()))
            origin.append(i)
    return docs, origin


def precision_recall(docs: list[str], origin: list[int], threshold: float, **kw) -> dict:
    """Deduplicate ``docs`` (from :func:`plant_near_duplicates`) at ``threshold``: precision and recall of the drops
    against the truth (a copy whose exact Jaccard similarity with its base is at least the threshold)."""
    d = Deduplicator(threshold, **kw)
    dropped = [d.check(x) is not None for x in docs]
    truth = [o >= 0 and jaccard(x, docs[o]) >= threshold for x, o in zip(docs, origin)]
    tp = sum(p and t for p, t in zip(dropped, truth))
    return {"threshold": threshold, "precision": tp / max(1, sum(dropped)), "recall": tp / max(1, sum(truth)),
            "dropped": dict(d.dropped), "duplicates": sum(truth), "documents": len(docs),
            "bands": d.bands, "rows": d.rows, "num_perm": d.num_perm}
