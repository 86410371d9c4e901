"""The frame of a training job, whatever it trains (pre-training, a fine-tune): one writer per run directory, the
checkpoint policy decided before anything is written, faults routed to the run's ``errors.log`` and reported as
one line, the checkpointer closed on every way out, and a start that failed before writing leaves nothing.

``run_job(spec, resume, resume_step, body)`` holds the frame and calls ``body(policy)`` inside it; ``body`` wires
the program, data and hooks and runs the step loop (``training/trainer.py``, ``gptjax/finetune/trainer.py``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import time
from typing import Callable, Iterator, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

from gptjax import storage
from gptjax.checkpoint.manager import CheckpointWriteError
from gptjax.runs import FAULTS, RunDir, RunLocked, WriterLock, deferred_interrupt, fault_reason, route_faults
from gptjax.training.checkpointing import CheckpointPolicy, RunSpec

log = logging.getLogger(__name__)
faults = FAULTS  # tracebacks of faults: into the run's errors.log (fault_log)

STORAGE_FAULTS = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS)  # the disk, not the request

R = TypeVar("R")


class RunWriteError(OSError):
    """A file of the run (metrics, TensorBoard events, the summary, the curves) could not be written."""


def run_job(spec: RunSpec, resume: bool | str, resume_step: int | None,
            body: Callable[[CheckpointPolicy], R]) -> R:
    """``body(policy)`` inside the frame: the writer lock first (a second writer is refused before any write), then
    the :class:`CheckpointPolicy` (which refuses a conflicting run directory, or raises ``RunComplete`` for this
    very run, finished). A failed checkpoint write is ``CheckpointWriteError`` and a full or failing disk
    ``RunWriteError``, one line each naming ``errors.log``; any other error goes out as it is, after the
    checkpointer is closed."""
    run = spec.run
    lock = None
    started = time.monotonic()
    try:
        with deferred_interrupt():  # taken whole, so that the cleanup below always knows what it holds
            lock = lock_for_job(run)
        with fault_log(run):
            policy = CheckpointPolicy(spec, resume, resume_step)  # refuses a conflicting run dir before writing
            try:
                result = body(policy)
                policy.close()  # completes a background save
            except CheckpointWriteError as e:
                faults.error("checkpoint write failed", exc_info=True)
                _close_after_fault(policy)
                raise CheckpointWriteError(f"{e} (details in {run.where(run.LOG)})") from None
            except storage.StorageError as e:  # a bucket that stopped answering (after the retries)
                faults.error("the bucket failed", exc_info=True)
                _close_after_fault(policy)
                raise storage.StorageError(f"{e}; resume with --resume once it answers (from the last checkpoint "
                                           f"that was committed)") from None
            except OSError as e:
                if e.errno not in STORAGE_FAULTS:  # a missing file the user named, an existing run: as they are
                    _close_after_fault(policy)
                    raise
                faults.error("writing the run failed", exc_info=True)
                _close_after_fault(policy)
                raise RunWriteError(f"could not write {e.filename or run}: {fault_reason(e)}; the checkpoints "
                                    f"{policy.checkpointer.all_steps()} are intact "
                                    f"(details in {run.where(run.LOG)})") from None
            except BaseException:
                _close_after_fault(policy)  # the error on its way out is the one to report
                raise
            return result
    finally:
        if lock is not None:
            # (a run on a bucket: what background writes still report while these take seconds goes to errors.log)
            with deferred_interrupt(), fault_log(run) if run.url else contextlib.nullcontext():
                if run.url and storage.gave_up_since(started):  # the bucket stopped answering: not minutes more
                    lock.abandon()
                    log.warning("the lock %s is left (the next writer takes it over) and the run's last files are "
                                "kept in %s", run.lock, storage.keep(run.url))
                else:
                    _push_last(run)
                    lock.release()
                run.remove_if_empty(directory=lock.created_dir)  # a start that failed before writing leaves nothing


def _push_last(run: RunDir) -> None:
    """A run on a bucket: what the job wrote since its last checkpoint (the summary, the curves, the last metrics,
    errors.log) goes up as it ends, on every way out; a bucket that cannot take it is logged, the error already on
    its way out is the one reported."""
    try:
        run.push()
    except Exception as e:  # noqa: BLE001
        log.warning("could not copy the run's last files to %s (%s): they are kept in %s", run, fault_reason(e),
                    storage.keep(run.url))


def _close_after_fault(policy: CheckpointPolicy) -> None:
    try:
        policy.close()
    except Exception:  # noqa: BLE001 - the first fault is the one reported; this one goes to errors.log
        faults.error("closing the checkpointer after a fault failed too", exc_info=True)


def lock_for_job(run: RunDir) -> WriterLock | None:
    """The run directory's writer lock, taken once for the job by process 0 (the others learn whether it got it):
    a second writer is refused with one line naming the holder (``RunLocked``); on a bucket, one that does not
    exist or refuses writes is found first (``storage.StorageError``), before anything else is done."""
    lock, refusal = None, None
    if jax.process_index() == 0:
        try:
            if run.url:
                storage.check_writable(run.url)
            lock = WriterLock(run).acquire()
        except (RunLocked, storage.StorageError) as e:
            refusal = e
    if jax.process_count() > 1:
        if not int(multihost_utils.broadcast_one_to_all(np.int32(refusal is None))):
            raise refusal or RunLocked(f"{run} could not be taken by this job (process 0 says why; see {run.lock})")
    elif refusal:
        raise refusal
    return lock


@contextlib.contextmanager
def fault_log(run: RunDir) -> Iterator[None]:
    """While a run trains, the storage layer's messages (orbax and grain log through absl: a full disk is dozens
    of tracebacks), asyncio's and background threads' reports of the writes orbax abandons after a fault, and the
    tracebacks of faults go to the run's ``errors.log``, not the console; the error line names the file (the CLI
    keeps routing them there while the process exits)."""
    undo = route_faults(run.log)
    try:
        yield
    finally:
        undo()
