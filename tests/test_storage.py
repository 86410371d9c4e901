"""Runs on object storage, against a real S3 server on loopback (moto's server mode; ``tools/storage_servers up``,
which ``.ci/run`` starts and these tests start when it is not up): checkpoints written natively by TensorStore's
S3 driver, the run's other files copied up at every checkpoint, the lock a conditional create, a resume on another
machine (another working copy) exact."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from helpers import ServerOutage, cpu_env, free_port, small_run
from gptjax import storage
from gptjax.runs import HOST, RunDir, RunLocked, WriterLock

PY = [sys.executable, "-m"]


def objects(url: str) -> list[str]:
    base = url.rstrip("/")
    return [str(p)[len(base) + 1:] for p in storage.files_under(url)]


def cli(*args: str, work: Path, storage_env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*PY, *args], capture_output=True, text=True, timeout=timeout,
                          env={**cpu_env(8), **storage_env, "GPTJAX_WORK_DIR": str(work)})  # the suite's 8 devices


def losses(rows: list[dict]) -> dict:
    return {(r["step"], k): r[k] for r in rows for k in ("loss", "val_loss") if r.get(k) is not None}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_corpus):
    """The local run every run on a bucket here must equal: 12 steps, its losses and its directory."""
    from gptjax.training import train

    run = tmp_path_factory.mktemp("reference") / "local"
    result = train(small_run(run, small_corpus))  # 12 steps, checkpoints at 6 and 12
    return run, losses(RunDir(run).read_metrics()), result.val_loss


def bucket_config(tmp_path: Path, corpus: Path, url: str, **train) -> Path:
    cfg = small_run(tmp_path / "unused", corpus, **train)
    path = tmp_path / f"{url.rsplit('/', 1)[-1]}.json"
    path.write_text(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, run_dir=url)).to_json())
    return path


def start(*args: str, work: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([*PY, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**cpu_env(8), **env, "GPTJAX_WORK_DIR": str(work)})


def bucket_losses(url: str) -> dict:
    return losses([json.loads(line) for line in storage.read_bytes(f"{url}/metrics.jsonl").splitlines()])


@pytest.mark.slow
def test_a_run_on_a_bucket_is_the_local_run_and_resumes_on_another_machine_then_falls_back_past_damage(
        tmp_path, small_corpus, bucket, storage_env, reference):
    local_dir, reference, local_val = reference
    url = f"{bucket}/runs/a"
    cfg_file = bucket_config(tmp_path, small_corpus, url)

    first = cli("gptjax.cli.train", "--config", str(cfg_file), "--stop-after", "6", work=tmp_path / "machine-a",
                storage_env=storage_env)
    assert first.returncode == 0, first.stderr[-3000:]
    held = objects(url)
    assert {"config.json", "metrics.jsonl", "tokenizer.model", "checkpoints/6/commit_success.txt",
            "checkpoints/6/state/manifest.ocdbt", "checkpoints/6/checksums.json"} <= set(held), held
    assert "writer.lock" not in held and not any("tmp" in k for k in held if k.startswith("checkpoints")), held
    assert not list((tmp_path / "machine-a").iterdir())  # the working copy went with the process

    # another machine: nothing local but the bucket's URL (the corpus file is not needed: the prepared data is there)
    second = cli("gptjax.cli.train", "--run-dir", url, "--resume", work=tmp_path / "machine-b", storage_env=storage_env)
    assert second.returncode == 0, second.stderr[-3000:]
    run = json.loads(storage.read_bytes(f"{url}/summary.json"))
    assert run["final_step"] == 12 and run["checkpoints"] == f"{url}/checkpoints"
    rows = [json.loads(line) for line in storage.read_bytes(f"{url}/metrics.jsonl").splitlines()]
    got = losses(rows)
    assert {k: got.get(k) for k in reference} == reference  # float for float: the bucket changed nothing
    assert set(got) - set(reference) == {(6, "loss")}  # (the stop at step 6 logged its step)
    assert run["val_loss"] == local_val

    # read from the bucket (in place, one tensor at a time): the export is the local run's, byte for byte
    from gptjax.interop.export import export_run

    export_run(local_dir, tmp_path / "hf-local", progress=False)
    exported = cli("gptjax.cli.export", "--run-dir", url, "--out", str(tmp_path / "hf-bucket"), "--no-progress",
                   work=tmp_path / "reader", storage_env=storage_env)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert f"exported step 12 of {url}" in exported.stdout
    assert (tmp_path / "hf-bucket" / "model.safetensors").read_bytes() == \
        (tmp_path / "hf-local" / "model.safetensors").read_bytes()

    # exported into a bucket (staged, config.json copied last): the same bytes; again, replacing it
    for _ in range(2):
        up = cli("gptjax.cli.export", "--run-dir", url, "--out", f"{bucket}/hf", "--no-progress", work=tmp_path / "r",
                 storage_env=storage_env)
        assert up.returncode == 0, up.stderr[-3000:]
    assert storage.read_bytes(f"{bucket}/hf/model.safetensors") == \
        (tmp_path / "hf-local" / "model.safetensors").read_bytes()
    assert set(objects(f"{bucket}/hf")) == {p.name for p in (tmp_path / "hf-local").iterdir()}
    storage.as_path(f"{bucket}/hf/notes.txt").write_bytes(b"mine")
    refused = cli("gptjax.cli.export", "--run-dir", url, "--out", f"{bucket}/hf", "--no-progress",
                  work=tmp_path / "r", storage_env=storage_env)
    assert refused.returncode == 2 and "files it did not write (notes.txt)" in refused.stderr, refused.stderr

    # and imported from the bucket's export into a bucket: a step-0 run there (the checkpoint first, then the files
    # that make it a run)
    imported = cli("gptjax.cli.import_hf", f"{bucket}/hf", "--run-dir", f"{bucket}/imported",
                   work=tmp_path / "reader", storage_env=storage_env)
    assert imported.returncode == 0, imported.stderr[-3000:]
    assert {"config.json", "import.json", "checkpoints/0/commit_success.txt"} <= set(objects(f"{bucket}/imported"))
    assert json.loads(storage.read_bytes(f"{bucket}/imported/import.json"))["hf_dir"] == f"{bucket}/hf"
    again = cli("gptjax.cli.import_hf", f"{bucket}/hf", "--run-dir", f"{bucket}/imported",
                work=tmp_path / "reader", storage_env=storage_env)
    assert again.returncode == 0 and "already holds this import" in again.stdout + again.stderr

    # the newest checkpoint damaged in the bucket: the resume falls back to step 6, moves 12 aside, and retrains
    # steps 7-12 exactly (the extension keeps the schedule)
    storage.delete(f"{url}/checkpoints/12/state/manifest.ocdbt")
    third = cli("gptjax.cli.train", "--run-dir", url, "--resume", "--extend-steps", "14", work=tmp_path / "c",
                storage_env=storage_env)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "checkpoint step 12 is damaged" in third.stderr
    held = objects(url)
    aside = {k.split("/")[1] for k in held if ".damaged-" in k}
    assert len(aside) == 1 and aside.pop().startswith("12.damaged-"), held
    assert any(k.endswith("/DAMAGED.txt") for k in held)
    rows = [json.loads(line) for line in storage.read_bytes(f"{url}/metrics.jsonl").splitlines()]
    redone = {k: v for k, v in losses(rows).items() if 6 < k[0] <= 12 and k in reference}
    assert redone == {k: v for k, v in reference.items() if 6 < k[0] <= 12} and redone


@pytest.mark.slow
def test_training_data_read_from_a_bucket_by_two_loader_processes_is_the_local_run(
        tmp_path, bucket, storage_env, reference):
    """The reference run's own prepared data, copied to the bucket and named as ``data.corpus``: its shards are
    fetched into the host's cache (named by their SHA-256) and read there by two loader processes, and the losses
    are the reference's, float for float."""
    local_dir, reference, local_val = reference
    url = f"{bucket}/data/small"
    storage.push(local_dir / "data", url)
    cfg = small_run(tmp_path / "run", "unused")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, corpus=url, document_masking=False,
                                                              loader_workers=2))
    (tmp_path / "cfg.json").write_text(cfg.to_json())
    ran = cli("gptjax.cli.train", "--config", str(tmp_path / "cfg.json"), "--stop-after", "6", work=tmp_path / "host",
              storage_env=storage_env)
    assert ran.returncode == 0, ran.stderr[-3000:]
    got = losses(RunDir(tmp_path / "run").read_metrics())
    want = {k: v for k, v in reference.items() if k[0] <= 6}
    assert want and {k: got.get(k) for k in want} == want
    manifest = json.loads(storage.read_bytes(f"{url}/manifest.json"))
    cached = {f.name for f in (tmp_path / "host" / "gptjax-cache" / "shards").iterdir()}
    assert {f"{s['sha256']}.arecord" for s in manifest["shards"]["train"]} <= cached, cached


    # a host whose disk cannot hold the directory is told so before any compute, with both sizes and the fix
    from gptjax.data import PreparedData
    from gptjax.data.sources import SourceError

    with pytest.MonkeyPatch.context() as mp:
        for k, v in {**storage_env, "GPTJAX_CACHE_DIR": str(tmp_path / "small-disk")}.items():
            mp.setenv(k, v)
        mp.setattr("shutil.disk_usage", lambda path: collections.namedtuple("Usage", "total used free")(1, 1, 1000))
        with pytest.raises(SourceError, match=r"holds 0\.\d GB; the cache for its shards at .*small-disk has 0\.0 GB "
                                              r"free: point GPTJAX_CACHE_DIR to a larger disk"):
            PreparedData(url).warm("train")


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_gptjax_data_prepares_from_a_bucket_into_a_bucket_the_bytes_it_prepares_locally_and_training_reads_them(
        tmp_path, scheme, storage_env, reference, small_corpus, request, monkeypatch):
    bucket = request.getfixturevalue("bucket" if scheme == "s3" else "gs_bucket")
    local_dir = reference[0]
    tok = local_dir / "data" / "tokenizer.model"
    storage.as_path(f"{bucket}/src/austen.txt").write_bytes(small_corpus.read_bytes())
    args = ["--tokenizer", str(tok), "--docs-per-shard", "64", "--no-progress"]
    here = cli("gptjax.cli.data", "prepare", str(small_corpus), *args, "--out", str(tmp_path / "local"),
               work=tmp_path / "w", storage_env=storage_env)
    assert here.returncode == 0, here.stderr[-3000:]
    url = f"{bucket}/prepared/austen"
    there = cli("gptjax.cli.data", "prepare", f"{bucket}/src/austen.txt", *args, "--out", url, work=tmp_path / "w",
                storage_env=storage_env)
    assert there.returncode == 0, there.stderr[-3000:]
    mine = json.loads((tmp_path / "local" / "manifest.json").read_text())
    theirs = json.loads(storage.read_bytes(f"{url}/manifest.json"))
    assert [s["sha256"] for s in theirs["shards"]["train"]] == [s["sha256"] for s in mine["shards"]["train"]]
    assert len(mine["shards"]["train"]) > 1 and theirs["sources"][0]["path"] == f"{bucket}/src/austen.txt"
    assert set(objects(url)) == {p.name for p in (tmp_path / "local").iterdir()}
    assert not list((tmp_path / "w").glob("gptjax-staging-*"))  # the staging directory went once copied up
    verified = cli("gptjax.cli.data", "verify", url, "--no-progress", work=tmp_path / "w", storage_env=storage_env)
    assert verified.returncode == 0 and "intact" in verified.stdout, verified.stdout + verified.stderr

    # a tokenizer in the bucket; the directory as a mixture entry beside a local one
    from gptjax.config import DataConfig
    from gptjax.data import PreparedCorpus, PreparedData, Tokenizer
    from gptjax.data.run_data import prepare_corpus

    storage.as_path(f"{bucket}/tok.model").write_bytes(tok.read_bytes())
    assert Tokenizer.load(f"{bucket}/tok.model").proto == tok.read_bytes()
    mixed = prepare_corpus(DataConfig(mixture={url: 1, str(tmp_path / "local"): 3}, tokenizer=f"{bucket}/tok.model"),
                           Tokenizer.load(tok).vocab_size, tmp_path / "mixed-run")
    assert mixed.names == ("austen", "local") and mixed.tokens[0] == 2 * mine["totals"]["train"]["tokens"]

    # the training windows read from the bucket (through this host's cache) are the local directory's

    monkeypatch.setenv("GPTJAX_CACHE_DIR", str(tmp_path / "cache"))
    here, there = (PreparedCorpus(PreparedData(d), PreparedData(d).tokenizer()).windows(64)
                   for d in (tmp_path / "local", url))
    assert len(here) == len(there) > 100
    for i in (0, 7, len(here) // 2, len(here) - 1):
        assert (here.raw(i) == there.raw(i)).all()


@pytest.mark.slow
def test_a_server_gone_15_s_mid_run_is_ridden_through_and_one_gone_for_good_is_one_line_and_a_resume(
        tmp_path, small_corpus, bucket, storage_env, reference):
    """The server restarting (connections refused, then back with what it holds) as the step-6 checkpoint and its
    copy are written: the run waits it out and ends with the local run's losses. Gone for good (two attempts
    allowed, to be quick): one line, exit 2; once it is back, --resume finishes the run, exactly."""
    _, reference, _ = reference
    outage = ServerOutage(int(storage_env["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]))
    env = {**storage_env, "AWS_ENDPOINT_URL": outage.endpoint}
    url = f"{bucket}/runs/outage"
    proc = start("gptjax.cli.train", "--config", str(bucket_config(tmp_path, small_corpus, url)), work=tmp_path,
                 env=env)
    out = []
    for line in proc.stdout:
        out.append(line)
        if line.startswith("step=4 "):
            outage.down()
            threading.Timer(15, outage.up).start()
            down = time.monotonic()
    assert proc.wait() == 0, "".join(out)[-3000:]
    assert time.monotonic() - down > 15  # it waited for the server (the checkpoint at step 6 needs it)
    assert bucket_losses(url) == reference

    url = f"{bucket}/runs/gone"
    cfg = bucket_config(tmp_path, small_corpus, url, checkpoint_every=2)
    proc = start("gptjax.cli.train", "--config", str(cfg), work=tmp_path, env={**env, "AWS_MAX_ATTEMPTS": "2"})
    out = []
    for line in proc.stdout:
        out.append(line)
        if line.startswith("step=8 "):  # steps 2-6 saved and committed: a save waits for the one before
            outage.down()
    assert proc.wait() == 2, "".join(out)[-3000:]
    last = out[-1].strip()
    assert last.startswith("error: ") and f"{outage.endpoint} did not answer (2 attempts with backoff)" in last
    assert "Traceback" not in "".join(out) and storage_env["AWS_SECRET_ACCESS_KEY"] not in "".join(out)
    outage.up()
    resumed = cli("gptjax.cli.train", "--run-dir", url, "--resume", work=tmp_path / "after", storage_env=storage_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "took over the lock" in resumed.stderr  # the one the stopped run could not remove
    got = bucket_losses(url)
    assert {k: got.get(k) for k in reference} == reference


@pytest.mark.slow
def test_kill_9_while_a_checkpoint_is_uploaded_resumes_from_the_last_committed_step_exactly(
        tmp_path, small_corpus, bucket, storage_env, reference):
    """SIGKILL while a step's objects are being written (some there, its commit marker not yet): orbax never
    lists that step, the next writer removes it, and the run resumed until done has the local run's losses."""
    _, reference, _ = reference
    url = f"{bucket}/runs/killed"
    cfg = bucket_config(tmp_path, small_corpus, url, checkpoint_every=2)
    in_upload = 0
    for _ in range(8):
        proc = start("gptjax.cli.train", "--config", str(cfg), "--resume", "auto", work=tmp_path, env=storage_env)
        killed = False
        while proc.poll() is None and not killed:
            steps = {}
            for key in objects(f"{url}/checkpoints"):
                step, _, rest = key.partition("/")
                steps.setdefault(step, set()).add(rest)
            if any(name.isdigit() and "commit_success.txt" not in held for name, held in steps.items()):
                proc.send_signal(signal.SIGKILL)
                in_upload, killed = in_upload + 1, True
            time.sleep(0.01)
        out = proc.communicate()[0]
        if proc.returncode == 0 or in_upload >= 2:
            break
        assert proc.returncode == -signal.SIGKILL, out[-3000:]
    assert in_upload >= 1
    done = start("gptjax.cli.train", "--config", str(cfg), "--resume", "auto", work=tmp_path, env=storage_env)
    out = done.communicate()[0]
    assert done.returncode == 0, out[-3000:]
    got = bucket_losses(url)
    assert {k: got.get(k) for k in reference} == reference
    steps = {k.split("/")[0] for k in objects(f"{url}/checkpoints")}
    assert all(f"{s}/commit_success.txt" in objects(f"{url}/checkpoints") for s in steps), steps


def test_a_bucket_that_does_not_exist_is_one_line_before_any_compute(tmp_path, storage_env):
    r = cli("gptjax.cli.train", "--model-preset", "nano", "--run-dir", f"s3://no-such-{uuid.uuid4().hex[:8]}/r",
            work=tmp_path, storage_env=storage_env, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: cannot write to s3://no-such-")
    assert r.stderr.strip().splitlines()[-1].endswith(": the bucket does not exist")
    assert "params" not in r.stdout and "AWS_SECRET" not in r.stderr and storage_env["AWS_SECRET_ACCESS_KEY"] not in \
        r.stderr + r.stdout
    assert not list(tmp_path.iterdir())


def test_a_bucket_that_denies_writes_is_one_line_before_any_compute(tmp_path, storage_env):
    """A second S3 server that checks credentials (moto with IAM enforced once its first 5 requests have set up a
    bucket, an object in the run directory, and a user whose policy only reads), and the run given that user's
    keys. (The object: moto answers a HEAD of a missing key with 403 under IAM, where S3 says 404 to a reader
    allowed to list, and s3fs asks one of an empty prefix; ``s3:Head*``: moto's name for what S3 allows with
    ``s3:GetObject``.)"""
    import boto3

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "5"}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        admin = {"endpoint_url": f"http://127.0.0.1:{port}", "region_name": "us-east-1",
                 "aws_access_key_id": "setup", "aws_secret_access_key": "setup"}
        for _ in range(100):
            try:
                boto3.client("s3", **admin).create_bucket(Bucket="locked")
                break
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.2)
        boto3.client("s3", **admin).put_object(Bucket="locked", Key="r/notes.txt", Body=b"a run's notes")
        iam = boto3.client("iam", **admin)
        iam.create_user(UserName="reader")
        iam.put_user_policy(UserName="reader", PolicyName="read", PolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": a, "Resource": "*"}
                                                   for a in ("s3:List*", "s3:Get*", "s3:Head*")]}))
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        env = {**storage_env, "AWS_ENDPOINT_URL": admin["endpoint_url"], "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
               "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
        r = cli("gptjax.cli.train", "--model-preset", "nano", "--run-dir", "s3://locked/r", work=tmp_path,
                storage_env=env, timeout=300)
    finally:
        server.kill()
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == \
        "error: cannot write to s3://locked/r: access denied (check the credentials in the environment)"
    assert "params" not in r.stdout and key["SecretAccessKey"] not in r.stderr + r.stdout
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


@pytest.mark.slow
def test_the_checkpoint_benchmark_runs_against_a_bucket(tmp_path, bucket, storage_env):
    """bench/checkpoint_bench.py --bucket (the local-disk-against-bucket figures in docs/storage.md), tiny."""
    bench = Path(__file__).resolve().parents[1] / "bench" / "checkpoint_bench.py"
    r = subprocess.run([sys.executable, str(bench), "--d-model", "64", "--layers", "1", "--saves", "1",
                        "--steps-between", "1", "--bucket", f"{bucket}/bench"], capture_output=True, text=True,
                       env={**cpu_env(1), **storage_env}, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert [row.get("where") for row in rows[:4]] == ["local disk", "bucket", "local disk", "bucket"]
    assert rows[-1]["bucket_over_local_save_s"] > 0 and not objects(f"{bucket}/bench")  # cleaned up
