"""Orbax checkpoints of the train state and the grain iterator state.

Each checkpoint step holds two items: ``state`` (params, optimizer state, step; written collectively by every
process, each writing its own shards) and ``data`` (one JSON file per process with its grain iterator state).
Restoring takes an abstract target (``ShapeDtypeStruct`` with shardings), so a checkpoint written on one mesh
restores onto another mesh shape.

Saving may be asynchronous (orbax writes in a background thread after the device-to-host copy; training goes
on). Orbax writes a step into a temporary directory and renames it when complete, so a killed save leaves no
step behind. A step that is present but damaged (a missing item, a missing commit marker, a file that fails to
read) is reported by :meth:`Checkpointer.problem` / on restore, and can be moved aside.

Bytes that changed after the save (a flipped bit on disk, a copy gone wrong) read back without any error: orbax
and TensorStore keep no checksum of the OCDBT data files, and a checkpoint with 256 flipped bytes restored, turned
the loss NaN two steps later and was loaded again by every later resume. So once a save is complete, the first
process records the CRC-32 of every file of the step in ``<step>/checksums.json``; every restore (resume, and the
readers through ``checkpoint/pinned.py``) checks them first, and a step whose files do not match is damaged like a
truncated one. CRC-32 (zlib) hashes 3.8 GB/s on one core here (SHA-256 1.6 GB/s): the cost on a 138M-parameter
model's checkpoint is in docs/reliability.md. A step saved before checksums were recorded, or whose writer was
killed between orbax's commit and the checksums, restores unverified (logged).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from gptjax import storage
from gptjax.runs import CheckpointNotFound, deferred_interrupt, fault_reason, write_atomic

log = logging.getLogger(__name__)

ITEMS = ("state", "data")
COMMIT_MARKER = storage.COMMIT_MARKER
CHECKSUMS = "checksums.json"  # written into each step once its save is complete
DAMAGED = "DAMAGED.txt"  # why a step moved aside is damaged


def _not_a_read_only_notice(record: logging.LogRecord) -> bool:
    """Orbax warns that a read-only manager keeps nothing and saves nothing, and that its directory is read-only:
    what a reader asked for, noise on every ``gptjax-sample`` / ``gptjax-serve`` start."""
    message = record.getMessage()
    return not ("read_only=True" in message or message.startswith("Given directory is read only"))


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; earlier checkpoints are untouched."""


class CheckpointMismatch(ValueError):
    """An intact checkpoint that cannot continue this run as asked (never moved aside as damaged)."""


DATA_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")


def data_files(data_dir: Path) -> dict[int, dict[int, Path]]:
    """The data item's iterator-state files, by the process count that wrote them and then process index."""
    out: dict[int, dict[int, Path]] = {}
    for f in data_dir.glob("process_*-of-*.json") if data_dir.is_dir() else ():
        m = DATA_FILE.fullmatch(f.name)
        if m:
            out.setdefault(int(m.group(2)), {})[int(m.group(1))] = f
    return out


def shared_iterator_state(data_dir: Path) -> tuple[int, dict]:
    """The process count that wrote ``data_dir`` and the iterator state every one of its processes saved: the
    pipeline's position is a global batch index (``gptjax.data.batches.train_dataset``), the same on every
    process, so it restores on any process count. Differing states are a :class:`CheckpointMismatch`."""
    by_count = data_files(data_dir)
    if len(by_count) != 1:
        raise CheckpointMismatch(f"{data_dir} holds iterator states of {sorted(by_count) or 'no'} process counts")
    (count, files), = by_count.items()
    if sorted(files) != list(range(count)):
        raise CheckpointMismatch(f"{data_dir} lacks iterator states of some of its {count} processes: "
                                 f"{sorted(p.name for p in files.values())}")
    states = {i: json.loads(f.read_text()) for i, f in files.items()}
    if any(st != states[0] for st in states.values()):
        raise CheckpointMismatch(f"{data_dir}: the {count} processes that wrote it saved different data positions "
                                 f"({states}); it can only resume on {count} processes")
    return count, states[0]


def _crc32(path: Path, chunk: int = 16 << 20) -> str:
    crc = 0
    with path.open("rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def _step_files(step_dir: Path) -> list[Path]:
    return [p for p in storage.files_under(step_dir) if p.name not in (CHECKSUMS, DAMAGED)]


def write_checksums(step_dir: Path) -> Path:
    """Record the CRC-32 and size of every file of the complete step ``step_dir``."""
    files = {p.relative_to(step_dir).as_posix(): {"crc32": _crc32(p), "bytes": storage.size(p)}
             for p in _step_files(step_dir)}
    return write_atomic(step_dir / CHECKSUMS, json.dumps({"algorithm": "crc32", "files": files}, indent=1))


def checksum_problem(step_dir: Path) -> str | None:
    """Which file of ``step_dir`` differs from what was recorded when it was saved (None: all match, or the step
    has no checksums: saved before they were recorded, or its writer was killed before it recorded them)."""
    try:
        recorded = json.loads((step_dir / CHECKSUMS).read_text())["files"]
        if not isinstance(recorded, dict) or not all(isinstance(w, dict) for w in recorded.values()):
            raise ValueError("not a map of file names to checksums")
    except FileNotFoundError:
        log.info("checkpoint step %s has no %s: restored unverified", step_dir.name, CHECKSUMS)
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its {CHECKSUMS} does not read ({fault_reason(e)})"
    for name, want in recorded.items():
        path = step_dir / name
        try:
            if (held := storage.size(path)) != want["bytes"]:
                return f"{name} holds {held} bytes, {want['bytes']} were written"
            if _crc32(path) != want["crc32"]:
                return f"{name} does not match its checksum (its bytes changed after the save)"
        except FileNotFoundError:
            return f"{name} is missing"
    return None


def step_problem(path: Path, items: tuple[str, ...] = ("state", "data"), verify: bool = True) -> str | None:
    """Why the checkpoint step directory ``path`` cannot be restored, as far as its files tell (None: it looks
    intact); ``items``: the items that must be there (readers of parameters only need ``("state",)``); ``verify``:
    also check every file against the checksums recorded at the save (reads the whole step)."""
    if not path.is_dir():
        return "its directory is missing"
    missing = [n for n in items if not (path / n).is_dir()]
    if missing:
        return f"item(s) {missing} missing"
    if not any(path.iterdir()) or not (path / "_CHECKPOINT_METADATA").exists():
        return "no checkpoint metadata (an incomplete or emptied step directory)"
    unmarked = [n for n in ("", *items) if not (path / n / COMMIT_MARKER).exists()]
    if unmarked:
        return f"no commit marker in {[n or '.' for n in unmarked]} (the save did not finish)"
    if not (path / "state" / "_METADATA").exists():
        return "the state item has no metadata"
    try:
        ocdbt = json.loads((path / "state" / "_METADATA").read_text()).get("use_ocdbt", False)
    except (OSError, ValueError):
        return "the state item's metadata does not read"
    if ocdbt and not (path / "state" / "manifest.ocdbt").exists():
        return "the state item has no OCDBT manifest (state/manifest.ocdbt)"
    if "data" in items and not data_files(path / "data"):
        return "the data item holds no iterator state (process_<i>-of-<n>.json)"
    return checksum_problem(path) if verify else None


class _IteratorSnapshot:
    """The iterator's state taken now, for a save that may be written later in a background thread (orbax runs
    grain's handler off the main thread while training goes on and advances the live iterator)."""

    def __init__(self, iterator: Any):
        state = iterator.get_state()  # a dict (dataset iterators) or JSON bytes (DataLoader iterators)
        self._state = state if isinstance(state, bytes) else json.dumps(state, indent=4).encode()

    def get_state(self) -> bytes:  # grain's handler writes these bytes, as it would the live iterator's state
        return self._state


def _save_args(state: Any) -> Any:
    """Orbax save arguments: scan-stacked block tensors (a ``blocks`` key followed by a parameter name, not a
    layer number) are stored in one chunk per layer, so a reader can take one layer without decoding the stack
    (``checkpoint/tensors.py``); everything else in chunks of its shard, orbax's default."""

    def args(path, leaf):
        keys = [str(getattr(k, "key", getattr(k, "idx", ""))) for k in path]
        stacked = any(k == "blocks" and not nxt.isdigit() for k, nxt in zip(keys, keys[1:]))
        return ocp.SaveArgs(shard_axes=(0,)) if stacked and getattr(leaf, "ndim", 0) >= 1 else ocp.SaveArgs()

    return jax.tree_util.tree_map_with_path(args, state)


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int = 3, create: bool = True, async_save: bool = False):
        """``create=False``: a reader, which needs the directory to exist and never writes or deletes in it; a
        writer (``create=True``) removes what interrupted saves left (``<step>.orbax-checkpoint-tmp``)."""
        self.directory = storage.as_path(directory)
        if not storage.is_remote(directory):
            self.directory = self.directory.absolute()
        if not create and not self.directory.is_dir():
            raise CheckpointNotFound(f"no checkpoint in {self.directory}")
        if not create and _not_a_read_only_notice not in logging.getLogger("absl").filters:
            logging.getLogger("absl").addFilter(_not_a_read_only_notice)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                                 enable_async_checkpointing=async_save,
                                                 cleanup_tmp_directories=create, read_only=not create,
                                                 **storage.orbax_options(self.directory)),
            item_names=ITEMS,
        )
        self.async_save = async_save
        self.pending: int | None = None  # the step an async save is still writing
        self._recording: threading.Thread | None = None  # the checksums of the last finished async save
        self._record_error: BaseException | None = None

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def existing_step(self, step: int | None) -> int:
        """``step`` (default: the latest) when it is one of the checkpoints here, else ``CheckpointNotFound`` naming
        the ones there are."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointNotFound(f"no checkpoint in {self.directory}")
        if step not in self.all_steps():
            raise CheckpointNotFound(f"no checkpoint for step {step} in {self.directory}; "
                                     f"available: {self.all_steps()}")
        return step

    def save(self, step: int, state: Any, data_iterator: Any | None = None) -> float:
        """Save ``step`` (in the background when async: the next save or ``wait`` completes it). Returns the
        seconds training was paused for it."""
        t = time.perf_counter()
        self.wait(record_in_background=True)
        items = {"state": ocp.args.StandardSave(state, save_args=_save_args(state))}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_iterator))
        with deferred_interrupt():
            try:
                self.manager.save(step, args=ocp.args.Composite(**items), force=True)
            except Exception as e:
                raise self._write_error(step, e) from e
        self.pending = step
        if not self.async_save:
            self.wait()
        return time.perf_counter() - t

    def wait(self, record_in_background: bool = False) -> None:
        """Block until a background save is complete, then record its checksums; a failed one raises
        ``CheckpointWriteError``. ``record_in_background`` (the next asynchronous save starting): the checksums
        are recorded by a thread while training goes on (they read every object back: on a bucket that read
        paused the step loop for most of a save, 23.4 s median against 1.14 s locally; docs/storage.md), and the
        next ``wait`` finishes them first. A step killed before its checksums restores unverified, as before."""
        step, self.pending = self.pending, None
        with deferred_interrupt():
            try:
                self.manager.wait_until_finished()
                self._join_recording()
                if step is not None and jax.process_index() == 0 and (self.directory / str(step)).is_dir():
                    if record_in_background and self.async_save:
                        self._recording = threading.Thread(target=self._record, args=(step,), daemon=True,
                                                           name=f"gptjax-checksums-{step}")
                        self._recording.start()
                    else:
                        write_checksums(self.directory / str(step))
            except Exception as e:
                raise self._write_error(step, e) from e

    def _record(self, step: int) -> None:
        try:
            write_checksums(self.directory / str(step))
        except FileNotFoundError:  # retention removed the step meanwhile: nothing to record
            pass
        except BaseException as e:  # noqa: BLE001 - raised by the next wait, on the main thread
            self._record_error = e

    def _join_recording(self) -> None:
        if self._recording is not None:
            self._recording.join()
            self._recording = None
        error, self._record_error = self._record_error, None
        if error is not None:
            raise error

    def _write_error(self, step: int | None, e: Exception) -> CheckpointWriteError:
        """The failed save's error, after removing what it left half-written (``<step>.orbax-checkpoint-tmp``)."""
        try:
            for leftover in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
                storage.remove_tree(leftover)
            self.manager.reload()
        except Exception:  # noqa: BLE001 - a bucket that stopped answering: the next writer cleans up (orbax does)
            log.debug("could not clean up after the failed save of step %s in %s", step, self.directory)
        try:
            kept = f"the earlier checkpoints {self.all_steps()} are untouched"
        except Exception:  # noqa: BLE001 - (the storage is what failed)
            kept = "the earlier committed checkpoints are untouched"
        return CheckpointWriteError(f"could not write checkpoint step {step} in {self.directory}: "
                                    f"{fault_reason(e)}; {kept}")

    def problem(self, step: int, items: tuple[str, ...] = ITEMS, verify: bool = True) -> str | None:
        """Why step ``step`` cannot be restored, as far as its files tell (None: it looks intact)."""
        return step_problem(self.directory / str(step), items, verify)

    def move_aside(self, step: int, why: str) -> Path:
        """Rename a damaged step out of orbax's sight (kept for inspection), so the step can be written again."""
        dest = self.directory / f"{step}.damaged-{int(time.time())}"
        storage.move(self.directory / str(step), dest)
        (dest / DAMAGED).write_text(why + "\n")
        self.manager.reload()
        return dest

    def restore(self, abstract_state: Any, data_iterator: Any | None = None, step: int | None = None) -> Any:
        """Restore the train state onto ``abstract_state``'s shardings (and the iterator in place).
        Returns the state. A checkpoint written by another number of processes restores too: the state is
        resharded by orbax, and the iterator takes the position all the writing processes shared."""
        step = self.existing_step(step)
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        other_count = None
        if data_iterator is not None:
            data_dir = self.directory / str(step) / "data"
            own = data_dir / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
            if own.exists():
                items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
            else:
                other_count, iterator_state = shared_iterator_state(data_dir)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        if other_count is not None:
            data_iterator.set_state(iterator_state)
            log.info("restored step %d from %s (written by %d processes, resumed on %d)", step, self.directory,
                     other_count, jax.process_count())
        else:
            log.info("restored step %d from %s", step, self.directory)
        return restored["state"]

    def restore_params(self, abstract_params: Any, step: int | None = None) -> Any:
        """Only the parameters of a saved train state (orbax partial restore: optimizer moments are never read),
        placed by ``abstract_params``' shardings."""
        step = self.existing_step(step)
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_params)
        item = ocp.args.PyTreeRestore(item={"params": abstract_params}, restore_args={"params": restore_args},
                                      partial_restore=True)
        restored = self.manager.restore(step, args=ocp.args.Composite(state=item))
        log.info("restored the parameters of step %d from %s", step, self.directory)
        return restored["state"]["params"]

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()
