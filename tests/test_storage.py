"""Runs on object storage, against a real S3 server on loopback (moto's server mode; ``tools/storage_servers up``,
which ``.ci/run`` starts and these tests start when it is not up): checkpoints written natively by TensorStore's
S3 driver, the run's other files copied up at every checkpoint, the lock a conditional create, a resume on another
machine (another working copy) exact."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from helpers import cpu_env, small_run
from gptjax import storage
from gptjax.runs import HOST, RunDir, RunLocked, WriterLock

PY = [sys.executable, "-m"]


def objects(url: str) -> list[str]:
    base = url.rstrip("/")
    return [str(p)[len(base) + 1:] for p in storage.files_under(url)]


def cli(*args: str, work: Path, s3_env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*PY, *args], capture_output=True, text=True, timeout=timeout,
                          env={**cpu_env(8), **s3_env, "GPTJAX_WORK_DIR": str(work)})  # the suite's 8 devices


def losses(rows: list[dict]) -> dict:
    return {(r["step"], k): r[k] for r in rows for k in ("loss", "val_loss") if r.get(k) is not None}


@pytest.mark.slow
def test_a_run_on_a_bucket_is_the_local_run_and_resumes_on_another_machine_then_falls_back_past_damage(
        tmp_path, small_corpus, bucket, s3_env):
    from gptjax.training import train

    local = train(small_run(tmp_path / "local", small_corpus))  # 12 steps, checkpoints at 6 and 12
    reference = losses(RunDir(tmp_path / "local").read_metrics())
    url = f"{bucket}/runs/a"
    cfg_file = tmp_path / "cfg.json"
    cfg = small_run(tmp_path / "unused", small_corpus)
    cfg_file.write_text(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, run_dir=url)).to_json())

    first = cli("gptjax.cli.train", "--config", str(cfg_file), "--stop-after", "6", work=tmp_path / "machine-a",
                s3_env=s3_env)
    assert first.returncode == 0, first.stderr[-3000:]
    held = objects(url)
    assert {"config.json", "metrics.jsonl", "tokenizer.model", "checkpoints/6/commit_success.txt",
            "checkpoints/6/state/manifest.ocdbt", "checkpoints/6/checksums.json"} <= set(held), held
    assert "writer.lock" not in held and not any("tmp" in k for k in held if k.startswith("checkpoints")), held
    assert not list((tmp_path / "machine-a").iterdir())  # the working copy went with the process

    # another machine: nothing local but the bucket's URL (the corpus file is not needed: the prepared data is there)
    second = cli("gptjax.cli.train", "--run-dir", url, "--resume", work=tmp_path / "machine-b", s3_env=s3_env)
    assert second.returncode == 0, second.stderr[-3000:]
    run = json.loads(storage.read_bytes(f"{url}/summary.json"))
    assert run["final_step"] == 12 and run["checkpoints"] == f"{url}/checkpoints"
    rows = [json.loads(line) for line in storage.read_bytes(f"{url}/metrics.jsonl").splitlines()]
    got = losses(rows)
    assert {k: got.get(k) for k in reference} == reference  # float for float: the bucket changed nothing
    assert set(got) - set(reference) == {(6, "loss")}  # (the stop at step 6 logged its step)
    assert run["val_loss"] == local.val_loss

    # read from the bucket (in place, one tensor at a time): the export is the local run's, byte for byte
    from gptjax.interop.export import export_run

    export_run(tmp_path / "local", tmp_path / "hf-local", progress=False)
    exported = cli("gptjax.cli.export", "--run-dir", url, "--out", str(tmp_path / "hf-bucket"), "--no-progress",
                   work=tmp_path / "reader", s3_env=s3_env)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert f"exported step 12 of {url}" in exported.stdout
    assert (tmp_path / "hf-bucket" / "model.safetensors").read_bytes() == \
        (tmp_path / "hf-local" / "model.safetensors").read_bytes()

    # the newest checkpoint damaged in the bucket: the resume falls back to step 6, moves 12 aside, and retrains
    # steps 7-12 exactly (the extension keeps the schedule)
    storage.delete(f"{url}/checkpoints/12/state/manifest.ocdbt")
    third = cli("gptjax.cli.train", "--run-dir", url, "--resume", "--extend-steps", "14", work=tmp_path / "c",
                s3_env=s3_env)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "checkpoint step 12 is damaged" in third.stderr
    held = objects(url)
    aside = {k.split("/")[1] for k in held if ".damaged-" in k}
    assert len(aside) == 1 and aside.pop().startswith("12.damaged-"), held
    assert any(k.endswith("/DAMAGED.txt") for k in held)
    rows = [json.loads(line) for line in storage.read_bytes(f"{url}/metrics.jsonl").splitlines()]
    redone = {k: v for k, v in losses(rows).items() if 6 < k[0] <= 12 and k in reference}
    assert redone == {k: v for k, v in reference.items() if 6 < k[0] <= 12} and redone


def test_a_bucket_that_does_not_exist_is_one_line_before_any_compute(tmp_path, s3_env):
    r = cli("gptjax.cli.train", "--model-preset", "nano", "--run-dir", f"s3://no-such-{uuid.uuid4().hex[:8]}/r",
            work=tmp_path, s3_env=s3_env, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: cannot write to s3://no-such-")
    assert r.stderr.strip().splitlines()[-1].endswith(": the bucket does not exist")
    assert "params" not in r.stdout and "AWS_SECRET" not in r.stderr and s3_env["AWS_SECRET_ACCESS_KEY"] not in \
        r.stderr + r.stdout
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("where", ["local", "s3"])
def test_the_lock_is_a_conditional_create_and_a_second_writer_is_refused(tmp_path, where, request):
    base = f"{request.getfixturevalue('bucket')}/r" if where == "s3" else str(tmp_path / "r")
    target = storage.as_path(f"{base}/x")
    if where == "local":
        target.parent.mkdir(parents=True)
    assert storage.create_exclusive(target, b"one") and not storage.create_exclusive(target, b"two")
    assert storage.read_bytes(target) == b"one" and 0 <= storage.age_s(target) < 60
    storage.delete(target)
    assert storage.read_bytes(target) is None and storage.age_s(target) is None

    run = RunDir(base)
    with WriterLock(run, command="gptjax-train first"):
        assert json.loads(storage.read_bytes(run.lock))["pid"] == os.getpid()
        with pytest.raises(RunLocked, match=f"{base} is being written by pid {os.getpid()} on {HOST}"):
            WriterLock(run, command="gptjax-train second").acquire()
    assert storage.read_bytes(run.lock) is None  # released
    # a lock whose holder is gone (a pid that no longer runs, this host) is taken over
    dead = subprocess.Popen(["true"])
    dead.wait()
    storage.create_exclusive(run.lock, json.dumps({"host": HOST, "pid": dead.pid, "since": "then"}).encode())
    with WriterLock(run):
        assert json.loads(storage.read_bytes(run.lock))["pid"] == os.getpid()
