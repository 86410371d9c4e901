"""Tokenized corpus -> packed fixed-length sequences -> shuffled, sharded batches (grain).

Packing: documents are concatenated, each followed by ``</s>``, and the stream is cut into windows of
``seq_len + 1`` tokens (inputs = window[:-1], targets = window[1:]). Without document masking attention is not
reset at document boundaries (GPT-2/3 practice); with it (prepared data's default) each window carries segment ids
and positions. Batches are ``{inputs, targets, loss_mask[, segment_ids, positions]}``, each ``[batch, seq_len]``.
The train/validation split is by document. The train pipeline is a grain ``MapDataset``: globally shuffled with a
seed, reshuffled every epoch (a mixture: each source so, then mixed by weight with ``MapDataset.mix``), sharded by
process (each process reads only its contiguous rows of each global batch, so the global batches do not depend on
the process count), batched; its iterator state (the number of batches taken, the same on every process) is saved
in checkpoints.
"""

from __future__ import annotations

import collections
import functools
import signal
from typing import Sequence

import grain
import numpy as np

from gptjax import storage
from gptjax.data.corpus import CorpusError
from gptjax.data.shards import PreparedData
from gptjax.data.sources import SourceError
from gptjax.runs import fault_reason


def mixture_proportions(weights: Sequence[float]) -> tuple[int, ...]:
    """Integer proportions for grain's mix, scaled as grain scales them (the smallest weight becomes 100), so that
    grain uses them unchanged and :func:`mixture_counts` can count what it draws."""
    return tuple(int(w * 100 / min(weights)) for w in weights)


def mixture_counts(n: int, proportions: Sequence[int]) -> list[int]:
    """How many of the first ``n`` elements of ``grain.MapDataset.mix(datasets, proportions)`` come from each
    dataset: grain's own interleaving, counted in closed form (``tests/test_data_mixture.py`` checks it against
    grain's draws)."""
    remaining, out = sum(proportions), []
    for p in proportions:
        rest = (n * (remaining - p)) // remaining
        out.append(n - rest)
        remaining, n = remaining - p, rest
    return out


class Mixture:
    """Window sources drawn by weight: element ``i`` of the mixed stream is a deterministic function of ``i``
    (grain's ``MapDataset.mix`` over each source shuffled and repeated), so a global sample index is the whole
    data position, as for one source; :meth:`drawn` says what each source has given after ``n`` elements."""

    def __init__(self, names: Sequence[str], sources: Sequence, weights: Sequence[float]):
        self.names, self.sources = tuple(names), list(sources)
        self.proportions = mixture_proportions(weights)

    def __len__(self) -> int:
        return min(len(s) for s in self.sources)

    @property
    def eos_id(self) -> int | None:
        return self.sources[0].eos_id  # one tokenizer for all (run_data.prepare_corpus checks)

    def order(self, seed: int) -> grain.MapDataset:
        """Element ``i`` of the mixed stream as ``(source, window)``: each source's windows shuffled and repeated,
        mixed by weight."""
        return grain.MapDataset.mix([shuffled(len(s), seed + k).map(functools.partial(_tagged, k))
                                     for k, s in enumerate(self.sources)], list(self.proportions))

    def drawn(self, n: int) -> dict[str, int]:
        """Windows taken from each source among the first ``n`` elements of the stream, by name."""
        return dict(zip(self.names, mixture_counts(n, self.proportions)))


def data_position(source: PackedWindows | PreparedWindows | Mixture, samples: int, seq_len: int
                  ) -> dict[str, float]:
    """Where the data stands after ``samples`` windows of the global stream: epochs of the training split, or in a
    mixture each source's tokens (``tokens/<name>``, targets as in ``tokens``) and epochs (``epochs/<name>``)."""
    if not isinstance(source, Mixture):
        return {"epochs": samples / len(source)}
    out = {}
    for (name, n), windows in zip(source.drawn(samples).items(), source.sources):
        out[f"tokens/{name}"], out[f"epochs/{name}"] = n * seq_len, n / len(windows)
    return out


def document_segments(window: np.ndarray, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Segment ids and positions of a window of the token stream (or of each row of a batch of windows), where
    every document ends with ``</s>``: a segment starts after each ``</s>`` (and at the window's start), and
    positions count from 0 in each."""
    ends = window[..., :-1] == eos_id
    first = np.ones(window.shape[:-1] + (1,), bool)
    segment = np.concatenate([~first, ends], axis=-1).cumsum(axis=-1, dtype=np.int32)
    index = np.broadcast_to(np.arange(window.shape[-1], dtype=np.int32), window.shape)
    starts = np.maximum.accumulate(np.where(np.concatenate([first, ends], axis=-1), index, 0), axis=-1)
    return segment, index - starts


def _window(tokens: np.ndarray, eos_id: int | None) -> np.ndarray | dict[str, np.ndarray]:
    if eos_id is None:
        return tokens
    segment, positions = document_segments(tokens, eos_id)
    return {"tokens": tokens, "segment_ids": segment, "positions": positions}


def shuffled(n: int, seed: int) -> grain.MapDataset:
    """Window indices ``0..n-1`` shuffled with ``seed``, reshuffled every epoch, repeated: grain's shuffle over an
    index range (13 us an element here, 32 us over a data source, whose every read grain also instruments)."""
    return grain.MapDataset.range(n).shuffle(seed=seed).repeat(None)


def _tagged(k: int, j: int) -> tuple[int, int]:
    return k, j


class PackedWindows:
    """Random-access source of ``seq_len + 1``-token windows over a token stream (grain data source); with
    ``eos_id`` (document masking) each window comes with its segment ids and positions."""

    def __init__(self, tokens: np.ndarray, seq_len: int, eos_id: int | None = None):
        self.tokens, self.seq_len, self.eos_id = tokens, seq_len, eos_id
        self.n = (len(tokens) - 1) // seq_len

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray | dict[str, np.ndarray]:
        return _window(self.raw(i), self.eos_id)

    def raw(self, i: int) -> np.ndarray:
        start = int(i) * self.seq_len
        return np.asarray(self.tokens[start: start + self.seq_len + 1], dtype=np.int32)


class ShardReadError(SourceError):
    """A record of a prepared shard does not read; the message names the shard and the document."""


class PreparedWindows:
    """``seq_len + 1``-token windows over the token stream of a prepared split (its shards' documents in order),
    read from the shards on demand: a window's documents are found through each shard's lengths file, and at most
    ``open_shards`` shards are open at a time, without read-ahead (random access; with it, the readers' buffers
    made the loader's memory grow with the corpus: 250 -> 394 MB for 10x the tokens, 200 MB flat without)."""

    def __init__(self, data: PreparedData, split: str, seq_len: int, eos_id: int | None = None,
                 open_shards: int = 64):
        self.data, self.split, self.seq_len, self.eos_id, self.open_shards = data, split, seq_len, eos_id, open_shards
        self.files = data.files(split)
        self.shard_start = np.concatenate([[0], np.cumsum([s["tokens"] for s in data.manifest["shards"][split]])])
        self.n = max(0, (int(self.shard_start[-1]) - 1) // seq_len)
        self._open: collections.OrderedDict = collections.OrderedDict()
        self._starts: dict[int, np.ndarray] = {}  # each shard's document starts, kept once read (8 bytes a document)

    def __len__(self) -> int:
        return self.n

    def __getstate__(self) -> dict:  # to a loader worker: without this process's open readers
        return {**self.__dict__, "_open": collections.OrderedDict()}

    def __getitem__(self, i: int) -> np.ndarray | dict[str, np.ndarray]:
        return _window(self.raw(i), self.eos_id)

    def raw(self, i: int) -> np.ndarray:
        return self.tokens(int(i) * self.seq_len, self.seq_len + 1)

    def _shard(self, k: int):
        if k in self._open:
            self._open.move_to_end(k)
            return self._open[k]
        from array_record.python.array_record_module import ArrayRecordReader

        try:  # random access: no read-ahead (its buffers were most of the loader's memory, and wasted on a window)
            shard, lengths = self.data.local_files(self.split, k)  # a bucket's: from the host's cache
            reader = ArrayRecordReader(str(shard), "readahead_buffer_size:0")
            if k not in self._starts:
                self._starts[k] = np.concatenate([[0], np.cumsum(np.load(lengths).astype(np.int64))])
        except storage.StorageError:
            raise
        except (OSError, ValueError, RuntimeError) as e:  # array_record raises these for a damaged file
            raise ShardReadError(self._damaged(k, None, e)) from None
        self._open[k] = (reader, self._starts[k])
        if len(self._open) > self.open_shards:
            self._open.popitem(last=False)[1][0].close()
        return self._open[k]

    def _damaged(self, k: int, document: int | None, e: Exception) -> str:
        where = f"{self.files[k]}" + (f", document {document}" if document is not None else "")
        return (f"{where} cannot be read ({fault_reason(e)}): the shard is damaged; gptjax-data verify "
                f"{self.data.path} checks every shard against the manifest, and gptjax-data prepare with the same "
                "inputs prepares the damaged ones again, to the same bytes")

    def tokens(self, start: int, count: int) -> np.ndarray:
        """``count`` tokens of the stream from position ``start``: the documents they lie in are read with one call
        per shard (a record read decompresses its 64-record chunk: 64 us for one record, 62 us for three together;
        a 257-token window of the loader benchmark's corpus spans about three documents)."""
        out = np.empty(count, np.int32)
        filled = 0
        while filled < count:
            g = start + filled
            k = int(np.searchsorted(self.shard_start, g, side="right")) - 1
            reader, doc_start = self._shard(k)
            local = g - int(self.shard_start[k])
            end = min(local + count - filled, int(doc_start[-1]))
            first = int(np.searchsorted(doc_start, local, side="right")) - 1
            last = int(np.searchsorted(doc_start, end, side="left"))  # documents [first, last) hold [local, end)
            try:
                docs = np.frombuffer(b"".join(reader.read(list(range(first, last)))), self.data.dtype)
            except (OSError, ValueError, RuntimeError, IndexError) as e:
                raise ShardReadError(self._damaged(k, first, e)) from None
            off = local - int(doc_start[first])
            if len(docs) < off + end - local:  # records shorter than the lengths file says
                raise ShardReadError(self._damaged(k, first, ValueError("a record is shorter than its length")))
            out[filled: filled + end - local] = docs[off: off + end - local]
            filled += end - local
        return out


def _split(batch: np.ndarray | dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A batch as the model API takes it: inputs, next-token targets, and the loss mask (every target counts in
    pretraining; fine-tuning masks prompts and padding); with document masking, the inputs' segment ids and
    positions."""
    if isinstance(batch, dict):
        return {**_split(batch["tokens"]), "segment_ids": batch["segment_ids"][:, :-1],
                "positions": batch["positions"][:, :-1]}
    return {"inputs": batch[:, :-1], "targets": batch[:, 1:], "loss_mask": np.ones(batch[:, 1:].shape, np.float32)}


def _split_windows(windows: np.ndarray, eos_id: int | None) -> dict[str, np.ndarray]:
    """A batch of bare windows (``[rows, seq_len + 1]``) split as :func:`_split` splits them, the segments of all
    rows computed at once."""
    if eos_id is None:
        return _split(windows)
    segment, positions = document_segments(windows, eos_id)
    return _split({"tokens": windows, "segment_ids": segment, "positions": positions})


def train_dataset(tokens: np.ndarray | PackedWindows | PreparedWindows | Mixture, seq_len: int, global_batch: int,
                  seed: int, process_index: int = 0, process_count: int = 1, workers: int = 0) -> "Batches":
    """Infinite iterator dataset of this process's share (``global_batch / process_count`` rows) of each batch,
    over a token array or a windows source (``corpus.windows(seq_len)``: ``len``, ``raw(i)`` the i-th window's
    ``seq_len + 1`` tokens, ``eos_id`` None or the end-of-document id that document masking segments by), read
    by ``workers`` processes (:class:`Batches`)."""
    if global_batch % process_count:
        raise ValueError(f"global batch {global_batch} is not divisible by {process_count} processes")
    source = PackedWindows(tokens, seq_len) if isinstance(tokens, np.ndarray) else tokens
    if len(source) < global_batch:
        raise CorpusError(f"the training split has {len(source)} sequences of {seq_len + 1} tokens, fewer than one "
                          f"batch of {global_batch}; use a larger corpus or smaller batch/seq_len")
    mixture = isinstance(source, Mixture)
    order = source.order(seed) if mixture else shuffled(len(source), seed)
    per = global_batch // process_count
    # global batch b is elements [b * global_batch, (b + 1) * global_batch) of the shuffled stream, whatever the
    # process count; this process reads its contiguous slice of each. The iterator's state (batches taken) is
    # then the same number on every process, so a run saved on P processes resumes on any other count. An element
    # of the pipeline is a whole batch, read by this function (segments computed for all rows at once): with a
    # grain element per window, grain's own work per element was most of the loader's time (0.35M tokens/s
    # delivered, against 1.2M now; bench/loader_bench.py).

    def batch(b: int) -> dict[str, np.ndarray]:
        first = b * global_batch + process_index * per
        picks = [order[first + r] for r in range(per)]
        rows = [source.sources[k].raw(j) for k, j in picks] if mixture else [source.raw(j) for j in picks]
        return _split_windows(np.stack(rows), source.eos_id)

    return Batches(grain.MapDataset.range(len(order) // global_batch).map(batch), workers)


class Batches(grain.IterDataset):
    """A map dataset of batches iterated in order, read beside the trainer: by ``workers`` processes (grain's
    ``mp_prefetch``), or with 0 by one thread of the trainer's process."""

    def __init__(self, batches: grain.MapDataset, workers: int = 0):
        super().__init__()
        self.batches, self.workers = batches, workers

    def __iter__(self) -> "BatchIterator":
        return BatchIterator(self.batches, self.workers)


def _loader_worker(index: int, count: int) -> None:
    """In each loader process: a terminal's Ctrl-C and a scheduler's SIGTERM reach the whole process group, and
    are the trainer's to answer (it saves, then stops its loaders); a worker that took them printed a traceback
    from its queue while the trainer saved."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class BatchIterator(grain.DatasetIterator):
    """The batches from ``next_index`` on. Its state is ``{"next_index": batches taken}`` for any worker count
    (grain's multiprocess iterator saves one state per worker, which another worker count cannot restore): the
    readers are started from that batch, afresh after ``set_state``."""

    def __init__(self, batches: grain.MapDataset, workers: int):
        super().__init__()
        self._batches, self._workers, self._next, self._it = batches, workers, 0, None

    def _start(self):
        ds = self._batches[self._next:].to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4))
        if self._workers:
            from absl import flags

            if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; a gptjax script parses none
                flags.FLAGS.mark_as_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._workers, per_worker_buffer_size=4),
                                worker_init_fn=_loader_worker)
        return iter(ds)

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:
            self._it = self._start()
        batch = next(self._it)
        self._next += 1
        return batch

    def get_state(self) -> dict:
        return {"next_index": self._next}

    def set_state(self, state: dict) -> None:
        self.close()
        self._next = int(state["next_index"])

    def close(self) -> None:
        """Stop the readers (worker processes end with them)."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "close"):
            it.close()


def eval_batches(tokens: np.ndarray | PackedWindows | PreparedWindows, seq_len: int, batch: int,
                 max_batches: int) -> list[dict[str, np.ndarray]]:
    """Fixed validation batches: the first ``max_batches * batch`` windows, in order (the same every eval)."""
    source = PackedWindows(tokens, seq_len) if isinstance(tokens, np.ndarray) else tokens
    if len(source) < batch:
        raise CorpusError(f"the validation split has {len(source)} sequences of {seq_len + 1} tokens, fewer than "
                          f"one batch of {batch}; raise data.val_fraction or lower the batch size")
    n = min(max_batches, len(source) // batch)
    return [_split(_stack([source[b * batch + i] for i in range(batch)])) for b in range(n)]


def _stack(windows: list) -> np.ndarray | dict[str, np.ndarray]:
    if isinstance(windows[0], dict):
        return {k: np.stack([w[k] for w in windows]) for k in windows[0]}
    return np.stack(windows)
