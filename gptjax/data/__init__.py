"""Data: source readers, corpus reading, sentencepiece tokenizer, prepared token shards (gptjax-data), curation
(deduplication, contamination, quality), grain pipelines.

The names below are imported on first use (PEP 562): a ``gptjax-data prepare`` worker process imports only the
preparation and the tokenizer, not grain (1.0 of its 1.25 s start-up before, on every worker spawned)."""

import importlib

_HOMES = {
    "gptjax.data.builtin": ["BUILTIN", "write_builtin"],
    "gptjax.data.contamination": ["ContaminationCheck"],
    "gptjax.data.corpus": ["CorpusError", "corpus_documents", "default_corpus_path", "read_corpus", "split_documents",
                           "train_val_documents"],
    "gptjax.data.dedup": ["Deduplicator", "plant_near_duplicates", "precision_recall"],
    "gptjax.data.batches": ["PreparedWindows", "eval_batches", "train_dataset"],
    "gptjax.data.run_data": ["MixtureCorpus", "PreparedCorpus", "prepare_corpus", "run_corpus"],
    "gptjax.data.shards": ["PreparedData", "PrepareSettings", "prepare", "train_tokenizer"],
    "gptjax.data.quality": ["QualityClassifier"],
    "gptjax.data.sources": ["SourceError", "read_documents"],
    "gptjax.data.tokenizer": ["Tokenizer", "TokenizerError"],
}
_HOME = {name: module for module, names in _HOMES.items() for name in names}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'gptjax.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME[name]), name)


def __dir__() -> list[str]:
    return __all__
