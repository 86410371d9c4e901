"""Read a checkpoint's parameters one tensor (or one layer of a stacked tensor) at a time, straight from the
stored arrays (TensorStore over orbax's OCDBT/zarr layout), with no model, no mesh and no device memory.

This is what streaming consumers (export) use: the bytes held at any time are those of the slice asked for, plus
the chunks it touches. Orbax stores each array in chunks of its write shape (one per device shard); the
``Checkpointer`` stores scan-stacked block parameters in one chunk per layer, so a layer's slice reads one chunk.
A checkpoint written on any mesh reads the same: the stored arrays are global.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tensorstore as ts

from gptjax.checkpoint.manager import CheckpointNotFound
from gptjax import storage
from gptjax.checkpoint.pinned import pinned
from gptjax.runs import RunDir, fault_reason

# No cache: a slice is decoded, returned and forgotten (a cache would keep every chunk read).
_CONTEXT = ts.Context({"cache_pool": {"total_bytes_limit": 0}})


class CheckpointTensors:
    """The parameters of one checkpoint step: ``shapes`` (``{"blocks.attn.w_q": (shape, dtype)}``) and
    ``read(name, layer=None)``; ``layer`` takes one index along the leading (layers) axis. Use it as a context
    manager: the step (default: the newest intact one) is pinned while it is open (``checkpoint/pinned.py``), so
    a run's retention cannot delete it mid-read."""

    def __init__(self, run_dir: str | Path, step: int | None = None):
        self._pin = pinned(run_dir, step)
        self.step, root = self._pin.__enter__()
        try:
            self.directory = (root if storage.is_remote(root) else root.absolute()) / str(self.step) / "state"
            meta = json.loads((self.directory / "_METADATA").read_text())
            if not meta.get("use_ocdbt", False):
                raise CheckpointNotFound(f"{self.directory}: not an OCDBT checkpoint (gptjax writes OCDBT)")
            self._driver = "zarr3" if meta.get("use_zarr3") else "zarr"
            self.shapes: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
            self._stores: dict[str, ts.TensorStore] = {}  # open handles (no data: the context has no cache)
            for key in meta["tree_metadata"]:
                path = [k["key"] for k in meta["tree_metadata"][key]["key_metadata"]]
                if path[0] == "params":
                    name = ".".join(path[1:])
                    self._stores[name] = store = self._open(name)
                    self.shapes[name] = (tuple(store.shape), np.dtype(store.dtype.numpy_dtype))
        except (ValueError, OSError) as e:  # tensorstore reports a damaged store as ValueError
            self.close()
            raise CheckpointNotFound(f"checkpoint step {self.step} in {RunDir(run_dir).checkpoints} cannot be read: "
                                     f"{fault_reason(e)}; read an earlier one with --step") from None
        except BaseException:  # a Ctrl-C while the stores open (seconds): the pin must not outlive the process
            self.close()
            raise

    def __enter__(self) -> "CheckpointTensors":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stores = {}
        self._pin.__exit__(None, None, None)

    def _open(self, name: str) -> ts.TensorStore:
        spec = {"driver": self._driver, "kvstore": {"driver": "ocdbt", "base": storage.kvstore(self.directory),
                                                    "path": f"params.{name}"}}
        return ts.open(spec, open=True, read=True, context=_CONTEXT).result()

    def read(self, name: str, layer: int | None = None) -> np.ndarray:
        if name not in self.shapes:
            raise KeyError(f"no parameter {name!r} in {self.directory}")
        store = self._stores[name]
        return np.asarray((store if layer is None else store[layer]).read().result())
