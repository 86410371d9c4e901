"""Reliability II, fault by fault: one writer per run directory, readers that pin the step they read, one line for
every fault (the details in the run's errors.log), Ctrl-C a clean exit anywhere. Each test reproduces a problem
that was there (the docstrings say what happened before)."""

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest

from helpers import ONE_DEVICE_ENV, nano_model, small_run
from gptjax.config import RunConfig, TrainConfig
from gptjax.runs import HOST, RunDir, RunLocked, WriterLock

ONE = jax.devices()[:1]
PY = [sys.executable, "-m"]


def config_file(tmp_path: Path, corpus: Path, run: Path, **train) -> Path:
    cfg = small_run(run, corpus, **train)
    path = tmp_path / f"{run.name}.json"
    path.write_text(cfg.to_json())
    return path


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([*PY, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ONE_DEVICE_ENV)


def wait_for(predicate, timeout: float = 240, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended first: {proc.communicate()}")
        time.sleep(0.1)
    raise AssertionError("timed out")


def rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


# ---- 1. one writer per run directory ---------------------------------------------------------------------------
@pytest.mark.slow
def test_a_second_writer_is_refused_naming_the_holder_and_the_first_is_unharmed(small_corpus, tmp_path):
    """Two gptjax-train on one --run-dir both exited 0, metrics.jsonl holding every row twice; two --resume at once
    died with orbax tracebacks. The first writer runs until both were refused, then is pre-empted (SIGTERM): it
    still saves its checkpoint and exits 75 (its length then does not depend on how fast this machine trains)."""
    run = tmp_path / "r"
    cfg = config_file(tmp_path, small_corpus, run, steps=100_000, log_every=50, eval_every=100_000,
                      checkpoint_every=100_000)
    first = start("gptjax.cli.train", "--config", str(cfg))
    wait_for(lambda: (run / "metrics.jsonl").exists(), proc=first)
    for extra in ([], ["--resume"]):
        second = subprocess.run([*PY, "gptjax.cli.train", "--config", str(cfg), *extra], capture_output=True,
                                text=True, env=ONE_DEVICE_ENV, timeout=300)
        assert second.returncode == 2, second.stderr[-2000:]
        assert second.stderr.count("\n") == 1 and "Traceback" not in second.stderr
        assert f"is being written by pid {first.pid} on {HOST} since" in second.stderr
        assert "gptjax.cli.train --config" in second.stderr  # the holder's command
    assert first.poll() is None  # the holder outlived both refusals
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=600)
    assert first.returncode == 75, err[-2000:]
    steps = [r["step"] for r in rows(run) if "loss" in r]
    assert steps and steps == sorted(set(steps))  # every logged step once: the refused writers wrote nothing
    stopped = int(err.split("pre-empted (SIGTERM) at step ")[1].split(":")[0])
    assert (run / "checkpoints" / str(stopped)).is_dir()  # the first writer's own save still worked
    assert not (run / RunDir.LOCK).exists()  # released


def test_a_lock_is_taken_over_only_when_its_holder_is_gone(tmp_path, caplog):
    """A SIGKILLed writer's lock is taken over at once on its host; another host's is refused until it has had no
    heartbeat for STALE_S; a live holder is never shared."""
    run = RunDir(tmp_path / "r")
    holder = subprocess.Popen([sys.executable, "-c", f"from gptjax.runs import WriterLock; "
                                                     f"WriterLock({str(run.path)!r}).acquire(); "
                                                     "print('held', flush=True); import time; time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunLocked, match=f"is being written by pid {holder.pid} on {HOST}"):
        WriterLock(run).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with caplog.at_level("WARNING", logger="gptjax"):
        lock = WriterLock(run).acquire()
    assert f"took over the lock of {run}: pid {holder.pid}" in caplog.text and "no longer runs" in caplog.text
    assert json.loads(run.lock.read_text())["pid"] == os.getpid()
    lock.release()
    assert not run.lock.exists()
    # another host's lock: held while it beats, taken over once it is stale
    run.lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": "then", "command": "gptjax-train",
                                    "token": "x"}))
    with pytest.raises(RunLocked, match="pid 1 on elsewhere since then .gptjax-train."):
        WriterLock(run).acquire()
    old = time.time() - WriterLock.STALE_S - 5
    os.utime(run.lock, (old, old))
    with caplog.at_level("WARNING", logger="gptjax"):
        with WriterLock(run):
            assert "no heartbeat for" in caplog.text


def test_the_lock_is_released_and_a_failed_start_leaves_nothing(tmp_path, small_corpus):
    """Every failed start used to leave an empty checkpoints/ (and the run directory) behind."""
    from gptjax.data import CorpusError
    from gptjax.training import train

    cfg = small_run(tmp_path / "r", tmp_path / "missing.txt")
    with pytest.raises(CorpusError, match="does not exist"):
        train(cfg, devices=ONE)
    assert not (tmp_path / "r").exists()


# ---- 2. readers pin the step they read ------------------------------------------------------------------------
@pytest.mark.slow
def test_exports_racing_retention_all_succeed(small_corpus, tmp_path):
    """gptjax-export while a run checkpoints every step keeping one crashed in 3 of 12 tries (FileNotFoundError,
    "Truncated Zstd-compressed stream"): retention deleted the step mid-read."""
    from gptjax.interop.export import export_run
    from gptjax.interop.safetensors import Reader

    run = tmp_path / "r"
    cfg = config_file(tmp_path, small_corpus, run, steps=60, log_every=20, checkpoint_every=1,
                      keep_checkpoints=1, async_checkpoint=False)
    trainer = start("gptjax.cli.train", "--config", str(cfg))
    wait_for(lambda: any(p.name.isdigit() for p in (run / "checkpoints").glob("*")), proc=trainer)
    exported = []
    while trainer.poll() is None or len(exported) < 3:
        r = export_run(run, tmp_path / "hf", progress=False)
        reader = Reader(tmp_path / "hf")
        assert all(reader.read(n).size for n in reader.names())  # every tensor of the export reads
        exported.append(r.step)
    assert trainer.wait() == 0, trainer.communicate()[1][-2000:]
    assert len(set(exported)) >= 2, exported  # the exports really raced a moving checkpoint
    assert not (run / RunDir.READERS).exists()  # every pin released


def test_a_damaged_latest_checkpoint_is_skipped_by_readers(small_corpus, tmp_path):
    """Export of a run whose latest checkpoint lost state/manifest.ocdbt was a ValueError traceback, with no
    fallback to the intact earlier step and no hint of --step."""
    from gptjax.checkpoint import load_run
    from gptjax.training import train

    run = tmp_path / "r"
    train(small_run(run, small_corpus, steps=12, checkpoint_every=6), devices=ONE)
    (run / "checkpoints" / "12" / "state" / "manifest.ocdbt").unlink()
    r = subprocess.run([*PY, "gptjax.cli.export", "--run-dir", str(run), "--out", str(tmp_path / "hf"),
                        "--no-progress"], capture_output=True, text=True, env=ONE_DEVICE_ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "reading checkpoint step 6: step 12 is damaged (the state item has no OCDBT manifest" in r.stderr
    assert "--step" in r.stderr and "Traceback" not in r.stderr
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["gptjax"]["step"] == 6
    r = subprocess.run([*PY, "gptjax.cli.export", "--run-dir", str(run), "--out", str(tmp_path / "hf12"),
                        "--step", "12"], capture_output=True, text=True, env=ONE_DEVICE_ENV, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "checkpoint step 12" in r.stderr and "cannot be read: the state item has no OCDBT manifest" in r.stderr
    loaded = load_run(run)  # sampling / init_from read the intact step too
    assert loaded.step == 6 and jax.tree.leaves(loaded.params)


# ---- 3. one line per fault ------------------------------------------------------------------------------------
@contextlib.contextmanager
def small_disk(path: Path, size: str):
    """A tmpfs of ``size`` at ``path``: a disk that fills up for real (root can mount one; CI runs as root)."""
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                       text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}): the full-disk test needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(small_corpus, tmp_path):
    """A full disk at a checkpoint printed 5-42 orbax tracebacks (up to 559 lines) before the error line,
    summary.json then claimed the failed step, curves.png was left at 0 bytes and <step>.orbax-checkpoint-tmp
    stayed; a full disk while caching the tokenized corpus was a raw OSError traceback and a truncated
    data/train.npy (now: while preparing the corpus into data/, which has no manifest until it is whole)."""
    with small_disk(tmp_path / "disk", "6m") as disk:
        run = disk / "r"
        cfg = config_file(tmp_path, small_corpus, run, steps=80, log_every=4, checkpoint_every=2,
                          keep_checkpoints=40)
        r = subprocess.run([*PY, "gptjax.cli.train", "--config", str(cfg)], capture_output=True, text=True,
                           env=ONE_DEVICE_ENV, timeout=600)
        assert r.returncode == 2, r.stderr[-3000:]
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in r.stderr and "Event loop" not in r.stderr, r.stderr[-3000:]
        assert "the disk is full (No space left on device)" in errors[0] and f"{run}/errors.log" in errors[0]
        assert "No space left on device" in (run / "errors.log").read_text()  # the details, where the line says
        assert not (run / "summary.json").exists() and not (run / "curves.png").exists()
        assert not list((run / "checkpoints").glob("*orbax-checkpoint-tmp*"))
        steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir())
        assert steps and steps == list(range(2, 2 * len(steps) + 1, 2))  # the earlier checkpoints are intact
    with small_disk(tmp_path / "tiny", "150k") as disk:
        cfg = config_file(tmp_path, small_corpus, disk / "r", steps=4)
        r = subprocess.run([*PY, "gptjax.cli.train", "--config", str(cfg)], capture_output=True, text=True,
                           env=ONE_DEVICE_ENV, timeout=600)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
        assert r.stderr.splitlines()[-1].startswith("error: could not write")
        assert "the disk is full" in r.stderr.splitlines()[-1]
        data = disk / "r" / "data"
        assert not (data / "manifest.json").exists() and not [p for p in data.iterdir() if ".tmp-" in p.name]


# ---- 4. Ctrl-C ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_source(tmp_path_factory):
    """A run with random parameters, and its export (what is imported)."""
    from gptjax.data import Tokenizer, default_corpus_path, read_corpus, split_documents
    from gptjax.interop.export import export_run
    from gptjax.model import ShardedModel
    from gptjax.sharding import single_device_mesh
    from gptjax.training import seed_run

    tmp = tmp_path_factory.mktemp("ctrl_c")
    tok = Tokenizer.train(split_documents(read_corpus(default_corpus_path()), None), 512, sample_chars=300_000)
    model = nano_model(d_model=256, n_heads=8, n_kv_heads=4, d_ff=768, n_layers=4)
    cfg = RunConfig(model=model, train=TrainConfig(run_dir=str(tmp / "src"), seq_len=64, batch_size=4))
    seed_run(cfg, jax.device_get(ShardedModel(model, single_device_mesh()).init_params(jax.random.key(0))),
             tok.proto, {"test": "ctrl-c"})
    export_run(tmp / "src", tmp / "hf", progress=False)
    return tmp


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name or p.name == ".readers"]


@pytest.mark.slow
@pytest.mark.parametrize("script", ["import", "export"])
def test_ctrl_c_at_random_moments_is_one_line_and_the_next_run_leaves_nothing(hf_source, tmp_path, script):
    """Ctrl-C during gptjax-import sometimes aborted the process (exit 134, "FATAL: exception not rethrown") or
    flooded "Event loop is closed", and always left a hidden .<run-dir>.tmp-<pid>-<time>/ that nothing removed;
    Ctrl-C during export printed a KeyboardInterrupt traceback."""
    dest = tmp_path / "dest"
    args = ({"import": ["gptjax.cli.import_hf", str(hf_source / "hf"), "--run-dir", str(dest)],
             "export": ["gptjax.cli.export", "--run-dir", str(hf_source / "src"), "--out", str(dest),
                        "--no-progress"]})[script]
    t = time.perf_counter()
    assert subprocess.run([*PY, *args], capture_output=True, env=ONE_DEVICE_ENV, timeout=300).returncode == 0
    whole = time.perf_counter() - t  # a whole run: the interrupts land at random moments inside one
    subprocess.run(["rm", "-r", str(dest)], check=True)
    rng = random.Random(0)
    interrupted = 0
    for _ in range(5):
        proc = start(*args)
        time.sleep(rng.uniform(0.1, 0.95) * whole)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode in (0, 130), (proc.returncode, err[-3000:])
        assert "Traceback" not in err and "Event loop is closed" not in err and "FATAL" not in err, err[-3000:]
        if proc.returncode == 130:
            interrupted += 1
            assert err.splitlines()[-1] == f"gptjax-{script}: interrupted; nothing half-written was left"
        if dest.exists():  # finished before the interrupt took effect: then whole
            assert (dest / "config.json").is_file()
            assert (dest / ("checkpoints/0" if script == "import" else "model.safetensors")).exists()
        assert not leftovers(tmp_path) and not leftovers(hf_source / "src")
        if dest.exists():
            subprocess.run(["rm", "-r", str(dest)], check=True)
    assert interrupted >= 2
    # a hard kill leaves a temporary sibling no handler could remove: the next run removes it
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".dest.tmp-{HOST}-{dead.pid}-1"
    stale.mkdir()
    r = subprocess.run([*PY, *args], capture_output=True, text=True, env=ONE_DEVICE_ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not stale.exists() and not leftovers(tmp_path)


@pytest.mark.parametrize("how", ["python -m", "installed script"])
def test_a_ctrl_c_during_the_start_up_imports_is_the_one_line_too(tmp_path, how):
    """CI once sent the random Ctrl-C above inside the second of imports before the entry point's handler was
    installed (NumPy, ml_dtypes): Python's KeyboardInterrupt traceback and exit -2. The package now holds an
    interrupt that lands in those imports and the entry point answers it."""
    command = ([*PY, "gptjax.cli.import_hf"] if how == "python -m" else
               [str(Path(sys.executable).with_name("gptjax-import"))])
    answered = 0
    # inside the second of imports, after the interpreter's own start (its first ~0.1 s, before any gptjax code
    # runs, are Python's default handler's: a loaded CI machine once took longer than 0.05 s there)
    for delay in (0.3, 0.5, 0.7):
        proc = subprocess.Popen([*command, str(tmp_path / "absent"), "--run-dir", str(tmp_path / "r")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ONE_DEVICE_ENV)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode in (2, 130) and "Traceback" not in err, (delay, proc.returncode, err[-2000:])
        if proc.returncode == 130:
            answered += 1
            assert err.splitlines() == ["gptjax-import: interrupted; nothing half-written was left"], err
    assert answered >= 2
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("where", ["opening the stores", "releasing the pin"])
def test_a_ctrl_c_while_a_reader_opens_or_releases_its_pin_leaves_no_snapshot(hf_source, monkeypatch, where):
    """The random Ctrl-C test above once left <run>/.readers/ behind in CI: an interrupt while the checkpoint's
    stores were opening (seconds, outside the handler that releases the pin), or while the pin was being removed.
    Here each moment is hit on purpose."""
    import shutil

    from gptjax.checkpoint import tensors

    run = hf_source / "src"
    if where == "opening the stores":
        def interrupted(*a, **k):
            raise KeyboardInterrupt
        monkeypatch.setattr(tensors.CheckpointTensors, "_open", interrupted)
    else:
        remove = shutil.rmtree

        def rmtree(path, *a, **k):  # the Ctrl-C lands as the removal starts
            signal.raise_signal(signal.SIGINT)
            remove(path, *a, **k)
        monkeypatch.setattr(shutil, "rmtree", rmtree)  # what checkpoint/pinned.py removes the pin with
    with pytest.raises(KeyboardInterrupt) as caught:
        with tensors.CheckpointTensors(run):
            pass
    assert caught.tb is not None  # the traceback (which holds the reader) is alive: the pin was released, not collected
    assert not leftovers(run)


# ---- 7. the small ones ------------------------------------------------------------------------------------------
def test_a_reexport_keeps_files_it_did_not_write_and_a_truncated_import_is_one_line(hf_source, tmp_path):
    """A re-export replaced the directory whole, deleting files a user had added there without a word; importing a
    truncated safetensors file was a ValueError traceback."""
    from gptjax.interop.export import ExportError, export_run

    out = tmp_path / "hf"
    export_run(hf_source / "src", out, progress=False)
    written = json.loads((out / "config.json").read_text())["gptjax"]["files"]
    assert sorted(p.name for p in out.iterdir()) == written
    export_run(hf_source / "src", out, progress=False)  # its own files: replaced
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match=r"files it did not write \(notes.txt\)"):
        export_run(hf_source / "src", out, progress=False)
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    r = subprocess.run([*PY, "gptjax.cli.import_hf", str(out), "--run-dir", str(tmp_path / "imported")],
                       capture_output=True, text=True, env=ONE_DEVICE_ENV, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr[-2000:]
    assert "model.safetensors is truncated: its header describes" in r.stderr
    assert not (tmp_path / "imported").exists()


def test_resume_step_rebranches_a_finished_run(small_corpus, tmp_path):
    """--resume --resume-step S on a finished run was ignored ("nothing to do")."""
    from gptjax.training import train

    cfg = small_run(tmp_path / "r", small_corpus, steps=8, log_every=1, checkpoint_every=4)
    full = train(cfg, devices=ONE)
    again = train(cfg, resume=True, resume_step=4, devices=ONE)
    assert not again.complete_already and again.final_step == 8
    assert again.train_loss == pytest.approx(full.train_loss, rel=1e-5)
    steps = [r["step"] for r in rows(tmp_path / "r") if "loss" in r]
    assert steps == list(range(1, 9))  # the re-run steps replaced the first run's, each once
    assert any(p.name.startswith("8.damaged-") or p.name == "8" for p in (tmp_path / "r" / "checkpoints").iterdir())


def test_a_changed_mesh_context_may_resume():
    """Changing mesh.context on resume was refused although the mesh may change."""
    from gptjax.training.checkpointing import check_resume_config

    stored = RunConfig.from_dict({"model": {"max_seq_len": 64}, "train": {"seq_len": 64}})
    check_resume_config(stored, stored.replace(mesh={"context": 2, "context_strategy": "ring", "fsdp": 2}))


def test_a_too_small_vocabulary_names_the_minimum(small_corpus):
    """The error quoted a sentencepiece flag gptjax does not have (--character_coverage)."""
    from gptjax.data import Tokenizer, TokenizerError, read_corpus, split_documents

    docs = split_documents(read_corpus(small_corpus), None)
    with pytest.raises(TokenizerError) as e:
        Tokenizer.train(docs, 300)
    assert "model.vocab_size=300 is too small for this corpus" in str(e.value)
    minimum = int(str(e.value).split("needs at least ")[1].split()[0])
    assert "character_coverage" not in str(e.value) and Tokenizer.train(docs, minimum).vocab_size == minimum


def test_experiment_file_errors_name_the_file(tmp_path):
    """"config must be a mapping, got int" did not name the file; a non-callable config was a traceback."""
    from gptjax.config import ConfigError, load_config_file

    returns_int = tmp_path / "a.py"
    returns_int.write_text("def config():\n    return 3\n")
    with pytest.raises(ConfigError, match=f"{returns_int}: config\\(\\) returned int 3"):
        load_config_file(returns_int)
    not_callable = tmp_path / "b.py"
    not_callable.write_text("config = 3\n")
    with pytest.raises(ConfigError, match=f"{not_callable} has config = 3, not a function"):
        load_config_file(not_callable)


def test_a_warmup_as_long_as_the_run_is_warned_about():
    """A 20-step run of the default preset (warmup 30) never decayed, silently."""
    from gptjax.config import build_run_config

    assert any("optim.warmup_steps=30 is not shorter than the schedule's 20 steps" in w
               for w in build_run_config(overrides=["train.steps=20"]).warnings())
    assert build_run_config().warnings() == []


def test_a_ctrl_c_that_comes_back_wrapped_is_still_one_line_and_130(capsys):
    """A KeyboardInterrupt raised inside a library callback can surface as another exception caused by it (seen once
    in the Ctrl-C test above: exit 1 and a JAX-filtered traceback while flax built the blocks)."""
    from gptjax.cli.common import EXIT_INTERRUPTED, console_script

    def wrapped(argv=None):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            raise RuntimeError("callback failed") from e

    def broken(argv=None):
        raise ValueError("a real error")

    handler, hook = signal.getsignal(signal.SIGINT), sys.unraisablehook  # the entry point sets both
    try:
        assert console_script("gptjax-x")(wrapped)([]) == EXIT_INTERRUPTED
        assert capsys.readouterr().err.splitlines()[-1] == "gptjax-x: interrupted; nothing half-written was left"
        with pytest.raises(ValueError, match="a real error"):
            console_script("gptjax-x")(broken)([])
    finally:
        signal.signal(signal.SIGINT, handler)
        sys.unraisablehook = hook


@pytest.mark.slow
def test_ctrl_c_at_a_terminal_reaches_the_loader_processes_too_and_is_still_one_line(tmp_path, small_corpus):
    """A terminal's Ctrl-C goes to the whole process group, the trainer's loader processes (data.loader_workers)
    included: they leave it to the trainer, which saves and says so in one line (a worker printed a traceback from
    its queue, and shared memory leaked)."""
    import dataclasses

    cfg = small_run(tmp_path / "run", small_corpus, steps=2000, log_every=5, checkpoint_every=1000)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, loader_workers=2))
    (tmp_path / "cfg.json").write_text(cfg.to_json())
    proc = subprocess.Popen([sys.executable, "-m", "gptjax.cli.train", "--config", str(tmp_path / "cfg.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, **ONE_DEVICE_ENV, "PYTHONUNBUFFERED": "1"})
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("step=10 "):
            break
    os.killpg(proc.pid, signal.SIGINT)
    out = "".join(seen) + proc.communicate(timeout=300)[0]
    assert "Traceback" not in out and "leaked shared_memory" not in out, out[-3000:]
    assert out.strip().splitlines()[-1].startswith("gptjax-train: pre-empted (SIGINT) at step "), out[-2000:]
    assert proc.returncode in (75, 130)
