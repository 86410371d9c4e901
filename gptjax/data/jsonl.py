"""Reading JSONL files line by line, with errors that name the file and the line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator


def jsonl_rows(path: str | Path, error: type[Exception]) -> Iterator[tuple[int, Any, str]]:
    """``(line number, parsed value, line)`` of every non-blank line of ``path``; a missing file or a line that is
    not JSON raises ``error`` naming the file (and the line)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path} does not exist")
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line), line
        except json.JSONDecodeError as e:
            raise error(f"{path} line {n}: not JSON ({e.msg})") from None
