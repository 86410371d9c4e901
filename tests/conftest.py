import os
import shutil
import subprocess
import sys
import tempfile
import uuid

# The test session runs on the CPU with 8 simulated devices (set before JAX starts). Single-device tests pass
# jax.devices()[:1] (or single_device_mesh()) explicitly; sharding tests build meshes over all 8. Multi-process
# tests start their own processes with 2 devices each. Helpers live in tests/helpers.py, not here.
#
# XLA:CPU's backend (LLVM) optimisation is off for the whole session, the processes the tests start included
# (helpers.cpu_env keeps the flag): the suite compiles hundreds of tiny programs whose running time is negligible,
# and at level 0 compiling is what shrinks. Measured: test_model + test_planning 342 -> 223 worker-seconds; the
# coordinate check's CLI 50 -> 29 s. The flag changes the machine code only, not the HLO, its fusions or the
# buffer assignment that the memory planner is checked against; gptjax itself, bench/ and tools/gpu_check.py
# compile at XLA's default level.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                           " --xla_force_host_platform_device_count=8").strip()

# One persistent XLA compilation cache for the session: both xdist workers and every training / CLI process the
# tests start inherit it (the workers inherit the controlling process's environment), so the nano model's steps,
# compiled by dozens of tests and subprocesses, are compiled once. It is new for each session and removed at its
# end: a run never loads executables from an earlier checkout. A cache dir set by the caller is used and kept.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="gptjax-test-xla-cache-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

# Ctrl-C as a terminal gives it, however the suite was started: a suite started in the background by a
# non-interactive shell (`(make test &)`) inherits SIGINT ignored, and every process it starts does too, so the
# tests that interrupt on purpose saw nothing (measured: 3 failures in tests/test_faults.py, launched so).
import signal  # noqa: E402

signal.signal(signal.SIGINT, signal.default_int_handler)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from gptjax.data.corpus import default_corpus_path  # noqa: E402


def pytest_sessionfinish(session):
    if _OWN_CACHE and not hasattr(session.config, "workerinput"):  # the controlling process, after the workers
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(autouse=True)
def _sigint_handler_as_it_was():
    """A console script's entry called in-process (``gptjax.cli.data.main([...])``) leaves SIGINT ignored, as a
    real command does while it exits; the next test in that worker then saw no KeyboardInterrupt from a Ctrl-C it
    raised on purpose (CI, tests/test_faults.py, depending on how xdist shared out the tests)."""
    import signal

    before = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """The first ~300 KB of the embedded Austen corpus (real text, whole chapters)."""
    text = default_corpus_path().read_text(encoding="utf-8")
    cut = text.index("CHAPTER", 300_000)
    path = tmp_path_factory.mktemp("corpus") / "austen_small.txt"
    path.write_text(text[:cut], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def storage_env() -> dict:
    """The environment that points the clients at the S3 server and the GCS emulator on loopback
    (``tools/storage_servers``, which ``.ci/run`` starts; started here if they are not up)."""
    r = subprocess.run([Path(__file__).resolve().parents[1] / "tools" / "storage_servers", "up"],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "GPTJAX_PYTHON": sys.executable})
    assert r.returncode == 0, r.stderr
    env = dict(line.removeprefix("export ").split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    assert env["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
    os.environ.update(env)  # the in-process clients (boto3, s3fs, TensorStore through gptjax.storage)
    return env


@pytest.fixture
def bucket(storage_env) -> str:
    import boto3

    name = f"gptjax-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture
def gs_bucket(storage_env) -> str:
    """A fresh bucket on the GCS emulator (which serves files, not TensorStore's checkpoints: tools/storage_servers)."""
    from google.cloud import storage

    name = f"gptjax-test-{uuid.uuid4().hex[:12]}"
    storage.Client().create_bucket(name)
    return f"gs://{name}"
