"""Tokenized corpus -> packed fixed-length sequences -> shuffled, sharded batches (grain).

Packing: documents are concatenated, each followed by ``</s>``, and the stream is cut into windows of
``seq_len + 1`` tokens (inputs = window[:-1], targets = window[1:]); attention is not reset at document
boundaries (GPT-2/3 practice). Batches are ``{inputs, targets, loss_mask}``, each ``[batch, seq_len]``.
The train/validation split is by document. The train pipeline is a grain
``MapDataset``: globally shuffled with a seed, reshuffled every epoch, sharded by process (each process reads
only its rows of the global batch), batched; its iterator state is saved in checkpoints.
"""

from __future__ import annotations

import io
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import grain
import numpy as np

from gptjax.config import DataConfig
from gptjax.data.corpus import CorpusError, fingerprint, read_corpus, resolve_corpus, split_documents
from gptjax.data.tokenizer import Tokenizer, TokenizerError, encode_documents
from gptjax.runs import RunDir, fault_reason, write_atomic

log = logging.getLogger(__name__)


@dataclass
class TokenizedCorpus:
    tokenizer: Tokenizer
    train: np.ndarray
    val: np.ndarray
    n_docs: tuple[int, int]


def split_file(run: RunDir, split: str) -> Path:
    """The prepared token file of ``split`` ("train" or "val") in ``run``'s data directory."""
    return run.data / f"{split}.npy"

def corpus_documents(cfg: DataConfig) -> tuple[Path, str, str | None, list[str]]:
    """``(path, text, document pattern, documents)`` of the corpus ``cfg`` names, read and split."""
    path, default_pattern = resolve_corpus(cfg.corpus)
    text = read_corpus(path)
    pattern = cfg.doc_pattern if cfg.doc_pattern is not None else default_pattern
    return path, text, pattern, split_documents(text, pattern)


def train_val_documents(docs: list[str], cfg: DataConfig) -> tuple[list[str], list[str]]:
    """The train/validation split by document: a seeded ``val_fraction`` of the documents (at least one) are
    held out, both splits in corpus order. The evaluation tasks are built from the same split."""
    order = list(range(len(docs)))
    random.Random(cfg.seed).shuffle(order)
    n_val = max(1, round(cfg.val_fraction * len(docs)))
    return [docs[i] for i in sorted(order[n_val:])], [docs[i] for i in sorted(order[:n_val])]


def prepare_corpus(cfg: DataConfig, vocab_size: int, run_dir: RunDir | str | Path) -> TokenizedCorpus:
    """Read, split, tokenize (training the tokenizer if needed); cached in the run's ``data/`` by content hash."""
    run = RunDir(run_dir)
    path, text, pattern, docs = corpus_documents(cfg)
    if len(docs) < 2:
        raise CorpusError(f"corpus {path} splits into {len(docs)} document(s); the train/validation split needs "
                          "at least 2 (set data.doc_pattern, or separate documents with blank lines)")
    tok_path = run.tokenizer
    if cfg.tokenizer is not None:
        tok = Tokenizer.load(cfg.tokenizer)
    elif tok_path.exists():
        tok = Tokenizer.load(tok_path)
    else:
        log.info("training a %d-piece BPE tokenizer on %s", vocab_size, path)
        tok = Tokenizer.train(docs, vocab_size, seed=cfg.seed, sample_chars=cfg.tokenizer_sample_chars)
    if tok.vocab_size != vocab_size:
        raise TokenizerError(f"tokenizer has {tok.vocab_size} pieces but model.vocab_size={vocab_size}; "
                         "make them equal (or remove the run's tokenizer.model to train a new one)")
    run.path.mkdir(parents=True, exist_ok=True)
    if not tok_path.exists():
        _write(tok_path, tok.proto)

    key = fingerprint(text, pattern, cfg.val_fraction, cfg.seed, tok.proto)
    cache = run.data
    meta_path = cache / "meta.json"
    if meta_path.exists() and json.loads(meta_path.read_text()).get("key") == key:
        meta = json.loads(meta_path.read_text())
        return TokenizedCorpus(tok, np.load(split_file(run, "train")), np.load(split_file(run, "val")),
                               tuple(meta["n_docs"]))
    train_docs, val_docs = train_val_documents(docs, cfg)
    train, val = encode_documents(tok, train_docs), encode_documents(tok, val_docs)
    cache.mkdir(parents=True, exist_ok=True)
    for split, tokens in (("train", train), ("val", val)):
        buf = io.BytesIO()
        np.save(buf, tokens)
        _write(split_file(run, split), buf.getvalue())
    _write(meta_path, json.dumps({"key": key, "n_docs": [len(train_docs), len(val_docs)],
                                  "tokens": [len(train), len(val)], "corpus": str(path)}))
    return TokenizedCorpus(tok, train, val, (len(train_docs), len(val_docs)))


def _write(path: Path, content: str | bytes) -> None:
    """A file of the run's data, whole or not at all; a failed write (a full disk) is one clear error."""
    try:
        write_atomic(path, content)
    except OSError as e:
        raise CorpusError(f"could not write {path}: {fault_reason(e)}; nothing partial was left, free space and "
                          "run again") from None


class PackedWindows:
    """Random-access source of ``seq_len + 1``-token windows over a token stream (grain data source)."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len
        self.n = (len(tokens) - 1) // seq_len

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(i) * self.seq_len
        return np.asarray(self.tokens[start: start + self.seq_len + 1], dtype=np.int32)


def _split(batch: np.ndarray) -> dict[str, np.ndarray]:
    """A batch as the model API takes it: inputs, next-token targets, and the loss mask (every target counts in
    pretraining; fine-tuning masks prompts and padding)."""
    return {"inputs": batch[:, :-1], "targets": batch[:, 1:], "loss_mask": np.ones(batch[:, 1:].shape, np.float32)}


def train_dataset(tokens: np.ndarray, seq_len: int, global_batch: int, seed: int,
                  process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """Infinite iterator dataset of this process's share (``global_batch / process_count`` rows) of each batch."""
    if global_batch % process_count:
        raise ValueError(f"global batch {global_batch} is not divisible by {process_count} processes")
    source = PackedWindows(tokens, seq_len)
    if len(source) < global_batch:
        raise CorpusError(f"the training split has {len(tokens)} tokens: {len(source)} sequences of {seq_len + 1}, "
                          f"fewer than one batch of {global_batch}; use a larger corpus or smaller batch/seq_len")
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
    ds = ds[process_index::process_count]
    ds = ds.batch(global_batch // process_count, drop_remainder=True).map(_split)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4))


def eval_batches(tokens: np.ndarray, seq_len: int, batch: int, max_batches: int) -> list[dict[str, np.ndarray]]:
    """Fixed validation batches: the first ``max_batches * batch`` windows, in order (the same every eval)."""
    source = PackedWindows(tokens, seq_len)
    if len(source) < batch:
        raise CorpusError(f"the validation split has {len(tokens)} tokens, fewer than one batch of {batch} "
                          f"sequences of {seq_len + 1}; raise data.val_fraction or lower the batch size")
    n = min(max_batches, len(source) // batch)
    return [_split(np.stack([source[b * batch + i] for i in range(batch)])) for b in range(n)]
