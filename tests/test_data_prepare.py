"""gptjax-data: sources streamed as documents, token shards with a manifest, resume after a kill with the same bytes,
and one clear error for each kind of bad input."""

import gzip
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import ONE_DEVICE_ENV, nano_model
from gptjax.data import Tokenizer, default_corpus_path, read_corpus, split_documents
from gptjax.data.shards import PrepareSettings, PreparedData, in_validation, prepare, train_tokenizer
from gptjax.data.sources import SourceError, read_documents

PARAS = [p for p in split_documents(read_corpus(default_corpus_path()), None) if len(p) > 40]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tok.model"
    Tokenizer.train(PARAS[:3000], 512, sample_chars=300_000).save(path)
    return path


def write_sources(folder: Path) -> tuple[list[Path], list[str]]:
    """One source of each format and the documents they hold, in order."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    docs = PARAS[:200]
    txt = folder / "a.txt"
    txt.write_text("\n\n".join(docs[:50]) + "\n")
    rows = "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs[50:100]))
    (folder / "b.jsonl").write_text(rows)
    rows = "".join(json.dumps({"text": d}) + "\n" for d in docs[100:130])
    with gzip.open(folder / "c.jsonl.gz", "wt") as f:
        f.write(rows)
    rows = "".join(json.dumps({"text": d}) + "\n" for d in docs[130:160])
    (folder / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(rows.encode()))
    pq.write_table(pa.table({"text": docs[160:200]}), folder / "e.parquet")
    return [txt, folder / "b.jsonl", folder / "c.jsonl.gz", folder / "d.jsonl.zst", folder / "e.parquet"], docs


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.arecord"))}


def test_every_format_round_trips_through_the_shards_split_by_hash(tmp_path, tok):
    sources, docs = write_sources(tmp_path)
    settings = PrepareSettings(docs_per_shard=32, val_fraction=0.1)
    manifest = prepare(sources, tok, tmp_path / "out", settings=settings, progress=False)
    tokenizer = Tokenizer.load(tok)
    data = PreparedData(tmp_path / "out")
    got = {split: [tokenizer.decode(ids[:-1].tolist()) for ids in data.documents(split)] for split in ("train", "val")}
    assert all(ids[-1] == tokenizer.eos_id for ids in data.documents("train"))
    want_val = [d for d in docs if in_validation(d, 0.1)]
    assert got["val"] == want_val and got["train"] == [d for d in docs if not in_validation(d, 0.1)]
    assert 0 < len(want_val) < 50
    assert [s["documents"] for s in manifest["sources"]] == [50, 50, 30, 30, 40]
    assert manifest["totals"]["train"]["documents"] + manifest["totals"]["val"]["documents"] == 200
    assert manifest["totals"]["train"]["tokens"] == sum(len(x) for x in data.documents("train"))
    assert len(manifest["shards"]["train"]) == 7  # 200 documents, 32 a chunk
    assert data.dtype == np.dtype("<u2")

    # the split and the documents do not depend on the shard size or the worker count; the bytes do not depend
    # on the worker count
    again = prepare(sources, tok, tmp_path / "out2", workers=2, settings=settings, progress=False)
    assert shard_bytes(tmp_path / "out") == shard_bytes(tmp_path / "out2")
    assert again["totals"] == manifest["totals"]
    other = PrepareSettings(docs_per_shard=7, val_fraction=0.1)
    prepare(sources, tok, tmp_path / "out3", settings=other, progress=False)
    assert [tokenizer.decode(x[:-1].tolist()) for x in PreparedData(tmp_path / "out3").documents("val")] == want_val

    # run again: nothing to do; with other inputs: refused, naming what differs
    assert prepare(sources, tok, tmp_path / "out", settings=settings, progress=False) == manifest
    with pytest.raises(SourceError, match=r"other inputs \(docs_per_shard \(32 -> 7\)\)"):
        prepare(sources, tok, tmp_path / "out", settings=other, progress=False)
    with pytest.raises(SourceError, match="the sources"):
        prepare(sources[:2], tok, tmp_path / "out", settings=settings, progress=False)


def test_a_shard_set_refuses_another_tokenizer(tmp_path, tok):
    sources, _ = write_sources(tmp_path)
    prepare(sources[:1], tok, tmp_path / "out", progress=False)
    data = PreparedData(tmp_path / "out")
    data.check_tokenizer(Tokenizer.load(tok))
    with pytest.raises(SourceError, match="was prepared with tokenizer .*use that tokenizer"):
        data.check_tokenizer(Tokenizer.train(PARAS[:2000], 600, sample_chars=200_000))
    with pytest.raises(SourceError, match="not a prepared data directory"):
        PreparedData(tmp_path)


def test_bad_input_is_one_error_naming_the_file_and_line(tmp_path, tok):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a good document"}\n{"text": oops}\n{"body": "no text field"}\n\n{"text": "fine"}\n')
    with pytest.raises(SourceError, match=r"bad.jsonl line 2: not JSON"):
        list(read_documents(bad))
    counts = {}
    assert [d.text for d in read_documents(bad, bad_rows="skip", counts=counts)] == ["a good document", "fine"]
    assert counts == {"documents": 2, "skipped": {"not JSON": 1, "no 'text' string": 1}}
    latin = tmp_path / "latin.txt"
    latin.write_bytes("first line\n\nnaïve café\n".encode("latin-1"))
    with pytest.raises(SourceError, match=r"latin.txt line 3: byte 0xef at column 3 is not UTF-8"):
        list(read_documents(latin))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(SourceError, match="empty.txt holds no documents"):
        list(read_documents(empty))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(SourceError, match=r"p.parquet has no column 'text' \(columns: body\)"):
        list(read_documents(tmp_path / "p.parquet"))
    # through the console script: one line, exit 2, nothing prepared
    r = subprocess.run([sys.executable, "-m", "gptjax.cli.data", "prepare", str(bad), "--tokenizer", str(tok),
                        "--out", str(tmp_path / "out"), "--no-progress"], capture_output=True, text=True,
                       env=ONE_DEVICE_ENV)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: {bad} line 2: not JSON (Expecting value) (pass bad_rows='skip' / --bad-rows skip to skip and count "
        "such rows)"]
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_train_tokenizer_samples_the_stream_with_a_seed(tmp_path):
    sources, _ = write_sources(tmp_path)
    a = train_tokenizer(sources, 400, sample_docs=120, seed=3, progress=False)
    b = train_tokenizer(sources, 400, sample_docs=120, seed=3, progress=False)
    assert a.proto == b.proto and a.vocab_size == 400


@pytest.mark.slow
def test_killed_at_random_moments_then_rerun_ends_with_the_same_bytes(tmp_path, tok):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(PARAS * 2))
    cmd = [sys.executable, "-m", "gptjax.cli.data", "prepare", str(corpus), "--tokenizer", str(tok),
           "--docs-per-shard", "64", "--val-fraction", "0.05", "--no-progress"]
    t = time.perf_counter()
    subprocess.run([*cmd, "--out", str(tmp_path / "whole")], check=True, env=ONE_DEVICE_ENV, capture_output=True)
    whole = time.perf_counter() - t
    shards = len(json.loads((tmp_path / "whole" / "manifest.json").read_text())["shards"]["train"])
    rng = random.Random(0)
    out = tmp_path / "killed"
    for _ in range(3):  # killed after a random number of shards, a random moment into the next one
        proc = subprocess.Popen([*cmd, "--out", str(out)], env=ONE_DEVICE_ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        target = rng.randrange(1, shards - 1)
        while proc.poll() is None and (not (out / "progress.jsonl").exists()
                                       or len((out / "progress.jsonl").read_text().splitlines()) < 1 + target):
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.05))
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL, "finished before the kill"
    assert whole > 0
    r = subprocess.run([*cmd, "--out", str(out)], env=ONE_DEVICE_ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert shard_bytes(out) == shard_bytes(tmp_path / "whole")
    assert not list(out.glob(".*tmp*")) and not (out / "progress.jsonl").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["totals"] == json.loads((tmp_path / "whole" / "manifest.json").read_text())["totals"]
    assert manifest["resumed_shards"] > 0  # the kills landed after some shards were done, and those were kept


# ---- training on prepared shards ------------------------------------------------------------------------------
def test_document_segments_restart_after_each_end_of_document():
    from gptjax.data.batches import document_segments

    seg, pos = document_segments(np.array([5, 6, 2, 7, 2, 2, 8, 9]), eos_id=2)
    assert seg.tolist() == [0, 0, 0, 1, 1, 2, 3, 3]
    assert pos.tolist() == [0, 1, 2, 0, 1, 0, 0, 1]


def test_prepared_windows_read_the_split_stream_across_shards(tmp_path, tok):
    from gptjax.data.batches import PreparedWindows

    sources, _ = write_sources(tmp_path)
    prepare(sources, tok, tmp_path / "out", settings=PrepareSettings(docs_per_shard=16, val_fraction=0.1),
            progress=False)
    data = PreparedData(tmp_path / "out")
    stream = np.concatenate(list(data.documents("train"))).astype(np.int32)
    windows = PreparedWindows(data, "train", 100, open_shards=2)  # fewer open than shards: readers are closed
    assert len(windows) == (len(stream) - 1) // 100 and len(data.files("train")) > 4
    rng = np.random.default_rng(0)
    for i in [0, len(windows) - 1, *rng.integers(0, len(windows), 20)]:
        np.testing.assert_array_equal(windows[i], stream[i * 100: i * 100 + 101])
    masked = PreparedWindows(data, "train", 100, eos_id=Tokenizer.load(tok).eos_id)[3]
    assert set(masked) == {"tokens", "segment_ids", "positions"} and masked["segment_ids"].max() >= 0


def test_a_packed_document_gets_the_logits_it_gets_alone(tmp_path, tok):
    """Document masking: inside a packed window a document attends only to itself, with positions from 0."""
    import jax

    from gptjax.data.batches import PreparedWindows, _split, _stack
    from gptjax.model import ShardedModel
    from gptjax.sharding import single_device_mesh

    sources, _ = write_sources(tmp_path)
    prepare(sources[:1], tok, tmp_path / "out", settings=PrepareSettings(val_fraction=0.0), progress=False)
    eos = Tokenizer.load(tok).eos_id
    batch = _split(_stack([PreparedWindows(PreparedData(tmp_path / "out"), "train", 512, eos)[i] for i in range(6)]))
    model = ShardedModel(nano_model(vocab_size=512, max_seq_len=512), single_device_mesh())
    params = model.init_params(jax.random.key(0))
    packed = np.asarray(model.apply(params, batch["inputs"], batch["positions"], batch["segment_ids"]))
    checked = 0
    for row in range(6):
        seg = batch["segment_ids"][row]
        for s in np.unique(seg)[1:-1]:  # documents whole inside the window (not cut by its edges)
            where = np.flatnonzero(seg == s)
            alone = np.asarray(model.apply(params, batch["inputs"][row:row + 1, where]))[0]
            np.testing.assert_allclose(packed[row, where], alone, atol=2e-5, rtol=0)
            checked += 1
    assert checked >= 3
    unmasked = np.asarray(model.apply(params, batch["inputs"]))
    assert np.abs(unmasked - packed).max() > 1e-2  # without segments the documents see each other


def test_training_reads_a_prepared_directory(tmp_path, tok):
    from gptjax.config import DataConfig
    from gptjax.data import TokenizerError
    from gptjax.training import train

    from helpers import small_run

    sources, _ = write_sources(tmp_path)
    prepare(sources, tok, tmp_path / "out", settings=PrepareSettings(docs_per_shard=16, val_fraction=0.2),
            progress=False)
    cfg = small_run(tmp_path / "run", tmp_path / "out", steps=4, eval_every=4, checkpoint_every=4)
    result = train(cfg)
    assert result.final_step == 4 and np.isfinite(result.val_loss)
    assert (tmp_path / "run" / "tokenizer.model").read_bytes() == Path(tok).read_bytes()
    bad = cfg.replace(model={"vocab_size": 1024}, train={"run_dir": str(tmp_path / "run2")})
    with pytest.raises(TokenizerError, match="set model.vocab_size=512"):
        train(bad)
    assert DataConfig().document_masking is None


# ---- deduplication -------------------------------------------------------------------------------------------
def test_dedup_finds_planted_near_duplicates_with_the_target_precision_and_recall():
    """Edited copies at known edit rates: the truth is each copy's exact Jaccard similarity with its base."""
    from gptjax.data.dedup import plant_near_duplicates, precision_recall

    bases = [p for p in PARAS if len(p.split()) >= 60][:150]
    docs, origin = plant_near_duplicates(bases, (0.0, 0.01, 0.03, 0.05, 0.1, 0.3), seed=1)
    for threshold in (0.7, 0.8):
        r = precision_recall(docs, origin, threshold)
        assert r["precision"] >= 0.95 and r["recall"] >= 0.90, r
        assert r["dropped"]["exact duplicate"] >= 150  # the unedited copies


def test_prepare_drops_duplicates_and_reports_why(tmp_path, tok):
    docs = PARAS[:40]
    edited = [d.replace(" the ", " a ", 1) for d in docs[:10] if len(d.split()) > 30]
    rows = [*docs, *docs[:5], *edited]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    m = prepare([tmp_path / "a.jsonl"], tok, tmp_path / "out", progress=False,
                settings=PrepareSettings(dedup=0.8, val_fraction=0.0))
    src = m["sources"][0]
    assert src["documents"] == len(rows)
    assert src["dropped"]["exact duplicate"] >= 5 and src["dropped"]["near duplicate"] >= len(edited) - 1
    assert m["totals"]["train"]["documents"] == len(rows) - sum(src["dropped"].values())


# ---- contamination -------------------------------------------------------------------------------------------
def test_contamination_counts_and_drops_documents_sharing_a_13_gram_with_the_tasks(tmp_path, tok):
    """The built-in cloze task is cut from the Austen corpus: its passages' paragraphs are contaminated, a
    source of other text is not."""
    from gptjax.data.contamination import ngram_hashes

    task = Path(__file__).resolve().parent.parent / "gptjax" / "assets" / "tasks" / "austen_cloze" / "test.jsonl"
    austen = tmp_path / "austen.txt"
    austen.write_text(read_corpus(default_corpus_path()))
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"text": f"document {i}: " + " ".join(f"word{j}" for j in range(40))}) + "\n"
                             for i in range(20)))
    settings = PrepareSettings(contamination=(str(task),), val_fraction=0.0)
    m = prepare([austen, other], tok, tmp_path / "out", settings=settings, progress=False)
    a, o = m["sources"]
    assert a["contaminated"] >= 10 and o.get("contaminated", 0) == 0
    assert a["contaminated_examples"][0].startswith(f"{austen}:")
    assert m["contamination"]["contaminated"] == a["contaminated"] and m["contamination"]["eval_files"][0]["texts"] > 50
    dropped = prepare([austen, other], tok, tmp_path / "dropped", progress=False,
                      settings=PrepareSettings(contamination=(str(task),), drop_contaminated=True, val_fraction=0.0))
    assert dropped["sources"][0]["dropped"]["contaminated"] == a["contaminated"]
    kept = PreparedData(tmp_path / "dropped")
    tokenizer = Tokenizer.load(tok)
    eval_grams = set().union(*(ngram_hashes(" ".join(str(v) for v in json.loads(line).values()))
                               for line in task.read_text().splitlines()))
    assert all(eval_grams.isdisjoint(ngram_hashes(tokenizer.decode(d[:-1].tolist())))
               for d in kept.documents("train"))
    assert ngram_hashes("one two three four five six seven eight nine ten eleven twelve") == set()  # < 13 words


def test_the_batch_pipeline_is_the_shuffled_stream_of_windows(tmp_path, tok):
    """The loader reads whole batches (one grain element a batch, segments computed for all rows at once, a shard's
    documents in one read call): its batches are, row for row, grain's shuffle of the windows source read one window
    at a time (``PreparedWindows[i]``, ``document_segments`` per window) and ``_split``; for a mixture, grain's mix
    of each source shuffled."""
    import grain

    from gptjax.data.batches import Mixture, _split, _stack, train_dataset
    from gptjax.data.run_data import PreparedCorpus

    sources, _ = write_sources(tmp_path)
    prepare(sources, tok, tmp_path / "out", settings=PrepareSettings(docs_per_shard=16), progress=False)
    corpus = PreparedCorpus(PreparedData(tmp_path / "out"), Tokenizer.load(tok))
    plain = PreparedCorpus(corpus.data, corpus.tokenizer, document_masking=False)
    mixture = Mixture(["a", "b"], [corpus.windows(64), corpus.windows(64)], [0.25, 0.75])  # each its own order
    for name, windows in [("masked", corpus.windows(64)), ("unmasked", plain.windows(64)), ("mixture", mixture)]:
        if name == "mixture":
            stream = grain.MapDataset.mix([grain.MapDataset.source(s).shuffle(seed=7 + k).repeat(None)
                                           for k, s in enumerate(windows.sources)], list(windows.proportions))
        else:
            stream = grain.MapDataset.source(windows).shuffle(seed=7).repeat(None)
        for p in (0, 1):
            it = iter(train_dataset(windows, 64, 8, 7, p, 2))
            for b in range(6):
                want = _split(_stack([stream[b * 8 + p * 4 + r] for r in range(4)]))
                got = next(it)
                assert list(got) == list(want), name
                for key in want:
                    np.testing.assert_array_equal(got[key], want[key], err_msg=f"{name} {key}")
                    assert got[key].dtype == want[key].dtype


def test_global_batches_do_not_depend_on_the_process_count(tmp_path, tok):
    """Process p of P reads the p-th contiguous slice of each global batch, and every process's iterator state is
    the global batch index: the token stream (with its segments) is the same on 1, 2 or 4 processes."""
    from gptjax.data.batches import train_dataset
    from gptjax.data.run_data import PreparedCorpus

    sources, _ = write_sources(tmp_path)
    prepare(sources, tok, tmp_path / "out", settings=PrepareSettings(docs_per_shard=16), progress=False)
    corpus = PreparedCorpus(PreparedData(tmp_path / "out"), Tokenizer.load(tok))
    one = iter(train_dataset(corpus.windows(64), 64, 8, 0))
    many = {p: [iter(train_dataset(corpus.windows(64), 64, 8, 0, i, p)) for i in range(p)] for p in (2, 4)}
    for _ in range(5):
        want = next(one)
        for parts in many.values():
            got = [next(it) for it in parts]
            for key in ("inputs", "targets", "segment_ids", "positions"):
                np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), want[key])
    assert {json.dumps(it.get_state()) for parts in many.values() for it in parts} == {json.dumps(one.get_state())}

    # resumed on another count from a state saved on 2 processes: the stream goes on, nothing skipped or repeated
    state = many[2][0].get_state()
    for p in (1, 4):
        later = [iter(train_dataset(corpus.windows(64), 64, 8, 0, i, p)) for i in range(p)]
        for it in later:
            it.set_state(state)
        for _ in range(3):
            want = next(one)
            np.testing.assert_array_equal(np.concatenate([next(it)["inputs"] for it in later]), want["inputs"])
        one = iter(train_dataset(corpus.windows(64), 64, 8, 0))
        one.set_state(state)


# ---- the quality filter ----------------------------------------------------------------------------------------
def junk(rng: random.Random, text: str) -> str:
    """Low-quality text of four kinds: word salad, spam, random strings, navigation boilerplate."""
    words = text.split()
    kind = rng.randrange(4)
    if kind == 0:
        rng.shuffle(words)
        return " ".join(words)
    if kind == 1:
        return " ".join(rng.choice(["click", "here", "subscribe", "free", "offer", "buy", "now", "login", "cookie",
                                    "privacy", "share"]) for _ in words)
    if kind == 2:
        return " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(rng.randint(2, 9)))
                        for _ in words)
    return "\n".join(f"Home | News | Sport | {w} | Contact" for w in words[:20])


def test_quality_filter_separates_held_out_good_text_from_the_raw_pool(tmp_path, tok):
    from gptjax.data import QualityClassifier

    paras = [p for p in PARAS if len(p.split()) >= 20]
    rng = random.Random(0)
    rng.shuffle(paras)
    good, good_test = paras[:800], paras[800:1100]
    raw = [junk(rng, p) for p in paras[1100:1900]] + paras[1100:1250]  # the raw pool holds some good text too
    raw_test = [junk(rng, p) for p in paras[1900:2200]]
    clf = QualityClassifier.fit(good, raw)
    sg, sr = clf.score(good_test), clf.score(raw_test)
    accuracy = (np.sum(sg > 0.5) + np.sum(sr <= 0.5)) / (len(sg) + len(sr))
    assert accuracy >= 0.88, accuracy
    kept_good = np.mean([clf.keep(t, s) for t, s in zip(good_test, sg)])
    kept_raw = np.mean([clf.keep(t, s) for t, s in zip(raw_test, sr)])
    assert kept_good > 5 * kept_raw and kept_raw < 0.05
    assert [clf.keep(t) for t in good_test[:20]] == [clf.keep(t) for t in good_test[:20]]  # seeded by the text
    clf.save(tmp_path / "q.npz")
    again = QualityClassifier.load(tmp_path / "q.npz")
    np.testing.assert_allclose(again.score(good_test[:5]), sg[:5], rtol=1e-5)

    # in preparation: the Pareto rule drops documents, counted per source
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in good_test + raw_test))
    m = prepare([tmp_path / "pool.jsonl"], tok, tmp_path / "out", progress=False,
                settings=PrepareSettings(quality=str(tmp_path / "q.npz"), val_fraction=0.0))
    dropped = m["sources"][0]["dropped"]["quality"]
    assert m["totals"]["train"]["documents"] == len(good_test) + len(raw_test) - dropped
    assert dropped >= len(raw_test) * 0.95


def test_a_text_corpus_keeps_document_masking_when_its_cache_is_read(tmp_path):
    """The second call reads the run's token cache (as a resume does, and every process but the first of a
    multi-process run): the setting must survive it."""
    from gptjax.config import DataConfig
    from gptjax.data import prepare_corpus

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(PARAS[:400]))
    cfg = DataConfig(corpus=str(corpus), document_masking=True)
    first = prepare_corpus(cfg, 512, tmp_path / "run")
    second = prepare_corpus(cfg, 512, tmp_path / "run")
    assert first.document_masking and second.document_masking
    assert set(second.windows(32)[0]) == {"tokens", "segment_ids", "positions"}


# ---- damaged shards (Reliability III, item 3) --------------------------------------------------------------------
def test_a_shard_damaged_mid_training_is_one_line_saves_the_last_step_and_prepare_mends_it(tmp_path, tok):
    """Shards damaged while a run trains: it stops with one line naming the shard and the document (exit 2, no
    Riegeli traceback) and saves its last good step; ``gptjax-data verify`` names each damaged shard (exit 1; info
    said the directory was fine); ``gptjax-data prepare`` with the same inputs prepares them again to the same
    bytes, and the run resumes."""
    from helpers import small_run

    src = tmp_path / "src.txt"
    src.write_text("\n\n".join(PARAS[:2000]))
    out = tmp_path / "out"
    prep = [sys.executable, "-m", "gptjax.cli.data", "prepare", str(src), "--tokenizer", str(tok), "--out", str(out),
            "--docs-per-shard", "256", "--val-fraction", "0.05", "--no-progress"]
    assert subprocess.run(prep, capture_output=True, env=ONE_DEVICE_ENV).returncode == 0
    original = shard_bytes(out)
    run = tmp_path / "run"
    cfg = small_run(run, out, steps=3000, log_every=1, eval_every=10_000, checkpoint_every=10_000)
    (tmp_path / "cfg.json").write_text(cfg.to_json())
    proc = subprocess.Popen([sys.executable, "-m", "gptjax.cli.train", "--config", str(tmp_path / "cfg.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ONE_DEVICE_ENV)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and any(json.loads(x).get("step", 0) >= 5 for x in metrics.read_text().splitlines()
                                        if x.endswith("}"))):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    for shard in out.glob("train-*.arecord"):  # flipped bytes every 8 KiB, in place (the reader has it open)
        data = bytearray(shard.read_bytes())
        for at in range(4096, len(data) - 4096, 8192):
            data[at:at + 64] = bytes(b ^ 0xFF for b in data[at:at + 64])
        with open(shard, "r+b") as f:
            f.write(bytes(data))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err and err.strip().count("\n") == 0, err[-3000:]
    assert "gptjax-train: " in err and ".arecord, document " in err and "cannot be read" in err
    assert "gptjax-data verify" in err and "training stopped after step" in err
    last = max(json.loads(x)["step"] for x in metrics.read_text().splitlines() if '"loss"' in x)
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [last]
    r = subprocess.run([sys.executable, "-m", "gptjax.cli.data", "verify", str(out), "--no-progress"],
                       capture_output=True, text=True, env=ONE_DEVICE_ENV)
    assert r.returncode == 1 and r.stdout.count("DAMAGED: ") == len(list(out.glob("train-*.arecord"))), r.stdout
    r = subprocess.run(prep, capture_output=True, text=True, env=ONE_DEVICE_ENV)
    assert r.returncode == 0 and "preparing it again" in r.stderr, r.stderr
    assert shard_bytes(out) == original
    r = subprocess.run([sys.executable, "-m", "gptjax.cli.train", "--config", str(tmp_path / "cfg.json"), "--resume",
                        "--extend-steps", str(last + 2)], capture_output=True, text=True, env=ONE_DEVICE_ENV)
    assert r.returncode == 0, r.stderr[-3000:]


def test_a_refused_preparation_leaves_nothing_and_the_corrected_one_runs(tmp_path, tok):
    """A bad row refused the preparation but left --out with a progress file and a tokenizer; the corrected
    re-run was then refused as "a preparation of other inputs"."""
    src = tmp_path / "a.jsonl"
    src.write_text(json.dumps({"text": PARAS[0]}) + "\nnot json\n")
    prep = [sys.executable, "-m", "gptjax.cli.data", "prepare", str(src), "--tokenizer", str(tok), "--out",
            str(tmp_path / "out"), "--no-progress"]
    r = subprocess.run(prep, capture_output=True, text=True, env=ONE_DEVICE_ENV)
    assert r.returncode == 2 and "line 2" in r.stderr and not (tmp_path / "out").exists(), r.stderr
    not_spm = tmp_path / "not.model"
    not_spm.write_bytes(b"not a sentencepiece model")  # a RuntimeError traceback from sentencepiece before
    r = subprocess.run([*prep[:prep.index("--tokenizer") + 1], str(not_spm), *prep[prep.index("--out"):]],
                       capture_output=True, text=True, env=ONE_DEVICE_ENV)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "is not a sentencepiece model" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()
    r = subprocess.run([*prep[:4], str(tmp_path), *prep[5:]], capture_output=True, text=True, env=ONE_DEVICE_ENV)
    assert r.returncode == 2 and f"source {tmp_path} is a directory: give the files in it" in r.stderr, r.stderr
    src.write_text(json.dumps({"text": PARAS[0]}) + "\n" + json.dumps({"text": PARAS[1]}) + "\n")
    r = subprocess.run(prep, capture_output=True, text=True, env=ONE_DEVICE_ENV)
    assert r.returncode == 0, r.stderr
    assert PreparedData(tmp_path / "out").verify() == {}
