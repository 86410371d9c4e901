"""The one loss and held-out evaluation: masks, token weighting, agreement with the training loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_batch, tiny_program
from gptjax.evals.loss import evaluate
from gptjax.model.loss import next_token_loss


def test_next_token_loss_masks_and_weights_by_tokens():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 7, (2, 5)), jnp.int32)
    nll_all = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
    full, aux = next_token_loss(logits, targets)
    assert float(full) == pytest.approx(float(nll_all.mean()), rel=1e-6) and float(aux["tokens"]) == 10
    mask = jnp.asarray([[1, 1, 0, 0, 0], [0, 0, 0, 1, 1]], jnp.float32)
    masked, aux = next_token_loss(logits, targets, mask)
    expected = (nll_all[0, :2].sum() + nll_all[1, 3:].sum()) / 4
    assert float(masked) == pytest.approx(float(expected), rel=1e-6)
    assert float(aux["nll_sum"]) == pytest.approx(float(expected) * 4, rel=1e-6) and float(aux["tokens"]) == 4
    empty, aux = next_token_loss(logits, targets, jnp.zeros((2, 5)))
    assert float(empty) == 0.0 and float(aux["z_loss"]) == 0.0  # no NaN from an empty mask
    # masked-out positions get no gradient
    g = jax.grad(lambda x: next_token_loss(x, targets, mask)[0])(logits)
    assert float(jnp.abs(g[0, 2:]).max()) == 0.0 and float(jnp.abs(g[0, :2]).max()) > 0


def test_evaluate_weights_batches_by_their_tokens():
    prog = tiny_program()
    params = prog.init(jax.random.key(0))["params"]
    a, b = random_batch(seed=1), random_batch(seed=2)
    b["loss_mask"][:, 8:] = 0  # a quarter of b's tokens count
    per = [prog.model.eval_step(params, prog.global_batch(x)) for x in (a, b)]
    expected = (float(per[0]["nll_sum"]) + float(per[1]["nll_sum"])) / (128 + 32)
    assert evaluate(prog.model, params, [a, b]) == pytest.approx(expected, rel=1e-6)
    # the training loss and the evaluation loss are the same function of (params, batch)
    _, m = prog.train_step(prog.init(jax.random.key(0)), prog.global_batch(a))
    assert float(m["loss"]) == pytest.approx(evaluate(prog.model, params, [a]), rel=1e-6)


# ---- perplexity and bits-per-byte with a sliding window ------------------------------------------------------
def test_sliding_windows_score_every_token_once_with_the_stated_context():
    from gptjax.evals.perplexity import windows

    for n, context, stride in ((1, 8, 8), (40, 16, 5), (40, 16, 16), (100, 32, 7), (16, 16, 3)):
        scored = []
        for i, (start, first) in enumerate(windows(n, context, stride)):
            end = min(start + context, n)
            scored += range(first, end)
            if i:  # after the first window each scored target has at least context - stride tokens before it
                assert first - start >= context - stride
        assert scored == list(range(n))
    with pytest.raises(ValueError, match="stride must be in"):
        windows(10, 8, 9)


def test_sliding_window_log_loss_is_the_full_forward_pass_over_each_window():
    """Against brute force: each target's log-probability from a forward pass over exactly the tokens its window
    gives it, summed; bits-per-byte are that sum over ln 2 times the bytes."""
    from gptjax.evals.perplexity import score_ids, windows
    from gptjax.model import ShardedModel
    from gptjax.sharding import single_device_mesh

    from helpers import nano_model

    model = ShardedModel(nano_model(max_seq_len=16), single_device_mesh())
    params = model.init_params(jax.random.key(0))
    ids = np.random.default_rng(0).integers(0, 512, 41)
    for context, stride in ((16, 5), (16, 16), (8, 3)):
        score = score_ids(model, params, ids, context, stride, batch_size=3, n_bytes=123)
        expected = 0.0
        for start, first in windows(len(ids) - 1, context, stride):
            end = min(start + context, len(ids) - 1)
            logp = jax.nn.log_softmax(model.forward(params, jnp.asarray(ids[None, start:end]))[0])
            expected -= sum(float(logp[t - start, ids[t + 1]]) for t in range(first, end))
        assert score.tokens == 40 and score.nll == pytest.approx(expected, rel=1e-5)
        assert score.bits_per_byte == pytest.approx(expected / (np.log(2) * 123), rel=1e-5)
        assert score.perplexity == pytest.approx(np.exp(expected / 40), rel=1e-5)
    with pytest.raises(ValueError, match="longer than the model's max_seq_len"):
        score_ids(model, params, ids, 32, 8)


# ---- packed log-likelihood scoring ---------------------------------------------------------------------------
def _scoring_model(max_seq_len=48):
    from gptjax.model import ShardedModel
    from gptjax.sharding import single_device_mesh

    from helpers import nano_model

    model = ShardedModel(nano_model(max_seq_len=max_seq_len), single_device_mesh())
    return model, model.init_params(jax.random.key(0))


def _requests(n=23, seed=0):
    from gptjax.evals.scoring import Request

    rng = np.random.default_rng(seed)
    out = [Request(rng.integers(0, 512, rng.integers(1, 30)).tolist(),
                   rng.integers(0, 512, rng.integers(1, 6)).tolist()) for _ in range(n)]
    out.append(Request(rng.integers(0, 512, 70).tolist(), [5, 6, 7]))  # longer than the model: cut on the left
    return out


def test_packed_scores_are_each_request_scored_alone():
    """Many requests packed into rows with segment ids give, for each, the log-likelihood and greedy flag of a
    forward pass over that request alone (its last max_len + 1 tokens)."""
    from gptjax.evals.scoring import Scorer

    model, params = _scoring_model()
    requests = _requests()
    scorer = Scorer(model, params, rows=4)
    got = scorer.loglikelihood(requests)
    assert scorer.rows_scored < len(requests) / 2  # packing: many requests a row
    for r, g in zip(requests, got):
        seq = np.asarray(list(r.context) + list(r.continuation))[-49:]
        logp = jax.nn.log_softmax(model.forward(params, jnp.asarray(seq[None, :-1]))[0])
        n = len(r.continuation)
        span = np.arange(len(seq) - 1 - n, len(seq) - 1)
        expected = float(sum(logp[t, seq[t + 1]] for t in span))
        assert g.logprob == pytest.approx(expected, abs=1e-4) and g.tokens == n
        assert g.greedy == all(int(jnp.argmax(logp[t])) == seq[t + 1] for t in span)
        assert g.truncated == (len(r.context) + n > 49)
    assert got[-1].truncated
    with pytest.raises(ValueError, match="request 0 has an empty context"):
        scorer.loglikelihood([type(requests[0])([], [1])])


def test_scoring_on_a_mesh_gives_the_one_device_numbers():
    from gptjax.config import MeshConfig
    from gptjax.evals.scoring import Scorer
    from gptjax.model import ShardedModel
    from gptjax.sharding import make_mesh

    model, params = _scoring_model()
    one = Scorer(model, params, rows=4).loglikelihood(_requests(seed=1))
    mesh = make_mesh(MeshConfig(data=4, fsdp=2), jax.devices()[:8])
    sharded = ShardedModel(model.cfg, mesh)
    scorer = Scorer(sharded, sharded.put_params(params), rows=4)
    assert scorer.rows == 8  # a multiple of the batch-parallel devices
    many = scorer.loglikelihood(_requests(seed=1))
    np.testing.assert_allclose([m.logprob for m in many], [o.logprob for o in one], rtol=1e-5, atol=1e-5)
    assert [m.greedy for m in many] == [o.greedy for o in one]


# ---- in-context tasks ----------------------------------------------------------------------------------------
class _Judge:
    """A stand-in scorer: the log-likelihood of a continuation is what ``table`` says (looked up by its text)."""

    def __init__(self, tokenizer, table):
        self.tokenizer, self.table, self.seen = tokenizer, table, []

    def loglikelihood(self, requests):
        from gptjax.evals.scoring import LogLikelihood

        out = []
        for r in requests:
            self.seen.append(self.tokenizer.decode(r.context[1:]))
            lp, greedy = self.table[self.tokenizer.decode(r.continuation)]
            out.append(LogLikelihood(lp, greedy, len(r.continuation), False))
        return out


class _CharTokenizer:
    eos_id = 0

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_task_accuracy_normalisation_stderr_and_demonstrations():
    from gptjax.evals.tasks import Example, Task, evaluate_task

    train = tuple(Example(f"demo{i}", (" x", " y"), i % 2) for i in range(10))
    test = (Example("q1", (" a", " bbbbbbbb"), 1), Example("q2", (" cc", " d"), 0), Example("q3", (" e", " f"), 0))
    task = Task("t", "choice", "\n\n", train, test)
    # q2: the longer right choice has the smaller total but the larger per-byte log-likelihood
    table = {" a": (-2.0, False), " bbbbbbbb": (-1.0, False), " cc": (-1.0, False), " d": (-0.9, False),
             " e": (-5.0, False), " f": (-1.0, False)}
    judge = _Judge(_CharTokenizer(), table)
    s = evaluate_task(judge, judge.tokenizer, task, shots=0)
    assert (s.n, s.acc, s.acc_norm, s.chance) == (3, pytest.approx(1 / 3), pytest.approx(2 / 3), 0.5)
    assert s.acc_stderr == pytest.approx(np.sqrt((1 / 3) * (2 / 3) / 2))
    assert judge.seen[:2] == ["q1", "q1"]
    judge.seen.clear()
    evaluate_task(judge, judge.tokenizer, task, shots=2, seed=7)
    prompts = judge.seen[::2]
    first = prompts[0].split("\n\n")
    assert len(first) == 3 and first[2] == "q1" and all(p.startswith("demo") for p in first[:2])
    demo = int(first[0][4:-2])
    assert first[0] == train[demo].context + train[demo].choices[train[demo].label]  # a demo ends with its answer
    judge.seen.clear()
    evaluate_task(judge, judge.tokenizer, task, shots=2, seed=7, limit=1)  # a prompt does not depend on the limit
    assert judge.seen[0] == prompts[0]
    cloze = Task("c", "cloze", "\n\n", train, (Example("p", (" w",), 0), Example("p2", (" w",), 0),
                                                 Example("p3", (" v",), 0)))
    s = evaluate_task(_Judge(_CharTokenizer(), {" w": (-1.0, True), " v": (-0.1, False)}), _CharTokenizer(), cloze)
    assert s.acc == pytest.approx(2 / 3) and s.acc_norm is None and s.chance == pytest.approx(2 / 3)


def test_builtin_tasks_are_rebuilt_from_the_default_split_and_hold_no_training_text():
    """The committed task files are exactly what build_tasks makes from the default data split, and every test
    passage comes from a validation chapter (a run trained on the default split never saw one)."""
    from gptjax.config import DataConfig
    from gptjax.data import corpus_documents, train_val_documents
    from gptjax.evals.tasks import BUILTIN, build_tasks, load_task, paragraphs

    _, _, _, docs = corpus_documents(DataConfig())
    train_docs, val_docs = train_val_documents(docs, DataConfig())
    built = build_tasks(train_docs, val_docs)
    val_text = " ".join(p for d in val_docs for p in paragraphs(d))
    train_text = " ".join(p for d in train_docs for p in paragraphs(d))
    for name in BUILTIN:
        shipped = load_task(name)
        assert shipped == built[name]
        for e in shipped.test:
            probe = e.context[-80:]
            assert probe in val_text and probe not in train_text
        assert len(shipped.test) >= 90 and len(shipped.train) == 1000
    assert all(len(e.choices) == 4 for e in load_task("austen_next_sentence").test)


def test_task_files_with_bad_rows_are_refused_naming_the_line(tmp_path):
    from gptjax.evals.tasks import TaskError, load_task

    d = tmp_path / "t"
    d.mkdir()
    (d / "task.json").write_text('{"kind": "choice"}')
    (d / "train.jsonl").write_text('{"context": "a", "choices": [" b", " c"], "label": 0}\n')
    (d / "test.jsonl").write_text('{"context": "a", "choices": [" b", " c"], "label": 0}\n{"context": "a"\n')
    with pytest.raises(TaskError, match=r"test.jsonl line 2: not JSON"):
        load_task(d)
    (d / "test.jsonl").write_text('{"context": "a", "choices": [" b"], "label": 3}\n')
    with pytest.raises(TaskError, match=r"test.jsonl line 1: expected"):
        load_task(d)
    with pytest.raises(TaskError, match="no task.json there"):
        load_task(tmp_path / "missing")


def test_target_bytes_are_the_texts_bytes(small_corpus, tmp_path):
    """Bits per byte divide by the bytes of the text the scored tokens stand for: for a split of whole
    documents, exactly the UTF-8 length of each document decoded."""
    from gptjax.config import DataConfig
    from gptjax.data import prepare_corpus
    from gptjax.evals.loss import target_bytes

    corpus = prepare_corpus(DataConfig(corpus=str(small_corpus), val_fraction=0.2), 512, tmp_path / "run")
    tok, val = corpus.tokenizer, corpus.stream("val")
    ids = np.concatenate([[tok.eos_id], val])
    batch = {"inputs": ids[None, :-1], "targets": ids[None, 1:], "loss_mask": np.ones((1, len(ids) - 1))}
    docs = np.split(val, np.where(val == tok.eos_id)[0] + 1)
    expected = sum(len(tok.decode(d[d != tok.eos_id]).encode("utf-8")) for d in docs)
    assert target_bytes([batch], tok) == expected
    batch["loss_mask"][0, : len(ids) // 2] = 0
    assert target_bytes([batch], tok) < expected


def test_training_reports_bits_per_byte_and_task_accuracy(small_corpus, tmp_path):
    """val_bpb next to val_loss; the tasks zero-shot every task_eval_every steps (with the time they took), and
    zero- and K-shot at the end, in the summary."""
    import json

    from gptjax.training.trainer import train

    from helpers import small_run

    cfg = small_run(tmp_path / "run", small_corpus, steps=6, eval_every=6, tasks="austen_cloze,austen_next_sentence",
                    task_eval_every=3, task_examples=6, final_task_examples=10, task_shots=1)
    result = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_loss" in r]
    bpb = evals[-1]["val_bpb"]
    assert 0 < bpb < evals[-1]["val_loss"] / np.log(2)  # more than one byte a token
    tasks = [r for r in rows if "austen_cloze_acc" in r]
    assert [r["step"] for r in tasks] == [3]  # not at the end: the full scoring happens there
    assert 0 <= tasks[0]["austen_next_sentence_acc"] <= 1 and tasks[0]["task_eval_s"] > 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["val_bpb"] == pytest.approx(bpb)
    assert [(t["task"], t["shots"], t["n"]) for t in summary["tasks"]] == [
        ("austen_cloze", 0, 10), ("austen_next_sentence", 0, 10), ("austen_cloze", 1, 10),
        ("austen_next_sentence", 1, 10)]
    assert [t.as_dict() for t in result.tasks] == summary["tasks"]
