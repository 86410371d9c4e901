"""In-context evaluation as in GPT-3 §2: zero-, one- and few-shot tasks scored by log-likelihood.

A task is two JSONL splits of examples ``{"context": str, "choices": [str, ...], "label": int}``: ``test`` (what is
scored) and ``train`` (where the K demonstrations of a few-shot prompt come from, drawn with a seed for each test
example, so an example's prompt does not depend on which others are scored). The prompt is the demonstrations,
each its context followed by its correct choice, then the test context, joined by the task's delimiter. The
choices are continuations of the prompt (each starts with its own space):

* ``cloze`` (one choice): right when every token of the choice is what greedy decoding produces after the prompt
  (exact match of the last word under greedy decoding, as LAMBADA is scored). Chance: always answering the commonest
  answer of the test split.
* ``choice``: the choice with the highest log-likelihood (``acc``), and with the highest log-likelihood per byte of
  the choice (``acc_norm``, the harness's length normalisation); chance 1 / number of choices.

Accuracy comes with its standard error ``sqrt(p (1 - p) / (n - 1))``. Requests are scored packed
(:mod:`gptjax.evals.scoring`).

The built-in tasks (``gptjax/assets/tasks``) are made from the embedded corpus by :func:`build_tasks`: test
examples from the validation chapters of the default data split (``DataConfig()``), demonstrations from its
training chapters, so a run trained with the default split has never seen a test passage.

* ``austen_cloze`` (LAMBADA-style last word): the shortest run of whole sentences of one chapter, 40 to 120
  words, that ends with the word and holds it earlier. A sentence's last word is a target only where it needs the
  passage: it is not in the rest of its own sentence (LAMBADA kept passages humans could complete from the whole
  passage but not from the last sentence alone), has at least 3 letters and is not one of the corpus's 100
  commonest words. The 14 validation chapters give 98 such passages (a strict rule on a small split; the
  standard error says what that costs).
* ``austen_next_sentence`` (multiple choice): two consecutive sentences of one paragraph, and four candidates
  for the next: the true one and three of similar length (within 30% in words) drawn from other chapters.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import random
import re
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from gptjax.data.jsonl import jsonl_rows
from gptjax.evals.scoring import Request, Scorer

KINDS = ("cloze", "choice")
SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class Example:
    context: str
    choices: tuple[str, ...]
    label: int


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    kind: str
    delimiter: str
    train: tuple[Example, ...]
    test: tuple[Example, ...]

    def chance(self, n: int | None = None) -> float:
        """The accuracy of guessing, on the first ``n`` test examples."""
        test = self.test[:n]
        if self.kind == "choice":
            return sum(1 / len(e.choices) for e in test) / len(test)
        answers = collections.Counter(e.choices[e.label] for e in test)
        return answers.most_common(1)[0][1] / len(test)


@dataclasses.dataclass(frozen=True)
class TaskScore:
    task: str
    shots: int
    n: int
    acc: float
    acc_stderr: float
    chance: float
    acc_norm: float | None = None
    truncated: int = 0  # prompts cut on the left to fit the context

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def line(self) -> str:
        norm = f", acc_norm {self.acc_norm:.3f}" if self.acc_norm is not None else ""
        cut = f", {self.truncated} prompts cut to fit" if self.truncated else ""
        return (f"{self.task} {self.shots}-shot: acc {self.acc:.3f} ± {self.acc_stderr:.3f}{norm} "
                f"(chance {self.chance:.3f}, n={self.n}{cut})")


class TaskError(ValueError):
    """A task file cannot be used; the message names the file and line."""


# ---- files ------------------------------------------------------------------------------------------------------
def builtin_tasks_dir() -> Path:
    return Path(str(resources.files("gptjax") / "assets" / "tasks"))


BUILTIN = {"austen_cloze": "cloze", "austen_next_sentence": "choice"}
DELIMITER = "\n\n"


def load_task(name_or_dir: str | Path, kind: str | None = None) -> Task:
    """A built-in task by name, or a directory holding ``task.json`` (``{"kind": ..., "delimiter": ...}``) and
    ``train.jsonl`` / ``test.jsonl``."""
    path = builtin_tasks_dir() / str(name_or_dir) if str(name_or_dir) in BUILTIN else Path(name_or_dir)
    spec_file = path / "task.json"
    if not spec_file.is_file():
        known = ", ".join(BUILTIN)
        raise TaskError(f"{path} is not a task: no task.json there (built-in tasks: {known})")
    spec = json.loads(spec_file.read_text())
    kind = kind or spec.get("kind")
    if kind not in KINDS:
        raise TaskError(f"{spec_file}: kind must be one of {KINDS}, got {kind!r}")
    splits = {s: tuple(read_examples(path / f"{s}.jsonl", kind)) for s in SPLITS}
    return Task(path.name, kind, spec.get("delimiter", DELIMITER), splits["train"], splits["test"])


def read_examples(path: Path, kind: str) -> list[Example]:
    out = []
    for n, row, line in jsonl_rows(path, TaskError):
        ok = (isinstance(row, dict) and isinstance(row.get("context"), str) and isinstance(row.get("choices"), list)
              and row["choices"] and all(isinstance(c, str) and c for c in row["choices"])
              and isinstance(row.get("label"), int) and 0 <= row["label"] < len(row["choices"]))
        if not ok:
            raise TaskError(f"{path} line {n}: expected {{\"context\": str, \"choices\": [non-empty str, ...], "
                            f"\"label\": index into choices}}, got {line[:120]}")
        if kind == "cloze" and len(row["choices"]) != 1:
            raise TaskError(f"{path} line {n}: a cloze example has exactly one choice (the answer)")
        out.append(Example(row["context"], tuple(row["choices"]), row["label"]))
    if not out:
        raise TaskError(f"{path} has no examples")
    return out


def write_task(task: Task, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "task.json").write_text(json.dumps({"kind": task.kind, "delimiter": task.delimiter}) + "\n")
    for split in SPLITS:
        rows = [json.dumps({"context": e.context, "choices": list(e.choices), "label": e.label}, ensure_ascii=False)
                for e in getattr(task, split)]
        (directory / f"{split}.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")


def write_harness_yaml(task_dir: str | Path, out_dir: str | Path, name: str | None = None) -> Path:
    """An lm-evaluation-harness task file for the task in ``task_dir`` (its JSONL splits read by the ``json``
    dataset builder, nothing downloaded), scored as :func:`evaluate_task` scores it: ``multiple_choice`` (acc,
    acc_norm) for a choice task, ``loglikelihood`` (acc: greedy exact match; not its perplexity, whose bootstrapped
    error forks worker processes under JAX) for a cloze one. The
    harness gives few-shot prompts its own demonstrations (``--num_fewshot``, its own seed)."""
    task_dir = Path(task_dir).resolve()
    task = load_task(task_dir)
    name = name or task.name
    common = {"task": name, "dataset_path": "json",
              "dataset_kwargs": {"data_files": {s: str(task_dir / f"{s}.jsonl") for s in SPLITS}},
              "training_split": "train", "test_split": "test", "doc_to_text": "{{context}}",
              "target_delimiter": "", "fewshot_delimiter": task.delimiter}
    if task.kind == "choice":
        spec = {**common, "output_type": "multiple_choice", "doc_to_choice": "{{choices}}",
                "doc_to_target": "{{label}}",
                "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}
    else:
        spec = {**common, "output_type": "loglikelihood", "doc_to_target": "{{choices[0]}}",
                "metric_list": [{"metric": "acc"}]}
    out = Path(out_dir) / f"{name}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(spec, indent=1) + "\n")  # JSON is YAML
    return out


# ---- scoring ----------------------------------------------------------------------------------------------------
def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation tokens as the lm-evaluation-harness makes them: the whole text is encoded once and
    split where the context's own encoding ends (trailing whitespace of the context moves to the continuation), so the
    continuation's tokens are those the model sees in the whole text."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = list(tokenizer.encode(context + continuation))
    n_context = len(tokenizer.encode(context))
    return whole[:n_context], whole[n_context:]


def prompt(task: Task, index: int, shots: int, seed: int) -> str:
    example = task.test[index]
    if shots > len(task.train):
        raise ValueError(f"{task.name}: {shots} shots asked, the train split has {len(task.train)} examples")
    demos = random.Random(f"{seed}:{index}").sample(task.train, shots) if shots else []
    return task.delimiter.join([d.context + d.choices[d.label] for d in demos] + [example.context])


def evaluate_task(scorer: Scorer, tokenizer: Any, task: Task, shots: int = 0, seed: int = 1234,
                  limit: int | None = None) -> TaskScore:
    """Accuracy of ``task``'s first ``limit`` test examples with ``shots`` demonstrations each."""
    examples = range(min(limit or len(task.test), len(task.test)))
    requests, owner = [], []
    for i in examples:
        text = prompt(task, i, shots, seed)
        for choice in task.test[i].choices:
            ctx, cont = encode_pair(tokenizer, text, choice)
            requests.append(Request([tokenizer.eos_id] + ctx, cont))  # documents follow </s> in training
            owner.append(i)
    results = scorer.loglikelihood(requests)
    by_example: dict[int, list] = collections.defaultdict(list)
    for i, r in zip(owner, results):
        by_example[i].append(r)
    right, right_norm, cut = [], [], 0
    for i in examples:
        rs, ex = by_example[i], task.test[i]
        cut += any(r.truncated for r in rs)
        if task.kind == "cloze":
            right.append(rs[0].greedy)
        else:
            right.append(_argmax([r.logprob for r in rs]) == ex.label)
            right_norm.append(_argmax([r.logprob / len(c.encode("utf-8")) for r, c in zip(rs, ex.choices)])
                              == ex.label)
    acc, n = sum(right) / len(right), len(right)
    return TaskScore(task.name, shots, n, acc, stderr(acc, n), task.chance(n),
                     sum(right_norm) / n if right_norm else None, cut)


def _argmax(xs: Sequence[float]) -> int:
    return max(range(len(xs)), key=lambda i: xs[i])


def stderr(p: float, n: int) -> float:
    """Standard error of a mean of ``n`` 0/1 outcomes with mean ``p`` (sample standard deviation / sqrt(n))."""
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")


# ---- building the built-in tasks from a corpus --------------------------------------------------------------------
_SENTENCE_END = re.compile(r'(?<!\bMr\.)(?<!\bMrs\.)(?<!\bDr\.)(?<!\bSt\.)(?<!\bMessrs\.)'
                           r'(?<=[.!?])["\'_]?\s+(?=["\'_]?[A-Z])')
_WORD = re.compile(r"[A-Za-z]+")
_LAST_WORD = re.compile(r"^(.*\s)([A-Za-z]+)[.!?]['\"_]*$")  # a sentence and its last word


def paragraphs(doc: str) -> list[str]:
    """A document's paragraphs, each on one line (the corpus wraps lines inside paragraphs)."""
    return [" ".join(p.split()) for p in re.split(r"\n[ \t]*\n", doc) if p.strip()]


def sentences(paragraph: str) -> list[str]:
    out, start = [], 0
    for m in _SENTENCE_END.finditer(paragraph):
        out.append(paragraph[start:m.end()].strip())
        start = m.end()
    out.append(paragraph[start:].strip())
    return [s for s in out if s]


def common_words(docs: Sequence[str], n: int = 100) -> set[str]:
    counts = collections.Counter(w.lower() for d in docs for w in _WORD.findall(d))
    return {w for w, _ in counts.most_common(n)}


def cloze_examples(docs: Sequence[str], common: set[str], limit: int, seed: int) -> list[Example]:
    found = []
    for doc in docs:
        sents = [s for para in paragraphs(doc) for s in sentences(para)]
        for end in range(1, len(sents)):
            m = _LAST_WORD.match(sents[end])
            if not m:
                continue
            last, target = m.group(1), m.group(2)
            if len(target) < 3 or target.lower() in common or target.lower() in _words(last):
                continue
            for start in range(end - 1, -1, -1):  # the shortest passage of >= 40 words with the word in it
                n = len(" ".join(sents[start:end + 1]).split())
                if n > 120:
                    break
                if n >= 40 and target.lower() in _words(" ".join(sents[start:end])):
                    found.append(Example(" ".join(sents[start:end]) + " " + last.rstrip(), (" " + target,), 0))
                    break
    random.Random(seed).shuffle(found)
    return found[:limit]


def _words(text: str) -> set[str]:
    return {w.lower() for w in _WORD.findall(text)}


def next_sentence_examples(docs: Sequence[str], limit: int, seed: int, n_choices: int = 4) -> list[Example]:
    rng = random.Random(seed)
    by_length = collections.defaultdict(list)  # words -> (document, sentence)
    for d, doc in enumerate(docs):
        for p in paragraphs(doc):
            for s in sentences(p):
                by_length[len(s.split())].append((d, s))
    items = []
    for d, doc in enumerate(docs):
        for para in paragraphs(doc):
            sents = sentences(para)
            for i in range(2, len(sents)):
                nxt = sents[i]
                if 6 <= len(nxt.split()) <= 40:
                    items.append((d, " ".join(sents[i - 2:i]), nxt))
    rng.shuffle(items)
    out = []
    for d, context, nxt in items[:limit]:
        n = len(nxt.split())
        similar = [s for k in range(math.ceil(0.7 * n), math.floor(1.3 * n) + 1) for e, s in by_length.get(k, ())
                   if e != d and s != nxt]
        choices = [nxt] + rng.sample(similar, n_choices - 1)
        rng.shuffle(choices)
        out.append(Example(context, tuple(" " + c for c in choices), choices.index(nxt)))
    return out


def build_tasks(train_docs: Sequence[str], val_docs: Sequence[str], n_test: int = 500, n_train: int = 1000,
                seed: int = 0) -> dict[str, Task]:
    """The built-in tasks from a corpus's document split (test from ``val_docs``, demonstrations from
    ``train_docs``)."""
    common = common_words([*train_docs, *val_docs])
    return {
        "austen_cloze": Task("austen_cloze", "cloze", DELIMITER,
                             tuple(cloze_examples(train_docs, common, n_train, seed)),
                             tuple(cloze_examples(val_docs, common, n_test, seed))),
        "austen_next_sentence": Task("austen_next_sentence", "choice", DELIMITER,
                                     tuple(next_sentence_examples(train_docs, n_train, seed)),
                                     tuple(next_sentence_examples(val_docs, n_test, seed))),
    }
