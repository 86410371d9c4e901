"""Fine-tuning with task heads, as in GPT-1 (Radford et al. 2018, §3.2): a linear layer on the final hidden state
of each sequence's extract token, trained with the whole decoder on

    loss = task loss + lm_coef * language-modelling loss on the task's text

(``lm_coef`` 0.5 as in GPT-1; 0 turns the auxiliary loss off). Classification and entailment read one sequence;
similarity adds the two orders' representations before the head; multiple choice scores each choice's sequence
with a one-output head and takes a softmax over the choices (``gptjax/finetune/data.py``: the inputs).

Three ways to start, for the comparisons GPT-1 makes (``mode``): ``finetune`` (the pretrained decoder, all of it
trained), ``probe`` (the pretrained decoder frozen, only the head trained, on the mean of the final hidden states over
the text, standardised; no auxiliary loss: a linear probe) and ``scratch`` (the same architecture from random
initialisation, trained like ``finetune``).

The run directory works as in pretraining (:class:`gptjax.runs.RunDir`): ``finetune.json`` (this config; a
resumed run must agree with it), ``checkpoints/`` (orbax, params + optimizer state; the batch order is a function of
the seed and the step, so a resumed run draws the batches an uninterrupted one would), ``metrics.jsonl``,
``summary.json``, one writer at a time (``writer.lock``), and SIGTERM / SIGINT save a checkpoint and stop with
``Preempted`` (exit code 75: continue with ``--resume``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from gptjax.checkpoint import Checkpointer, load_run
from gptjax.config import MeshConfig, ModelConfig, RunConfig
from gptjax.data import Tokenizer
from gptjax.finetune.data import N_SPECIAL, TASK_TYPES, Encoded, encode, read_rows
from gptjax.model import ShardedModel
from gptjax.model.loss import next_token_loss
from gptjax.reporting.metrics import MetricsLog
from gptjax.runs import RunDir, WriterLock, write_atomic
from gptjax.sharding import make_mesh
from gptjax.training.hooks import Preempted

MODES = ("finetune", "probe", "scratch")


class FinetuneError(ValueError):
    """A fine-tuning run cannot start as asked; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    init_from: str  # the pretrained run directory (gptjax-train or gptjax-import): its model and tokenizer
    task_type: str
    train_file: str
    test_file: str
    run_dir: str
    mode: str = "finetune"
    lm_coef: float = 0.5  # GPT-1's lambda
    lr: float = 6.25e-5  # GPT-1's
    batch_size: int = 32  # GPT-1's
    epochs: float = 3.0  # GPT-1's
    warmup_fraction: float = 0.002  # GPT-1's 0.2% of training, then linear decay to 0
    weight_decay: float = 0.01
    seed: int = 0
    checkpoint_every: int = 100
    eval_every: int = 0  # steps between test-set evaluations (0: at the end only)
    devices: int = 1  # local devices the batch is split over

    def __post_init__(self) -> None:
        problems = [(self.task_type in TASK_TYPES, f"task_type must be one of {TASK_TYPES}, got {self.task_type!r}"),
                    (self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}"),
                    (self.lm_coef >= 0, f"lm_coef must be >= 0, got {self.lm_coef}"),
                    (self.lr > 0, f"lr must be > 0, got {self.lr}"),
                    (self.batch_size > 0 and self.epochs > 0 and self.checkpoint_every > 0,
                     "batch_size, epochs and checkpoint_every must be > 0"),
                    (0 <= self.warmup_fraction < 1, f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")]
        for ok, message in problems:
            if not ok:
                raise FinetuneError(message)

    @property
    def aux_coef(self) -> float:
        return 0.0 if self.mode == "probe" else self.lm_coef

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class FinetuneResult:
    run_dir: Path
    step: int
    accuracy: float
    accuracy_stderr: float
    n_test: int
    chance: float
    train_loss: float | None
    complete_already: bool = False


def extend_vocabulary(params: dict, cfg: ModelConfig, key: jax.Array) -> dict:
    """The pretrained parameters with ``N_SPECIAL`` new token rows (start, delimiter, extract) appended to the
    embedding (and output columns to an untied unembedding), initialised as the model initialises embeddings."""
    params = jax.device_get(params)
    k1, k2 = jax.random.split(key)
    new = np.asarray(jax.random.normal(k1, (N_SPECIAL, cfg.d_model)) * cfg.init_std, params["embedding"].dtype)
    params = {**params, "embedding": np.concatenate([params["embedding"], new])}
    if params.get("unembedding") is not None:
        cols = np.asarray(jax.random.normal(k2, (cfg.d_model, N_SPECIAL)) * cfg.init_std, params["unembedding"].dtype)
        params["unembedding"] = np.concatenate([params["unembedding"], cols], axis=1)
    return params


class TaskModel:
    """The decoder (its vocabulary extended by the special tokens) and the linear head, as pure functions of
    ``params = {"decoder": ..., "head": {"w", "b"}}`` on a mesh (the batch split over its data axis)."""

    def __init__(self, cfg: ModelConfig, task_type: str, n_out: int, mesh):
        self.cfg, self.task_type, self.n_out = cfg, task_type, n_out
        self.decoder = ShardedModel(cfg, mesh)

    def init_head(self, key: jax.Array) -> dict:
        w = jax.random.normal(key, (self.cfg.d_model, self.n_out), jnp.float32) * self.cfg.init_std
        return {"w": w, "b": jnp.zeros((self.n_out,), jnp.float32)}

    def features(self, decoder: dict, batch: dict, frozen: bool = False) -> tuple[jax.Array, jax.Array]:
        """``(h_BxSxD, logits_NxLxV)``: what the head reads for each sequence (the final hidden state at its extract
        token; ``frozen``, a linear probe: the mean over its text tokens, no gradient to the decoder), and the
        next-token logits of the ``N = B * S`` sequences."""
        tokens_BxSxL = batch["tokens"]
        B, S, L = tokens_BxSxL.shape
        hidden_NxLxD, logits_NxLxV = self.decoder.features(decoder, tokens_BxSxL.reshape(B * S, L))
        if frozen:  # the extract token's new embedding is never trained in a probe: read the text instead
            hidden_NxLxD = jax.lax.stop_gradient(hidden_NxLxD)
            lm_mask_NxL = batch["lm_mask"].reshape(B * S, L)
            text_NxL = jnp.concatenate([jnp.zeros((B * S, 1), lm_mask_NxL.dtype), lm_mask_NxL[:, :-1]], axis=1)
            h_NxD = (jnp.einsum("nld,nl->nd", hidden_NxLxD.astype(jnp.float32), text_NxL)
                     / jnp.maximum(text_NxL.sum(1, keepdims=True), 1.0))
        else:
            at_N = batch["extract_at"].reshape(B * S)
            h_NxD = jnp.take_along_axis(hidden_NxLxD, at_N[:, None, None], axis=1)[:, 0].astype(jnp.float32)
        return h_NxD.reshape(B, S, -1), logits_NxLxV

    def logits_and_lm(self, params: dict, batch: dict, frozen: bool = False) -> tuple[jax.Array, jax.Array]:
        """Task logits ``[B, C]`` (C classes or choices) and the auxiliary LM loss (masked mean nll)."""
        h_BxSxD, logits_NxLxV = self.features(params["decoder"], batch, frozen)
        head = params["head"]
        if "mean" in head:  # a probe's features, standardised by their statistics on the training set
            h_BxSxD = (h_BxSxD - head["mean"]) / head["std"]
        if self.task_type == "multiple_choice":
            logits_BxC = (h_BxSxD @ head["w"] + head["b"])[..., 0]
        else:  # one sequence, or (similarity) the two orders' representations added
            logits_BxC = h_BxSxD.sum(axis=1) @ head["w"] + head["b"]
        tokens_BxSxL = batch["tokens"]
        B, S, L = tokens_BxSxL.shape
        flat_NxL = tokens_BxSxL.reshape(B * S, L)
        targets_NxL = jnp.concatenate([flat_NxL[:, 1:], jnp.zeros((B * S, 1), flat_NxL.dtype)], axis=1)
        lm, _ = next_token_loss(logits_NxLxV, targets_NxL, batch["lm_mask"].reshape(B * S, L))
        return logits_BxC, lm


class Finetuner:
    """Builds the run (or resumes it) and trains; ``run()`` returns the test accuracy."""

    def __init__(self, cfg: FinetuneConfig):
        self.cfg = cfg
        self.run_dir = RunDir(cfg.run_dir)
        source = RunDir(cfg.init_from)
        pre: RunConfig = source.read_config()
        self.tokenizer = Tokenizer.load(source.tokenizer)
        self.pretrained_vocab = pre.model.vocab_size
        self.model_cfg = dataclasses.replace(pre.model, vocab_size=pre.model.vocab_size + N_SPECIAL)
        rows = {split: read_rows(path, cfg.task_type) for split, path in (("train", cfg.train_file),
                                                                          ("test", cfg.test_file))}
        self.data = {split: encode(r, cfg.task_type, self.tokenizer, self.pretrained_vocab, pre.model.max_seq_len)
                     for split, r in rows.items()}
        labels = np.concatenate([d.labels for d in self.data.values()])
        self.n_out = 1 if cfg.task_type == "multiple_choice" else int(labels.max()) + 1
        self.n_classes = self.data["train"].tokens.shape[1] if cfg.task_type == "multiple_choice" else self.n_out
        self.mesh = make_mesh(MeshConfig(data=cfg.devices), jax.local_devices()[:cfg.devices])
        self.model = TaskModel(self.model_cfg, cfg.task_type, self.n_out, self.mesh)
        n = len(self.data["train"])
        self.steps_per_epoch = max(1, n // cfg.batch_size)
        self.steps = max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        self.tx = self._optimizer()
        self._step = jax.jit(self._train_step, donate_argnums=0)
        self._eval = jax.jit(lambda params, batch: self.model.logits_and_lm(params, batch, cfg.mode == "probe")[0])

    # ---- state ------------------------------------------------------------------------------------------------
    def _optimizer(self) -> optax.GradientTransformation:
        c = self.cfg
        warmup = int(c.warmup_fraction * self.steps)
        schedule = optax.join_schedules([optax.linear_schedule(0.0, c.lr, max(warmup, 1)),
                                         optax.linear_schedule(c.lr, 0.0, max(self.steps - warmup, 1))], [warmup])
        adamw = optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=c.weight_decay)
        if c.mode != "probe":
            return adamw
        return optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()},
                                     lambda p: {"decoder": jax.tree.map(lambda _: "frozen", p["decoder"]),
                                                "head": {k: "train" if k in ("w", "b") else "frozen"
                                                         for k in p["head"]}})

    def initial_params(self) -> dict:
        key = jax.random.key(self.cfg.seed)
        k_vocab, k_head, k_init = jax.random.split(key, 3)
        if self.cfg.mode == "scratch":
            decoder = self.model.decoder.init_params(k_init)
        else:
            pretrained = load_run(self.cfg.init_from, None, self.mesh, tokenizer=False).params
            pretrained_cfg = dataclasses.replace(self.model_cfg, vocab_size=self.pretrained_vocab)
            decoder = self.model.decoder.put_params(extend_vocabulary(pretrained, pretrained_cfg, k_vocab))
        head = self.model.init_head(k_head)
        if self.cfg.mode == "probe":
            head.update(self._feature_statistics(decoder))
        return {"decoder": decoder, "head": head}

    def _feature_statistics(self, decoder: dict, examples: int = 512) -> dict:
        """Mean and standard deviation of the frozen features over (up to) the first ``examples`` training
        examples: a probe reads them standardised, as a linear probe on features that vary little around a large
        mean needs (the default model's on the novels task: std 0.23 against |mean| 0.46)."""
        pooled = jax.jit(lambda p, b: self.model.features(p, b, frozen=True)[0])
        data, n = self.data["train"], min(examples, len(self.data["train"]))
        feats = [np.asarray(jax.device_get(pooled(decoder, data.take(np.arange(i, min(i + 64, n))))))
                 .reshape(-1, self.model_cfg.d_model) for i in range(0, n, 64)]
        feats = np.concatenate(feats)
        return {"mean": jnp.asarray(feats.mean(0)), "std": jnp.asarray(feats.std(0) + 1e-6)}

    def _train_step(self, state: dict, batch: dict) -> tuple[dict, dict]:
        frozen = self.cfg.mode == "probe"

        def loss_fn(params):
            logits_BxC, lm = self.model.logits_and_lm(params, batch, frozen)
            task = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, batch["labels"]).mean()
            return task + self.cfg.aux_coef * lm, {"task_loss": task, "lm_loss": lm}

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, {"loss": loss, **aux}

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """The batch of ``step``: epoch ``step // steps_per_epoch`` in its own seeded order (so a resumed run
        draws what an uninterrupted one would)."""
        epoch, i = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.data["train"]))
        return self.data["train"].take(order[i * self.cfg.batch_size:(i + 1) * self.cfg.batch_size])

    def accuracy(self, params: dict, split: str = "test") -> tuple[float, int]:
        data: Encoded = self.data[split]
        parallel = self.mesh.shape["data"]
        size = -(-self.cfg.batch_size // parallel) * parallel
        right = 0
        for i in range(0, len(data), size):
            idx = np.arange(i, min(i + size, len(data)))
            batch = data.take(np.concatenate([idx, np.zeros(size - len(idx), int)]))  # padded to one shape
            preds = np.asarray(jax.device_get(self._eval(params, batch))).argmax(-1)[:len(idx)]
            right += int((preds == data.labels[idx]).sum())
        return right / len(data), len(data)

    # ---- the run ----------------------------------------------------------------------------------------------
    def run(self, resume: bool = False, stop_after: int | None = None) -> FinetuneResult:
        """Train (or continue with ``resume``) to the end, or checkpoint and stop once step ``stop_after`` is done
        (a job with a time limit: the schedule still spans every step; the result then has no accuracy)."""
        created = not self.run_dir.path.exists()
        self.run_dir.path.mkdir(parents=True, exist_ok=True)
        lock = WriterLock(self.run_dir).acquire()
        try:
            return self._run(resume, stop_after)
        except BaseException:
            if created and not self.run_dir.has_checkpoint_step():  # a refusal leaves no directory behind
                lock.release()
                shutil.rmtree(self.run_dir.path, ignore_errors=True)
            raise
        finally:
            lock.release()

    def _run(self, resume: bool, stop_after: int | None) -> FinetuneResult:
        run, cfg = self.run_dir, self.cfg
        record = run.finetune_record
        written = json.loads(record.read_text()) if record.is_file() else None
        checkpointer = Checkpointer(run.checkpoints, keep=2)
        have = checkpointer.latest_step()
        if have is not None and not resume:
            if written and written.get("config") == cfg.to_dict() and have >= self.steps and run.read_summary():
                s = run.read_summary()
                return FinetuneResult(run.path, have, s["accuracy"], s["accuracy_stderr"], s["n_test"], s["chance"],
                                      s.get("train_loss"), complete_already=True)
            if written is None:  # (it was called "a fine-tuning run" too)
                raise FinetuneError(f"{run.path} holds a pre-training run (checkpoint step {have}, no "
                                    f"{run.FINETUNE}): give it as --init-from and choose another --run-dir")
            raise FinetuneError(f"{run.path} already holds a fine-tuning run (checkpoint step {have}); continue it "
                                "with --resume or choose another --run-dir")
        if resume and written and written.get("config") != cfg.to_dict():
            diff = {k: (written["config"].get(k), v) for k, v in cfg.to_dict().items()
                    if written["config"].get(k) != v}
            raise FinetuneError(f"--resume with settings that differ from {record}: {diff} (was, now)")
        write_atomic(record, json.dumps({"config": cfg.to_dict(), "model": dataclasses.asdict(self.model_cfg),
                                         "n_out": self.n_out}, indent=2))
        params = self.initial_params()
        state = {"params": params, "opt_state": self.tx.init(params), "step": jnp.zeros((), jnp.int32)}
        if resume and have is not None:
            state = checkpointer.restore(jax.tree.map(_abstract, state))
        start = int(jax.device_get(state["step"]))
        metrics = MetricsLog(run.metrics, run.dropped_metrics)
        metrics.truncate_after(start)
        stop = _StopFlag()
        bar = tqdm(total=self.steps, initial=start, desc=f"finetune ({cfg.mode})", disable=None)
        loss = None
        end = self.steps if stop_after is None else min(stop_after, self.steps)
        try:
            for step in range(start + 1, end + 1):
                state, m = self._step(state, self.model.decoder.global_batch(self.batch(step - 1)))
                bar.update(1)
                if step % 10 == 0 or step == self.steps:
                    m = {k: float(v) for k, v in jax.device_get(m).items()}
                    loss = m["loss"]
                    metrics.write(step, **m)
                    bar.set_postfix(loss=f"{loss:.3f}")
                if cfg.eval_every and step % cfg.eval_every == 0 and step != self.steps:
                    metrics.write(step, test_accuracy=self.accuracy(state["params"])[0])
                if step % cfg.checkpoint_every == 0 or step == end or stop.received:
                    checkpointer.save(step, state)
                if stop.received and step != self.steps:
                    checkpointer.wait()
                    raise Preempted(f"pre-empted ({stop.received}) at step {step}: checkpoint saved in "
                                    f"{checkpointer.directory}; continue with --resume")
        finally:
            bar.close()
            stop.restore()
            checkpointer.close()
        self.state = state
        if end < self.steps:
            return FinetuneResult(run.path, end, float("nan"), float("nan"), 0, float("nan"), loss)
        acc, n = self.accuracy(state["params"])
        se = math.sqrt(acc * (1 - acc) / (n - 1)) if n > 1 else float("nan")
        chance = float(np.bincount(self.data["test"].labels).max() / n) if self.n_out > 1 else 1 / self.n_classes
        metrics.write(self.steps, test_accuracy=acc)
        summary = {"mode": cfg.mode, "task_type": cfg.task_type, "lm_coef": cfg.aux_coef, "steps": self.steps,
                   "accuracy": acc, "accuracy_stderr": se, "n_test": n, "chance": chance, "train_loss": loss,
                   "truncated": int(self.data["train"].truncated + self.data["test"].truncated)}
        run.write_summary(summary)
        return FinetuneResult(run.path, self.steps, acc, se, n, chance, loss)


def _abstract(x: Any) -> Any:
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


class _StopFlag:
    """SIGTERM / SIGINT set ``received``; the loop saves and stops at the next step boundary."""

    def __init__(self):
        self.received: str | None = None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._on)

    def _on(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def finetune(cfg: FinetuneConfig, resume: bool = False, stop_after: int | None = None) -> FinetuneResult:
    return Finetuner(cfg).run(resume, stop_after)


__all__ = ["FinetuneConfig", "FinetuneError", "FinetuneResult", "Finetuner", "TaskModel", "extend_vocabulary",
           "finetune"]
