"""Offline preparation: source files -> token documents in ArrayRecord shards, with a manifest.

The documents of all sources are streamed in order and cut into chunks of ``docs_per_shard``; chunk ``i`` becomes
shard ``i`` of each split (``train-00000.arecord``, ``val-00000.arecord``), one record per document: its token ids
followed by ``</s>``, as little-endian ``uint16`` (``int32`` above 65,536 pieces). A document is in the validation
split when a hash of its text says so (``val_fraction``): the split does not depend on the order, the shard size
or the worker count. Chunks are tokenized in ``workers`` processes, a bounded number in flight (memory does not
grow with the corpus); each shard is written under a temporary name and renamed whole, then recorded in
``progress.jsonl``. Re-running with the same inputs skips the recorded shards, so a run killed at any moment
resumes and ends with byte-identical shards. The directory keeps a copy of the tokenizer (``tokenizer.model``), so
that it is whole wherever it is moved; ``manifest.json`` is written last (its presence means complete):
sources with sizes and content hashes and their document / skipped-row counts, the tokenizer's hash, the
settings, and each shard's documents, tokens and hash. Inputs that differ from the ones a directory was prepared
from are refused, naming what differs.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from gptjax import storage
from gptjax.config import DataConfig
from gptjax.data.corpus import CorpusError, corpus_documents, fingerprint, train_val_documents
from gptjax.data.sources import SourceError, check_source, read_documents
from gptjax.data.tokenizer import Tokenizer, TokenizerError
from gptjax.runs import RunDir, fault_reason, write_atomic

log = logging.getLogger(__name__)

FORMAT = "gptjax-tokens/1"
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.model"  # a copy of the tokenizer, so that the directory is whole when moved
PROGRESS = "progress.jsonl"
SPLITS = ("train", "val")


@dataclass(frozen=True)
class PrepareSettings:
    """What, besides the sources and the tokenizer, decides the shards' bytes."""

    text_field: str = "text"
    doc_pattern: str | None = None
    bad_rows: str = "refuse"
    docs_per_shard: int = 4096
    val_fraction: float = 0.005
    dedup: float | None = None  # drop exact and near duplicates at this Jaccard threshold (gptjax/data/dedup.py)
    contamination: tuple[str, ...] = ()  # evaluation files: count documents sharing a 13-gram with them
    drop_contaminated: bool = False  # ... and drop those documents
    quality: str | None = None  # a quality classifier (gptjax-data quality-train): GPT-3's Pareto rule drops documents


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.arecord"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<i4")


def in_validation(text: str, val_fraction: float) -> bool:
    """The document's split, from its text alone."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
    return h % 1_000_000 < round(val_fraction * 1_000_000)


# ---- workers -------------------------------------------------------------------------------------------------
_TOKENIZER: Tokenizer | None = None


def _init_worker(tokenizer_proto: bytes) -> None:
    global _TOKENIZER
    _TOKENIZER = Tokenizer(tokenizer_proto)


def lengths_file(shard: Path) -> Path:
    """The shard's document lengths in tokens (``uint32``), for random access to a position in the token stream."""
    return shard.with_name(shard.name.replace(".arecord", ".lengths.npy"))


def _write_shard(path: Path, records: list[bytes], lengths: list[int]) -> dict:
    """The shard and its lengths file, each under a temporary name, then renamed (the lengths first: a shard that
    exists always has its lengths)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    ltmp = path.with_name(f".{lengths_file(path).name}.tmp-{os.getpid()}")
    with open(ltmp, "wb") as f:
        np.save(f, np.asarray(lengths, np.uint32))
        f.flush()
        os.fsync(f.fileno())
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    writer = ArrayRecordWriter(str(tmp), "group_size:64")
    try:
        for r in records:
            writer.write(r)
        writer.close()
    except RuntimeError as e:  # array_record says the system's write errors (a full disk) as RuntimeError
        raise OSError(str(e)) from None
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    digest = storage.file_sha256(tmp)
    os.replace(ltmp, lengths_file(path))
    os.replace(tmp, path)
    return {"file": path.name, "sha256": digest, "documents": len(records), "tokens": sum(lengths)}


def _document_record(ids: Sequence[int], eos_id: int, dtype: np.dtype) -> bytes:
    """One document as a shard holds it: its token ids, then ``</s>``."""
    return np.asarray([*ids, eos_id], dtype).tobytes()


def _tokenizer_record(tok: Tokenizer, path: str | Path) -> dict:
    return {"path": str(path), "sha256": hashlib.sha256(tok.proto).hexdigest(), "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id}


def _totals(shards: dict[str, list[dict]]) -> dict:
    """Documents and tokens of each split, from its shards' entries."""
    return {s: {k: sum(r[k] for r in shards[s]) for k in ("documents", "tokens")} for s in SPLITS}


def _tokenize_chunk(out: str, index: int, texts: list[str], val_fraction: float) -> dict:
    """Shard ``index`` of each split from one chunk of documents (runs in a worker process)."""
    tok = _TOKENIZER
    dtype = token_dtype(tok.vocab_size)
    records: dict[str, list[bytes]] = {s: [] for s in SPLITS}
    lengths: dict[str, list[int]] = {s: [] for s in SPLITS}
    # one thread: a worker is one core (--workers sets the parallelism; bench/prepare_bench.py measures it)
    for text, ids in zip(texts, tok.encode_batch(texts, threads=1)):
        split = "val" if in_validation(text, val_fraction) else "train"
        records[split].append(_document_record(ids, tok.eos_id, dtype))
        lengths[split].append(len(ids) + 1)
    result = {"index": index}
    for split in SPLITS:
        if records[split]:
            result[split] = _write_shard(Path(out) / shard_name(split, index), records[split], lengths[split])
    return result


def prepare_splits(out: str | Path, tok: Tokenizer, splits: dict[str, Sequence[str]], *, key: str, source: dict,
                   docs_per_shard: int = 4096) -> dict:
    """Documents already split (a text corpus's seeded split: ``data.corpus=file.txt`` and the embedded default)
    into a directory of the same layout, in this process: the run directory's ``data/``, prepared on the fly so that
    training reads every corpus one way. The manifest records ``key`` (the text, settings and tokenizer) so that a
    resumed run finds its preparation; it is removed first and written last, so a preparation cut short is never
    taken for one that finished."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    write_atomic(out / TOKENIZER, tok.proto)
    dtype = token_dtype(tok.vocab_size)
    shards: dict[str, list[dict]] = {}
    try:
        for split in SPLITS:
            docs, shards[split] = list(splits[split]), []
            for index, start in enumerate(range(0, len(docs), docs_per_shard)):
                ids = tok.encode_batch(docs[start: start + docs_per_shard])
                shards[split].append(_write_shard(out / shard_name(split, index),
                                                  [_document_record(x, tok.eos_id, dtype) for x in ids],
                                                  [len(x) + 1 for x in ids]))
    except BaseException:
        for stale in out.glob(".*.tmp-*"):  # a full disk: nothing half-written stays
            stale.unlink(missing_ok=True)
        raise
    manifest = {"format": FORMAT, "key": key, "tokenizer": _tokenizer_record(tok, TOKENIZER), "dtype": dtype.str,
                "sources": [source], "shards": shards, "totals": _totals(shards)}
    write_atomic(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


# ---- the driver ----------------------------------------------------------------------------------------------
def _settings_fields(settings: PrepareSettings) -> dict:
    """The settings as the manifest records them (evaluation files by content hash)."""
    fields = dataclasses.asdict(settings)
    fields["contamination"] = [storage.file_sha256(p) if Path(p).is_file() else str(p) for p in settings.contamination]
    if settings.quality is not None:
        quality = settings.quality
        fields["quality"] = storage.file_sha256(quality) if Path(quality).is_file() else quality
    return fields


def _identity(sources: list[dict], tokenizer: dict, settings: PrepareSettings) -> dict:
    fields = _settings_fields(settings)
    return {"format": FORMAT, "sources": [{k: s[k] for k in ("path", "bytes", "sha256")} for s in sources],
            "tokenizer": {k: tokenizer[k] for k in ("sha256", "vocab_size")}, "settings": fields}


def _differences(old: dict, new: dict) -> list[str]:
    out = []
    if [s["sha256"] for s in old["sources"]] != [s["sha256"] for s in new["sources"]]:
        out.append("the sources (their list or contents)")
    if any(old["tokenizer"].get(k) != new["tokenizer"][k] for k in new["tokenizer"]):
        out.append("the tokenizer")
    defaults = _settings_fields(PrepareSettings())  # a setting added since ``old`` was written had its default
    out += [f"{k} ({old['settings'].get(k, defaults[k])!r} -> {v!r})" for k, v in new["settings"].items()
            if old["settings"].get(k, defaults[k]) != v]
    return out


def prepare(sources: Sequence[str | Path], tokenizer_path: str | Path, out: str | Path, *, workers: int = 1,
            settings: PrepareSettings = PrepareSettings(), progress: bool = True) -> dict:
    """Prepare ``sources`` into ``out`` (module docstring); the manifest. Safe to run again: it resumes, or, when
    complete, checks the shards against the manifest and returns it (a damaged shard is prepared again, to the same
    bytes). A call that fails before it wrote a shard leaves no ``out`` it created (a refused preparation left a
    progress file and a tokenizer there, and the corrected re-run was refused as "a preparation of other
    inputs")."""
    if storage.is_remote(out):
        return _prepare_to_bucket(sources, tokenizer_path, str(out).rstrip("/"), workers, settings, progress)
    out = Path(out)
    created = not out.exists()
    try:
        return _prepare(sources, tokenizer_path, out, workers, settings, progress)
    except BaseException:
        if created and out.is_dir() and not any(out.glob("*.arecord")):
            shutil.rmtree(out, ignore_errors=True)
        raise


def _prepare_to_bucket(sources: Sequence[str | Path], tokenizer_path: str | Path, url: str, workers: int,
                       settings: PrepareSettings, progress: bool) -> dict:
    """``prepare`` into a bucket: the directory is prepared in a local staging directory (under
    ``$GPTJAX_WORK_DIR``, named by the URL, so that a run killed on this machine resumes there), then copied up
    with ``manifest.json`` last (a directory in the bucket is complete exactly when it has one), then the staging
    directory is removed. A bucket directory that is complete already is checked and returned."""
    storage.check_writable(url)
    if storage.read_bytes(f"{url}/{MANIFEST}") is not None:
        data = PreparedData(url)
        problems = data.verify(progress=progress)
        if not problems:
            return data.manifest
        log.warning("%s: %d damaged shards; preparing them again", url, len(problems))
    staging = storage.staging_dir(url)
    manifest = prepare(sources, tokenizer_path, staging, workers=workers, settings=settings, progress=progress)
    storage.push(staging, url, last=(MANIFEST,))
    shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _prepare(sources: Sequence[str | Path], tokenizer_path: str | Path, out: Path, workers: int,
             settings: PrepareSettings, progress: bool) -> dict:
    from tqdm import tqdm

    if workers < 1:
        raise SourceError(f"workers={workers}: must be at least 1")
    if settings.docs_per_shard < 1 or not 0 <= settings.val_fraction < 1:
        raise SourceError(f"docs_per_shard={settings.docs_per_shard} must be >= 1 and val_fraction="
                          f"{settings.val_fraction} in [0, 1)")
    paths = [storage.as_path(s) for s in sources]  # local files or objects in a bucket
    if not paths:
        raise SourceError("no sources given")
    for p in paths:
        check_source(p)
    tok = Tokenizer.load(tokenizer_path)
    tokenizer = _tokenizer_record(tok, tokenizer_path)
    src = [{"path": str(p), "bytes": storage.size(p), "sha256": storage.file_sha256(p)} for p in paths]
    identity = _identity(src, tokenizer, settings)

    out.mkdir(parents=True, exist_ok=True)
    if not (out / TOKENIZER).exists() or (out / TOKENIZER).read_bytes() != tok.proto:
        write_atomic(out / TOKENIZER, tok.proto)
    manifest_path, progress_path = out / MANIFEST, out / PROGRESS
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        diff = _differences(manifest, identity)
        if diff:
            raise SourceError(f"{out} was prepared from other inputs ({'; '.join(diff)}): prepare into another "
                              "directory, or remove this one")
        damaged = PreparedData(out).verify(progress=progress)
        if not damaged:
            return manifest
        for path, why in damaged.items():
            print(f"gptjax-data: {path}: {why}; preparing it again", file=sys.stderr)
            for f in (path, lengths_file(path)):
                f.unlink(missing_ok=True)
        manifest_path.unlink()
    for stale in out.glob(".*.tmp-*"):  # a killed run's half-written shard
        stale.unlink()
    done: dict[int, dict] = {}
    if progress_path.exists():
        lines = []
        raw = [line for line in progress_path.read_text().splitlines() if line.strip()]
        for n, line in enumerate(raw):
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                if n < len(raw) - 1:  # only the last line can be cut short, by a kill mid-write
                    raise SourceError(f"{progress_path} line {n + 1} is damaged: remove {out} and prepare again") \
                        from None
        if lines:
            diff = _differences(lines[0], identity)
            if diff and len(lines) > 1:  # (a start of other inputs that wrote no shard is simply started over)
                raise SourceError(f"{out} holds a preparation of other inputs ({'; '.join(diff)}): prepare into "
                                  "another directory, or remove this one")
            for rec in lines[1:]:
                if all((out / rec[s]["file"]).is_file() and lengths_file(out / rec[s]["file"]).is_file()
                       for s in SPLITS if s in rec):
                    done[rec["index"]] = rec
    if not done:
        write_atomic(progress_path, json.dumps(identity) + "\n")
    log = open(progress_path, "a")

    counts = [{"documents": 0, "skipped": {}, "dropped": {}} for _ in paths]
    quality = None
    if settings.quality is not None:
        from gptjax.data.quality import QualityClassifier

        quality = QualityClassifier.load(settings.quality)
    contamination = None
    if settings.contamination:
        from gptjax.data.contamination import ContaminationCheck

        contamination = ContaminationCheck(settings.contamination)

    def chunks() -> Iterator[tuple[int, list[str]]]:
        from gptjax.data.dedup import Deduplicator

        dedup = Deduplicator(settings.dedup) if settings.dedup else None  # the same decisions on every pass
        chunk, index = [], 0
        for p, c in zip(paths, counts):
            for doc in read_documents(p, text_field=settings.text_field, doc_pattern=settings.doc_pattern,
                                      bad_rows=settings.bad_rows, counts=c):
                why = dedup.check(doc.text) if dedup is not None else None
                if why is None and contamination is not None and contamination.contaminated(doc.text):
                    c["contaminated"] = c.get("contaminated", 0) + 1
                    if len(c.setdefault("contaminated_examples", [])) < 5:
                        c["contaminated_examples"].append(doc.where)
                    why = "contaminated" if settings.drop_contaminated else None
                if why is None and quality is not None and not quality.keep(doc.text):
                    why = "quality"
                if why is not None:
                    c["dropped"][why] = c["dropped"].get(why, 0) + 1
                    continue
                chunk.append(doc.text)
                if len(chunk) == settings.docs_per_shard:
                    yield index, chunk
                    chunk, index = [], index + 1
        if chunk:
            yield index, chunk

    def record(result: dict) -> None:
        done[result["index"]] = result
        log.write(json.dumps(result) + "\n")
        log.flush()
        os.fsync(log.fileno())

    bar = tqdm(desc=f"preparing {out.name}", unit=" docs", disable=not progress, file=sys.stderr, smoothing=0.1)
    resumed = len(done)
    try:
        if workers == 1:
            _init_worker(tok.proto)
            for index, texts in chunks():
                if index not in done:
                    record(_tokenize_chunk(str(out), index, texts, settings.val_fraction))
                bar.update(len(texts))
        else:
            import multiprocessing

            with multiprocessing.get_context("spawn").Pool(workers, _init_worker, (tok.proto,)) as pool:
                pending: collections.deque = collections.deque()
                for index, texts in chunks():
                    if index not in done:
                        pending.append((len(texts), pool.apply_async(
                            _tokenize_chunk, (str(out), index, texts, settings.val_fraction))))
                    else:
                        bar.update(len(texts))
                    while len(pending) > 2 * workers:  # bounded: memory does not grow with the corpus
                        n, job = pending.popleft()
                        record(job.get())
                        bar.update(n)
                while pending:
                    n, job = pending.popleft()
                    record(job.get())
                    bar.update(n)
    finally:
        bar.close()
        log.close()

    chunks_done = [done[i] for i in sorted(done)]
    shards = {s: [{k: r[s][k] for k in ("file", "documents", "tokens", "sha256")} for r in chunks_done if s in r]
              for s in SPLITS}
    manifest = {**identity, "tokenizer": tokenizer, "dtype": token_dtype(tok.vocab_size).str,
                "sources": [{**s, **c} for s, c in zip(src, counts)], "shards": shards,
                "totals": _totals(shards), "resumed_shards": resumed,
                **({"contamination": {"n": contamination.n, "eval_files": contamination.files,
                                      "contaminated": sum(c.get("contaminated", 0) for c in counts),
                                      "dropped": settings.drop_contaminated}} if contamination else {})}
    write_atomic(manifest_path, json.dumps(manifest, indent=1) + "\n")
    progress_path.unlink()
    return manifest


# ---- reading -------------------------------------------------------------------------------------------------
def _cache_names(entry: dict) -> tuple[str, str]:
    """A bucket's shard and its lengths file in the host's cache: named by the shard's SHA-256 (the manifest's)."""
    return f"shards/{entry['sha256']}.arecord", f"shards/{entry['sha256']}.lengths.npy"


class PreparedData:
    """A prepared directory: its manifest, shard files and documents (token arrays, each ending with ``</s>``)."""

    def __init__(self, path: str | Path):
        self.url = str(path).rstrip("/") if storage.is_remote(path) else None  # a prepared directory in a bucket
        self.path = storage.as_path(path)
        manifest = self.path / MANIFEST
        try:
            text = storage.read_bytes(manifest)
        except (OSError, ValueError) as e:
            raise SourceError(f"{manifest} does not read ({fault_reason(e)})") from None
        if text is None:
            why = "it is still being prepared (or was killed: run gptjax-data prepare again to finish it)" \
                if (self.path / PROGRESS).exists() else "no manifest.json: prepare it with gptjax-data prepare"
            raise SourceError(f"{self.path} is not a prepared data directory: {why}")
        try:
            self.manifest = json.loads(text)
        except ValueError as e:
            raise SourceError(f"{manifest} does not read ({type(e).__name__}: {e}): the directory is damaged; "
                              "prepare it again") from None
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != FORMAT:
            raise SourceError(f"{manifest}: format {self.manifest.get('format')!r}, expected {FORMAT!r}")
        self.dtype = np.dtype(self.manifest["dtype"])

    def files(self, split: str) -> list[Path]:
        return [self.path / s["file"] for s in self.manifest["shards"][split]]

    def local_files(self, split: str, k: int) -> tuple[Path, Path]:
        """Shard ``k`` of ``split`` and its lengths file as local files to read: a bucket's are fetched into the
        host's cache the first time (named by the shard's SHA-256, checked on arrival; ``storage.cached``)."""
        entry = self.manifest["shards"][split][k]
        shard = self.path / entry["file"]
        if self.url is None:
            return shard, lengths_file(shard)
        shard_name, lengths_name = _cache_names(entry)
        return (storage.cached(shard, shard_name, entry["sha256"]), storage.cached(lengths_file(shard), lengths_name))

    def warm(self, split: str) -> None:
        """For a directory in a bucket: refuse one the host's cache cannot hold (a :class:`SourceError` naming
        both sizes), then fetch the shards of ``split`` into it in a background thread, in order, while training
        starts (a window whose shard has not arrived fetches it itself). A global shuffle reads every shard of the
        split in every stretch of steps, so the cache holds the whole directory: its disk bound."""
        if self.url is None:
            return
        root = storage.cache_root()
        root.mkdir(parents=True, exist_ok=True)
        need, free = storage.total_size(self.url), shutil.disk_usage(root).free
        have = sum(f.stat().st_size for s in SPLITS for entry in self.manifest["shards"][s]  # (this directory's)
                   for f in (root / n for n in _cache_names(entry)) if f.is_file())
        if need > free + have:
            raise SourceError(f"{self.url} holds {need / 1e9:.1f} GB; the cache for its shards at {root} has "
                              f"{free / 1e9:.1f} GB free: point GPTJAX_CACHE_DIR to a larger disk")

        def fetch() -> None:
            for k in range(len(self.manifest["shards"][split])):
                try:
                    self.local_files(split, k)
                except Exception:  # noqa: BLE001 - the read that needs the shard reports the problem
                    return

        threading.Thread(target=fetch, name=f"gptjax-fetch-{split}", daemon=True).start()

    def tokenizer(self) -> Tokenizer:
        """The tokenizer the shards were made with: the directory's copy (or, in a directory prepared before
        copies were kept, the file the manifest names)."""
        own = storage.read_bytes(self.path / TOKENIZER)
        tok = Tokenizer(own) if own is not None else Tokenizer.load(self.manifest["tokenizer"]["path"])
        self.check_tokenizer(tok)
        return tok

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Refuse a tokenizer other than the one the shards were made with."""
        want = self.manifest["tokenizer"]["sha256"]
        got = hashlib.sha256(tokenizer.proto).hexdigest()
        if got != want:
            raise SourceError(f"{self.path} was prepared with tokenizer {self.manifest['tokenizer']['path']} "
                              f"(sha256 {want[:12]}); this one is {got[:12]}: use that tokenizer, or prepare again")

    def key(self) -> str | None:
        """What a run directory's own preparation was made from (:func:`prepare_splits`); None for others."""
        return self.manifest.get("key")

    def verify(self, progress: bool = False) -> dict[Path, str]:
        """The shards that differ from the manifest, each with why (empty: none): its SHA-256, its lengths file's
        counts. Reads every shard whole."""
        from tqdm import tqdm

        problems = {}
        shards = [s for split in SPLITS for s in self.manifest["shards"][split]]
        for shard in tqdm(shards, desc="verify", unit="shard", disable=not progress, file=sys.stderr):
            path = self.path / shard["file"]
            try:
                if storage.file_sha256(path) != shard["sha256"]:
                    problems[path] = "its SHA-256 differs from the manifest's (the file changed after it was written)"
                    continue
                with lengths_file(path).open("rb") as f:
                    lengths = np.load(f)
                if len(lengths) != shard["documents"] or int(lengths.sum()) != shard["tokens"]:
                    problems[path] = (f"its lengths file holds {len(lengths)} documents, {int(lengths.sum())} "
                                      f"tokens; the manifest says {shard['documents']} and {shard['tokens']}")
            except (OSError, ValueError) as e:
                problems[path] = fault_reason(e)
        return problems

    def documents(self, split: str) -> Iterator[np.ndarray]:
        from array_record.python.array_record_module import ArrayRecordReader

        for k in range(len(self.files(split))):
            reader = ArrayRecordReader(str(self.local_files(split, k)[0]))
            try:
                for i in range(0, reader.num_records(), 1024):
                    for rec in reader.read(list(range(i, min(i + 1024, reader.num_records())))):
                        yield np.frombuffer(rec, self.dtype)
            finally:
                reader.close()


def train_tokenizer(sources: Sequence[str | Path], vocab_size: int, *, sample_docs: int = 100_000,
                    sample_chars: int = 20_000_000, seed: int = 0, settings: PrepareSettings = PrepareSettings(),
                    progress: bool = True) -> Tokenizer:
    """A byte-fallback BPE tokenizer trained on a seeded uniform sample of the sources' documents (reservoir
    sampling over the stream: at most ``sample_docs`` documents are held, whatever the corpus size)."""
    import random

    from tqdm import tqdm

    rng = random.Random(seed)
    reservoir: list[str] = []
    seen = 0
    with tqdm(desc="sampling documents", unit=" docs", disable=not progress, file=sys.stderr) as bar:
        for p in sources:
            for doc in read_documents(p, text_field=settings.text_field, doc_pattern=settings.doc_pattern,
                                      bad_rows=settings.bad_rows):
                seen += 1
                if len(reservoir) < sample_docs:
                    reservoir.append(doc.text)
                else:
                    j = rng.randrange(seen)
                    if j < sample_docs:
                        reservoir[j] = doc.text
                bar.update()
    return Tokenizer.train(reservoir, vocab_size, seed=seed, sample_chars=sample_chars)


# ---- a run's text corpus, prepared on the fly ------------------------------------------------------------------
def write_whole(path: Path, content: str | bytes) -> None:
    """A file of a run's data, whole or not at all; a failed write (a full disk) is one clear error."""
    try:
        write_atomic(path, content)
    except OSError as e:
        raise CorpusError(f"could not write {path}: {fault_reason(e)}; nothing partial was left, free space and "
                          "run again") from None


def prepared_key(directory: Path) -> str | None:
    """What a run directory's own preparation was made from, or None (none there yet, or cut short)."""
    try:
        return PreparedData(directory).key()
    except (SourceError, OSError, ValueError):
        return None


def prepare_text(cfg: DataConfig, vocab_size: int, run: RunDir) -> Tokenizer:
    """A text corpus (``data.corpus=file.txt``, the embedded default) prepared into the run's ``data/``: read,
    split into documents and train / validation (seeded), tokenized (training the tokenizer if needed) and
    written as shards (:func:`prepare_splits`; kept, and found again by content hash; checked against its manifest
    and prepared again when damaged), so that every corpus is read one way. Returns the tokenizer."""
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
        write_whole(tok_path, tok.proto)

    key = fingerprint(text, pattern, cfg.val_fraction, cfg.seed, tok.proto)
    damaged = PreparedData(run.data).verify() if prepared_key(run.data) == key else None
    if damaged:  # the run's own cache, made from the text (cheaper to hash than the text was to read)
        log.warning("%s: %s; preparing the run's data again (the same bytes)", run.data,
                    "; ".join(f"{p.name}: {why}" for p, why in damaged.items()))
    if damaged is None or damaged:
        train_docs, val_docs = train_val_documents(docs, cfg)
        source = {"path": str(path), "bytes": len(text.encode("utf-8")), "documents": len(docs),
                  "doc_pattern": pattern, "val_fraction": cfg.val_fraction, "seed": cfg.seed}
        try:
            prepare_splits(run.data, tok, {"train": train_docs, "val": val_docs}, key=key, source=source)
        except OSError as e:
            raise CorpusError(f"could not write {run.data}: {fault_reason(e)}; free space and run again (a "
                              "preparation cut short is made again)") from None
    return tok
