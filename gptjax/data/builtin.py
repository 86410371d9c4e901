"""Real corpora every machine has, as JSONL sources for ``gptjax-data`` (``gptjax-data builtin NAME --out F``):

* ``austen``: the embedded novels (``gptjax/assets/austen.txt``), one document per chapter (4.0 MB);
* ``stdlib``: the running interpreter's standard library, one document per module's source with its docstrings
  and comments (CPython 3.11: 566 modules, 10.6 MB), tests, IDLE, tkinter and the turtle demos left out.

Two different kinds of text (prose and code) for mixtures, per-source losses, deduplication and the quality
filter, with nothing downloaded. The stdlib corpus depends on the Python version; ``prepare``'s manifest records
the file's hash, so a directory prepared from another version is told apart.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path
from typing import Callable, Iterator

from gptjax.data.corpus import DEFAULT_DOC_PATTERN, default_corpus_path, read_corpus, split_documents
from gptjax.runs import write_atomic

SKIPPED_STDLIB = {"test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "site-packages", "ensurepip"}


def austen_documents() -> Iterator[dict]:
    for i, text in enumerate(split_documents(read_corpus(default_corpus_path()), DEFAULT_DOC_PATTERN)):
        yield {"text": text, "id": f"austen-{i:04d}"}


def stdlib_documents(max_bytes: int = 400_000) -> Iterator[dict]:
    """Each module of the standard library (sorted by path) up to ``max_bytes``; files that are not UTF-8 are
    left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIPPED_STDLIB & set(rel.parts) or path.stat().st_size > max_bytes:
            continue
        try:
            text = path.read_text("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            yield {"text": text, "id": ".".join(rel.with_suffix("").parts)}


BUILTIN: dict[str, Callable[[], Iterator[dict]]] = {"austen": austen_documents, "stdlib": stdlib_documents}


def write_builtin(name: str, out: str | Path) -> int:
    """Write corpus ``name`` as JSONL (``{"text", "id"}`` per line) to ``out``, whole or not at all; the number of
    documents."""
    rows = [json.dumps(d, ensure_ascii=False) for d in BUILTIN[name]()]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(Path(out), "\n".join(rows) + "\n")
    return len(rows)
