"""Multi-host start-up through ``jax.distributed``, driven by flags or environment variables.

``GPTJAX_COORDINATOR`` (host:port), ``GPTJAX_NUM_PROCESSES`` and ``GPTJAX_PROCESS_ID`` (or the CLI flags
``--coordinator``, ``--num-processes``, ``--process-id``). With none given, the run is single-process, unless
the platform's cluster auto-detection (SLURM, TPU pods, ...) is asked for with ``--coordinator auto``.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)


def maybe_initialize(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, local_device_ids: list[int] | None = None) -> bool:
    """Call ``jax.distributed.initialize`` when a multi-process run is configured. Returns True if it did."""
    coordinator = coordinator or os.environ.get("GPTJAX_COORDINATOR")
    if num_processes is None and os.environ.get("GPTJAX_NUM_PROCESSES"):
        num_processes = int(os.environ["GPTJAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("GPTJAX_PROCESS_ID"):
        process_id = int(os.environ["GPTJAX_PROCESS_ID"])
    if coordinator is None:
        if num_processes not in (None, 1):
            raise ValueError("num_processes > 1 needs a coordinator address (--coordinator host:port)")
        return False
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or os.environ.get("GPTJAX_CPU_COLLECTIVES"):
        # CPU processes need a collectives backend for cross-process all-reduce etc. (gloo works on loopback).
        jax.config.update("jax_cpu_collectives_implementation", os.environ.get("GPTJAX_CPU_COLLECTIVES", "gloo"))
    if coordinator == "auto":
        jax.distributed.initialize()
    else:
        if num_processes is None or process_id is None:
            raise ValueError("a coordinator address needs --num-processes and --process-id too")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"process_id {process_id} is not in [0, {num_processes})")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, local_device_ids=local_device_ids)
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True
