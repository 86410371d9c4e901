"""Reading a text corpus and splitting it into documents, with errors that say what is wrong."""

from __future__ import annotations

import hashlib
import random
import re
from importlib import resources
from pathlib import Path

from gptjax.config import DataConfig

DEFAULT_CORPUS = "default"
# Chapter headings start documents in the embedded Austen corpus.
DEFAULT_DOC_PATTERN = r"^(?:CHAPTER|Chapter) [IVXLC\d]+"


class CorpusError(ValueError):
    """The corpus cannot be used; the message names the file and the problem."""


def default_corpus_path() -> Path:
    return Path(str(resources.files("gptjax") / "assets" / "austen.txt"))


def resolve_corpus(corpus: str) -> tuple[Path, str | None]:
    """(path, default document pattern) for a corpus setting."""
    if corpus == DEFAULT_CORPUS:
        return default_corpus_path(), DEFAULT_DOC_PATTERN
    return Path(corpus).expanduser(), None


def read_corpus(path: str | Path) -> str:
    path = Path(path)
    if not path.exists():
        raise CorpusError(f"corpus file {path} does not exist")
    if path.is_dir():
        raise CorpusError(f"corpus {path} is a directory; give a UTF-8 text file")
    raw = path.read_bytes()
    if not raw.strip():
        raise CorpusError(f"corpus file {path} is empty" + (" (only whitespace)" if raw else ""))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise CorpusError(f"corpus file {path} is not UTF-8: byte 0x{raw[e.start]:02x} at offset {e.start} "
                          f"(line {line}) cannot be decoded; convert it, e.g. `iconv -f latin1 -t utf-8`") from None
    return text.lstrip("\ufeff")


def split_documents(text: str, doc_pattern: str | None) -> list[str]:
    """Documents: pieces starting at each match of ``doc_pattern`` (multiline regex), else blank-line paragraphs."""
    if doc_pattern is None:
        docs = re.split(r"\n[ \t]*\n", text)
    else:
        try:
            starts = [m.start() for m in re.finditer(doc_pattern, text, flags=re.MULTILINE)]
        except re.error as e:
            raise CorpusError(f"doc_pattern {doc_pattern!r} is not a valid regular expression: {e}") from None
        bounds = [0] + [s for s in starts if s > 0] + [len(text)]
        docs = [text[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    return [d.strip() for d in docs if d.strip()]


def fingerprint(text: str, *parts: object) -> str:
    h = hashlib.sha256(text.encode("utf-8"))
    for p in parts:
        h.update(repr(p).encode())
    return h.hexdigest()[:16]


def corpus_documents(cfg: DataConfig) -> tuple[Path, str, str | None, list[str]]:
    """``(path, text, document pattern, documents)`` of the corpus ``cfg`` names, read and split."""
    path, default_pattern = resolve_corpus(cfg.corpus)
    text = read_corpus(path)
    pattern = cfg.doc_pattern if cfg.doc_pattern is not None else default_pattern
    return path, text, pattern, split_documents(text, pattern)


def train_val_documents(docs: list[str], cfg: DataConfig) -> tuple[list[str], list[str]]:
    """The train/validation split by document: a seeded ``val_fraction`` of the documents (at least one) are
    held out, both splits in corpus order. The evaluation tasks are built from the same split."""
    order = list(range(len(docs)))
    random.Random(cfg.seed).shuffle(order)
    n_val = max(1, round(cfg.val_fraction * len(docs)))
    return [docs[i] for i in sorted(order[n_val:])], [docs[i] for i in sorted(order[:n_val])]
