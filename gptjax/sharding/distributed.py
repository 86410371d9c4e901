"""Multi-host start-up through ``jax.distributed``, driven by flags or environment variables, with a preflight.

``GPTJAX_COORDINATOR`` (host:port), ``GPTJAX_NUM_PROCESSES`` and ``GPTJAX_PROCESS_ID`` (or the CLI flags
``--coordinator``, ``--num-processes``, ``--process-id``). With none given, the run is single-process, unless
the platform's cluster auto-detection (SLURM, Kubernetes indexed Jobs, Cloud TPU, Open MPI) is asked for with
``--coordinator auto``: JAX's own detection then gives the address, the process count and this process's id.

The preflight turns what would hang or abort into one line (``PreflightError``; the CLI prints it and exits 2):

* a partial ``SLURM_*`` environment: a shell inside an allocation, or a batch script, without ``srun``;
* a coordinator that does not answer, or processes that do not join, within ``GPTJAX_INIT_TIMEOUT`` seconds
  (default 300, JAX's own): JAX's coordination service aborts the process (``LOG(FATAL)``, no exception) and never
  says who is missing, so a rendezvous on the coordinator's port runs first and names the absent processes;
* (``check_mesh``) devices per process that do not match the mesh, or a process count that does not divide its
  batch shards; (``check_shared_dir``) a run directory that not every process can see.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from pathlib import Path

import jax
import numpy as np

log = logging.getLogger(__name__)

INIT_TIMEOUT_S = 300  # JAX's initialization_timeout default
# what JAX's SLURM detection reads (jax._src.clusters.slurm_cluster): all or none must be there
SLURM_STEP_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


class PreflightError(Exception):
    """A multi-process start that cannot work; the message names what is wrong and the fix."""


def init_timeout() -> int:
    return int(os.environ.get("GPTJAX_INIT_TIMEOUT", INIT_TIMEOUT_S))


def check_slurm_env(env: dict[str, str] | None = None) -> None:
    """A job's variables without a step's: JAX's SLURM detection then silently does not apply (one process
    waits for peers that never start, or the start fails on a missing address)."""
    env = os.environ if env is None else env
    if "SLURM_JOB_ID" not in env:
        return
    missing = [v for v in SLURM_STEP_VARS if v not in env]
    if missing:
        raise PreflightError(
            f"SLURM_JOB_ID={env['SLURM_JOB_ID']} is set but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not: this is an allocation's shell or a batch script, not a "
            "job step; start each process with srun (srun -n N gptjax-train --coordinator auto ...), or use "
            "gptjax-launch slurm, which does")


def detect() -> tuple[str, int, int, list[int] | None]:
    """``(coordinator address, process count, process id, local device ids)`` from JAX's cluster detection."""
    import inspect

    from jax._src import clusters

    find = clusters.ClusterEnv.auto_detect_unset_distributed_params  # its parameters vary across JAX versions
    kw = {k: None for k in inspect.signature(find).parameters if k != "initialization_timeout"}
    if "initialization_timeout" in inspect.signature(find).parameters:
        kw["initialization_timeout"] = init_timeout()
    try:
        address, n, pid, local = find(**kw)
    except Exception as e:  # noqa: BLE001 - JAX's message is kept, one line
        raise PreflightError(f"--coordinator auto: JAX's cluster detection failed: {e}".replace("\n", " ")) from e
    if address is None or n is None or pid is None:
        raise PreflightError("--coordinator auto: no cluster found (SLURM, Kubernetes indexed Job, Cloud TPU, Open "
                             "MPI); give --coordinator host:port --num-processes N --process-id I instead")
    return address, int(n), int(pid), local


def _env_device_ids() -> list[int] | None:
    """``GPTJAX_LOCAL_DEVICE_IDS`` (``0,1,...``): the devices this process drives. JAX's detection gives a SLURM
    process only device ``SLURM_LOCALID`` (one process per GPU); a process per host sets all of its GPUs here."""
    raw = os.environ.get("GPTJAX_LOCAL_DEVICE_IDS")
    return [int(x) for x in raw.split(",")] if raw else None


def rendezvous(address: str, num_processes: int, process_id: int, timeout: float | None = None) -> None:
    """Every process meets process 0 on the coordinator's port before JAX's start-up, within ``timeout`` seconds.

    Process 0 listens, the others connect (retrying) and say who they are; when all have joined process 0
    answers "ok" and closes the port for JAX's coordination service to bind. Otherwise every process that can
    raises the same ``PreflightError`` naming the address, the timeout and the processes that did not join."""
    timeout = init_timeout() if timeout is None else timeout
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    me = f"{process_id} {num_processes} {socket.gethostname()}"
    if process_id == 0:
        _rendezvous_serve(int(port), num_processes, deadline, address, timeout)
    else:
        _rendezvous_join(host, int(port), me, deadline, address, timeout, process_id, num_processes)


def _rendezvous_serve(port: int, n: int, deadline: float, address: str, timeout: float) -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        server.bind(("", port))
    except OSError as e:
        raise PreflightError(f"coordinator {address}: cannot listen on port {port} ({e.strerror}); another job "
                             "uses it: give another port") from e
    server.listen(max(n, 8))
    joined: dict[int, tuple[socket.socket, str]] = {}
    try:
        while len(joined) < n - 1 and (left := deadline - time.monotonic()) > 0:
            server.settimeout(left)
            try:
                conn, _ = server.accept()
            except socket.timeout:
                break
            conn.settimeout(max(deadline - time.monotonic(), 1.0))
            try:
                pid, count, host = conn.makefile().readline().split()
            except (OSError, ValueError):
                conn.close()
                continue
            if int(count) != n:
                error = (f"process {pid} on {host} was started for {count} processes, process 0 for {n}: start "
                         "every process with the same count")
                conn.sendall(f"error {error}\n".encode())
                conn.close()
                _close_all(joined, f"error {error}")
                raise PreflightError(error)
            joined[int(pid)] = (conn, host)
        missing = sorted(set(range(1, n)) - set(joined))
        if missing:
            error = (f"coordinator {address}: processes {_ids(missing)} of {n} did not join within {timeout:g} s "
                     f"(joined: 0{''.join(f', {p}' for p in sorted(joined))}); check that they were started, with "
                     "the same coordinator address, and that they can reach it (GPTJAX_INIT_TIMEOUT sets the wait)")
            _close_all(joined, f"error {error}")
            raise PreflightError(error)
        _close_all(joined, "ok")
    finally:
        server.close()


def _close_all(joined: dict, message: str) -> None:
    for conn, _ in joined.values():
        try:
            conn.sendall((message + "\n").encode())
        except OSError:
            pass
        conn.close()


def _rendezvous_join(host: str, port: int, me: str, deadline: float, address: str, timeout: float, pid: int,
                     n: int) -> None:
    no_answer = (f"coordinator {address} did not answer within {timeout:g} s (this is process {pid} of {n} on "
                 f"{socket.gethostname()}): check that process 0 runs on that host and that the port is reachable "
                 "from here (GPTJAX_INIT_TIMEOUT sets the wait)")
    while True:
        try:
            conn = socket.create_connection((host, port), timeout=max(min(deadline - time.monotonic(), 5.0), 0.1))
            break
        except OSError:
            if time.monotonic() >= deadline:
                raise PreflightError(no_answer) from None
            time.sleep(0.2)
    with conn:
        conn.sendall((me + "\n").encode())
        conn.settimeout(max(deadline - time.monotonic(), 0) + 10.0)  # process 0 answers by its own deadline
        try:
            answer = conn.makefile().readline().strip()
        except OSError:
            answer = ""
    if answer == "ok":
        return
    raise PreflightError(answer.removeprefix("error ") if answer.startswith("error ") else no_answer)


def _ids(ids: list[int]) -> str:
    return ", ".join(map(str, ids))


def maybe_initialize(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, local_device_ids: list[int] | None = None) -> bool:
    """Call ``jax.distributed.initialize`` when a multi-process run is configured, after the preflight (above).
    Returns True if it did."""
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
    local_device_ids = local_device_ids or _env_device_ids()
    if coordinator == "auto":
        check_slurm_env()
        coordinator, num_processes, process_id, detected_local = detect()
        local_device_ids = local_device_ids or detected_local
    else:
        if num_processes is None or process_id is None:
            raise ValueError("a coordinator address needs --num-processes and --process-id too")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"process_id {process_id} is not in [0, {num_processes})")
    if ":" not in coordinator:
        raise PreflightError(f"coordinator {coordinator!r} needs a port: host:port")
    rendezvous(coordinator, num_processes, process_id)
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids,
                               initialization_timeout=init_timeout())
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def check_mesh(cfg) -> None:
    """A run's mesh against the processes and their devices, before anything is compiled: every process drives the
    same number of devices, the mesh covers them all, the batch shards (data x fsdp) split evenly over the
    processes (each process loads only its own rows), and the batch and sequence split over the mesh
    (``RunConfig.check_mesh_split``)."""
    mesh_cfg = cfg.mesh
    from gptjax.config import ConfigError, batch_shards

    n = jax.process_count()
    local = jax.local_device_count()
    counts = _allgather_ints([local]) if n > 1 else np.array([[local]])
    if len(set(counts[:, 0].tolist())) > 1:
        per = ", ".join(f"process {i}: {c}" for i, c in enumerate(counts[:, 0].tolist()))
        raise PreflightError(f"processes drive different numbers of devices ({per}); every process needs the same "
                             "count (one process per GPU, or one per host with all of its GPUs)")
    try:
        sizes = mesh_cfg.resolve(jax.device_count())
    except ConfigError as e:
        raise PreflightError(f"{e} ({n} process{'es' * (n > 1)} x {local} device{'s' * (local > 1)} each)") from e
    shards = batch_shards(sizes)
    if n > 1 and shards % n:
        raise PreflightError(
            f"mesh data x fsdp = {sizes['data']} x {sizes['fsdp']} = {shards} batch shards cannot be split over {n} "
            f"processes (each loads its own rows): make data x fsdp a multiple of {n}, e.g. --set mesh.data={n}")
    try:
        cfg.check_mesh_split(sizes)  # (then the batch divides over the processes too)
    except ConfigError as e:
        raise PreflightError(str(e)) from e


def check_shared_dir(path: str | Path) -> None:
    """Every process writes a file into ``path``, then each looks for all of them: a run directory must be one
    directory for all processes (checkpoints are written by all and read back by all)."""
    n = jax.process_count()
    if n == 1:
        return
    from jax.experimental import multihost_utils

    path = Path(path)
    token = int(_allgather_ints([uuid.uuid4().int % 2**31])[0, 0])  # process 0's, agreed by all
    probe = path / f".preflight-{token}"
    probe.mkdir(parents=True, exist_ok=True)
    (probe / f"{jax.process_index()}").write_text(socket.gethostname())
    multihost_utils.sync_global_devices("gptjax preflight: shared dir written")
    seen = [int((probe / f"{i}").exists()) for i in range(n)]
    everyone = _allgather_ints(seen)  # [process, what it saw]
    multihost_utils.sync_global_devices("gptjax preflight: shared dir read")
    (probe / f"{jax.process_index()}").unlink(missing_ok=True)
    try:
        probe.rmdir()  # the last process out removes it
    except OSError:
        pass
    blind = [i for i in range(n) if not everyone[i].all()]
    if blind:
        raise PreflightError(
            f"run directory {path} is not shared: processes {_ids(blind)} of {n} do not see the files the others "
            "wrote there; put the run directory on a filesystem every host mounts at the same path")


def _allgather_ints(values: list[int]) -> np.ndarray:
    """``[process, len(values)]`` from every process (a collective: all processes must call it)."""
    from jax.experimental import multihost_utils

    out = np.asarray(multihost_utils.process_allgather(np.asarray(values, np.int32)))
    return out.reshape(jax.process_count(), len(values))
