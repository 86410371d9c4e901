"""The generation engine: prefill and decode through the KV cache, continuous batching over a fixed number of
slots, speculative decoding with a draft model, on one device or on a mesh.

* **Slots.** The engine holds one KV cache of ``slots`` rows with an index per row (``KVCache(per_row=True)``):
  each row is its own sequence at its own length. A request waits until a slot is free; it is then prefilled
  (a causal forward pass over its prompt into a cache of the prompt's padded length, which also gives its first
  token; waiting prompts of one length bucket together, up to ``prefill_tokens`` a call) and its keys and values
  are copied into the slot's row, while the other slots keep decoding; every step decodes one token for every busy
  slot. Batched generation is the same loop with every prompt queued at once.
* **No recompilation per request.** Prompts are padded on the right to a bucket (the powers of two from 16 up to
  the cache length) and prefilled in batches of 1, 2, 4, ... rows: at most ``log2(max_len) x log2(slots)`` prefill
  compilations; the padding is written to the cache beyond the row's index, where causality hides it until the
  row's own tokens overwrite it. The decode step (and the speculative step) compiles once; rows differ in their
  sampling settings as arrays, not as constants.
* **Length.** A request whose prompt plus ``max_new_tokens`` does not fit the cache (``max_seq_len`` by default)
  is refused with one error naming the numbers; nothing is cut silently.
* **Speculative decoding** (Leviathan et al. 2023; Chen et al. 2023): with a draft model, every step drafts
  ``draft_tokens`` tokens per busy row with the draft, scores them all in one target pass, keeps each draft token
  with probability ``min(1, p / q)`` and, at the first rejection, samples from ``max(0, p - q)`` normalised (or
  from the target's next distribution when all were kept): the output is distributed exactly as the target's. In
  greedy mode a draft token is kept iff it is the target's argmax, so the output is the target's greedy output.
  Each row rewinds its own cache index by what it rejected. Acceptance per draft position is counted in
  ``stats``.

Requests finish at the end-of-sequence token, at a stop string (cut from the text), or after ``max_new_tokens``.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import threading
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.inference.sampling import (TOP_LOGPROBS, GenerationConfig, GenerationError, RowSettings, filter_logits,
                                       row_keys, sample)
from gptjax.config import axes as ax
from gptjax.model import KVCache, ShardedModel
from gptjax.sharding import logical_sharding

MIN_BUCKET = 16


@dataclasses.dataclass
class Completion:
    """One request's result: the generated ``token_ids`` (without the end-of-sequence token), each one's
    log-probability under the model and the model's most likely alternatives, the ``text`` (with a tokenizer),
    and why it ended: ``"stop"`` (end of sequence or a stop string), ``"length"`` (``max_new_tokens``),
    ``"cancelled"`` or ``"error"`` (``error`` says what failed). With ``prompt_logprobs`` asked for, the prompt's
    tokens' log-probabilities (``None`` for the first, which has no context) and alternatives."""

    prompt_ids: list[int]
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top_logprobs: list[dict[int, float]] = dataclasses.field(default_factory=list)
    text: str | None = None
    finish_reason: str | None = None
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[dict[int, float] | None] | None = None
    error: str | None = None


class ContextOverflow(GenerationError):
    """A prompt and its new tokens do not fit a cache row; ``room``: the most new tokens that would (<= 0: the prompt
    alone does not fit)."""

    def __init__(self, room: int, message: str):
        super().__init__(message)
        self.room = room


@dataclasses.dataclass
class Request:
    prompt_ids: list[int]
    config: GenerationConfig
    on_text: Callable[[str], None] | None = None  # receives each new piece of text as it is produced
    on_finish: Callable[["Request"], None] | None = None  # called once the request has ended (any reason)
    prompt_logprobs: bool = False  # also score the prompt's tokens (OpenAI's echo with logprobs)
    completion: Completion = None  # type: ignore[assignment]
    emitted: int = 0  # characters of text handed to on_text
    cancelled: bool = False  # set by the caller (a client went away): the row is freed at the next step
    done: threading.Event = dataclasses.field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.completion = Completion(list(self.prompt_ids))


@dataclasses.dataclass
class SpeculativeStats:
    """Draft tokens proposed and accepted at each draft position, rounds run and tokens produced."""

    proposed: np.ndarray
    accepted: np.ndarray
    rounds: int = 0
    tokens: int = 0

    @property
    def acceptance(self) -> np.ndarray:
        """The fraction of draft tokens kept, per draft position."""
        return self.accepted / np.maximum(self.proposed, 1)

    @property
    def tokens_per_round(self) -> float:
        return self.tokens / max(self.rounds, 1)


def bucket(length: int, max_len: int) -> int:
    """The padded length a prompt of ``length`` tokens is prefilled at: the next power of two (at least
    ``MIN_BUCKET``), capped at ``max_len``."""
    return min(max_len, max(MIN_BUCKET, 1 << max(0, math.ceil(math.log2(max(length, 1))))))


class Engine:
    """Generation from ``model`` (a ``ShardedModel``, on one device or a mesh) with ``params``. ``tokenizer``
    (optional) turns text prompts into ids and ids into text; ``slots``: rows decoded together; ``max_len``: cache
    length per row (default ``max_seq_len``); ``draft``: ``(ShardedModel, params)`` of a draft model with the same
    vocabulary for speculative decoding, proposing ``draft_tokens`` tokens a step; ``prefill_tokens``: the most prompt
    tokens one prefill call takes (prompts of one length bucket are prefilled together)."""

    def __init__(self, model: ShardedModel, params: Any, tokenizer: Any = None, *, slots: int = 8,
                 max_len: int | None = None, draft: tuple[ShardedModel, Any] | None = None, draft_tokens: int = 4,
                 prefill_tokens: int = 1024):
        cfg = model.cfg
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.max_len = max_len or cfg.max_seq_len
        if not 1 < self.max_len <= cfg.max_seq_len:
            raise GenerationError(f"max_len={self.max_len} must be in [2, model.max_seq_len={cfg.max_seq_len}]")
        if not (isinstance(slots, int) and slots >= 1):
            raise GenerationError(f"slots must be a positive integer, got {slots!r}")
        self.slots, self.vocab = slots, cfg.vocab_size
        # rows held: at least 2 (one slot decodes beside an idle row). With a batch of one, XLA:CPU fused the
        # cache's in-place update into each of its readers and copied every layer's buffers at every step (gpt2ish:
        # 57 ms a step at batch 1, 32 ms as one busy row of 2; the idle row's attention costs little).
        self.held = max(slots, 2)
        # Prompts of one length bucket are prefilled together, up to this many tokens a call. On 2 CPU cores
        # (tiny model, 512-token prompts) a call of 2 prompts took 31 ms a prompt, 1 took 38, 8 took 37 and 16
        # took 73: past a few thousand tokens the attention's intermediates no longer fit the caches. An
        # accelerator wants far larger calls: raise it there.
        self.prefill_tokens = prefill_tokens
        self.eos_id = getattr(tokenizer, "eos_id", None)
        self.draft = draft
        self.draft_tokens = draft_tokens
        if draft is not None:
            if draft[0].cfg.vocab_size != cfg.vocab_size:
                raise GenerationError(f"the draft model's vocabulary ({draft[0].cfg.vocab_size}) differs from the "
                                      f"target's ({cfg.vocab_size}); speculative decoding needs the same tokenizer")
            if draft[0].cfg.max_seq_len < self.max_len:
                raise GenerationError(f"the draft model's context ({draft[0].cfg.max_seq_len}) is shorter than "
                                      f"max_len={self.max_len}")
            if not (isinstance(draft_tokens, int) and draft_tokens >= 1):
                raise GenerationError(f"draft_tokens must be a positive integer, got {draft_tokens!r}")
        # a speculative round writes its draft tokens past a row's last token: keep that room in every row
        self.spare = draft_tokens if draft is not None else 0
        self.stats = SpeculativeStats(np.zeros(draft_tokens, np.int64), np.zeros(draft_tokens, np.int64))
        self.cache = model.init_cache(self.held, self.max_len, per_row=True)
        self.draft_cache = draft[0].init_cache(self.held, self.max_len, per_row=True) if draft else None
        self._seen_sharding = logical_sharding((ax.BATCH, None), model.mesh, model.rules, (self.held, self.vocab))
        self.seen = self._no_tokens_seen()
        self.last_B = np.zeros(self.held, np.int32)  # the token each row feeds next
        self.rows: list[Request | None] = [None] * self.held
        self.settings = RowSettings.of([GenerationConfig()] * self.held, [[0]] * self.held)
        self.waiting: collections.deque[Request] = collections.deque()
        self.lock = threading.Lock()  # submit() may be called from other threads (the server)
        # prompts are prefilled in batches of 1, 2, 4, ... rows, replicated over the batch's mesh axes (a batch
        # that small need not divide among them); the rows are then inserted into the sharded cache
        self._prefill_models = {id(m): ShardedModel(m.cfg, m.mesh, {**m.rules, ax.BATCH: None},
                                                    context_strategy=m.context_strategy)
                                for m in [model] + ([draft[0]] if draft else [])}
        self._prefill = jax.jit(self._prefill_fn, static_argnums=(0, 6))
        self._insert = jax.jit(self._insert_fn, donate_argnums=(0, 1))
        self._decode = jax.jit(self._decode_fn, donate_argnums=(1, 2))
        self._speculate = jax.jit(self._speculate_fn, donate_argnums=(1, 2, 3))

    def _no_tokens_seen(self) -> jax.Array:
        """The seen-token mask of empty rows, placed as every compiled step returns it (rows by the batch rule,
        the vocabulary whole): left to XLA, the placement changed between the start and the first step (an
        uncommitted array; on a mesh the vocabulary split over ``tensor``), and each change compiled the cache
        insert again."""
        return jax.device_put(np.zeros((self.held, self.vocab), bool), self._seen_sharding)

    def _placed(self, seen_BxV: jax.Array) -> jax.Array:
        return jax.lax.with_sharding_constraint(seen_BxV, self._seen_sharding)

    # ---- requests -------------------------------------------------------------------------------------------
    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise GenerationError("a text prompt needs a tokenizer; give token ids or an engine with one")
            if not prompt:
                raise GenerationError("the prompt is empty; give some text")
            return list(self.tokenizer.encode(prompt))
        ids = [int(t) for t in prompt]
        if not ids:
            raise GenerationError("the prompt is empty; give at least one token")
        if min(ids) < 0 or max(ids) >= self.vocab:
            raise GenerationError(f"prompt token ids must be in [0, {self.vocab}), got {min(ids)}..{max(ids)}")
        return ids

    def request(self, prompt: str | Sequence[int], config: GenerationConfig = GenerationConfig(),
                on_text: Callable[[str], None] | None = None, **options) -> Request:
        """A checked request: the prompt and ``max_new_tokens`` must fit a cache row."""
        ids = self.encode(prompt)
        if len(ids) + config.max_new_tokens + self.spare > self.max_len:
            room = self.max_len - self.spare - len(ids)
            raise ContextOverflow(
                room, f"the prompt has {len(ids)} tokens and {config.max_new_tokens} new ones were asked for: "
                f"more than the model's context of {self.max_len} tokens"
                + (f" less the {self.spare} a speculative round drafts past the end" if self.spare else "") + "; "
                + (f"ask for at most {room} new tokens" if room > 0 else "shorten the prompt"))
        if self.draft is not None and config.repetition_penalty != 1:
            raise GenerationError("repetition_penalty is not supported with a draft model (speculative decoding "
                                  "keeps the target's distribution, which a history-dependent penalty changes)")
        return Request(ids, config, on_text, **options)

    def submit(self, request: Request) -> Request:
        with self.lock:
            self.waiting.append(request)
        return request

    def generate(self, prompts: Sequence[str | Sequence[int]], config: GenerationConfig = GenerationConfig(),
                 seeds: Sequence[int] | None = None) -> list[Completion]:
        """Every prompt's completion, decoded in ``slots`` rows with continuous batching (``seeds``: one per
        prompt, default ``config.seed`` for all)."""
        requests = [self.request(p, config if seeds is None else config.replace(seed=s))
                    for p, s in zip(prompts, seeds if seeds is not None else itertools.repeat(None))]
        for r in requests:
            self.submit(r)
        while self.busy:
            self.step()
        return [r.completion for r in requests]

    def stream(self, prompt: str | Sequence[int], config: GenerationConfig = GenerationConfig()) -> Iterator[str]:
        """One prompt's text, piece by piece as it is generated (needs a tokenizer)."""
        pieces: list[str] = []
        request = self.submit(self.request(prompt, config, pieces.append))
        while not request.done.is_set():
            self.step()
            yield from pieces
            pieces.clear()

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.rows)

    # ---- the loop -------------------------------------------------------------------------------------------
    def step(self) -> None:
        """Admit waiting requests into free slots (prefill), then decode one step (or one speculative round) for
        every busy slot."""
        for b, r in enumerate(self.rows):
            if r is not None and r.cancelled:
                self._finish(b, "cancelled")
        self._admit()
        if not any(r is not None for r in self.rows):
            return
        active = np.asarray([r is not None for r in self.rows])
        positions = np.asarray([len(r.completion.token_ids) if r else 0 for r in self.rows], np.int32)
        if self.draft is None:
            out = self._decode(self.params, self.cache, self.seen, self.last_B, self.settings, positions, active)
            tok, lp, top_ids, top_lp, self.cache, self.seen = out
            tok, lp, top_ids, top_lp = jax.device_get((tok, lp, top_ids, top_lp))
            for b in np.flatnonzero(active):
                self._emit(b, [int(tok[b])], [float(lp[b])], [top_ids[b]], [top_lp[b]])
            return
        out = self._speculate(self.params, self.cache, self.draft_cache, self.seen, self.last_B, self.settings,
                              positions, active, self.draft[1])
        tokens, lps, top_ids, top_lp, n_acc, self.cache, self.draft_cache, self.seen = out
        tokens, lps, top_ids, top_lp, n_acc = jax.device_get((tokens, lps, top_ids, top_lp, n_acc))
        for b in np.flatnonzero(active):
            n = int(n_acc[b])
            self.stats.proposed[: min(n + 1, self.draft_tokens)] += 1
            self.stats.accepted[:n] += 1
            self.stats.rounds += 1
            self.stats.tokens += n + 1
            self._emit(b, [int(t) for t in tokens[b, :n + 1]], [float(x) for x in lps[b, :n + 1]],
                       list(top_ids[b, :n + 1]), list(top_lp[b, :n + 1]))

    def _admit(self) -> None:
        """Prefill waiting requests into the free slots: those whose prompts share a length bucket together, as one
        batch (its size rounded up to a power of two, the extra rows dropped), so a burst of requests is one
        forward pass rather than one per prompt."""
        taken: list[tuple[int, Request]] = []
        for b in range(self.slots):
            if self.rows[b] is not None:
                continue
            with self.lock:
                while self.waiting and self.waiting[0].cancelled:
                    self._end(self.waiting.popleft(), "cancelled")
                if not self.waiting:
                    break
                taken.append((b, self.waiting.popleft()))
        groups: dict[int, list[tuple[int, Request]]] = collections.defaultdict(list)
        for b, request in taken:
            groups[bucket(len(request.prompt_ids), self.max_len)].append((b, request))
        for P, group in groups.items():
            per_call = max(1, self.prefill_tokens // P)
            for i in range(0, len(group), per_call):
                self._prefill_group(P, group[i:i + per_call])

    def _prefill_group(self, P: int, group: list[tuple[int, Request]]) -> None:
        n = 1 << (len(group) - 1).bit_length()  # rows in the compiled batch: 1, 2, 4, ...
        padded = np.zeros((n, P), np.int32)
        lengths = np.ones(n, np.int32)
        seen = np.zeros((n, self.vocab), bool)
        slots = np.full(n, self.held, np.int32)  # rows past the group go to slot `held`: out of range, dropped
        for i, (b, request) in enumerate(group):
            ids = request.prompt_ids
            padded[i, :len(ids)], lengths[i], slots[i] = ids, len(ids), b
            seen[i, ids] = True  # the prompt's tokens count as seen for the repetition penalty
        requests = [r for _, r in group]
        settings = RowSettings.of([r.config for r in requests] + [requests[0].config] * (n - len(group)),
                                  [r.prompt_ids for r in requests] + [[0]] * (n - len(group)))
        scored = any(r.prompt_logprobs for r in requests)
        out = self._prefill(self.model, self.params, padded, lengths, settings, seen, scored)
        rows_cache, seen, tok, lp, top_ids, top_lp, prompt_lp, prompt_top_ids, prompt_top_lp = out
        self.cache, self.seen = self._insert(self.cache, self.seen, rows_cache, seen, slots)
        if self.draft is not None:
            draft_rows = self._prefill(self.draft[0], self.draft[1], padded, lengths, settings, seen, False)[0]
            self.draft_cache, _ = self._insert(self.draft_cache, None, draft_rows, None, slots)
        tok, lp, top_ids, top_lp = jax.device_get((tok, lp, top_ids, top_lp))
        if scored:
            prompt_lp, prompt_top_ids, prompt_top_lp = jax.device_get((prompt_lp, prompt_top_ids, prompt_top_lp))
        for i, (b, request) in enumerate(group):
            self.rows[b] = request
            self.settings.set_row(b, request.config, request.prompt_ids)
            if request.prompt_logprobs:
                L, c = len(request.prompt_ids), request.completion
                c.prompt_logprobs = [None] + [float(x) for x in prompt_lp[i, 1:L]]
                tops = zip(prompt_top_ids[i, :L - 1], prompt_top_lp[i, :L - 1])
                c.prompt_top_logprobs = [None] + [dict(zip(map(int, ids), map(float, x))) for ids, x in tops]
            if request.config.max_new_tokens == 0:
                self._finish(b, "length")  # only scored: its row is free again (its cache row is never read)
                continue
            self._emit(b, [int(tok[i])], [float(lp[i])], [top_ids[i]], [top_lp[i]])

    def _emit(self, b: int, tokens: list[int], logprobs: list[float], top_ids, top_lps) -> None:
        """Record row ``b``'s new tokens; finish its request at the end of sequence, a stop string or its length."""
        request = self.rows[b]
        c, cfg = request.completion, request.config
        for t, lp, ids, lps in zip(tokens, logprobs, top_ids, top_lps):
            if cfg.stop_at_eos and t == self.eos_id:
                return self._finish(b, "stop")
            c.token_ids.append(t)
            c.logprobs.append(lp)
            c.top_logprobs.append({int(i): float(x) for i, x in zip(ids, lps)})
            self.last_B[b] = t
            if self.tokenizer is not None:
                c.text = self._text(request)
                cut = min((i for i in (c.text.find(s) for s in cfg.stop) if i >= 0), default=-1)
                if cut >= 0:
                    c.text = c.text[:cut]
                    return self._finish(b, "stop")
            if len(c.token_ids) >= cfg.max_new_tokens:
                return self._finish(b, "length")
        self._flush(request, final=False)

    def _finish(self, b: int, reason: str) -> None:
        request = self.rows[b]
        self.rows[b] = None
        self._end(request, reason)

    def _end(self, request: Request, reason: str, error: str | None = None) -> None:
        request.completion.finish_reason, request.completion.error = reason, error
        if self.tokenizer is not None and request.completion.text is None:
            request.completion.text = self._text(request)
        self._flush(request, final=True)
        if request.on_finish is not None:
            request.on_finish(request)
        request.done.set()

    def abort(self, error: str) -> None:
        """End every running and waiting request with ``finish_reason="error"`` and ``error``, and start again
        from empty caches (after a failed step, whose donated buffers may be gone)."""
        with self.lock:
            requests = [r for r in self.rows if r is not None] + list(self.waiting)
            self.waiting.clear()
        self.rows = [None] * self.held
        self.cache = self.model.init_cache(self.held, self.max_len, per_row=True)
        if self.draft is not None:
            self.draft_cache = self.draft[0].init_cache(self.held, self.max_len, per_row=True)
        self.seen = self._no_tokens_seen()
        for r in requests:
            self._end(r, "error", error)

    def _text(self, request: Request) -> str:
        return self.text_after(request.prompt_ids, request.completion.token_ids)

    def text_after(self, prompt_ids: Sequence[int], token_ids: Sequence[int]) -> str:
        """The text of ``token_ids`` as they continue the prompt: decoded after the prompt's last tokens, whose
        text is then taken off (sentencepiece drops a leading space at the start of a decode, not after other
        text)."""
        ctx = list(prompt_ids[-4:])
        head, full = self.tokenizer.decode(ctx), self.tokenizer.decode(ctx + list(token_ids))
        return full[len(head):] if full.startswith(head) else self.tokenizer.decode(list(token_ids))

    def _flush(self, request: Request, final: bool) -> None:
        """Hand ``on_text`` the text produced since the last call; until the request ends, hold back what may
        still change: an unfinished UTF-8 sequence, or the start of a stop string."""
        text = request.completion.text
        if request.on_text is None or text is None:
            return
        end = len(text)
        if not final:
            if text.endswith("\ufffd"):
                end -= 1
            for s in request.config.stop:
                for k in range(min(len(s) - 1, end), 0, -1):
                    if text[:end].endswith(s[:k]):
                        end -= k
                        break
        if end > request.emitted:
            request.on_text(text[request.emitted:end])
            request.emitted = end

    # ---- compiled steps -------------------------------------------------------------------------------------
    def _prefill_fn(self, model: ShardedModel, params, tokens_NxP, length_N, settings: RowSettings, seen_NxV,
                    prompt_logprobs: bool = False):
        """Prompts (padded on the right) through fresh cache rows, and each one's first new token; with
        ``prompt_logprobs`` also each prompt token's log-probability given the ones before it (position ``t``
        holds token ``t + 1``'s) and the most likely alternatives there."""
        N, P = tokens_NxP.shape
        # a cache of exactly the prompts' padded length: the prefill is causal self-attention over P tokens (not
        # P queries against every one of max_len slots); _insert_fn moves the rows into the engine's cache
        cache = KVCache.init(model.cfg, N, P)
        logits_NxPxV, cache = self._prefill_models[id(model)].decode(
            params, tokens_NxP, cache, logits_at_B=None if prompt_logprobs else length_N - 1)
        cache = dataclasses.replace(cache, index=jnp.asarray(length_N, jnp.int32))
        last_NxV = (jnp.take_along_axis(logits_NxPxV, (length_N - 1)[:, None, None], axis=1)[:, 0] if prompt_logprobs
                    else logits_NxPxV[:, 0])
        tok, lp, top_ids, top_lp = sample(last_NxV, settings, jnp.zeros((N,), jnp.int32), seen_NxV)
        scored = (None, None, None)
        if prompt_logprobs:
            all_lp = jax.nn.log_softmax(logits_NxPxV.astype(jnp.float32), axis=-1)
            next_ids = jnp.roll(tokens_NxP, -1, axis=1)
            taken = jnp.take_along_axis(all_lp, next_ids[..., None], -1)[..., 0]
            scored = (jnp.concatenate([jnp.zeros((N, 1)), taken[:, :-1]], axis=1),
                      *jax.lax.top_k(all_lp, min(TOP_LOGPROBS, all_lp.shape[-1]))[::-1])
        return cache, seen_NxV.at[jnp.arange(N), tok].set(True), tok, lp, top_ids, top_lp, *scored

    def _insert_fn(self, cache: KVCache, seen_BxV, rows: KVCache, seen_NxV, slot_N):
        """Rows ``slot_N`` of the engine's cache (and of its seen-token mask) take the prefilled ``rows`` (their
        first P slots; the slots after hold an earlier request's entries, which the row overwrites before it
        reads them) and ``seen_NxV``; a slot out of range drops its row."""
        P = rows.segment_ids_BxS.shape[1]
        put = lambda buf, new, at: buf.at[at].set(new.astype(buf.dtype), mode="drop")  # noqa: E731
        cache = KVCache(tuple(put(c, r, (slot_N, slice(None), slice(None), slice(0, P)))
                              for c, r in zip(cache.k_BxKxHxS, rows.k_BxKxHxS)),
                        tuple(put(c, r, (slot_N, slice(None), slice(0, P)))
                              for c, r in zip(cache.v_BxKxSxH, rows.v_BxKxSxH)),
                        put(cache.segment_ids_BxS, rows.segment_ids_BxS, (slot_N, slice(0, P))),
                        put(cache.index, rows.index, slot_N))
        return cache, None if seen_BxV is None else self._placed(put(seen_BxV, seen_NxV, slot_N))

    def _decode_fn(self, params, cache: KVCache, seen, last_B, settings: RowSettings, position_B, active_B):
        logits, cache = self.model.decode(params, last_B[:, None], cache)
        tok, lp, top_ids, top_lp = sample(logits[:, 0], settings, position_B, seen)
        rows = jnp.arange(seen.shape[0])
        seen = seen.at[rows, tok].set(seen[rows, tok] | active_B)
        return tok, lp, top_ids, top_lp, _park(cache, active_B), self._placed(seen)

    def _speculate_fn(self, params, cache: KVCache, draft_cache: KVCache, seen, last_B, settings: RowSettings,
                      position_B, active_B, draft_params):
        """One speculative round for every row: ``(tokens_BxG1, logprobs, top ids, top logprobs, accepted_B,
        cache, draft_cache, seen)``; row b's new tokens are ``tokens[b, :accepted[b] + 1]``."""
        draft_model, G = self.draft[0], self.draft_tokens
        B = last_B.shape[0]
        start, draft_start = cache.index, draft_cache.index
        keys = row_keys(settings, position_B)  # one key per row and round: split for each draw
        draw = lambda j, what: jax.vmap(lambda k: jax.random.fold_in(k, 3 * j + what))(keys)  # noqa: E731
        tok, drafted, q_probs = last_B, [], []
        for j in range(G + 1):  # G proposals; the last pass only writes the G-th proposal into the draft cache
            logits, draft_cache = draft_model.decode(draft_params, tok[:, None], draft_cache)
            if j == G:
                break
            q = filter_logits(logits[:, 0].astype(jnp.float32), settings)
            greedy_tok = jnp.argmax(q, axis=-1)
            drawn = jax.vmap(jax.random.categorical)(draw(j, 0), q)
            tok = jnp.where(settings.temperature_B > 0, drawn, greedy_tok).astype(jnp.int32)
            drafted.append(tok)
            q_probs.append(jax.nn.softmax(q, axis=-1))
        d_BxG = jnp.stack(drafted, axis=1)
        q_BxGxV = jnp.stack(q_probs, axis=1)
        logits, cache = self.model.decode(params, jnp.concatenate([last_B[:, None], d_BxG], axis=1), cache)
        logits = logits.astype(jnp.float32)  # [B, G + 1, V]
        p_BxG1xV = jax.nn.softmax(filter_logits(logits.reshape(B * (G + 1), -1),
                                                jax.tree.map(lambda x: jnp.repeat(x, G + 1, axis=0), settings))
                                  .reshape(B, G + 1, -1), axis=-1)
        p_d = jnp.take_along_axis(p_BxG1xV[:, :G], d_BxG[..., None], axis=-1)[..., 0]
        q_d = jnp.take_along_axis(q_BxGxV, d_BxG[..., None], axis=-1)[..., 0]
        u = jnp.stack([jax.vmap(jax.random.uniform)(draw(j, 1)) for j in range(G)], axis=1)
        sampled_ok = u < jnp.minimum(1.0, p_d / jnp.maximum(q_d, 1e-30))
        greedy_ok = jnp.argmax(p_BxG1xV[:, :G], axis=-1) == d_BxG
        ok = jnp.where(settings.temperature_B[:, None] > 0, sampled_ok, greedy_ok)
        n = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)  # leading accepted proposals
        # the token after them: from the residual max(0, p - q) at the first rejection, from p after all G
        p_n = jnp.take_along_axis(p_BxG1xV, n[:, None, None], axis=1)[:, 0]
        q_n = jnp.take_along_axis(jnp.concatenate([q_BxGxV, jnp.zeros_like(q_BxGxV[:, :1])], axis=1),
                                  n[:, None, None], axis=1)[:, 0]
        residual = jnp.maximum(p_n - q_n, 0.0)
        residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, residual, p_n)
        drawn = jax.vmap(jax.random.categorical)(draw(G, 2), jnp.log(residual + 1e-38))
        bonus = jnp.where(settings.temperature_B > 0, drawn, jnp.argmax(p_n, axis=-1)).astype(jnp.int32)
        tokens = jnp.concatenate([d_BxG, jnp.zeros((B, 1), jnp.int32)], axis=1)
        tokens = jnp.where(jnp.arange(G + 1)[None] == n[:, None], bonus[:, None], tokens)
        logprobs_all = jax.nn.log_softmax(logits, axis=-1)
        logprobs = jnp.take_along_axis(logprobs_all, tokens[..., None], axis=-1)[..., 0]
        top_lp, top_ids = jax.lax.top_k(logprobs_all, min(TOP_LOGPROBS, logits.shape[-1]))
        # each row keeps its last token and the n accepted proposals: the rest of what was written is rewound
        cache = dataclasses.replace(cache, index=start + n + 1)
        draft_cache = dataclasses.replace(draft_cache, index=draft_start + n + 1)
        return (tokens, logprobs, top_ids, top_lp, n, _park(cache, active_B), _park(draft_cache, active_B),
                self._placed(seen))


def _park(cache: KVCache, active_B) -> KVCache:
    """Idle rows go back to slot 0 (what they wrote is never read: a new request's prefill replaces the row)."""
    return dataclasses.replace(cache, index=jnp.where(active_B, cache.index, 0))

