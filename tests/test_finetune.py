"""Fine-tuning with task heads (GPT-1): the input transformations, the heads' symmetries, the vocabulary extension,
bad rows, learning, and resume / pre-emption as in pretraining."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from helpers import ONE_DEVICE_ENV, small_run


class Chars:
    """One token per character (ids 10 + ord - 97 for a-z), enough to read the transformed sequences."""

    def encode(self, text):
        return [10 + ord(c) - 97 for c in text]


def test_gpt1_input_transformations():
    from gptjax.finetune.data import encode

    V = 100
    s, d, e = V, V + 1, V + 2
    t = Chars().encode
    enc = encode([{"premise": "ab", "hypothesis": "c", "label": 1}], "entailment", Chars(), V, 16)
    assert enc.tokens[0, 0, :6].tolist() == [s, *t("ab"), d, *t("c"), e] and enc.extract_at[0, 0] == 5
    # the auxiliary LM loss predicts the text tokens only (position t predicts token t + 1)
    assert enc.lm_mask[0, 0, :6].tolist() == [1, 1, 0, 1, 0, 0]
    sim = encode([{"text_a": "ab", "text_b": "c", "label": 0}], "similarity", Chars(), V, 16)
    assert sim.tokens.shape[1] == 2 and sim.tokens[0, 1, :5].tolist() == [s, *t("c"), d, *t("ab"), e][:5]
    mc = encode([{"context": "ab", "choices": ["c", "dd", "e"], "label": 2}] * 2, "multiple_choice", Chars(), V, 16)
    assert mc.tokens.shape[:2] == (2, 3) and mc.extract_at[0].tolist() == [5, 6, 5]
    assert mc.tokens[0, 1, :7].tolist() == [s, *t("ab"), d, *t("dd"), e] and mc.labels.tolist() == [2, 2]
    cls = encode([{"text": "abcdefghij", "label": 0}, {"text": "ab", "label": 1}], "classification", Chars(), V, 6)
    assert cls.tokens.shape == (2, 1, 6) and cls.truncated == 1
    assert cls.tokens[0, 0].tolist() == [s, *t("abcd"), e]  # the end of the text goes; the extract token stays
    assert cls.tokens[1, 0].tolist() == [s, *t("ab"), e, 0, 0] and cls.extract_at[:, 0].tolist() == [5, 3]


@pytest.mark.parametrize("bad,words", [
    ('{"text": "a", "label": 0}\n{"text": "b"', "line 2: not JSON"),
    ('{"text": "a", "label": 0}\n{"txt": "b", "label": 1}', 'line 2: a classification row needs "text", "label"'),
    ('{"text": "a", "label": "x"}', "line 1: label must be an integer"),
    ('{"text": "", "label": 0}', "line 1: text must be a non-empty string"),
])
def test_bad_rows_are_refused_naming_the_line(tmp_path, bad, words):
    from gptjax.finetune.data import FinetuneDataError, read_rows

    f = tmp_path / "rows.jsonl"
    f.write_text(bad)
    with pytest.raises(FinetuneDataError, match=words) as e:
        read_rows(f, "classification")
    assert str(f) in str(e.value)
    f.write_text('{"context": "a", "choices": ["b", "c"], "label": 0}\n{"context": "a", "choices": ["b"], "label": 0}')
    with pytest.raises(FinetuneDataError, match="line 2: choices must be a list of at least 2"):
        read_rows(f, "multiple_choice")
    f.write_text('{"context": "a", "choices": ["b", "c"], "label": 0}\n{"context": "a", "choices": ["b", "c", "d"], '
                 '"label": 0}')
    with pytest.raises(FinetuneDataError, match=r"line 2: 3 choices; every row needs the same number \(2"):
        read_rows(f, "multiple_choice")


def test_heads_symmetries_and_the_extended_vocabulary():
    """Similarity does not depend on the order of its two texts; multiple-choice logits follow the choices'
    order; the extended vocabulary leaves the pretrained logits of the old tokens as they were."""
    from gptjax.finetune.data import N_SPECIAL, encode
    from gptjax.finetune.trainer import TaskModel, extend_vocabulary
    from gptjax.model import ShardedModel
    from gptjax.sharding import single_device_mesh

    from helpers import nano_model

    cfg = nano_model(max_seq_len=32)
    mesh = single_device_mesh()
    base = ShardedModel(cfg, mesh)
    pretrained = base.init_params(jax.random.key(0))
    import dataclasses

    big = dataclasses.replace(cfg, vocab_size=cfg.vocab_size + N_SPECIAL)
    decoder = extend_vocabulary(pretrained, cfg, jax.random.key(1))
    tokens = np.arange(1, 17, dtype=np.int32)[None]
    np.testing.assert_allclose(ShardedModel(big, mesh).forward(decoder, tokens)[..., :cfg.vocab_size],
                               base.forward(pretrained, tokens), rtol=1e-5, atol=1e-5)
    sim = TaskModel(big, "similarity", 3, mesh)
    params = {"decoder": decoder, "head": sim.init_head(jax.random.key(2))}
    ab = encode([{"text_a": "abc", "text_b": "de", "label": 0}], "similarity", Chars(), cfg.vocab_size, 32)
    ba = encode([{"text_a": "de", "text_b": "abc", "label": 0}], "similarity", Chars(), cfg.vocab_size, 32)
    np.testing.assert_allclose(sim.logits_and_lm(params, ba.take([0]))[0], sim.logits_and_lm(params, ab.take([0]))[0],
                               rtol=1e-5, atol=1e-6)
    mc = TaskModel(big, "multiple_choice", 1, mesh)
    params = {"decoder": decoder, "head": mc.init_head(jax.random.key(3))}
    rows = [{"context": "ab", "choices": ["c", "dd", "eee"], "label": 0},
            {"context": "ab", "choices": ["eee", "c", "dd"], "label": 1}]
    logits = np.asarray(mc.logits_and_lm(params, encode(rows, "multiple_choice", Chars(), cfg.vocab_size, 32).take(
        [0, 1]))[0])
    np.testing.assert_allclose(logits[1], logits[0][[2, 0, 1]], rtol=1e-5, atol=1e-6)


def _question_task(tmp_path, corpus):
    """Real sentences labelled by whether they are questions: a rule a fine-tuned model learns in a few steps."""
    from gptjax.evals.tasks import paragraphs, sentences

    sents = [s for p in paragraphs(corpus.read_text()) for s in sentences(p) if 4 <= len(s.split()) <= 30]
    rows = [{"text": s.rstrip('"'), "label": int(s.rstrip('"').endswith("?"))} for s in sents]
    pos, neg = [r for r in rows if r["label"]], [r for r in rows if not r["label"]]
    n = min(len(pos), len(neg), 200)
    rng = np.random.default_rng(0)
    pos, neg = [pos[i] for i in rng.permutation(len(pos))[:n]], [neg[i] for i in rng.permutation(len(neg))[:n]]
    cut = 3 * n // 4  # both splits balanced: chance is 1/2
    for name, part in (("train", pos[:cut] + neg[:cut]), ("test", pos[cut:] + neg[cut:])):
        part = [part[i] for i in rng.permutation(len(part))]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return tmp_path / "train.jsonl", tmp_path / "test.jsonl"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, small_corpus):
    from gptjax.training.trainer import train

    run = tmp_path_factory.mktemp("pre") / "run"
    train(small_run(run, small_corpus, steps=30, eval_every=30, checkpoint_every=30))
    train_f, test_f = _question_task(tmp_path_factory.mktemp("task"), small_corpus)
    return run, train_f, test_f


def test_finetuning_learns_a_task_and_resumes_exactly(pretrained, tmp_path):
    from gptjax.config import ConfigError
    from gptjax.finetune import FinetuneConfig, Finetuner, finetune
    from gptjax.runs import RunLocked, WriterLock

    run, train_f, test_f = pretrained
    cfg = FinetuneConfig(str(run), "classification", str(train_f), str(test_f), str(tmp_path / "a"), lr=3e-3,
                         epochs=10, batch_size=16, checkpoint_every=100)
    whole = Finetuner(cfg)
    result = whole.run()
    assert result.chance == 0.5 and result.accuracy > 0.7, result
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["accuracy"] == result.accuracy and (tmp_path / "a" / "finetune.json").is_file()
    assert finetune(cfg).complete_already  # the same run again: its summary, nothing trained
    # interrupted at step 37 and resumed: the same final parameters as the uninterrupted run
    cut = FinetuneConfig(**{**cfg.to_dict(), "run_dir": str(tmp_path / "b")})
    assert finetune(cut, stop_after=37).step == 37
    with pytest.raises(FileExistsError, match=r"already holds checkpoints \(latest step 37\); pass --resume"):
        finetune(cut)
    with pytest.raises(ConfigError, match=r"(?s)differs from .*finetune.json.*lr: 0.003 in finetune.json, 0.001 now "
                                          r"\(changes the optimizer trajectory\)"):
        finetune(FinetuneConfig(**{**cut.to_dict(), "lr": 1e-3}), resume=True)
    with pytest.raises(RunLocked), WriterLock(tmp_path / "b"):  # a second writer is refused, as in pre-training
        finetune(cut, resume=True)
    # what only changes the cadence may change on resume (the fields' roles, as in pre-training)
    resumed = Finetuner(FinetuneConfig(**{**cut.to_dict(), "checkpoint_every": 7, "log_every": 5}))
    assert resumed.run(resume=True).accuracy == result.accuracy
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
                 resumed.state["params"], whole.state["params"])
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [10, 20, 30, 37, 40, 45, 50, 55, 60, 65, 70, 75, 80, 85, 90,
                                                        95, 100]
    assert {"task_loss", "lm_loss", "grad_norm", "lr", "epochs", "tokens_per_sec"} <= set(
        [r for r in rows if "loss" in r][-1])
    assert sorted(int(p.name) for p in (tmp_path / "b" / "checkpoints").iterdir()) == [98, 100]


def test_gptjax_finetune_sigterm_saves_and_resume_finishes(pretrained, tmp_path):
    run, train_f, test_f = pretrained
    args = [sys.executable, "-m", "gptjax.cli.finetune", "--init-from", str(run), "--task-type", "classification",
            "--train", str(train_f), "--test", str(test_f), "--run-dir", str(tmp_path / "ft"), "--lr", "3e-3",
            "--batch-size", "8", "--epochs", "3", "--checkpoint-every", "1000"]
    proc = subprocess.Popen(args, env=ONE_DEVICE_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "ft" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().strip()) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75 and "continue with --resume" in err, err[-2000:]
    saved = sorted(int(p.name) for p in (tmp_path / "ft" / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and saved[-1] >= 10
    r = subprocess.run(args + ["--resume"], env=ONE_DEVICE_ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "test accuracy" in r.stdout, r.stderr[-2000:]
    bad = subprocess.run(args + ["--test", str(tmp_path / "nope.jsonl"), "--run-dir", str(tmp_path / "x")],
                         env=ONE_DEVICE_ENV, capture_output=True, text=True, timeout=300)  # (the last one counts)
    assert bad.returncode == 2 and "nope.jsonl does not exist" in bad.stderr and "Traceback" not in bad.stderr
    assert os.path.exists(tmp_path / "ft" / "summary.json")


def test_a_refused_finetune_leaves_no_directory_and_names_a_pretraining_run(pretrained, tmp_path):
    """A fine-tune refused after it made its run directory left the directory (with finetune.json and a lock's
    leftovers), and a pre-training run given as --run-dir was called "a fine-tuning run"."""
    import shutil

    from gptjax.checkpoint import CheckpointNotFound
    from gptjax.finetune import FinetuneConfig, FinetuneError, finetune

    run, train_f, test_f = pretrained
    damaged = tmp_path / "damaged"
    shutil.copytree(run, damaged)
    shutil.rmtree(damaged / "checkpoints" / "30" / "state")  # its only checkpoint cannot be read
    cfg = FinetuneConfig(str(damaged), "classification", str(train_f), str(test_f), str(tmp_path / "ft"), epochs=1,
                         batch_size=16)
    with pytest.raises(CheckpointNotFound, match="no intact checkpoint"):
        finetune(cfg)
    assert not (tmp_path / "ft").exists()
    with pytest.raises(FinetuneError, match=r"holds a pre-training run \(checkpoint step 30, no finetune.json\)"):
        finetune(FinetuneConfig(**{**cfg.to_dict(), "init_from": str(run), "run_dir": str(run)}))
    assert (run / "checkpoints" / "30").is_dir() and not (run / "finetune.json").exists()


def test_a_probe_trains_the_head_alone_and_scratch_starts_fresh(pretrained, tmp_path):
    """The probe's optimizer (a multi-transform: the decoder frozen) and the scratch start, through the training
    loop: a probe's decoder leaves exactly as the pretrained one came in (its vocabulary extended), its head moves."""
    from gptjax.finetune import FinetuneConfig, Finetuner

    run, train_f, test_f = pretrained
    probe = Finetuner(FinetuneConfig(str(run), "classification", str(train_f), str(test_f), str(tmp_path / "p"),
                                     mode="probe", lr=1e-2, epochs=1, batch_size=32))
    start = jax.device_get(probe.program.initial_params())
    result = probe.run()
    end = jax.device_get(probe.state["params"])
    jax.tree.map(np.testing.assert_array_equal, end["decoder"], start["decoder"])
    np.testing.assert_array_equal(end["head"]["mean"], start["head"]["mean"])
    assert np.abs(end["head"]["w"] - start["head"]["w"]).max() > 1e-3 and result.n_test > 0
    assert json.loads((tmp_path / "p" / "summary.json").read_text())["lm_coef"] == 0.0
    scratch = Finetuner(FinetuneConfig(str(run), "classification", str(train_f), str(test_f), str(tmp_path / "s"),
                                       mode="scratch", epochs=1, batch_size=32))
    fresh = jax.device_get(scratch.program.initial_params())["decoder"]["embedding"]
    pretrained_rows = start["decoder"]["embedding"][:fresh.shape[0]]
    assert fresh.shape == pretrained_rows.shape and not np.allclose(fresh, pretrained_rows)
    assert scratch.run().step == scratch.steps
