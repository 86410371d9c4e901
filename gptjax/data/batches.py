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
from typing import Sequence

import grain
import numpy as np

from gptjax.data.corpus import CorpusError
from gptjax.data.shards import PreparedData, lengths_file
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

    def stream(self, seed: int) -> grain.MapDataset:
        return grain.MapDataset.mix([grain.MapDataset.source(s).shuffle(seed=seed + k).repeat(None)
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
    """Segment ids and positions of a window of the token stream, where every document ends with ``</s>``: a
    segment starts after each ``</s>`` (and at the window's start), and positions count from 0 in each."""
    ends = window[:-1] == eos_id
    segment = np.concatenate([[0], np.cumsum(ends)]).astype(np.int32)
    starts = np.concatenate([[0], np.flatnonzero(ends) + 1])
    return segment, (np.arange(len(window)) - starts[segment]).astype(np.int32)


def _window(tokens: np.ndarray, eos_id: int | None) -> np.ndarray | dict[str, np.ndarray]:
    if eos_id is None:
        return tokens
    segment, positions = document_segments(tokens, eos_id)
    return {"tokens": tokens, "segment_ids": segment, "positions": positions}


class PackedWindows:
    """Random-access source of ``seq_len + 1``-token windows over a token stream (grain data source); with
    ``eos_id`` (document masking) each window comes with its segment ids and positions."""

    def __init__(self, tokens: np.ndarray, seq_len: int, eos_id: int | None = None):
        self.tokens, self.seq_len, self.eos_id = tokens, seq_len, eos_id
        self.n = (len(tokens) - 1) // seq_len

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray | dict[str, np.ndarray]:
        start = int(i) * self.seq_len
        return _window(np.asarray(self.tokens[start: start + self.seq_len + 1], dtype=np.int32), self.eos_id)


class ShardReadError(SourceError):
    """A record of a prepared shard does not read; the message names the shard and the document."""


class PreparedWindows:
    """``seq_len + 1``-token windows over the token stream of a prepared split (its shards' documents in order),
    read from the shards on demand: a window's documents are found through each shard's lengths file, and at most
    ``open_shards`` shards are open at a time, without read-ahead (random access; with it, the readers' buffers
    made the loader's memory grow with the corpus: 250 -> 394 MB for 10x the tokens, 200 MB flat without)."""

    def __init__(self, data: PreparedData, split: str, seq_len: int, eos_id: int | None = None,
                 open_shards: int = 64):
        self.data, self.seq_len, self.eos_id, self.open_shards = data, seq_len, eos_id, open_shards
        self.files = data.files(split)
        self.shard_start = np.concatenate([[0], np.cumsum([s["tokens"] for s in data.manifest["shards"][split]])])
        self.n = max(0, (int(self.shard_start[-1]) - 1) // seq_len)
        self._open: collections.OrderedDict = collections.OrderedDict()
        self._starts: dict[int, np.ndarray] = {}  # each shard's document starts, kept once read (8 bytes a document)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray | dict[str, np.ndarray]:
        return _window(self.tokens(int(i) * self.seq_len, self.seq_len + 1), self.eos_id)

    def _shard(self, k: int):
        if k in self._open:
            self._open.move_to_end(k)
            return self._open[k]
        from array_record.python.array_record_module import ArrayRecordReader

        try:  # random access: no read-ahead (its buffers were most of the loader's memory, and wasted on a window)
            reader = ArrayRecordReader(str(self.files[k]), "readahead_buffer_size:0")
            if k not in self._starts:
                self._starts[k] = np.concatenate([[0], np.cumsum(np.load(lengths_file(self.files[k]))
                                                                 .astype(np.int64))])
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
        """``count`` tokens of the stream from position ``start``."""
        out = np.empty(count, np.int32)
        filled = 0
        while filled < count:
            g = start + filled
            k = int(np.searchsorted(self.shard_start, g, side="right")) - 1
            reader, doc_start = self._shard(k)
            local = g - int(self.shard_start[k])
            j = int(np.searchsorted(doc_start, local, side="right")) - 1
            try:
                doc = np.frombuffer(reader.read([j])[0], self.data.dtype)
            except (OSError, ValueError, RuntimeError, IndexError) as e:
                raise ShardReadError(self._damaged(k, j, e)) from None
            off = local - int(doc_start[j])
            take = min(len(doc) - off, count - filled)
            out[filled: filled + take] = doc[off: off + take]
            filled += take
        return out


def _split(batch: np.ndarray | dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A batch as the model API takes it: inputs, next-token targets, and the loss mask (every target counts in
    pretraining; fine-tuning masks prompts and padding); with document masking, the inputs' segment ids and
    positions."""
    if isinstance(batch, dict):
        return {**_split(batch["tokens"]), "segment_ids": batch["segment_ids"][:, :-1],
                "positions": batch["positions"][:, :-1]}
    return {"inputs": batch[:, :-1], "targets": batch[:, 1:], "loss_mask": np.ones(batch[:, 1:].shape, np.float32)}


def train_dataset(tokens: np.ndarray | PackedWindows | PreparedWindows | Mixture, seq_len: int, global_batch: int,
                  seed: int, process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """Infinite iterator dataset of this process's share (``global_batch / process_count`` rows) of each batch,
    over a token array or a windows source (``corpus.windows(seq_len)``)."""
    if global_batch % process_count:
        raise ValueError(f"global batch {global_batch} is not divisible by {process_count} processes")
    source = PackedWindows(tokens, seq_len) if isinstance(tokens, np.ndarray) else tokens
    if len(source) < global_batch:
        raise CorpusError(f"the training split has {len(source)} sequences of {seq_len + 1} tokens, fewer than one "
                          f"batch of {global_batch}; use a larger corpus or smaller batch/seq_len")
    if isinstance(source, Mixture):
        stream = source.stream(seed)
    else:
        stream = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
    per = global_batch // process_count
    # global batch b is elements [b * global_batch, (b + 1) * global_batch) of the shuffled stream, whatever the
    # process count; this process reads its contiguous slice of each. The iterator's state (batches taken) is
    # then the same number on every process, so a run saved on P processes resumes on any other count.
    rows = grain.MapDataset.range(len(stream)).map(
        lambda j: stream[(j // per) * global_batch + process_index * per + j % per])
    ds = rows.batch(per, drop_remainder=True).map(_split)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4))


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
