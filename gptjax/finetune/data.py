"""Fine-tuning data: JSONL examples per task type and GPT-1's input transformations (Radford et al. 2018, §3.3 and
Figure 1), which turn every task into token sequences a decoder reads left to right.

One JSON object per line; ``label`` is an integer (a class index, or the index of the right choice):

=================  ================================================  ======================================
task type          fields                                            sequences (``s`` start, ``$`` delimiter,
                                                                     ``e`` extract)
=================  ================================================  ======================================
classification     ``{"text": str, "label": int}``                   ``s text e``
entailment         ``{"premise": str, "hypothesis": str, "label"}``  ``s premise $ hypothesis e``
similarity         ``{"text_a": str, "text_b": str, "label": int}``  ``s a $ b e`` and ``s b $ a e`` (no
                                                                     inherent order: both, representations
                                                                     added)
multiple_choice    ``{"context": str, "choices": [str, ...],         ``s context $ choice_i e`` for each
                   "label": int}``                                   choice (same number in every row)
=================  ================================================  ======================================

The three special tokens are new vocabulary entries (ids ``V``, ``V + 1``, ``V + 2`` after the pretrained
vocabulary of ``V``), trained with the rest. A sequence longer than the model's context loses tokens from the end
of its longest text until it fits (the extract token always stays last).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from gptjax.config import choices
from gptjax.data.jsonl import jsonl_rows

TaskType = Literal["classification", "entailment", "similarity", "multiple_choice"]
TASK_TYPES = choices(TaskType)
FIELDS = {"classification": ("text",), "entailment": ("premise", "hypothesis"), "similarity": ("text_a", "text_b"),
          "multiple_choice": ("context", "choices")}
N_SPECIAL = 3  # start, delimiter, extract


class FinetuneDataError(ValueError):
    """A fine-tuning file cannot be used; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class Encoded:
    """``tokens [N, S, L]`` (S sequences per example), ``extract_at [N, S]`` (index of each extract token),
    ``lm_mask [N, S, L]`` (1 where the next token is a text token: the auxiliary language-modelling loss),
    ``labels [N]``."""

    tokens: np.ndarray
    extract_at: np.ndarray
    lm_mask: np.ndarray
    labels: np.ndarray
    truncated: int  # sequences cut to fit

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        return {"tokens": self.tokens[idx], "extract_at": self.extract_at[idx], "lm_mask": self.lm_mask[idx],
                "labels": self.labels[idx]}


def read_rows(path: str | Path, task_type: str) -> list[dict]:
    """The rows of a JSONL file, each checked against ``task_type``'s schema (an error names the line)."""
    if task_type not in TASK_TYPES:
        raise FinetuneDataError(f"task type must be one of {TASK_TYPES}, got {task_type!r}")
    path = Path(path)
    rows, n_choices = [], None
    schema = ", ".join(f'"{f}"' for f in FIELDS[task_type]) + ', "label"'
    for n, row, line in jsonl_rows(path, FinetuneDataError):
        if not isinstance(row, dict) or any(f not in row for f in (*FIELDS[task_type], "label")):
            raise FinetuneDataError(f"{path} line {n}: a {task_type} row needs {schema}; got {line[:120]}")
        label = row["label"]
        if not isinstance(label, int) or isinstance(label, bool) or label < 0:
            raise FinetuneDataError(f"{path} line {n}: label must be an integer >= 0, got {label!r}")
        for f in FIELDS[task_type]:
            ok = (isinstance(row[f], list) and len(row[f]) >= 2 and all(isinstance(c, str) and c for c in row[f])
                  if f == "choices" else isinstance(row[f], str) and row[f] != "")
            if not ok:
                what = "a list of at least 2 non-empty strings" if f == "choices" else "a non-empty string"
                raise FinetuneDataError(f"{path} line {n}: {f} must be {what}, got {row[f]!r:.80}")
        if task_type == "multiple_choice":
            n_choices = n_choices or len(row["choices"])
            if len(row["choices"]) != n_choices:
                raise FinetuneDataError(f"{path} line {n}: {len(row['choices'])} choices; every row needs the same "
                                        f"number ({n_choices}, as on the first row)")
            if label >= n_choices:
                raise FinetuneDataError(f"{path} line {n}: label {label} is not an index into its {n_choices} "
                                        "choices")
        rows.append(row)
    if not rows:
        raise FinetuneDataError(f"{path} has no rows")
    return rows


def segments(row: dict, task_type: str) -> list[tuple[str, ...]]:
    """The texts of each sequence of a row (one per sequence, before the special tokens)."""
    if task_type == "classification":
        return [(row["text"],)]
    if task_type == "entailment":
        return [(row["premise"], row["hypothesis"])]
    if task_type == "similarity":
        return [(row["text_a"], row["text_b"]), (row["text_b"], row["text_a"])]
    return [(row["context"], choice) for choice in row["choices"]]


def encode(rows: Sequence[dict], task_type: str, tokenizer: Any, vocab_size: int, max_len: int) -> Encoded:
    """GPT-1's transformation of every row: ``start text ($ text) extract`` per sequence, padded to the longest
    sequence (at most ``max_len``); special token ids follow the pretrained vocabulary of ``vocab_size``."""
    start, delim, extract = vocab_size, vocab_size + 1, vocab_size + 2
    seqs, cut = [], 0
    for row in rows:
        per_row = []
        for texts in segments(row, task_type):
            parts = [list(tokenizer.encode(t)) for t in texts]
            budget = max_len - 1 - len(parts)  # start, a delimiter between parts, extract
            cut += sum(map(len, parts)) > budget
            while sum(map(len, parts)) > budget:
                longest = max(range(len(parts)), key=lambda i: len(parts[i]))
                parts[longest] = parts[longest][:-max(1, sum(map(len, parts)) - budget)]
            ids, text_mask = [start], [False]
            for i, part in enumerate(parts):
                if i:
                    ids.append(delim)
                    text_mask.append(False)
                ids += part
                text_mask += [True] * len(part)
            ids.append(extract)
            text_mask.append(False)
            per_row.append((ids, text_mask))
        seqs.append(per_row)
    L = max(len(ids) for row in seqs for ids, _ in row)
    N, S = len(seqs), len(seqs[0])
    tokens = np.zeros((N, S, L), np.int32)
    lm_mask = np.zeros((N, S, L), np.float32)
    extract_at = np.zeros((N, S), np.int32)
    for n, row in enumerate(seqs):
        for s, (ids, text_mask) in enumerate(row):
            tokens[n, s, :len(ids)] = ids
            lm_mask[n, s, :len(ids) - 1] = text_mask[1:]  # position t predicts token t + 1
            extract_at[n, s] = len(ids) - 1
    labels = np.array([row["label"] for row in rows], np.int32)
    return Encoded(tokens, extract_at, lm_mask, labels, cut)
