"""Reliability under faults and bad input: resume from the run's own config, pre-emption, the non-finite guard,
damaged checkpoints, write failures, metrics once per step, repeated commands. Each probe of the reliability
issue is a regression test here."""

import errno
import json
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from helpers import cpu_env, small_run
from gptjax.checkpoint.manager import Checkpointer, CheckpointNotFound, CheckpointWriteError
from gptjax.config import ConfigError
from gptjax.runs import RunDir
from gptjax.sharding.mesh import single_device_mesh
from gptjax.training import trainer as trainer_module
from gptjax.training.hooks import NonFiniteStop
from gptjax.training.program import Program
from gptjax.training.trainer import train

ONE = jax.devices()[:1]


def losses(run_dir) -> dict:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"train": [(r["step"], r["loss"]) for r in rows if "loss" in r],
            "val": [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]}


def finite_checkpoints(run_dir, cfg) -> list[int]:
    prog = Program(cfg, single_device_mesh())
    ck = Checkpointer(run_dir / "checkpoints", create=False)
    steps = ck.all_steps()
    for s in steps:
        state = ck.restore(prog.abstract_state, step=s)
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"])), s
    ck.close()
    return steps


# ---- 1. resume from the run's own config ------------------------------------------------------------------------
def test_resume_with_conflicting_overrides_lists_them_and_leaves_config_json(small_corpus, tmp_path):
    cfg = small_run(tmp_path / "r", small_corpus, steps=12)
    train(cfg, devices=ONE, stop_after=6)
    before = (tmp_path / "r" / "config.json").read_bytes()
    changed = cfg.replace(optim={"lr": 1e-2}, model={"d_ff": 96}, train={"steps": 20})
    with pytest.raises(ConfigError) as e:
        train(changed, resume=True, devices=ONE)
    msg = str(e.value)
    assert "optim.lr: 0.003 in config.json, 0.01 now" in msg and "model.d_ff: 128 in config.json, 96 now" in msg
    assert "train.steps: 12 in config.json, 20 now" in msg and "--extend-steps" in msg
    assert (tmp_path / "r" / "config.json").read_bytes() == before
    # cadence fields may change on resume
    done = train(cfg.replace(train={"log_every": 3, "eval_every": 3}), resume=True, devices=ONE)
    assert done.final_step == 12


def test_a_run_written_before_context_strategy_moved_resumes_and_execution_may_change(small_corpus, tmp_path):
    """Run directories of earlier versions hold ``model.context_strategy``; reading their config.json moves it to
    the mesh settings, and the run resumes. The kernel and remat, execution fields, may change on resume (they do
    not change the trajectory); the resumed steps then match the uninterrupted run's."""
    cfg = small_run(tmp_path / "r", small_corpus, steps=8, log_every=1)
    train(cfg, devices=ONE, stop_after=4)
    path = tmp_path / "r" / "config.json"
    old = json.loads(path.read_text())
    old["model"]["context_strategy"] = old["mesh"].pop("context_strategy")
    path.write_text(json.dumps(old))
    stored = RunDir(tmp_path / "r").read_config()
    assert stored == cfg
    done = train(stored.replace(model={"remat": "full", "attention_impl": "blockwise"}), resume=True, devices=ONE)
    assert done.final_step == 8
    rewritten = json.loads(path.read_text())
    assert "context_strategy" not in rewritten["model"] and rewritten["mesh"]["context_strategy"] == "gather"
    whole = train(small_run(tmp_path / "w", small_corpus, steps=8, log_every=1), devices=ONE)
    assert whole.final_step == 8
    resumed, uninterrupted = losses(tmp_path / "r")["train"], losses(tmp_path / "w")["train"]
    assert [s for s, _ in resumed] == [s for s, _ in uninterrupted] == list(range(1, 9))
    np.testing.assert_allclose([x for _, x in resumed], [x for _, x in uninterrupted], rtol=1e-4)


def test_cli_resume_reads_config_json_and_extends_without_restretching(small_corpus, tmp_path):
    run = tmp_path / "r"
    base = ["--config", str(_config_file(small_corpus, tmp_path, run, steps=8, lr=1e-3))]
    py = [sys.executable, "-m", "gptjax.cli.train"]
    env = cpu_env(1)
    r = subprocess.run(py + base + ["--stop-after", "4"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    # --resume with no other flag: the run's lr (1e-3), not the preset's (3e-3)
    r = subprocess.run(py + ["--run-dir", str(run), "--resume"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((run / "config.json").read_text())["optim"]["lr"] == 1e-3
    # finished: running it again reports it and changes nothing
    r = subprocess.run(py + base, capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "is complete (step 8)" in r.stdout
    r = subprocess.run(py + ["--run-dir", str(run), "--resume", "--set", "optim.lr=3e-3"], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 2 and "optim.lr: 0.001 in config.json, 0.003 now" in r.stderr
    assert "Traceback" not in r.stderr
    # extend to 12 steps: the schedule keeps its length; past it the lr stays at its final value
    r = subprocess.run(py + ["--run-dir", str(run), "--resume", "--extend-steps", "12"], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["train"]["steps"] == 12 and cfg["optim"]["schedule_steps"] == 8
    lrs = {s: lr for s, lr in ((r_["step"], r_.get("lr")) for r_ in map(json.loads, (run / "metrics.jsonl")
                                                                         .read_text().splitlines())) if lr}
    assert lrs[12] == pytest.approx(1e-3 * 0.1, rel=1e-4)  # min_lr_ratio * lr, not a re-stretched cosine
    # the policy is the library's: a Python caller resolves what the CLI resolves
    from gptjax.training.checkpointing import resolve_resume

    r = subprocess.run(py + ["--run-dir", str(run), "--resume", "--extend-steps", "16", "--set", "train.log_every=2",
                             "--print-config"], capture_output=True, text=True, env=env)
    cfg, resuming = resolve_resume(run, True, overrides=["train.log_every=2"], extend_steps=16)
    assert resuming and json.loads(r.stdout) == cfg.to_dict() and cfg.train.steps == 16
    assert cfg.optim.schedule_steps == 8 and cfg.optim.lr == 1e-3
    fresh, resuming = resolve_resume(tmp_path / "new", "auto", fresh="austen", overrides=["train.steps=3"])
    assert not resuming and fresh.train.steps == 3 and fresh.optim.lr == 3e-3
    with pytest.raises(ConfigError, match="goes with --resume"):
        resolve_resume(tmp_path / "new", "auto", extend_steps=5)


def _config_file(corpus, tmp_path, run, steps, lr):
    cfg = small_run(run, corpus, steps=steps, log_every=2, eval_every=4, checkpoint_every=4)
    cfg = cfg.replace(optim={"lr": lr})
    path = tmp_path / "cfg.json"
    path.write_text(cfg.to_json())
    return path


# ---- 2. metrics once per step; summary kept ----------------------------------------------------------------------
def test_metrics_hold_each_step_once_after_resume(small_corpus, tmp_path):
    cfg = small_run(tmp_path / "r", small_corpus, steps=12, log_every=2, checkpoint_every=4)
    train(cfg, devices=ONE, stop_after=6)  # checkpoints at 4 and 6; metrics up to 6
    # a crash after step 6's checkpoint would leave rows past the checkpoint; simulate rows up to 10
    with (tmp_path / "r" / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 8, "loss": 1.0}) + "\n" + json.dumps({"step": 10, "loss": 1.0}) + "\n")
    train(cfg, resume=True, devices=ONE)
    steps = [s for s, _ in losses(tmp_path / "r")["train"]]
    assert steps == sorted(set(steps)) == [2, 4, 6, 8, 10, 12]
    dropped = (tmp_path / "r" / "metrics.dropped.jsonl").read_text()
    assert '"loss": 1.0' in dropped
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    again = train(cfg, resume=True, devices=ONE)  # resuming a finished run: reported, summary untouched
    assert again.complete_already and json.loads((tmp_path / "r" / "summary.json").read_text()) == summary
    assert summary["train_loss"] is not None


# ---- 3. the non-finite guard --------------------------------------------------------------------------------------
def poison(monkeypatch, steps: set[int]):
    """Make the batches of the given (1-based) steps produce a NaN loss (a NaN in the loss mask)."""
    real = trainer_module.train_dataset

    def dataset(*a, **kw):
        count = iter(range(1, 1 << 30))  # batches are mapped in order, as they are consumed

        def maybe_poison(b):
            return dict(b, loss_mask=np.full_like(b["loss_mask"], np.nan)) if next(count) in steps else b

        return real(*a, **kw).map(maybe_poison)

    monkeypatch.setattr(trainer_module, "train_dataset", dataset)


def test_nonfinite_steps_are_skipped_and_never_saved(small_corpus, tmp_path, monkeypatch):
    cfg = small_run(tmp_path / "skip", small_corpus, steps=12, log_every=1, checkpoint_every=2, keep_checkpoints=2)
    poison(monkeypatch, {5, 6})
    result = train(cfg, devices=ONE)
    rows = dict(losses(tmp_path / "skip")["train"])
    assert rows[5] == "nan" and rows[6] == "nan" and np.isfinite(rows[12])
    assert finite_checkpoints(tmp_path / "skip", cfg) == [10, 12]
    assert np.isfinite(result.val_loss)


def test_a_diverged_run_stops_naming_the_step_and_keeps_finite_checkpoints(small_corpus, tmp_path, monkeypatch):
    cfg = small_run(tmp_path / "stop", small_corpus, steps=30, log_every=1, checkpoint_every=2, keep_checkpoints=2,
                    max_nonfinite_skips=2)
    poison(monkeypatch, set(range(7, 31)))  # diverged from step 7 on
    with pytest.raises(NonFiniteStop, match=r"stopped at step 9: .* from step 7 \(3 in a row, more than "
                                            r"train.max_nonfinite_skips=2\)"):
        train(cfg, devices=ONE)
    # the newest finite checkpoints survive retention; nothing non-finite was written
    assert finite_checkpoints(tmp_path / "stop", cfg) == [6, 8]


# ---- 4. damaged checkpoints ---------------------------------------------------------------------------------------
def damage_truncate(step_dir):
    files = sorted((step_dir / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
    big = files[-1]
    big.write_bytes(big.read_bytes()[: big.stat().st_size // 2])


def damage_flip_bytes(step_dir):
    """256 bytes flipped inside the step's largest data file: every file still reads, no size changes (before
    checksums, resume restored this, the loss went NaN two steps later, and every later resume loaded it again)."""
    big = max((step_dir / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
    data = bytearray(big.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 256] = bytes(b ^ 0xFF for b in data[mid:mid + 256])
    big.write_bytes(bytes(data))
    return big


def damage_delete_item(step_dir):
    import shutil

    shutil.rmtree(step_dir / "data")


def damage_empty(step_dir):
    import shutil

    for p in step_dir.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()


@pytest.fixture(scope="module")
def uninterrupted(small_corpus, tmp_path_factory):
    return train(small_run(tmp_path_factory.mktemp("full") / "r", small_corpus, steps=12, checkpoint_every=4),
                 devices=ONE)


@pytest.mark.parametrize("damage", [damage_truncate, damage_flip_bytes, damage_delete_item, damage_empty])
def test_resume_falls_back_to_the_newest_intact_checkpoint(small_corpus, tmp_path, damage, uninterrupted):
    full = uninterrupted
    cfg = small_run(tmp_path / "r", small_corpus, steps=12, checkpoint_every=4)
    train(cfg, devices=ONE, stop_after=8)
    damage(tmp_path / "r" / "checkpoints" / "8")
    resumed = train(cfg, resume=True, devices=ONE)  # warns, resumes from step 4
    assert resumed.final_step == 12
    assert resumed.train_loss == full.train_loss and resumed.val_loss == full.val_loss
    aside = [p.name for p in (tmp_path / "r" / "checkpoints").iterdir() if ".damaged-" in p.name]
    assert len(aside) == 1 and aside[0].startswith("8.damaged-")


def test_flipped_bytes_are_found_by_verify_and_skipped_by_readers(small_corpus, tmp_path, uninterrupted, caplog):
    """``gptjax-checkpoint verify`` names the changed file and exits 1 (changing nothing); a reader of parameters
    (sampling, serving, evaluation, export, init_from) falls back to the intact step with a warning."""
    from gptjax.checkpoint import load_run
    from helpers import run_cli

    run = tmp_path / "r"
    shutil.copytree(uninterrupted.run_dir, run)
    assert json.loads((run / "checkpoints" / "12" / "checksums.json").read_text())["algorithm"] == "crc32"
    r = run_cli("checkpoint", "verify", str(run), env=cpu_env(1))
    assert r.returncode == 0 and r.stdout.count(": intact (") == 3, r.stdout + r.stderr
    changed = damage_flip_bytes(run / "checkpoints" / "12")
    r = run_cli("checkpoint", "verify", str(run), env=cpu_env(1))
    assert r.returncode == 1, r.stdout + r.stderr
    name = changed.relative_to(run / "checkpoints" / "12").as_posix()
    assert f"step 12: DAMAGED: {name} does not match its checksum" in r.stdout and "step 8: intact" in r.stdout
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["12", "4", "8"]  # verify moves nothing
    with caplog.at_level("WARNING", logger="gptjax"):
        load_run(run)
    assert "reading checkpoint step 8: step 12 is damaged" in caplog.text and name in caplog.text
    with pytest.raises(CheckpointNotFound, match=r"checkpoint step 12 .* cannot be read: .*does not match its "):
        load_run(run, step=12)
    r = run_cli("checkpoint", "verify", str(tmp_path / "nothing"), env=cpu_env(1))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "a gptjax run directory?" in r.stderr


def test_every_other_file_of_a_run_damaged_is_one_line_or_mended(small_corpus, tmp_path, uninterrupted):
    """Found by corrupting each kind of file a run holds: a garbage metrics line was a JSONDecodeError traceback
    from gptjax-plot, gptjax-scaling collect and gptjax-plan; a garbage summary.json one from --resume of a finished
    run; a damaged shard of the run's own data cache stopped every resume; a garbage sweep spec a traceback in the
    array task."""
    from gptjax.config import build_run_config
    from gptjax.training.checkpointing import extend_run
    from helpers import run_cli

    def copy(name):
        shutil.copytree(uninterrupted.run_dir, tmp_path / name)
        return tmp_path / name

    run = copy("metrics")
    lines = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(lines + '{"step": 13, "lo')  # cut short by a kill: left out
    r = run_cli("plot", str(run), env=cpu_env(1))
    assert r.returncode == 0, r.stderr
    (run / "metrics.jsonl").write_text("garbage\n" + lines)
    for args in (["plot", str(run)], ["scaling", "collect", str(run), "--out", str(tmp_path / "p.csv")]):
        r = run_cli(*args, env=cpu_env(1))
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr[-2000:]
        assert "metrics.jsonl line 1 does not read" in r.stderr
    run = copy("summary")
    (run / "summary.json").write_text("{garbage")
    stored = RunDir(run).read_config()
    assert stored.train.run_dir == str(uninterrupted.run_dir)
    assert train(stored.replace(train={"run_dir": str(run)}), resume=True, devices=ONE).final_step == 12  # complete
    extended = [build_run_config(stored, overrides=[*extend_run(stored, 14), f"train.run_dir={copy(name)}"])
                for name in ("whole", "cache")]
    (tmp_path / "cache" / "data" / "train-00000.arecord").write_bytes(b"garbage")
    whole, mended = (train(c, resume=True, devices=ONE) for c in extended)
    assert mended.final_step == 14 and (mended.train_loss, mended.val_loss) == (whole.train_loss, whole.val_loss)
    (tmp_path / "sweep" / ".sweep").mkdir(parents=True)
    (tmp_path / "sweep" / ".sweep" / "0.json").write_text("{garbage")
    r = subprocess.run([sys.executable, "-m", "gptjax.experiments", str(tmp_path / "sweep"), "0"],
                       capture_output=True, text=True, env=cpu_env(1))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "0.json does not read" in r.stderr, r.stderr


def test_resume_step_picks_one_and_a_damaged_one_is_a_clear_error(small_corpus, tmp_path):
    cfg = small_run(tmp_path / "r", small_corpus, steps=12, checkpoint_every=4)
    train(cfg, devices=ONE, stop_after=8)
    with pytest.raises(CheckpointNotFound, match=r"--resume-step 5: no such checkpoint .* available: \[4, 8\]"):
        train(cfg, resume=True, resume_step=5, devices=ONE)
    damage_delete_item(tmp_path / "r" / "checkpoints" / "4")
    with pytest.raises(CheckpointNotFound,
                       match=r"--resume-step 4: checkpoint step 4 is damaged: item\(s\) \['data'\]"):
        train(cfg, resume=True, resume_step=4, devices=ONE)


def test_a_failed_checkpoint_write_is_clear_and_keeps_earlier_ones(small_corpus, tmp_path, monkeypatch):
    """The disk fills up while step 8 is written (every Python-level write raises ENOSPC)."""
    from etils import epath

    cfg = small_run(tmp_path / "r", small_corpus, steps=12, checkpoint_every=4, async_checkpoint=False)
    train(cfg, devices=ONE, stop_after=4)
    real_write = epath.Path.write_text

    def full_disk(self, *a, **kw):
        if "/checkpoints/" in str(self) and "/8" in str(self):
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_write(self, *a, **kw)

    monkeypatch.setattr(type(epath.Path(tmp_path)), "write_text", full_disk)
    with pytest.raises(CheckpointWriteError, match=r"could not write checkpoint step 8 .*No space left on device"
                                                   r".*earlier checkpoints \[4\] are untouched"):
        train(cfg, resume=True, devices=ONE)
    monkeypatch.setattr(type(epath.Path(tmp_path)), "write_text", real_write)
    resumed = train(cfg, resume=True, devices=ONE)  # the step-4 checkpoint still resumes
    assert resumed.final_step == 12


# ---- 5. pre-emption and kill -9 (subprocesses) -----------------------------------------------------------------
def start_run(config_path, *extra):
    env = cpu_env(1)
    return subprocess.Popen([sys.executable, "-m", "gptjax.cli.train", "--config", str(config_path), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def has_checkpoint(run_dir) -> bool:
    return (run_dir / "checkpoints").exists() and Checkpointer(run_dir / "checkpoints", create=False).latest_step() \
        is not None


def wait_for_step(run_dir, step, proc, timeout=300):
    deadline = time.time() + timeout
    path = run_dir / "metrics.jsonl"
    while time.time() < deadline:
        if path.exists() and any(json.loads(x).get("step", 0) >= step for x in path.read_text().splitlines()
                                 if x.strip().endswith("}")):
            return
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    raise TimeoutError


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_the_step_reached_and_exits_75(small_corpus, tmp_path, sig):
    run = tmp_path / "r"
    cfg = small_run(run, small_corpus, steps=3000, log_every=1, eval_every=10_000, checkpoint_every=10_000)
    path = tmp_path / "cfg.json"
    path.write_text(cfg.to_json())
    proc = start_run(path)
    wait_for_step(run, 10, proc)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out[-3000:]
    assert f"pre-empted ({sig.name}) at step" in out and "Traceback" not in out
    last_logged = max(s for s, _ in losses(run)["train"])
    saved = Checkpointer(run / "checkpoints", create=False).latest_step()
    assert saved == last_logged  # the checkpoint is the last completed step: no step's work is lost


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_is_bit_identical(small_corpus, tmp_path):
    """Runs killed with SIGKILL at random moments (also inside checkpoint saves, which are frequent here), then
    resumed until done, end with exactly the uninterrupted run's losses."""
    def config(run):
        cfg = small_run(run, small_corpus, steps=24, log_every=1, eval_every=8, checkpoint_every=2,
                        keep_checkpoints=2)
        path = run.parent / f"{run.name}.json"
        path.write_text(cfg.to_json())
        return path

    ref_dir = tmp_path / "ref"
    ref = start_run(config(ref_dir))
    assert ref.wait(timeout=600) == 0
    reference = losses(ref_dir)
    rng = random.Random(0)
    kills = 0
    for seed in range(1):
        run = tmp_path / f"k{seed}"
        path = config(run)
        for attempt in range(4):
            proc = start_run(path, *(["--resume"] if has_checkpoint(run) else []))
            try:
                wait_for_step(run, 1, proc, timeout=300)  # compiled and training
            except AssertionError:
                break  # it finished before we got to kill it
            time.sleep(rng.uniform(0.0, 1.5))
            if proc.poll() is not None:
                break
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
        proc = start_run(path, *(["--resume"] if has_checkpoint(run) else []))
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
        assert losses(run) == reference, f"seed {seed}"
    # and killed while a checkpoint is being written: the moment orbax's temporary step directory appears
    run = tmp_path / "in_save"
    path = config(run)
    in_save = 0
    for attempt in range(6):
        proc = start_run(path, *(["--resume"] if has_checkpoint(run) else []))
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            if any(".orbax-checkpoint-tmp" in p.name for p in (run / "checkpoints").glob("*")) if (
                    run / "checkpoints").exists() else False:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                in_save += 1
                break
            time.sleep(0.001)
        if proc.poll() == 0 or in_save >= 2:
            break
    proc = start_run(path, *(["--resume"] if has_checkpoint(run) else []))
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert losses(run) == reference
    assert kills >= 3 and in_save >= 1
    print(f"\nkill -9 cycles survived bit-identically: {kills} at random moments, {in_save} inside a "
          "checkpoint save")
