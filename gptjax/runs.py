"""A run directory, in one place: the name of everything in it, reading and writing its files, and the one way a
file or a directory is written so that a crash never leaves half of it (a temporary sibling, renamed into place).

::

    runs/austen/
      config.json             the RunConfig the run trains with (the source of truth on resume)
      tokenizer.model         its sentencepiece tokenizer
      data/                   a text corpus prepared on the fly (token shards + manifest, gptjax-data layout)
      checkpoints/<step>/     orbax checkpoints: state/ and each process's grain iterator state (data/)
      metrics.jsonl           one JSON object per logged or evaluated step
      metrics.dropped.jsonl   rows a resumed run replaced
      tensorboard/            TensorBoard event files
      summary.json            what the finished run reported
      curves.png              loss and throughput curves
      import.json             where an imported run's parameters came from
      finetune.json           a fine-tuning run's settings (gptjax-finetune; no config.json there)
      errors.log              tracebacks of faults (the error line names it) and the storage layer's messages
      writer.lock             held by the one process writing the run (WriterLock)
      .readers/               readers' copy-free snapshots of the checkpoint they read (gptjax.checkpoint.pinned)

Everything that reads or writes these (training, checkpointing, interop, ``gptjax-scaling collect``, the
experiments) names them through :class:`RunDir`.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

from gptjax import storage
from gptjax.config import ConfigError, RunConfig

__all__ = ["CheckpointNotFound", "DamagedFile", "FaultLogHandler", "NotOurs", "RunDir", "RunLocked", "WriterLock",
           "atomic_directory", "check_overwrite", "deferred_interrupt", "fault_reason", "process_alive", "read_metrics",
           "route_faults", "write_atomic"]

log = logging.getLogger("gptjax")
HOST = socket.gethostname()


class FaultLogHandler(logging.FileHandler):
    """Log records into a file (a run's ``errors.log``), created only once something is written, and silent when
    writing it fails: on a full disk the fault's one error line already says what happened, and logging's default
    would print a traceback of the failed write over it (seen: orbax's report of the failed save, 30 lines)."""

    def __init__(self, path: str | Path):
        super().__init__(path, delay=True)

    def handleError(self, record: logging.LogRecord) -> None:
        pass

    def close(self) -> None:
        try:
            super().close()  # flushes what a full disk did not take
        except OSError:
            pass


class DamagedFile(ValueError):
    """A file of a run directory does not read; the message names it and what to do."""


FAULTS = logging.getLogger("gptjax.faults")  # tracebacks of faults: into a run's errors.log (route_faults)


def route_faults(path: str | Path | None) -> Callable[[], None]:
    """From now on, what background threads report (orbax and grain log through absl: a full disk is dozens of
    tracebacks; asyncio and orbax's threads report the writes abandoned after a fault), uncaught exceptions of any
    thread and ``gptjax.faults``' records go to ``path`` (a run's ``errors.log``, created only when something comes;
    nowhere when None), not over the console's one error line. Returns the function that undoes it: training routes
    them for its run while it runs; a console script that fails keeps them routed while the process exits."""
    handler = FaultLogHandler(path if path is not None and Path(path).parent.is_dir() else os.devnull)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    loggers = [logging.getLogger(name) for name in ("absl", FAULTS.name, "asyncio")]
    before = [(lg.handlers[:], lg.propagate) for lg in loggers]
    hooks = sys.excepthook, threading.excepthook, sys.unraisablehook
    for lg in loggers:
        lg.handlers[:] = [handler]
        lg.propagate = False
    sys.excepthook = lambda *info: FAULTS.error("uncaught", exc_info=info)
    threading.excepthook = lambda a: FAULTS.error("in thread %s", a.thread, exc_info=(a.exc_type, a.exc_value,
                                                                                    a.exc_traceback))
    sys.unraisablehook = lambda u: FAULTS.error("unraisable in %r", u.object, exc_info=(u.exc_type, u.exc_value,
                                                                                        u.exc_traceback))

    def undo() -> None:
        sys.excepthook, threading.excepthook, sys.unraisablehook = hooks
        for lg, (handlers, propagate) in zip(loggers, before):
            lg.handlers[:] = handlers
            lg.propagate = propagate
        handler.close()

    return undo


class CheckpointNotFound(FileNotFoundError):
    """A run directory, or the checkpoint asked for in it, is not there; the message names what is missing."""


def _entry(name: str) -> property:
    return property(lambda self: self.path / name, doc=f"``<run>/{name}``")


class RunDir:
    """The files of one run directory (nothing is created by naming them): ``RunDir.METRICS`` is a name,
    ``RunDir(path).metrics`` its path in that run."""

    CONFIG = "config.json"
    TOKENIZER = "tokenizer.model"
    DATA = "data"
    CHECKPOINTS = "checkpoints"
    METRICS = "metrics.jsonl"
    DROPPED_METRICS = "metrics.dropped.jsonl"
    TENSORBOARD = "tensorboard"
    PROFILE = "profile"
    WANDB_ID = "wandb-id"
    SUMMARY = "summary.json"
    CURVES = "curves.png"
    IMPORT_RECORD = "import.json"
    FINETUNE = "finetune.json"
    LOG = "errors.log"
    LOCK = "writer.lock"
    READERS = ".readers"

    # On a bucket, what stays there only (never copied to the working copy) and what is never copied up
    REMOTE_ONLY = (CHECKPOINTS, LOCK, READERS)

    def __init__(self, path: str | Path):
        """``path``: a local directory, or ``s3://bucket/key`` / ``gs://bucket/key``. On a bucket the run's
        checkpoints and lock are objects there and its other files live in a local working copy
        (``storage.working_copy``: filled from the bucket when a process first names the run), copied up by
        :meth:`push`."""
        self.url = str(path).rstrip("/") if storage.is_remote(path) else None
        self.path = storage.working_copy(self.url, skip=self.REMOTE_ONLY) if self.url else Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self)!r})"

    def __str__(self) -> str:
        return self.url or str(self.path)

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return storage.name(self.url) if self.url else self.path.name

    @property
    def checkpoints(self):
        """``<run>/checkpoints``: on a bucket, there (orbax writes it natively)."""
        return storage.as_path(self.where(self.CHECKPOINTS))

    @property
    def lock(self):
        """``<run>/writer.lock``: on a bucket, an object there (a conditional create takes it)."""
        return storage.as_path(self.where(self.LOCK))

    def where(self, name: str) -> str:
        """Where a user finds file ``name`` of the run: on a bucket, there (copied up when the job ends)."""
        return f"{self.url}/{name}" if self.url else str(self.path / name)

    def push(self) -> int:
        """Copy what changed in the working copy to the bucket (nothing to do for a local run): at every checkpoint
        and when the job ends."""
        return storage.push(self.path, self.url, skip=self.REMOTE_ONLY) if self.url else 0

    def pull(self) -> int:
        """Copy the bucket's files over the working copy (nothing to do for a local run): a process that writes
        nothing reads what process 0 pushed (the prepared data of a multi-host run)."""
        return storage.pull(self.url, self.path, skip=self.REMOTE_ONLY) if self.url else 0

    config = _entry(CONFIG)
    tokenizer = _entry(TOKENIZER)
    data = _entry(DATA)
    metrics = _entry(METRICS)
    dropped_metrics = _entry(DROPPED_METRICS)
    tensorboard = _entry(TENSORBOARD)
    profile = _entry(PROFILE)
    wandb_id = _entry(WANDB_ID)
    summary = _entry(SUMMARY)
    curves = _entry(CURVES)
    import_record = _entry(IMPORT_RECORD)
    finetune_record = _entry(FINETUNE)
    log = _entry(LOG)
    readers = _entry(READERS)

    def read_config(self) -> RunConfig:
        """The ``config.json`` the run was trained with (migrated if it predates a field's move). One that does not
        read (overwritten, truncated, not JSON) is a ``ConfigError`` naming the file, for every command that opens
        the run (before, resume and ``gptjax-serve`` died with a ``JSONDecodeError`` traceback, and ``gptjax-eval``
        printed "Expecting value", naming no file)."""
        if not self.config.is_file():
            raise CheckpointNotFound(f"{self.where(self.CONFIG)} not found: is {self} a gptjax run directory?")
        try:
            return RunConfig.from_dict(json.loads(self.config.read_text()))
        except (OSError, ValueError, TypeError, AttributeError) as e:
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}" if str(e) else type(e).__name__
            raise ConfigError(f"{self.where(self.CONFIG)} is not a readable run config ({reason}); it is written by "
                              "gptjax-train and must not be edited or overwritten: restore it from a copy (the run's "
                              "checkpoints are untouched)") from None

    def write_config(self, cfg: RunConfig) -> Path:
        return write_atomic(self.config, cfg.to_json())

    def read_summary(self) -> dict | None:
        """What the finished run reported; None if it has not (a summary that does not read is reported and
        treated as absent: it is rewritten whole when the run finishes, and was a JSONDecodeError traceback)."""
        if not self.summary.is_file():
            return None
        try:
            summary = json.loads(self.summary.read_text())
        except (OSError, ValueError) as e:
            log.warning("%s does not read (%s): taken as absent", self.summary, fault_reason(e))
            return None
        return summary if isinstance(summary, dict) else None

    def read_metrics(self) -> list[dict]:
        return read_metrics(self.metrics)

    def write_summary(self, summary: dict) -> Path:
        return write_atomic(self.summary, json.dumps(summary, indent=2))

    def has_checkpoint_step(self) -> bool:
        """At least one step directory under ``checkpoints/`` (whether intact is the restore's call)."""
        return self.checkpoints.is_dir() and any(p.name.isdigit() for p in self.checkpoints.iterdir())

    def has_checkpoint(self) -> bool:
        """A config and at least one step directory under ``checkpoints/`` (whether intact is the restore's call)."""
        return self.config.is_file() and self.has_checkpoint_step()

    def is_finished(self, steps: int) -> bool:
        """The run's summary reports step ``steps`` as its final step."""
        summary = self.read_summary()
        return summary is not None and summary.get("final_step") == steps

    def remove_if_empty(self, directory: bool = True) -> None:
        """Remove what a start that failed before writing anything left: an empty ``checkpoints/``, and (with
        ``directory``) the run directory itself if nothing else is in it."""
        if self.url:  # a bucket has no empty directories; the working copy goes if nothing is in it
            with contextlib.suppress(OSError):
                self.path.rmdir()
            return
        for path in (self.checkpoints, self.path) if directory else (self.checkpoints,):
            with contextlib.suppress(OSError):
                path.rmdir()  # only succeeds on an empty directory


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a ``metrics.jsonl``: the last line may be cut short (a kill mid-write) and is left out; any other
    line that does not read is a :class:`DamagedFile` naming it (plot, collect and plan died with a JSONDecodeError
    traceback)."""
    path = Path(path)
    lines = path.read_text().splitlines()
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("not a row with a step")
        except ValueError as e:
            if n == len(lines):
                continue
            raise DamagedFile(f"{path} line {n} does not read ({e}): the run's metrics are damaged; remove that "
                              "line") from None
        rows.append(row)
    return rows


def fault_reason(e: BaseException) -> str:
    """A storage fault in a few words: a full disk said as such, else the error's first line (orbax and
    tensorstore messages run to hundreds of characters of paths)."""
    text = str(e)
    if getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in text or "os_error_code='28'" in text:
        return "the disk is full (No space left on device)"
    if "Could not connect to the endpoint" in text or "EndpointConnectionError" in type(e).__name__ or (
            "retry attempts failed" in text and "Could not connect" in text):  # botocore's, TensorStore's
        return storage.unreachable()
    first = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {first[:300]}{'...' if len(first) > 300 else ''}"


def process_alive(host: str, pid: int) -> bool | None:
    """Whether process ``pid`` of ``host`` still runs: True / False on this host (a zombie counts as gone), None
    for another host (unknown)."""
    if host != HOST or pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Ctrl-C (SIGINT) during the block takes effect when it ends: for steps that must not stop half-way. A
    checkpoint save (interrupting orbax mid-save abandoned its background writes: the process could abort, "FATAL:
    exception not rethrown", exit 134, or flood "Event loop is closed"), and the rename that puts a directory
    built beside its destination into place. The interrupt is then raised, or handed to the handler that was
    installed (training's pre-emption hook)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)
        if received:
            if callable(previous):
                previous(signal.SIGINT, received[0])
            elif previous == signal.SIG_DFL:
                raise KeyboardInterrupt


def _sibling(path: Path, kind: str) -> Path:
    """A hidden name beside ``path`` that no other process or call uses (its host and pid in the name, so that a
    later call can tell a leftover of a killed process)."""
    return path.parent / f".{path.name}.{kind}-{HOST}-{os.getpid()}-{time.time_ns()}"


def _remove_leftovers(path: Path) -> None:
    """Remove the temporary siblings of ``path`` left by processes of this host that no longer run (an
    interrupted export or import killed before it could clean up)."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(?:tmp|old)-(.+)-(\d+)-\d+$")
    with contextlib.suppress(OSError):
        for sibling in path.parent.iterdir():
            m = pattern.match(sibling.name)
            if m and process_alive(m.group(1), int(m.group(2))) is False:
                log.warning("removing %s, left by an interrupted run of process %s", sibling, m.group(2))
                shutil.rmtree(sibling, ignore_errors=True) if sibling.is_dir() else sibling.unlink(missing_ok=True)


class NotOurs(FileExistsError):
    """An output path holds a file that the command did not write; the message names it and the way out."""


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check_overwrite(path: str | Path, ours: Callable[[bytes], bool], command: str, force: bool = False) -> None:
    """Refuse (:class:`NotOurs`) to replace ``path`` unless it is absent, written by ``command`` before (``ours`` of
    its first 4 KiB: the header that command writes), or ``force``. Seen: ``gptjax-plan --out <run>/config.json``
    replaced a run's config, after which resume, serve and eval all failed."""
    path = Path(path)
    if force or not (path.exists() or path.is_symlink()):
        return
    if path.is_dir():
        raise NotOurs(f"{path} is a directory; {command} writes a file there: choose another --out")
    with open(path, "rb") as f:
        head = f.read(4096)
    if not ours(head):
        raise NotOurs(f"{path} exists and was not written by {command}; it is left as it is: choose another "
                      "--out" + (", or pass --force to replace it" if command == "gptjax-plan" else
                                 ", or remove it first"))


def write_atomic(path: str | Path, content: str | bytes) -> Path:
    """Write a file whole or not at all: a temporary sibling, then a rename over ``path`` (on an object store, the
    object: each is written whole)."""
    if storage.is_remote(path):
        target = storage.as_path(path)
        target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)
        return target
    path = Path(path)
    tmp = _sibling(path, "tmp")
    try:
        tmp.write_bytes(content) if isinstance(content, bytes) else tmp.write_text(content)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def atomic_directory(dest: str | Path) -> Iterator[Path]:
    """Build directory ``dest`` whole or not at all: the block fills a temporary sibling, which is renamed to
    ``dest`` when the block ends without an error (a previous ``dest`` is replaced only once the new one is in
    place: moved aside, then removed); on an error the sibling is removed and ``dest`` is as it was. Whether an
    existing ``dest`` may be replaced is the caller's decision."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(dest)
    tmp = _sibling(dest, "tmp")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with deferred_interrupt():  # the swap and the removal of the previous one, whole
        old = _sibling(dest, "old") if dest.exists() else None
        if old is not None:
            dest.rename(old)
        try:
            tmp.rename(dest)
        except BaseException:
            if old is not None:
                old.rename(dest)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


class RunLocked(RuntimeError):
    """Another process writes this run directory; the message names it."""


class WriterLock:
    """The one writer of a run directory (training, ``--extend-steps``, an import into it), across processes and
    hosts sharing a filesystem.

    Mechanism: ``<run>/writer.lock`` is created with ``O_CREAT | O_EXCL`` (atomic on local filesystems and on NFS
    v3 and later; on a bucket a conditional create, ``storage.create_exclusive``) and holds the writer's host, pid,
    start time and command; while it is held a daemon thread touches it every ``HEARTBEAT_S`` seconds (on a
    bucket, rewrites it). A lock whose holder is gone is stale: on the same host when its pid
    no longer runs (taken over at once), from another host (or a pid reused since) when it has not been touched for
    ``STALE_S`` seconds. A stale lock is taken over with a warning naming the old holder (takeovers are serialised
    by a second ``O_EXCL`` file, so two newcomers never both win); a live one refuses the newcomer with
    :class:`RunLocked`, never shared. Released (the file removed, if still this holder's) on any exit that runs
    Python's cleanup; a SIGKILLed holder leaves a stale lock, which the next writer takes over."""

    HEARTBEAT_S = 5.0
    STALE_S = 60.0

    def __init__(self, run: RunDir | str | Path, command: str | None = None):
        self.run = run if isinstance(run, RunDir) else RunDir(run)
        self.path = self.run.lock
        self.info = {"host": HOST, "pid": os.getpid(), "since": _now(), "command": command or _command(),
                     "token": uuid.uuid4().hex}
        self.created_dir = False
        self._stop: threading.Event | None = None

    def __enter__(self) -> "WriterLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> "WriterLock":
        self.created_dir = not self.run.path.exists()
        self.run.path.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            if not storage.create_exclusive(self.path, json.dumps(self.info).encode()):
                holder = self._read(self.path)
                why = self._stale(holder, self.path)
                if why is None:
                    raise RunLocked(self.refusal(holder)) from None
                self._take_over(holder, why)
                continue
            self._stop = threading.Event()
            threading.Thread(target=self._beat, args=(self._stop,), daemon=True, name="gptjax-lock").start()
            return self
        raise RunLocked(f"{self.run}: could not take {self.path.name} (other processes keep taking it over)")

    def abandon(self) -> None:
        """Stop holding the lock without removing it (the storage holding it does not answer): it goes stale and
        the next writer takes it over."""
        if self._stop is not None:
            self._stop.set()
            self._stop = None

    def release(self) -> None:
        if self._stop is None:
            return
        self._stop.set()
        self._stop = None
        try:
            if (self._read(self.path) or {}).get("token") == self.info["token"]:
                storage.delete(self.path)
        except Exception as e:  # noqa: BLE001 - a bucket that stopped answering: the lock goes stale, is taken over
            log.warning("could not remove %s (%s): the next writer takes it over once it is stale", self.path,
                        fault_reason(e))

    def refusal(self, holder: dict | None) -> str:
        who = (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')} "
               f"({holder.get('command')})" if holder else "a process that is still creating its lock")
        return (f"{self.run} is being written by {who}; wait for it to end or stop it (a lock left by a killed job is "
                f"taken over once its holder is gone: at once on this host, from another host after "
                f"{self.STALE_S:.0f} s without a heartbeat in {self.path})")

    def _beat(self, stop: threading.Event) -> None:
        data = json.dumps(self.info).encode()
        while not stop.wait(self.HEARTBEAT_S):
            with contextlib.suppress(Exception):  # a missed beat is no fault; STALE_S allows for many
                storage.rewrite(self.path, data)

    @staticmethod
    def _read(path) -> dict | None:
        try:
            return json.loads(storage.read_bytes(path) or b"")
        except (OSError, ValueError):
            return None

    def _stale(self, holder: dict | None, path) -> str | None:
        """Why the lock at ``path`` is stale (None: it is held)."""
        age = storage.age_s(path)
        if age is None:
            return "it was just released"
        if holder and process_alive(holder.get("host"), int(holder.get("pid", -1))) is False:
            return f"process {holder['pid']} on {holder['host']} no longer runs"
        if age > self.STALE_S:
            return f"no heartbeat for {age:.0f} s"
        return None

    def _take_over(self, holder: dict | None, why: str) -> None:
        guard = storage.as_path(f"{self.path}.takeover")
        if not storage.create_exclusive(guard, b""):
            if (storage.age_s(guard) or 0.0) > self.STALE_S:
                storage.delete(guard)  # a takeover that died half-way
            return
        try:
            current = self._read(self.path)
            if current == holder and self._stale(current, self.path) is not None:  # not re-taken meanwhile
                storage.delete(self.path)
                if holder:
                    log.warning("took over the lock of %s: %s held it since %s (%s), and %s", self.run,
                                f"pid {holder.get('pid')} on {holder.get('host')}", holder.get("since"),
                                holder.get("command"), why)
        finally:
            storage.delete(guard)


def _command() -> str:
    """This process's command line, as typed: ``gptjax-train ...`` or ``python -m gptjax.cli.train ...``."""
    script = Path(sys.argv[0])
    head = (f"python -m gptjax.cli.{script.stem}" if script.parent.name == "cli" and script.parent.parent.name ==
            "gptjax" else script.name)
    return " ".join([head, *sys.argv[1:]])


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")
