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
