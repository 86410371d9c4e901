"""Real multi-process training: 2 processes x 2 CPU devices on 127.0.0.1 (jax.distributed + gloo)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gptjax import storage
from gptjax.config import RunConfig
from helpers import cpu_env, free_port, run_processes

pytestmark = pytest.mark.slow


def write_config(tmp_path, corpus, run_dir) -> str:
    cfg = {"model": {"vocab_size": 512, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 128,
                     "max_seq_len": 64},
           "data": {"corpus": str(corpus), "document_masking": True},
           "optim": {"lr": 3e-3, "warmup_steps": 2},
           "mesh": {"data": 2, "fsdp": 2, "tensor": 1},
           "train": {"run_dir": str(run_dir), "steps": 8, "batch_size": 8, "seq_len": 64, "log_every": 2,
                     "eval_every": 4, "eval_batches": 2, "checkpoint_every": 4, "sample_tokens": 0, "tasks": "",
                     "progress": False, "peak_flops": 1e11}}
    RunConfig.from_dict(cfg)  # valid
    path = tmp_path / f"{run_dir.name}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def summary(run_dir) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def losses(run_dir) -> list[tuple]:
    """Every (step, training loss, validation loss) recorded, in order."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in rows]


def test_two_process_training_checkpoint_and_resume(tmp_path, small_corpus):
    full_dir, part_dir = tmp_path / "full", tmp_path / "part"
    run_processes(write_config(tmp_path, small_corpus, full_dir), 2, 2)
    full = summary(full_dir)
    assert full["final_step"] == 8
    # the two processes as two slices (one per process: data parallelism over "DCN", the processes' link): the
    # same device layout as the flat mesh here, so the same losses, bit for bit
    slices_dir = tmp_path / "slices"
    outs = run_processes(write_config(tmp_path, small_corpus, slices_dir), 2, 2, "--set", "mesh.slices=2")
    assert "(4 devices, 2 slices: data 2-way over DCN)" in outs[0]
    assert losses(slices_dir) == losses(full_dir)

    part_cfg = write_config(tmp_path, small_corpus, part_dir)
    run_processes(part_cfg, 2, 2, "--stop-after", "4")
    assert summary(part_dir)["final_step"] == 4
    step_dir = part_dir / "checkpoints" / "4"
    assert {p.name for p in (step_dir / "data").glob("process_*.json")} == {"process_0-of-2.json",
                                                                           "process_1-of-2.json"}
    assert (step_dir / "state" / "ocdbt.process_1").exists()  # both processes wrote their shards
    other_dir = tmp_path / "other"  # the same step-4 run, resumed below on another mesh
    shutil.copytree(part_dir, other_dir)
    outs = run_processes(part_cfg, 2, 2, "--resume")
    assert "steps 4->8" in outs[0]
    resumed = summary(part_dir)
    assert resumed["final_step"] == 8
    # the same process count and mesh: bit-identical, step by step
    assert losses(part_dir) == losses(full_dir)
    assert (resumed["train_loss"], resumed["val_loss"]) == (full["train_loss"], full["val_loss"])

    # Restore onto a different mesh shape: the step-4 checkpoint of the 2x2 (data x fsdp) run continues as
    # pure FSDP over the 4 devices; same data order, so the same losses up to reduction order.
    other_cfg = write_config(tmp_path, small_corpus, other_dir)
    run_processes(other_cfg, 2, 2, "--resume", "--set", "mesh.data=1", "--set", "mesh.fsdp=4")
    moved = summary(other_dir)
    assert moved["final_step"] == 8
    assert moved["train_loss"] == pytest.approx(full["train_loss"], rel=1e-4)
    assert json.loads((other_dir / "config.json").read_text())["mesh"]["fsdp"] == 4

    # Each process fed only its rows: together they make the global batch of a one-process run on the same
    # (2 x 2) mesh, up to the order of rows within the batch.
    single_dir = tmp_path / "single"
    run_processes(write_config(tmp_path, small_corpus, single_dir), 1, 4)
    assert summary(single_dir)["train_loss"] == pytest.approx(full["train_loss"], rel=1e-4)


def test_two_process_sigterm_agrees_on_a_step_saves_and_resumes(tmp_path, small_corpus):
    """A scheduler's SIGTERM reaching only process 1: JAX's pre-emption sync point tells process 0 too, both stop
    at the same step after saving it collectively (exit 75), and --resume finishes the run."""
    import signal
    import time

    run = tmp_path / "pre"
    path = write_config(tmp_path, small_corpus, run)
    cfg = json.loads(open(path).read())
    cfg["train"].update(steps=400, log_every=1, eval_every=1000, checkpoint_every=1000)
    open(path, "w").write(json.dumps(cfg))
    env = cpu_env(2)
    port = free_port()
    cmd = [sys.executable, "-m", "gptjax.cli.train", "--config", path, "--coordinator", f"127.0.0.1:{port}",
           "--num-processes", "2"]
    procs = [subprocess.Popen(cmd + ["--process-id", str(i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        assert time.time() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [75, 75], outs[0][-2000:] + outs[1][-2000:]
    steps = {int(o.split("pre-empted (SIGTERM) at step ")[1].split(":")[0]) for o in outs}
    assert len(steps) == 1  # the same step on both processes
    (step,) = steps
    step_dir = run / "checkpoints" / str(step)
    assert {p.name for p in (step_dir / "data").glob("process_*.json")} == {"process_0-of-2.json",
                                                                           "process_1-of-2.json"}
    outs = run_processes(path, 2, 2, "--resume", "--steps", str(step + 4), "--set", "optim.schedule_steps=400")
    assert f"steps {step}->{step + 4}" in outs[0]
    assert summary(run)["final_step"] == step + 4


def test_a_checkpoint_resumes_on_another_process_count(tmp_path, small_corpus, request):
    """Saved by 2 processes, resumed by 1 (and the other way): the global batches do not depend on the process
    count, so the run continues with the losses of an uninterrupted one; the checkpoint is never taken for
    damaged (it used to be moved aside: "process_0-of-1.json does not exist")."""
    full_dir = tmp_path / "full"
    run_processes(write_config(tmp_path, small_corpus, full_dir), 1, 4)
    full = summary(full_dir)
    for first, then in ((2, 1), (1, 2)):
        run_dir = tmp_path / f"from{first}to{then}"
        cfg = write_config(tmp_path, small_corpus, run_dir)
        run_processes(cfg, first, 4 // first, "--stop-after", "4")
        assert len(list((run_dir / "checkpoints" / "4" / "data").glob(f"process_*-of-{first}.json"))) == first
        outs = run_processes(cfg, then, 4 // then, "--resume")
        assert "steps 4->8" in outs[0]
        assert not list((run_dir / "checkpoints").glob("*.damaged-*"))
        resumed = summary(run_dir)
        assert resumed["final_step"] == 8
        assert resumed["train_loss"] == pytest.approx(full["train_loss"], rel=1e-4)
        assert resumed["val_loss"] == pytest.approx(full["val_loss"], rel=1e-4)

    # the same on a bucket, with no directory the two processes share: each has its own working directory, the
    # checkpoints go only to the bucket, process 1 reads the data process 0 prepared from there; a scheduler's
    # SIGTERM to process 1 pre-empts both at one step, saved to the bucket; then one process on a third "machine"
    # resumes it
    import signal

    url = f"{request.getfixturevalue('bucket')}/runs/two"
    cfg = write_config(tmp_path, small_corpus, tmp_path / "on-a-bucket")
    spec = json.loads(open(cfg).read())
    spec["train"]["run_dir"] = url
    open(cfg, "w").write(json.dumps(spec))
    storage_env = request.getfixturevalue("storage_env")
    hosts = [tmp_path / f"host{i}" for i in range(3)]
    cmd = [sys.executable, "-m", "gptjax.cli.train", "--config", cfg, "--coordinator", f"127.0.0.1:{free_port()}",
           "--num-processes", "2"]
    procs = [subprocess.Popen(cmd + ["--process-id", str(i)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env={**cpu_env(2), **storage_env, "GPTJAX_WORK_DIR": str(hosts[i]),
                                              "PYTHONUNBUFFERED": "1"}) for i in range(2)]
    started = []
    for line in procs[0].stdout:  # process 0's banner: training has begun (its first step compiling)
        started.append(line)
        if line.startswith("gptjax: "):
            break
    procs[1].send_signal(signal.SIGTERM)
    outs = ["".join(started) + procs[0].communicate(timeout=300)[0], procs[1].communicate(timeout=300)[0]]
    assert [p.returncode for p in procs] == [75, 75], outs[0][-2000:] + outs[1][-2000:]
    (step,) = {int(o.split("pre-empted (SIGTERM) at step ")[1].split(":")[0]) for o in outs}
    assert 0 < step < 8
    held = [str(p) for p in storage.files_under(f"{url}/checkpoints/{step}")]
    assert {f"{url}/checkpoints/{step}/data/process_{i}-of-2.json" for i in range(2)} <= set(held), held
    assert not storage.read_bytes(f"{url}/writer.lock") and not any(any(h.iterdir()) for h in hosts[:2])
    assert not Path("s3:").exists(), "the bucket's URL was taken for a local path (in the processes' directory)"
    outs = run_processes(cfg, 1, 4, "--resume", env=lambda i: {**storage_env, "GPTJAX_WORK_DIR": str(hosts[2])})
    assert f"steps {step}->8" in outs[0]
    resumed = json.loads(storage.read_bytes(f"{url}/summary.json"))
    assert resumed["final_step"] == 8 and not any(".damaged-" in str(p) for p in storage.files_under(url))
    assert resumed["train_loss"] == pytest.approx(full["train_loss"], rel=1e-4)
    assert resumed["val_loss"] == pytest.approx(full["val_loss"], rel=1e-4)
