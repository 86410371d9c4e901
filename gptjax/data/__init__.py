"""Data: source readers, corpus reading, sentencepiece tokenizer, prepared token shards (gptjax-data), curation
(deduplication, contamination, quality), grain pipelines."""

from gptjax.data.contamination import ContaminationCheck
from gptjax.data.corpus import CorpusError, default_corpus_path, read_corpus, split_documents
from gptjax.data.dedup import Deduplicator, plant_near_duplicates, precision_recall
from gptjax.data.pipeline import (PreparedCorpus, PreparedWindows, TokenizedCorpus, corpus_documents, eval_batches,
                                   prepare_corpus, split_file, train_dataset, train_val_documents)
from gptjax.data.prepare import PreparedData, PrepareSettings, prepare, train_tokenizer
from gptjax.data.quality import QualityClassifier
from gptjax.data.sources import SourceError, read_documents
from gptjax.data.tokenizer import Tokenizer, TokenizerError

__all__ = ["ContaminationCheck", "CorpusError", "Deduplicator", "PrepareSettings", "PreparedCorpus", "PreparedData",
           "PreparedWindows", "QualityClassifier", "SourceError", "TokenizedCorpus", "Tokenizer", "TokenizerError",
           "corpus_documents", "default_corpus_path", "eval_batches", "plant_near_duplicates", "precision_recall",
           "prepare", "prepare_corpus", "read_corpus", "read_documents", "split_documents", "split_file",
           "train_dataset", "train_tokenizer", "train_val_documents"]
