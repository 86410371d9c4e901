"""Documents streamed from source files, never loaded whole: plain text, JSONL (plain, ``.gz``, ``.zst``) and
Parquet.

* plain text (any other suffix): a document starts at each line matching ``doc_pattern`` (a regular expression
  matched at line starts), else at each blank line;
* JSONL: one JSON object per line, the document in ``text_field``;
* Parquet (``.parquet``, through pyarrow, read a row group at a time): the document in column ``text_field``.

Every error names the file and the line or row (:class:`SourceError`). A JSONL line that is not JSON or lacks the
field either stops the read (``bad_rows="refuse"``) or is skipped and counted by reason (``"skip"``): the
``counts`` dict a caller passes holds ``documents`` and ``skipped: {reason: n}``. A source with no documents is an
error either way.
"""

from __future__ import annotations

import gzip
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

from gptjax import storage

BAD_ROWS = ("refuse", "skip")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".json.zst", ".ndjson")


class SourceError(ValueError):
    """A source file that cannot be read as documents; the message names the file and the line or row."""


def check_source(path: Path) -> None:
    """A missing source, or a directory given as one (it was reported as "does not exist"), is a SourceError."""
    if path.is_dir():
        raise SourceError(f"source {path} is a directory: give the files in it (e.g. {path}/*.jsonl)")
    if not path.is_file():
        raise SourceError(f"source {path} does not exist")


@dataclass(frozen=True)
class Document:
    text: str
    where: str  # "file:line" or "file:row N"


def source_format(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return "text"


def _open_binary(path: Path) -> IO[bytes]:
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path.open("rb"), "rb")
    if name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise SourceError(f"{path}: reading .zst needs the zstandard package (pip install 'gptjax[data]')") \
                from None
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(path.open("rb"), closefd=True))
    return path.open("rb")  # a local file, or an object in a bucket (a stream: epath over fsspec)


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of every line, decoded strictly: a byte that is not UTF-8 names its line."""
    with _open_binary(path) as raw:
        for n, line in enumerate(raw, 1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise SourceError(f"{path} line {n}: byte 0x{line[e.start]:02x} at column {e.start + 1} is not "
                                  "UTF-8; convert the file (e.g. `iconv -f latin1 -t utf-8`)") from None
            yield n, text.lstrip("\ufeff") if n == 1 else text


def read_documents(path: str | Path, *, text_field: str = "text", doc_pattern: str | None = None,
                   bad_rows: str = "refuse", counts: dict | None = None) -> Iterator[Document]:
    """The documents of one source file (local, or ``s3://`` / ``gs://``), in file order (module docstring)."""
    path = storage.as_path(path)
    counts = {} if counts is None else counts
    counts.setdefault("documents", 0)
    counts.setdefault("skipped", {})
    if bad_rows not in BAD_ROWS:
        raise SourceError(f"bad_rows={bad_rows!r}: choose one of {', '.join(BAD_ROWS)}")
    check_source(path)
    reader = {"parquet": _parquet, "jsonl": _jsonl, "text": _text}[source_format(path)]
    for doc in reader(path, text_field=text_field, doc_pattern=doc_pattern, bad_rows=bad_rows, counts=counts):
        counts["documents"] += 1
        yield doc
    if counts["documents"] == 0:
        skipped = sum(counts["skipped"].values())
        raise SourceError(f"{path} holds no documents" + (f" ({skipped} rows skipped: {counts['skipped']})"
                                                           if skipped else ""))


def _text(path: Path, *, doc_pattern: str | None, counts: dict, **_) -> Iterator[Document]:
    try:
        start = re.compile(doc_pattern) if doc_pattern is not None else None
    except re.error as e:
        raise SourceError(f"doc_pattern {doc_pattern!r} is not a valid regular expression: {e}") from None
    lines: list[str] = []
    first = 0
    for n, line in _lines(path):
        boundary = start.match(line) if start is not None else not line.strip()
        if boundary and lines:
            text = "".join(lines).strip()
            if text:
                yield Document(text, f"{path}:{first}")
            lines = []
        if start is not None or line.strip():
            if not lines:
                first = n
            lines.append(line)
    text = "".join(lines).strip()
    if text:
        yield Document(text, f"{path}:{first}")


def _bad(path: Path, where: str, reason: str, bad_rows: str, counts: dict, detail: str) -> None:
    if bad_rows == "refuse":
        raise SourceError(f"{path} {where}: {detail} (pass bad_rows='skip' / --bad-rows skip to skip and count "
                          "such rows)")
    counts["skipped"][reason] = counts["skipped"].get(reason, 0) + 1


def _jsonl(path: Path, *, text_field: str, bad_rows: str, counts: dict, **_) -> Iterator[Document]:
    for n, line in _lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            _bad(path, f"line {n}", "not JSON", bad_rows, counts, f"not JSON ({e.msg})")
            continue
        text = row.get(text_field) if isinstance(row, dict) else None
        if not isinstance(text, str):
            _bad(path, f"line {n}", f"no {text_field!r} string", bad_rows, counts,
                 f"no string field {text_field!r}" + (f" (fields: {', '.join(list(row)[:8])})"
                                                      if isinstance(row, dict) else ""))
            continue
        if text.strip():
            yield Document(text, f"{path}:{n}")


def _parquet(path: Path, *, text_field: str, bad_rows: str, counts: dict, **_) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SourceError(f"{path}: reading Parquet needs pyarrow (pip install 'gptjax[data]')") from None
    try:
        f = pq.ParquetFile(path.open("rb"))
    except Exception as e:  # noqa: BLE001 - pyarrow's errors for a file that is not Parquet vary by version
        raise SourceError(f"{path} is not a Parquet file: {e}") from None
    columns = f.schema_arrow.names
    if text_field not in columns:
        raise SourceError(f"{path} has no column {text_field!r} (columns: {', '.join(columns[:12])}); "
                          "pass text_field / --text-field")
    row = 0
    for batch in f.iter_batches(columns=[text_field], batch_size=4096):
        for text in batch.column(0).to_pylist():
            row += 1
            if not isinstance(text, str):
                _bad(path, f"row {row}", f"no {text_field!r} string", bad_rows, counts,
                     f"column {text_field!r} is {type(text).__name__}, not a string")
                continue
            if text.strip():
                yield Document(text, f"{path}:row {row}")
