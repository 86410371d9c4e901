import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import nano_model, small_run
from gptjax.checkpoint.manager import Checkpointer, CheckpointNotFound
from gptjax.config import OptimConfig, RunConfig, TrainConfig
from gptjax.eval.sample import filter_logits, generate
from gptjax.sharding.mesh import make_mesh
from gptjax.training.optimizer import decay_mask, lr_schedule
from gptjax.training.program import Program
from gptjax.training.loop import train


def tiny_program(steps=40, **model_kw):
    cfg = RunConfig(model=nano_model(**model_kw), optim=OptimConfig(lr=1e-2, warmup_steps=0),
                    train=TrainConfig(steps=steps, batch_size=4, seq_len=32))
    return Program(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))


def batch_for(prog, seed=0):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 512, (4, 33)).astype(np.int32)
    return prog.global_batch({"inputs": data[:, :-1], "targets": data[:, 1:]})


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


def test_weight_decay_mask_convention():
    prog = tiny_program()
    shapes = prog.abstract_state["params"]
    mask = decay_mask(shapes)
    assert mask["blocks"][0]["attn"]["w_q"] and mask["blocks"][1]["mlp"]["w_down"]
    assert not mask["embedding"]
    assert not mask["blocks"][0]["attn_norm"]["scale"] and not mask["final_norm"]["scale"]
    untied = tiny_program(tie_embeddings=False, use_bias=True, positions="learned", scan_layers=True)
    m2 = decay_mask(untied.abstract_state["params"])  # stacked layout: rank counts without the layer axis
    assert m2["unembedding"] and not m2["pos_embedding"] and not m2["blocks"]["mlp"]["b_up"]
    assert m2["blocks"]["mlp"]["w_up"] and not m2["blocks"]["attn_norm"]["scale"]


def test_schedules():
    cos = lr_schedule(OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1), 100)
    assert float(cos(0)) == 0.0 and float(cos(10)) == pytest.approx(1.0)
    assert float(cos(100)) == pytest.approx(0.1)
    wsd = lr_schedule(OptimConfig(lr=1.0, warmup_steps=10, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0), 100)
    assert float(wsd(50)) == pytest.approx(1.0) and float(wsd(79)) == pytest.approx(1.0)
    assert float(wsd(90)) == pytest.approx(0.5) and float(wsd(100)) == pytest.approx(0.0)


def test_checkpoint_round_trip_gives_identical_params_and_next_loss(tmp_path):
    prog = tiny_program()
    state = prog.init(jax.random.key(0))
    for s in range(3):
        state, _ = prog.train_step(state, batch_for(prog, s))
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(3, state)
    restored = ckpt.restore(prog.abstract_state)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored, state)
    _, m1 = prog.train_step(state, batch_for(prog, 9))
    _, m2 = prog.train_step(restored, batch_for(prog, 9))
    assert float(m1["loss"]) == float(m2["loss"])
    with pytest.raises(CheckpointNotFound, match="no checkpoint for step 7"):
        ckpt.restore(prog.abstract_state, step=7)
    with pytest.raises(CheckpointNotFound, match="no checkpoint in"):
        Checkpointer(tmp_path / "empty").restore(prog.abstract_state)


def test_sampling_filters():
    logits = jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05]))
    k2 = filter_logits(logits, 1.0, 2, 1.0)
    assert list(np.isfinite(np.asarray(k2)) & (np.asarray(k2) > -1e30)) == [True, True, False, False]
    p = np.asarray(filter_logits(logits, 1.0, 0, 0.75))  # nucleus: 0.5 + 0.3 reaches 0.75
    assert list(p > -1e30) == [True, True, False, False]
    p = np.asarray(filter_logits(logits, 1.0, 0, 0.4))  # the best token alone already exceeds 0.4
    assert list(p > -1e30) == [True, False, False, False]


def test_generate_greedy_is_deterministic_and_top_k_1_is_greedy():
    prog = tiny_program()
    params = prog.init(jax.random.key(0))["params"]
    a = generate(prog.forward, params, [5, 6, 7], 10, 64, temperature=0.0)
    b = generate(prog.forward, params, [5, 6, 7], 10, 64, temperature=0.0)
    c = generate(prog.forward, params, [5, 6, 7], 10, 64, temperature=1.0, top_k=1, seed=3)
    assert a == b == c and len(a) == 10
    logits = prog.forward(params, jnp.asarray([[5, 6, 7]]))
    assert a[0] == int(jnp.argmax(logits[0, -1]))
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(prog.forward, params, [], 5, 64)


def test_train_end_to_end_then_resume_matches_uninterrupted(small_corpus, tmp_path):
    one = jax.devices()[:1]
    full = train(small_run(tmp_path / "full", small_corpus, steps=12), devices=one)
    assert (tmp_path / "full" / "metrics.jsonl").exists() and (tmp_path / "full" / "tokenizer.model").exists()
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "tokens_per_sec", "mfu", "step_time"} <= set(rows[0]) and any("val_loss" in r for r in rows)
    assert Checkpointer(tmp_path / "full" / "checkpoints").all_steps() == [6, 12]
    png = (tmp_path / "full" / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000  # the loss/throughput picture

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
