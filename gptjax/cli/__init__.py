"""Console scripts, one module each (``gptjax-train``, ``gptjax-sample``, ``gptjax-plan``, ``gptjax-plot``,
``gptjax-scaling``, ``gptjax-export``, ``gptjax-import``); each builds its parser in ``parser()``, with which the
docs test parses every command shown in README.md and docs/. The top layer.

A console script's start-up is a second of imports (NumPy, ml_dtypes, then JAX) before its entry point installs
the Ctrl-C handling of :func:`gptjax.cli.common.console_script`; a Ctrl-C there was Python's traceback and exit
-2 (seen in CI). So when this package is imported by a script starting (``python -m gptjax.cli.X`` or an installed
``gptjax-*``), an interrupt inside those imports is held here and the entry point answers it (one line, 130)
before doing anything; nothing has been written by then.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

startup_interrupted: list[bool] = [False]  # a Ctrl-C came during start-up; the entry point answers it


def _held_during_startup(signum, frame) -> None:
    inner = frame
    while inner is not None:
        if inner.f_code.co_filename.startswith("<frozen importlib"):
            startup_interrupted[0] = True
            return
        inner = inner.f_back
    raise KeyboardInterrupt


def _starting_a_script() -> bool:
    """``python -m`` sets ``argv[0]`` to "-m" while it imports the module's packages; an installed console script
    is ``bin/gptjax-*``. Not for a notebook or a test that imports a script's module (their Ctrl-C is theirs)."""
    first = sys.argv[0] if sys.argv else ""
    return first == "-m" or os.path.basename(first).startswith("gptjax-")


if threading.current_thread() is threading.main_thread() and _starting_a_script() \
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _held_during_startup)
