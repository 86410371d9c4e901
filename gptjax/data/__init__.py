"""Data: corpus reading, sentencepiece tokenizer, grain pipelines."""

from gptjax.data.corpus import CorpusError, default_corpus_path, read_corpus, split_documents
from gptjax.data.pipeline import (TokenizedCorpus, corpus_documents, eval_batches, prepare_corpus, split_file,
                                   train_dataset, train_val_documents)
from gptjax.data.tokenizer import Tokenizer, TokenizerError

__all__ = ["CorpusError", "TokenizedCorpus", "Tokenizer", "TokenizerError", "corpus_documents", "default_corpus_path",
           "eval_batches", "train_val_documents",
           "prepare_corpus", "split_file", "read_corpus", "split_documents", "train_dataset"]
