"""What every console script shares: the config arguments (``--config``, ``--preset``, ``--model-preset``,
``--set``), logging set-up, turning the errors users cause into one line and exit code 2, and Ctrl-C into one
line and exit code 130 (:func:`console_script`)."""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, Iterator

from gptjax.cli import startup_interrupted
from gptjax.config import MODEL_PRESETS, RUN_PRESETS, ConfigError, RunConfig, build_run_config
from gptjax.runs import DamagedFile, NotOurs, route_faults
from gptjax.storage import StorageError


def add_config_args(p: argparse.ArgumentParser, default_preset: str | None = "austen") -> None:
    p.add_argument("--preset", default=default_preset, choices=sorted(RUN_PRESETS),
                   help=f"run preset (default: {default_preset})")
    p.add_argument("--config", help="a .py file with config() or a .json RunConfig; replaces --preset")
    p.add_argument("--model-preset", help=f"model preset: {', '.join(MODEL_PRESETS)}")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a field (repeatable), e.g. --set model.dtype=bfloat16")


def config_from_args(a: argparse.Namespace, *extra_overrides: str, **model_fields) -> RunConfig:
    """The run config from the shared arguments; ``extra_overrides`` come from a script's own flags and are
    applied before ``--set`` (so ``--set`` wins)."""
    return build_run_config(**config_args(a, *extra_overrides), **model_fields)


def config_args(a: argparse.Namespace, *extra_overrides: str) -> dict:
    """The shared arguments as keyword arguments of ``build_run_config`` / ``build_config_dict``."""
    return dict(base=a.config or a.preset, model_preset_name=a.model_preset, overrides=[*extra_overrides, *a.set])


def at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``low`` (``--batch-size 0`` was "range() arg 3 must not be zero",
    ``--shots -1`` "Sample larger than population", and ``--limit 0`` scored everything)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"takes an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "orbax", "jax._src", "grain", "botocore", "aiobotocore", "s3fs", "gcsfs"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class UserError(Exception):
    """An error in what the user asked for; the message is the whole story."""


@contextlib.contextmanager
def user_errors(*kinds: type[BaseException], log: Path | None = None) -> Iterator[None]:
    """Turn ``ConfigError``, ``NotOurs`` (an output path holding someone else's file), ``DamagedFile``,
    ``StorageError`` (a bucket that does not exist or refuses writes) and ``kinds``
    into ``error: <message>`` on stderr and ``SystemExit(2)``. ``log``: where
    what background threads still report while the process exits goes (a fault leaves orbax's writes abandoned)."""
    try:
        yield
    except (ConfigError, UserError, NotOurs, DamagedFile, StorageError, *kinds) as e:
        print(f"error: {e}", file=sys.stderr)
        _exit_log[0] = log
        raise SystemExit(2) from None


_exit_log: list[Path | None] = [None]  # where the failing command's leftover reports go as the process exits


EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


def console_script(prog: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """The entry point of console script ``prog``: Ctrl-C anywhere is one line and exit code 130 (training saves
    and exits 75 instead, see gptjax-train), after the script's own cleanup (temporary directories are removed on
    the way out); reports of abandoned background work after a failure go to the run's log, not the console."""
    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def entry(argv: list[str] | None = None) -> int:
            sys.unraisablehook = _forward_interrupts(sys.unraisablehook)
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, _on_interrupt)
            if startup_interrupted[0]:  # held by gptjax.cli while the script's modules were imported
                startup_interrupted[0] = False
                return _interrupted(prog)
            try:
                code = main(argv)
                if threading.current_thread() is threading.main_thread():
                    signal.signal(signal.SIGINT, signal.SIG_IGN)  # done: a late Ctrl-C does not turn it into 130
                return code
            except Exception as e:
                if not _interrupt_inside(e):
                    raise
                return _interrupted(prog)
            except KeyboardInterrupt:
                return _interrupted(prog)
            except SystemExit as e:
                if e.code not in (0, None):
                    quiet_exit(_exit_log[0])
                raise

        return entry

    return wrap


def _interrupted(prog: str) -> int:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # one interrupt is enough: later ones are ignored
    print(f"{prog}: interrupted; nothing half-written was left", file=sys.stderr)
    quiet_exit(_exit_log[0])
    return EXIT_INTERRUPTED


def _interrupt_inside(error: BaseException) -> bool:
    """``error`` was caused by a Ctrl-C: a KeyboardInterrupt raised inside a library callback comes back wrapped
    (seen once in the suite: an exception JAX re-raised while flax built the model's blocks, exit 1 and a
    traceback instead of the one line)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, KeyboardInterrupt) or "KeyboardInterrupt" in f"{type(error).__name__}: {error}":
            return True
        error = error.__cause__ or error.__context__
    return False


def _on_interrupt(signum, frame) -> None:
    """Ctrl-C as KeyboardInterrupt, but not inside an import (a C extension interrupted half-way through its
    initialisation aborted the process at exit: "SetTimeZone() has already been called", exit 134) or a garbage
    collection callback (which would swallow it): there it is signalled again, shortly, from outside."""
    inner = frame
    while inner is not None:
        code = inner.f_code
        if code.co_filename.startswith("<frozen importlib") or code.co_name.endswith("gc_callback"):
            threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()
            return
        inner = inner.f_back
    raise KeyboardInterrupt


def _forward_interrupts(hook):
    """An unraisable-exception hook that re-raises a Ctrl-C where it can be handled: a KeyboardInterrupt that lands
    in a callback (JAX's garbage-collection hook runs at any allocation) is otherwise printed as "Exception
    ignored" and lost."""
    def forward(unraisable) -> None:
        if issubclass(unraisable.exc_type, KeyboardInterrupt):  # signalled again, from outside the callback
            threading.Timer(0.01, os.kill, (os.getpid(), signal.SIGINT)).start()
        else:
            hook(unraisable)

    return forward


def quiet_exit(log: Path | None) -> None:
    """From now on (the process is about to exit), reports of background threads that lost their event loop or
    were abandoned mid-write go to ``log`` (created only if one comes), or nowhere, not over the one line already
    printed (``runs.route_faults``, never undone)."""
    route_faults(log)
