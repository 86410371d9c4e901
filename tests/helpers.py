"""Shared test helpers (imported by the test modules; ``conftest.py`` holds only session set-up and fixtures)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from gptjax.config import DataConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig, model_preset
from gptjax.sharding.mesh import single_device_mesh

ROOT = Path(__file__).resolve().parents[1]
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def cpu_env(devices: int = 1) -> dict:
    """A subprocess's environment on ``devices`` CPU devices: the session's other XLA flags (conftest.py), no
    SLURM variables."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT_FLAG)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join([*flags, f"{DEVICE_COUNT_FLAG}={devices}"]))
    return env


# A subprocess's environment with one CPU device (not the test session's 8 simulated ones).
ONE_DEVICE_ENV = cpu_env(1)


def nano_model(**kw) -> ModelConfig:
    """The ``nano`` preset (the smallest model that trains with the default run), fields overridden by ``kw``."""
    return model_preset("nano", **kw)


def small_run(run_dir: Path, corpus: Path, **train_kw) -> RunConfig:
    train = dict(run_dir=str(run_dir), steps=12, batch_size=8, seq_len=64, log_every=4, eval_every=6,
                 eval_batches=2, checkpoint_every=6, sample_tokens=0, tasks="", progress=False,
                 peak_flops=1e11)
    train.update(train_kw)
    return RunConfig(model=nano_model(), data=DataConfig(corpus=str(corpus)),
                     optim=OptimConfig(lr=3e-3, warmup_steps=2), train=TrainConfig(**train))


def tiny_program(steps: int = 40, **model_kw):
    from gptjax.training.program import Program

    cfg = RunConfig(model=nano_model(**model_kw), optim=OptimConfig(lr=1e-2, warmup_steps=0),
                    train=TrainConfig(steps=steps, batch_size=4, seq_len=32))
    return Program(cfg, single_device_mesh())


def random_batch(batch: int = 4, seq: int = 32, vocab: int = 512, seed: int = 0) -> dict[str, np.ndarray]:
    data = np.random.default_rng(seed).integers(0, vocab, (batch, seq + 1)).astype(np.int32)
    return {"inputs": data[:, :-1], "targets": data[:, 1:], "loss_mask": np.ones((batch, seq), np.float32)}


def batch_for(prog, seed: int = 0):
    return prog.global_batch(random_batch(seed=seed))


def assert_trees_equal(a, b) -> None:
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def run_cli(module: str, *args: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m gptjax.cli.<module> args...`` in a subprocess (one CPU device)."""
    return subprocess.run([sys.executable, "-m", f"gptjax.cli.{module}", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(config: str, n_processes: int, devices_per_process: int, *extra: str,
                  env: Callable[[int], dict] = lambda i: {}) -> list[str]:
    """``gptjax-train --config config`` on ``n_processes`` processes of ``devices_per_process`` CPU devices each,
    joined on loopback; ``env(i)``: process i's own variables. Their outputs, each must exit 0."""
    port = free_port()
    cmd = [sys.executable, "-m", "gptjax.cli.train", "--config", config, *extra]
    if n_processes > 1:
        cmd += ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n_processes)]
    procs = [subprocess.Popen(cmd + (["--process-id", str(i)] if n_processes > 1 else []),
                              env={**cpu_env(devices_per_process), **env(i)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(n_processes)]
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append(out)
        assert p.returncode == 0, out[-3000:]
    return outs


class ServerOutage:
    """A TCP forwarder on loopback in front of a server, which can go down (its listener closed: connections
    refused, the open ones reset) and come back: a storage server restarting, as its clients see it, with what it
    holds kept (moto keeps its objects in memory: restarting it would lose them)."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.port = free_port()
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.listener: socket.socket | None = None
        self.up()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen(64)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def down(self) -> None:
        self.listener.close()
        with self.lock:
            for c in self.conns:
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)
                c.close()
            self.conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
                server = socket.create_connection(self.target)
            except OSError:
                if listener.fileno() == -1:
                    return
                continue
            with self.lock:
                self.conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := a.recv(65536):
                b.sendall(data)
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
