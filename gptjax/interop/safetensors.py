"""The safetensors format, written one tensor at a time and read memory-mapped.

A file is an 8-byte little-endian header length, a JSON header (``{name: {dtype, shape, data_offsets}}`` plus
``__metadata__``), padded with spaces to a multiple of 8, then the tensors' bytes (C order, little endian) at
their offsets. Since every shape and dtype is known before any tensor is read, the header is written first and
each tensor is then streamed in; a reader maps the file and copies out only the tensor it asks for. Sharded
checkpoints add ``model.safetensors.index.json`` (``weight_map``: tensor -> file), as transformers writes them.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import BinaryIO, Iterable

import ml_dtypes
import numpy as np

DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
          "F64": np.dtype(np.float64), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32)}
NAMES = {v: k for k, v in DTYPES.items()}
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class SafetensorsError(ValueError):
    """A safetensors file or index is malformed or lacks what was asked for; the message names it."""


def parse_size(text: str) -> int:
    """``"5GB"`` -> 5e9 bytes (KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024, as transformers reads them)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"size {text!r} is not understood; give e.g. 5GB, 500MB, 2GiB or a byte count")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = " KMGT".index(unit[0]) if unit != "B" else 0
    size = int(float(m.group(1)) * base ** power)
    if size <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return size


def shard_names(n: int) -> list[str]:
    return [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def plan_shards(sizes: Iterable[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Tensors (in order) grouped into files of at most ``max_bytes`` each (a larger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if shards[-1] and used + nbytes > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


class StreamWriter:
    """``with StreamWriter(path, {name: (shape, dtype)}) as w: w.write(name, array)`` for every name, in order."""

    def __init__(self, path: Path, specs: dict[str, tuple[tuple[int, ...], np.dtype]]):
        header, offset = {}, 0
        self.order = list(specs)
        for name, (shape, dtype) in specs.items():
            nbytes = math.prod(shape) * np.dtype(dtype).itemsize
            header[name] = {"dtype": NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset,
                                                                                                  offset + nbytes]}
            offset += nbytes
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.specs, self.next = specs, 0
        self.file: BinaryIO = open(path, "wb")
        self.file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, array: np.ndarray) -> None:
        expected = self.order[self.next] if self.next < len(self.order) else None
        shape, dtype = self.specs[name]
        if name != expected or tuple(array.shape) != tuple(shape) or array.dtype != dtype:
            raise SafetensorsError(f"writing {name} {array.shape} {array.dtype}: expected {expected} {shape} {dtype}")
        array = np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"), copy=False))
        self.file.write(memoryview(array.reshape(-1).view(np.uint8)))  # no copy of the bytes
        self.next += 1

    def __enter__(self) -> "StreamWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()
        if exc[0] is None and self.next != len(self.order):
            raise SafetensorsError(f"only {self.next} of {len(self.order)} tensors were written")


class Reader:
    """The tensors of a directory's ``model.safetensors`` or sharded ``model-*.safetensors`` + index."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise SafetensorsError(f"{index} is not a safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
        elif (self.directory / SINGLE).is_file():
            files = [SINGLE]
        else:
            raise SafetensorsError(f"no {SINGLE} or {INDEX} in {self.directory} (gptjax reads safetensors "
                                   "checkpoints; convert .bin / .pt files with transformers' save_pretrained)")
        self.entries: dict[str, tuple[Path, dict, int]] = {}
        for f in files:
            path = self.directory / f
            if not path.is_file():
                raise SafetensorsError(f"{index.name} names {f}, which is not in {self.directory}")
            size = path.stat().st_size
            with open(path, "rb") as fh:
                try:
                    (n,) = struct.unpack("<Q", fh.read(8))
                    if n > size - 8:
                        raise ValueError(f"a {n:,}-byte header in a {size:,}-byte file")
                    header = json.loads(fh.read(n))
                    header.pop("__metadata__", None)
                    end = max((int(e["data_offsets"][1]) for e in header.values()), default=0)
                except (struct.error, ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError) as e:
                    raise SafetensorsError(f"{path} is not a safetensors file ({e})") from None
            if 8 + n + end > size:  # a truncated file: before, a ValueError traceback from the memory map
                raise SafetensorsError(f"{path} is truncated: its header describes {8 + n + end:,} bytes, the file "
                                       f"holds {size:,}; copy or download it again")
            for name, entry in header.items():
                self.entries[name] = (path, entry, 8 + n)

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name][1]["shape"])

    def read(self, name: str) -> np.ndarray:
        """A copy of tensor ``name`` (only its bytes are read)."""
        if name not in self.entries:
            raise SafetensorsError(f"tensor {name} is missing from {self.directory}")
        path, entry, start = self.entries[name]
        if entry["dtype"] not in DTYPES:
            raise SafetensorsError(f"tensor {name} in {path} has dtype {entry['dtype']}; gptjax reads "
                                   f"{', '.join(DTYPES)}")
        dtype, shape = DTYPES[entry["dtype"]].newbyteorder("<"), tuple(entry["shape"])
        begin, end = entry["data_offsets"]
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise SafetensorsError(f"tensor {name} in {path}: {end - begin} bytes for shape {list(shape)} "
                                   f"{entry['dtype']}")
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=start + begin, shape=(end - begin,))
        return np.array(data.view(dtype).reshape(shape))
