"""Mixtures of prepared directories: grain's mixing by weight, counted in closed form; global batches that do not
depend on the process count; per-source tokens, epochs and validation loss in metrics.jsonl; one clear error for
each bad mixture."""

import json
from pathlib import Path

import grain
import numpy as np
import pytest

from helpers import small_run
from gptjax.data import Tokenizer, default_corpus_path, read_corpus, split_documents
from gptjax.data.batches import Mixture, mixture_counts, mixture_proportions, train_dataset
from gptjax.data.shards import PrepareSettings, prepare

PARAS = [p for p in split_documents(read_corpus(default_corpus_path()), None) if len(p) > 40]


class Tagged:
    """A source whose element i is (tag, i)."""

    def __init__(self, tag: int, n: int):
        self.tag, self.n = tag, n

    def __len__(self):
        return self.n

    eos_id = None  # a windows source: bare windows (no document masking)

    def __getitem__(self, i):
        return self.raw(i)

    def raw(self, i):
        return np.array([self.tag, i])


@pytest.mark.parametrize("weights", [(0.7, 0.3), (3, 1, 2), (1, 1), (0.05, 0.9, 0.05)])
def test_mixture_counts_are_what_grain_draws(weights):
    props = mixture_proportions(weights)
    mixed = grain.MapDataset.mix([grain.MapDataset.source(Tagged(k, 10**9)) for k in range(len(weights))],
                                 list(props))
    seen = [0] * len(weights)
    for n in range(1, 600):
        tag, i = mixed[n - 1]
        assert i == seen[tag]  # each source is read in order, nothing skipped
        seen[tag] += 1
        assert mixture_counts(n, props) == seen
    share = np.array(seen) / sum(seen)
    np.testing.assert_allclose(share, np.array(weights) / sum(weights), atol=0.01)


def test_a_mixture_batches_the_same_on_any_process_count():
    mix = Mixture(["a", "b"], [Tagged(0, 50), Tagged(1, 37)], [0.75, 0.25])
    # each (tag, index) element passes through as a one-token window: inputs = tag, targets = index
    one = iter(train_dataset(mix, 1, 8, 0))
    two = [iter(train_dataset(mix, 1, 8, 0, p, 2)) for p in range(2)]
    for _ in range(30):  # past an epoch of each source: reshuffled, still the same stream
        want = next(one)
        got = [next(it) for it in two]
        for key in ("inputs", "targets"):
            np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), want[key])
    assert mix.drawn(30 * 8) == {"a": 180, "b": 60}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Path, Path]:
    """Two prepared directories of different text (prose paragraphs; the same paragraphs' words reversed) with one
    tokenizer."""
    root = tmp_path_factory.mktemp("mix")
    tok = root / "tok.model"
    prose = PARAS[:600]
    backwards = [" ".join(reversed(p.split())) for p in PARAS[600:1200]]
    Tokenizer.train(prose + backwards, 512, sample_chars=300_000).save(tok)
    dirs = []
    for name, docs in (("prose", prose), ("backwards", backwards)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        prepare([root / f"{name}.jsonl"], tok, root / name, settings=PrepareSettings(val_fraction=0.1),
                progress=False)
        dirs.append(root / name)
    return tok, dirs[0], dirs[1]


def test_training_on_a_mixture_reports_each_source(tmp_path, prepared):
    from gptjax.reporting.metrics import read_metrics
    from gptjax.training import train

    _, prose, backwards = prepared
    cfg = small_run(tmp_path / "run", "default", steps=6, eval_every=6, log_every=3)
    cfg = cfg.replace(data={"mixture": {str(prose): 3, str(backwards): 1}})
    result = train(cfg)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    logged = [r for r in rows if "loss" in r]
    assert [r["step"] for r in logged] == [3, 6]
    for r in logged:
        assert r["tokens/prose"] + r["tokens/backwards"] == r["tokens"]
        assert r["tokens/prose"] == 3 * r["tokens/backwards"]  # 3:1, exactly at these batch boundaries
        assert 0 < r["epochs/backwards"] < r["epochs/prose"]
    evals = [r for r in rows if "val_loss" in r]
    last = evals[-1]
    assert last["val_loss"] == pytest.approx(0.75 * last["val_loss/prose"] + 0.25 * last["val_loss/backwards"])
    assert last["val_loss/prose"] != last["val_loss/backwards"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["val_loss_by_source"] == {"prose": last["val_loss/prose"],
                                             "backwards": last["val_loss/backwards"]}
    assert result.val_loss == pytest.approx(last["val_loss"])


def test_bad_mixtures_are_one_error_naming_the_problem(tmp_path, prepared):
    from gptjax.config import ConfigError, DataConfig
    from gptjax.data import CorpusError, prepare_corpus

    tok, prose, backwards = prepared
    with pytest.raises(ConfigError, match=r"data.mixture\[.*\] = 0: a weight must be a positive number"):
        DataConfig(mixture={str(prose): 0})
    with pytest.raises(ConfigError, match="data.corpus=.* and data.mixture are both set"):
        DataConfig(corpus=str(prose), mixture={str(prose): 1})
    with pytest.raises(CorpusError, match="not a prepared data directory"):
        prepare_corpus(DataConfig(mixture={str(prose): 1, str(tmp_path): 1}), 512, tmp_path / "run")
    other = tmp_path / "other"
    Tokenizer.train(PARAS[:1500], 600, sample_chars=200_000).save(tmp_path / "tok2.model")
    (tmp_path / "x.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in PARAS[:50]))
    prepare([tmp_path / "x.jsonl"], tmp_path / "tok2.model", other, progress=False)
    with pytest.raises(CorpusError, match=r"data.mixture\['.*other'\]: .* was prepared with tokenizer"):
        prepare_corpus(DataConfig(mixture={str(prose): 1, str(other): 1}), 512, tmp_path / "run")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "prose").symlink_to(prose)
    with pytest.raises(CorpusError, match="do not have distinct names"):
        prepare_corpus(DataConfig(mixture={str(prose): 1, str(tmp_path / "a" / "prose"): 1}), 512, tmp_path / "r")


def test_builtin_corpora_are_real_text_and_the_stdlib_has_near_duplicates(tmp_path):
    """``gptjax-data builtin``: the embedded novels by chapter and the interpreter's standard library by module;
    deduplication finds the standard library's near-identical codec modules."""
    from gptjax.cli.data import main
    from gptjax.data import Deduplicator

    assert main(["builtin", "austen", "--out", str(tmp_path / "a.jsonl")]) == 0
    assert main(["builtin", "stdlib", "--out", str(tmp_path / "s.jsonl")]) == 0
    austen = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    stdlib = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(austen) > 200 and sum(d["text"].startswith(("CHAPTER", "Chapter")) for d in austen) > 200
    assert len(stdlib) > 300 and any(d["id"] == "json.decoder" and "def " in d["text"] for d in stdlib)
    assert not any(d["id"].startswith("test.") for d in stdlib)
    dedup = Deduplicator(0.8)
    dropped = [d["id"] for d in stdlib if dedup.check(d["text"]) is not None]
    assert 5 <= len(dropped) <= 60 and sum(i.startswith("encodings.") for i in dropped) >= 5, dropped
