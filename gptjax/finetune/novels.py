"""A fine-tuning task from real text that ships with the repository: which of Jane Austen's six novels a passage
comes from (classification, 6 classes), built from the embedded corpus.

Passages are runs of whole sentences of one chapter, 30 to 60 words, that do not overlap. The training split
comes from the default data split's training chapters, the test split from its validation chapters, so a model
pretrained with the default split has never seen a test passage (it has seen the training ones: fine-tuning data
a pretrained model has read is the ordinary case). A novel starts at its first chapter heading (``CHAPTER I``,
``CHAPTER 1`` or ``Chapter 1`` not under a ``VOLUME II`` / ``VOLUME III`` heading, which restart the numbering
inside *Emma*).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Sequence

from gptjax.config import DataConfig
from gptjax.data import corpus_documents, train_val_documents
from gptjax.evals.tasks import paragraphs, sentences

NOVELS = ("Emma", "Mansfield Park", "Northanger Abbey", "Persuasion", "Pride and Prejudice",
          "Sense and Sensibility")
_FIRST_CHAPTER = re.compile(r"^(?:CHAPTER|Chapter) (?:I|1)$", re.MULTILINE)


def novel_of_each_document(text: str, docs: Sequence[str]) -> list[int]:
    starts = [m.start() for m in _FIRST_CHAPTER.finditer(text)
              if not re.search(r"VOLUME III?\s*$", text[max(0, m.start() - 40):m.start()])]
    if len(starts) != len(NOVELS):
        raise ValueError(f"found {len(starts)} novels in the corpus, expected {len(NOVELS)}")
    out, pos = [], 0
    for doc in docs:
        pos = text.index(doc[:200], pos)
        out.append(sum(s <= pos for s in starts) - 1)
    return out


def passages(doc: str, rng: random.Random) -> list[str]:
    sents = [s for p in paragraphs(doc) for s in sentences(p)]
    out, i = [], 0
    while i < len(sents):
        j, words = i, 0
        while j < len(sents) and words < 30:
            words += len(sents[j].split())
            j += 1
        if 30 <= words <= 60:
            out.append(" ".join(sents[i:j]))
        i = j + rng.randint(0, 2)  # a gap, so neighbouring passages are not one text cut in two
    return out


def build(per_novel_train: int = 300, seed: int = 0) -> dict[str, list[dict]]:
    """``{"train": rows, "test": rows}`` (classification rows ``{"text", "label"}``; label = index in NOVELS), each
    split balanced: ``per_novel_train`` training passages of each novel; in the test split, as many passages of each
    novel as the rarest novel of the validation chapters has (the default split's 14 validation chapters come from
    four of the six novels, so chance there is 1/4 of the test passages, not 1/6)."""
    data = DataConfig()
    _, text, _, docs = corpus_documents(data)
    novel = dict(zip(docs, novel_of_each_document(text, docs)))
    train_docs, val_docs = train_val_documents(docs, data)
    rng = random.Random(seed)
    splits = {}
    for split, chosen in (("train", train_docs), ("test", val_docs)):
        by_novel: dict[int, list[str]] = {}
        for d in chosen:
            by_novel.setdefault(novel[d], []).extend(passages(d, rng))
        per = per_novel_train if split == "train" else min(len(v) for v in by_novel.values())
        rows = [{"text": p, "label": n} for n, ps in sorted(by_novel.items())
                for p in rng.sample(ps, min(per, len(ps)))]
        rng.shuffle(rows)
        splits[split] = rows
    return splits


def write(out_dir: str | Path, **kw) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rows in build(**kw).items():
        paths[split] = out / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return paths
