"""A run's corpus: the data ``data.corpus`` / ``data.mixture`` name, opened for training (a prepared directory, a
mixture of them, or a text corpus prepared on the fly into the run's ``data/`` by ``shards.prepare_text``); its
windows and batches are ``batches.py``'s."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from gptjax import storage
from gptjax.config import DataConfig
from gptjax.data.batches import Mixture, PreparedWindows
from gptjax.data.corpus import CorpusError
from gptjax.data.shards import SPLITS, PreparedData, prepare_text, write_whole
from gptjax.data.sources import SourceError
from gptjax.data.tokenizer import Tokenizer, TokenizerError
from gptjax.runs import RunDir


class PreparedCorpus:
    """A directory made by ``gptjax-data prepare``: the splits are read from its shards a window at a time, never
    whole, so memory does not grow with the corpus."""

    def __init__(self, data: PreparedData, tokenizer: Tokenizer, document_masking: bool = True):
        self.data, self.tokenizer, self.document_masking = data, tokenizer, document_masking
        totals = data.manifest["totals"]
        self.tokens = (totals["train"]["tokens"], totals["val"]["tokens"])
        self.n_docs = (totals["train"]["documents"], totals["val"]["documents"])

    def windows(self, seq_len: int) -> "PreparedWindows":
        self.data.warm("train")  # a bucket's shards: into the host's cache, beside the training
        return PreparedWindows(self.data, "train", seq_len, self._eos())

    def eval_windows(self, seq_len: int) -> "PreparedWindows":
        return PreparedWindows(self.data, "val", seq_len, self._eos())

    def stream(self, split: str, limit: int | None = None) -> np.ndarray:
        """The token stream of ``split`` ("train" or "val"), whole or its first ``limit`` tokens, in memory."""
        n = self.tokens[SPLITS.index(split)]
        return PreparedWindows(self.data, split, 1, None).tokens(0, n if limit is None else min(limit, n))

    def _eos(self) -> int | None:
        return self.tokenizer.eos_id if self.document_masking else None


class MixtureCorpus:
    """Several prepared directories (``data.mixture``) drawn by weight: one tokenizer (each directory's must be the
    same), the training windows mixed by grain (:class:`Mixture`), validation kept per source."""

    def __init__(self, names: Sequence[str], parts: Sequence[PreparedCorpus], weights: Sequence[float]):
        self.names, self.parts, self.weights = tuple(names), list(parts), tuple(float(w) for w in weights)
        self.tokenizer = parts[0].tokenizer
        self.tokens = tuple(sum(p.tokens[i] for p in parts) for i in (0, 1))
        self.n_docs = tuple(sum(p.n_docs[i] for p in parts) for i in (0, 1))

    def windows(self, seq_len: int) -> "Mixture":
        return Mixture(self.names, [p.windows(seq_len) for p in self.parts], self.weights)

    def eval_windows(self, seq_len: int) -> dict[str, "PreparedWindows"]:
        """Each source's validation windows, by name."""
        return {n: p.eval_windows(seq_len) for n, p in zip(self.names, self.parts)}

    def stream(self, split: str, limit: int | None = None) -> np.ndarray:
        """The sources' streams of ``split`` one after another (each cut to an equal share of ``limit``)."""
        share = None if limit is None else limit // len(self.parts)
        return np.concatenate([p.stream(split, share) for p in self.parts])


def prepare_corpus(cfg: DataConfig, vocab_size: int, run_dir: RunDir | str | Path
                   ) -> PreparedCorpus | MixtureCorpus:
    """The run's data. A text corpus (``data.corpus=file.txt``, the embedded default) is read, split into documents
    and train / validation (seeded), tokenized (training the tokenizer if needed) and prepared on the fly into the
    run's ``data/`` (:func:`gptjax.data.shards.prepare_text`; kept, and found again by content hash), so that
    every corpus is read one way; a directory prepared by ``gptjax-data prepare`` is opened instead, and the
    directories of ``data.mixture`` together (:class:`MixtureCorpus`)."""
    run = RunDir(run_dir)
    if names_prepared_data(cfg):
        return open_prepared(cfg, vocab_size, run)
    tokenizer = prepare_text(cfg, vocab_size, run)  # (before the data it prepares is opened)
    return PreparedCorpus(PreparedData(run.data), tokenizer, bool(cfg.document_masking))


def names_prepared_data(cfg: DataConfig) -> bool:
    """The corpus is prepared already (a directory, or a mixture of them), not a text file prepared on the fly."""
    return bool(cfg.mixture) or storage.is_remote(cfg.corpus) or Path(cfg.corpus).expanduser().is_dir()


def run_corpus(cfg: DataConfig, vocab_size: int, run_dir: RunDir | str | Path) -> PreparedCorpus | MixtureCorpus:
    """The data a run trained on, opened to read (nothing is prepared or written): its own ``data/``, or the
    prepared directories its config names."""
    run = RunDir(run_dir)
    if names_prepared_data(cfg):
        return open_prepared(cfg, vocab_size, run)
    try:
        data = PreparedData(run.data)
        return PreparedCorpus(data, data.tokenizer(), bool(cfg.document_masking))
    except SourceError:
        raise CorpusError(f"{run.data} holds no prepared data: the run has not started training") from None


def open_prepared(cfg: DataConfig, vocab_size: int, run: RunDir) -> PreparedCorpus | MixtureCorpus:
    """``data.corpus`` (a prepared directory) or the directories of ``data.mixture`` as the run's data: their
    tokenizer (or ``data.tokenizer``, which must be the same one; every directory of a mixture must share it) is
    copied into the run directory."""
    paths = list(cfg.mixture) or [cfg.corpus]
    names = [storage.name(p) if storage.is_remote(p) else Path(p).expanduser().resolve().name for p in paths]
    if len(set(names)) < len(names):
        raise CorpusError(f"data.mixture: the directories {paths} do not have distinct names, which name them in "
                          "the metrics; rename (or link) one")
    tok, parts = None, []
    for path in paths:
        field = f"data.mixture[{path!r}]" if cfg.mixture else f"data.corpus={path}"
        try:
            data = PreparedData(path if storage.is_remote(path) else Path(path).expanduser())
            if tok is None:
                tok = Tokenizer.load(cfg.tokenizer) if cfg.tokenizer else data.tokenizer()
            data.check_tokenizer(tok)
        except SourceError as e:
            raise CorpusError(f"{field}: {e}") from None
        parts.append(PreparedCorpus(data, tok, cfg.document_masking is not False))
    if tok.vocab_size != vocab_size:
        raise TokenizerError(f"{paths[0]} was prepared with a {tok.vocab_size}-piece tokenizer but "
                             f"model.vocab_size={vocab_size}; set model.vocab_size={tok.vocab_size}")
    run.path.mkdir(parents=True, exist_ok=True)
    if not run.tokenizer.exists():
        write_whole(run.tokenizer, tok.proto)
    return MixtureCorpus(names, parts, list(cfg.mixture.values())) if cfg.mixture else parts[0]


