"""Data: corpus reading, sentencepiece tokenizer, grain pipelines."""

from gptjax.data.corpus import CorpusError, read_corpus, split_documents
from gptjax.data.pipeline import (TokenizedCorpus, eval_batches, prepare_corpus, train_dataset,
                                  unigram_cross_entropy)
from gptjax.data.tokenizer import Tokenizer

__all__ = ["CorpusError", "TokenizedCorpus", "Tokenizer", "eval_batches", "prepare_corpus", "read_corpus",
           "split_documents", "train_dataset", "unigram_cross_entropy"]
