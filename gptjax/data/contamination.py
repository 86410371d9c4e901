"""Contamination: training documents that share a 13-gram with evaluation texts (GPT-3 §4 and Appendix C).

Text is normalised to lower-case alphanumeric words; a training document is contaminated when any of its word
``n``-grams (13, as GPT-3) occurs in any evaluation text. Evaluation files are read whole (they are small): plain
text, or JSONL whose rows' string values (``context``, ``choices``, ``target``, ... of any task format) are joined
into one text per row. The n-grams are kept as 64-bit hashes.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Iterable

from gptjax.data.jsonl import jsonl_rows
from gptjax.data.sources import SourceError

NGRAM = 13
_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    """The text's lower-cased alphanumeric words (how contamination and the quality filter read text)."""
    return _WORD.findall(text.lower())


def ngram_hashes(text: str, n: int = NGRAM) -> set[int]:
    words_ = words(text)
    return {int.from_bytes(hashlib.blake2b(" ".join(words_[i:i + n]).encode(), digest_size=8).digest(), "little")
            for i in range(len(words_) - n + 1)}


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def eval_texts(path: str | Path) -> list[str]:
    """The texts of one evaluation file (module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"evaluation file {path} does not exist")
    try:
        if path.name.endswith((".jsonl", ".ndjson")):
            return [" ".join(_strings(row)) for _, row, _ in jsonl_rows(path, SourceError)]
        return [path.read_text(encoding="utf-8")]
    except UnicodeDecodeError as e:
        raise SourceError(f"evaluation file {path} is not UTF-8 ({e})") from None


class ContaminationCheck:
    """The n-grams of the evaluation files; :meth:`contaminated` tells whether a training text shares one."""

    def __init__(self, paths: Iterable[str | Path], n: int = NGRAM):
        self.n = n
        self.ngrams: set[int] = set()
        self.files = []
        for p in paths:
            texts = eval_texts(p)
            grams = set().union(*(ngram_hashes(t, n) for t in texts)) if texts else set()
            self.files.append({"path": str(p), "texts": len(texts), "ngrams": len(grams)})
            self.ngrams |= grams
        if not self.ngrams:
            raise SourceError(f"the evaluation files {[f['path'] for f in self.files]} hold no {n}-word text")

    def contaminated(self, text: str) -> bool:
        return not self.ngrams.isdisjoint(ngram_hashes(text, self.n))
