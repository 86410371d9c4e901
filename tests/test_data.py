import numpy as np
import pytest

from gptjax.config import DataConfig
from gptjax.data.corpus import CorpusError, read_corpus, split_documents
from gptjax.data.batches import PackedWindows, eval_batches, train_dataset
from gptjax.data.run_data import prepare_corpus
from gptjax.data.tokenizer import Tokenizer, TokenizerError
from gptjax.evals import unigram_cross_entropy


def test_empty_and_whitespace_corpus_errors(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_bytes(b"  \n\n \t\n")
    with pytest.raises(CorpusError, match="empty.txt is empty"):
        read_corpus(tmp_path / "empty.txt")
    with pytest.raises(CorpusError, match="only whitespace"):
        read_corpus(tmp_path / "blank.txt")
    with pytest.raises(CorpusError, match="does not exist"):
        read_corpus(tmp_path / "missing.txt")
    with pytest.raises(CorpusError, match="is a directory"):
        read_corpus(tmp_path)


def test_non_utf8_corpus_error_names_offset_and_line(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes("first line\nna\xefve caf\xe9\n".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"not UTF-8: byte 0xef at offset 13 \(line 2\)"):
        read_corpus(p)
    assert p.read_bytes().startswith(b"first line")  # nothing was changed


def test_document_splitting():
    text = "CHAPTER I\n\nOne.\n\nTwo.\n\nCHAPTER II\n\nThree.\n"
    assert split_documents(text, r"^CHAPTER") == ["CHAPTER I\n\nOne.\n\nTwo.", "CHAPTER II\n\nThree."]
    assert split_documents(text, None) == ["CHAPTER I", "One.", "Two.", "CHAPTER II", "Three."]
    with pytest.raises(CorpusError, match="not a valid regular expression"):
        split_documents(text, "(")


def test_tokenizer_round_trip_and_separators(small_corpus):
    text = small_corpus.read_text()
    docs = split_documents(text, r"^CHAPTER")
    tok = Tokenizer.train(docs, 512)
    assert tok.vocab_size == 512
    sample = docs[1][:500] + "\n\n  odd   spacing\tand ünïcödé ✓\n"
    assert tok.decode(tok.encode(sample)) == sample  # lossless: identity normalisation + byte fallback
    with pytest.raises(TokenizerError, match="too small"):
        Tokenizer.train(docs, 100)


def test_packed_windows_and_sharded_shuffled_batches():
    tokens = np.arange(1001, dtype=np.uint16)
    src = PackedWindows(tokens, 10)
    assert len(src) == 100
    np.testing.assert_array_equal(src[3], np.arange(30, 41))
    ds0 = iter(train_dataset(tokens, 10, 8, seed=1, process_index=0, process_count=2))
    ds1 = iter(train_dataset(tokens, 10, 8, seed=1, process_index=1, process_count=2))
    b0, b1 = next(ds0), next(ds1)
    assert b0["inputs"].shape == (4, 10) and b0["targets"].shape == (4, 10)
    np.testing.assert_array_equal(b0["inputs"][:, 1:], b0["targets"][:, :-1])
    starts0, starts1 = set(b0["inputs"][:, 0]), set(b1["inputs"][:, 0])
    assert not starts0 & starts1  # the two processes read disjoint rows
    assert sorted(b0["inputs"][:, 0]) != [0, 10, 20, 30]  # shuffled


def test_iterator_state_restores_the_same_next_batch():
    tokens = np.arange(5001, dtype=np.uint16)
    it = iter(train_dataset(tokens, 10, 4, seed=3))
    for _ in range(7):
        next(it)
    state = it.get_state()
    expected = [next(it)["inputs"] for _ in range(3)]
    it2 = iter(train_dataset(tokens, 10, 4, seed=3))
    it2.set_state(state)
    for e in expected:
        np.testing.assert_array_equal(next(it2)["inputs"], e)


def test_epochs_reshuffle():
    tokens = np.arange(81, dtype=np.uint16)  # 8 windows of 10 -> one batch of 8 per epoch
    it = iter(train_dataset(tokens, 10, 8, seed=0))
    e1, e2 = next(it)["inputs"][:, 0], next(it)["inputs"][:, 0]
    assert sorted(e1) == sorted(e2) and list(e1) != list(e2)


def test_prepare_corpus_splits_by_document_and_caches(small_corpus, tmp_path):
    cfg = DataConfig(corpus=str(small_corpus), doc_pattern=r"^CHAPTER", val_fraction=0.2)
    c = prepare_corpus(cfg, 512, tmp_path)
    assert c.n_docs[1] >= 1 and c.n_docs[0] > c.n_docs[1]
    assert (tmp_path / "tokenizer.model").exists()
    made = (tmp_path / "data" / "manifest.json").stat().st_mtime_ns
    c2 = prepare_corpus(cfg, 512, tmp_path)  # found again, not made again
    assert (tmp_path / "data" / "manifest.json").stat().st_mtime_ns == made
    np.testing.assert_array_equal(c.stream("train"), c2.stream("train"))
    val = c.stream("val")
    assert (val == c.tokenizer.eos_id).sum() == c.n_docs[1] and val[-1] == c.tokenizer.eos_id  # each doc ends
    with pytest.raises(TokenizerError, match="make them equal"):
        prepare_corpus(cfg, 1024, tmp_path)
    assert len(eval_batches(val, 32, 4, 3)) == 3
    uni = unigram_cross_entropy(c.stream("train"), val, 512)
    assert 3.0 < uni < np.log(512)
    # another split is another preparation (the key), in the same place
    c3 = prepare_corpus(DataConfig(corpus=str(small_corpus), doc_pattern=r"^CHAPTER", val_fraction=0.4), 512,
                        tmp_path)
    assert c3.n_docs[1] > c.n_docs[1] and c3.tokens[0] + c3.tokens[1] == c.tokens[0] + c.tokens[1]


def test_single_document_corpus_is_a_clear_error(tmp_path):
    p = tmp_path / "one.txt"
    p.write_text("just one paragraph with no blank lines")
    with pytest.raises(CorpusError, match="at least 2"):
        prepare_corpus(DataConfig(corpus=str(p)), 512, tmp_path / "run")
