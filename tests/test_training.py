import json

import jax
import numpy as np
import pytest

from helpers import batch_for, small_run, tiny_program
from gptjax.checkpoint.manager import Checkpointer, CheckpointNotFound
from gptjax.config import OptimConfig
from gptjax.runs import RunDir
from gptjax.training.optimizer import lr_schedule
from gptjax.training.trainer import train


def test_loss_decreases_when_overfitting_one_batch():
    prog = tiny_program()
    state = prog.init(jax.random.key(0))
    b = batch_for(prog)
    state, m0 = prog.train_step(state, b)
    for _ in range(30):
        state, m = prog.train_step(state, b)
    first, last = float(m0["loss"]), float(m["loss"])
    assert first == pytest.approx(np.log(512), abs=0.3)  # starts near uniform
    assert last < 0.5 * first


def test_schedules():
    cos = lr_schedule(OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1), 100)
    assert float(cos(0)) == 0.0 and float(cos(10)) == pytest.approx(1.0)
    assert float(cos(100)) == pytest.approx(0.1)
    wsd = lr_schedule(OptimConfig(lr=1.0, warmup_steps=10, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0), 100)
    assert float(wsd(50)) == pytest.approx(1.0) and float(wsd(79)) == pytest.approx(1.0)
    assert float(wsd(90)) == pytest.approx(0.5) and float(wsd(100)) == pytest.approx(0.0)


def test_train_end_to_end_then_resume_matches_uninterrupted(small_corpus, tmp_path):
    one = jax.devices()[:1]
    full = train(small_run(tmp_path / "full", small_corpus, steps=12), devices=one)
    assert (tmp_path / "full" / "metrics.jsonl").exists() and (tmp_path / "full" / "tokenizer.model").exists()
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "tokens_per_sec", "mfu", "step_time"} <= set(rows[0]) and any("val_loss" in r for r in rows)
    assert Checkpointer(tmp_path / "full" / "checkpoints").all_steps() == [6, 12]
    png = (tmp_path / "full" / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000  # the loss/throughput picture
    # everything the run wrote is a name the run-directory module declares (one home for each file name)
    declared = {v for k, v in vars(RunDir).items() if k.isupper()}
    assert {p.name for p in (tmp_path / "full").iterdir()} <= declared
    assert RunDir(tmp_path / "full").read_summary()["final_step"] == 12

    with pytest.raises(CheckpointNotFound, match="--resume: no checkpoint in"):
        train(small_run(tmp_path / "part", small_corpus, steps=12), devices=one, resume=True)
    half = train(small_run(tmp_path / "part", small_corpus, steps=12), devices=one, stop_after=6)  # pre-empted
    assert half.final_step == 6
    with pytest.raises(FileExistsError, match="pass --resume"):
        train(small_run(tmp_path / "part", small_corpus, steps=12), devices=one)
    resumed = train(small_run(tmp_path / "part", small_corpus, steps=12), devices=one, resume=True)
    assert resumed.final_step == 12
    assert resumed.train_loss == pytest.approx(full.train_loss, rel=1e-5)
    assert resumed.val_loss == pytest.approx(full.val_loss, rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6),
                 resumed.state["params"], full.state["params"])


def test_train_step_never_copies_the_donated_state():
    """The non-finite guard is a conditional: a per-element select between new and old state made XLA copy every
    donated optimizer buffer at the start of the step (the whole Adam state held twice through the peak)."""
    import re

    prog = tiny_program()
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch_for(prog).items()}
    hlo = prog.train_step.lower(prog.abstract_state, batch).compile().as_text()
    copies = re.findall(r"= f32\[[\d,]+\]\{[\d,]*\} copy\(%state", hlo)
    assert copies == [], copies[:5]


def test_profile_writes_a_trace_of_the_steps_asked(tmp_path, small_corpus, capsys):
    """train.profile=2:3 (gptjax-train --profile 2:3): a JAX profiler trace of steps 2-3 in <run>/profile, the
    format TensorBoard's profile plugin and XProf read (an .xplane.pb per host); a bad range is refused."""
    from gptjax.config import ConfigError

    run = tmp_path / "run"
    train(small_run(run, small_corpus, steps=4, eval_every=4, checkpoint_every=4, profile="2:3"))
    traces = list((run / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 1000
    assert "profile of steps 2-3" in capsys.readouterr().out
    for bad in ("3", "0:2", "5:4", "a:b"):
        with pytest.raises(ConfigError, match="train.profile=.*START:END"):
            small_run(run, small_corpus, profile=bad)


def wandb_records(path) -> list:
    """The records of an offline W&B run file (``run-<id>.wandb``): a ``:W&B`` header, then LevelDB's log format
    (32 KiB blocks of records framed by crc32c, length, type; long records in pieces) holding W&B's protobuf
    ``Record`` messages (wandb 0.31 no longer ships a Python reader)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, out, pieces = path.read_bytes(), 7, 32768, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        pieces, pos = pieces + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(pieces)
            out.append(record)
            pieces = b""
    return out


def test_wandb_offline_logs_the_run_and_a_resume_continues_the_same_wandb_run(tmp_path, small_corpus, monkeypatch):
    """train.wandb_project with WANDB_MODE=offline (nothing reaches a server): the W&B run lives under
    <run>/wandb, its id in <run>/wandb-id; a run stopped at step 4 and resumed logs to the same id: the first
    attempt's history holds steps 4, the second's 8, and the summary the run's final numbers."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    cfg = small_run(run, small_corpus, steps=8, eval_every=4, checkpoint_every=4, wandb_project="gptjax-tests")
    train(cfg, stop_after=4)
    run_id = (run / "wandb-id").read_text().strip()
    result = train(cfg, resume=True)
    attempts = sorted((run / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2 and all(p.name.endswith(f"-{run_id}") for p in attempts)
    logged = []
    for attempt in attempts:
        records = wandb_records(attempt / f"run-{run_id}.wandb")
        (header,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert header.run_id == run_id and header.project == "gptjax-tests"
        config = {c.key: json.loads(c.value_json) for c in header.config.update}
        assert config["train"]["wandb_project"] == "gptjax-tests"
        history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                   for r in records if r.WhichOneof("record_type") == "history"]
        logged.append(sorted({h["_step"] for h in history if "train/loss" in h}))
        summary = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for r in records
                   if r.WhichOneof("record_type") == "summary" for i in r.summary.update}
    assert logged == [[4], [8]]  # log_every 4: each attempt its own steps, under one W&B run
    assert summary["final_step"] == 8 and summary["val_loss"] == pytest.approx(result.val_loss)
    assert summary["train_loss"] == pytest.approx(result.train_loss)


def test_muon_trains_checkpoints_and_resumes_exactly(tmp_path, small_corpus):
    """optim.name=muon: a run stopped at step 4 and resumed logs the losses of the uninterrupted run, float for
    float (Muon's momentum and AdamW's moments of the other parameters are in the checkpoint); μP with Muon is
    refused, saying why."""
    from gptjax.config import ConfigError

    def cfg(name):
        return small_run(tmp_path / name, small_corpus, steps=8, eval_every=4, checkpoint_every=4, log_every=1) \
            .replace(optim={"name": "muon"})

    whole = train(cfg("whole"))
    train(cfg("cut"), stop_after=4)
    resumed = train(cfg("cut"), resume=True)
    rows = lambda name: [(r["step"], r.get("loss"), r.get("val_loss"))  # noqa: E731
                         for r in RunDir(tmp_path / name).read_metrics() if "loss" in r or "val_loss" in r]
    assert rows("cut") == rows("whole") and resumed.val_loss == whole.val_loss
    assert whole.history[0]["loss"] > whole.train_loss
    timed = [r for r in whole.history if "data_time" in r]  # the step-time breakdown: the host's wait for data
    assert len(timed) == 8 and all(0 <= r["data_time"] <= r["step_time"] for r in timed)
    with pytest.raises(ConfigError, match="optim.name=muon with model.parametrization=mup"):
        cfg("x").replace(model={"parametrization": "mup"})
