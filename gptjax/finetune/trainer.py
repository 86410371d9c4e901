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

A fine-tune is a client of ``gptjax/training``, not a second trainer: :class:`FinetuneProgram` is its objective and
its start (a :class:`~gptjax.training.program.TrainProgram`), and the run is pre-training's job frame, checkpoint
policy, step loop and hooks (``training/job.py``, ``checkpointing.py``, ``loop.py``, ``hooks.py``). So it survives
what a pre-training run survives, by construction: one writer at a time (``writer.lock``); SIGTERM / SIGINT save a
checkpoint and stop with ``Preempted`` (exit code 75; several processes agree on the step); ``--resume`` continues
exactly (the batch order is a function of the seed and the step, the position saved with each checkpoint) from the
newest intact checkpoint, and refuses settings that change the model or the trajectory, by each field's role
(``finetune.json`` holds the run's); a non-finite step applies no update; a failed write is one line naming
``errors.log``. Metrics go through the same ``Reporter`` (``metrics.jsonl``, TensorBoard, the progress bar).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gptjax.checkpoint import load_run
from gptjax.config import (ConfigError, MeshConfig, ModelConfig, OptimConfig, Role, RunConfig, check_choices,
                           role_field, role_of)
from gptjax.config import axes as ax
from gptjax.data import Tokenizer
from gptjax.finetune.data import N_SPECIAL, Encoded, TaskType, encode, read_rows
from gptjax.model import ShardedModel
from gptjax.model.accounting import flops_per_token
from gptjax.model.loss import next_token_loss
from gptjax.reporting.reporter import Reporter
from gptjax.runs import RunDir, write_atomic
from gptjax.sharding import make_mesh
from gptjax.sharding.rules import logical_sharding
from gptjax.training.checkpointing import CheckpointPolicy, RunComplete, RunSpec
from gptjax.training.hooks import CheckpointHook, Clock, Hook, LogHook, NonFiniteHook, PreemptionHook
from gptjax.training.job import run_job
from gptjax.training.loop import run_steps
from gptjax.training.optimizer import make_optimizer
from gptjax.training.perf import measure_peak_flops
from gptjax.training.program import TrainProgram

Mode = Literal["finetune", "probe", "scratch"]
NO_DEFAULT = dataclasses.MISSING


class FinetuneError(ConfigError):
    """A fine-tuning run cannot start as asked; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """A fine-tune's settings, each with its role (``gptjax/config/schema.py``): a resumed run may change only the
    cadence and execution ones (``training/checkpointing.py``)."""

    init_from: str = role_field(NO_DEFAULT, Role.TRAJECTORY)  # the pretrained run directory: its model, tokenizer
    task_type: TaskType = role_field(NO_DEFAULT, Role.PARAMETERS)  # the head's inputs and outputs
    train_file: str = role_field(NO_DEFAULT, Role.TRAJECTORY)
    test_file: str = role_field(NO_DEFAULT, Role.TRAJECTORY)  # (its labels count towards the head's outputs too)
    run_dir: str = role_field(NO_DEFAULT, Role.EXECUTION)
    mode: Mode = role_field("finetune", Role.PARAMETERS)  # a probe's head holds its feature statistics
    lm_coef: float = role_field(0.5, Role.TRAJECTORY)  # GPT-1's lambda
    lr: float = role_field(6.25e-5, Role.TRAJECTORY)  # GPT-1's
    batch_size: int = role_field(32, Role.TRAJECTORY)  # GPT-1's
    epochs: float = role_field(3.0, Role.TRAJECTORY)  # GPT-1's
    warmup_fraction: float = role_field(0.002, Role.TRAJECTORY)  # GPT-1's 0.2% of training, then linear decay to 0
    weight_decay: float = role_field(0.01, Role.TRAJECTORY)
    seed: int = role_field(0, Role.TRAJECTORY)
    log_every: int = role_field(10, Role.CADENCE)
    checkpoint_every: int = role_field(100, Role.CADENCE)
    keep_checkpoints: int = role_field(2, Role.CADENCE)
    eval_every: int = role_field(0, Role.CADENCE)  # steps between test-set evaluations (0: at the end only)
    progress: bool = role_field(True, Role.CADENCE)
    devices: int = role_field(1, Role.EXECUTION)  # local devices the batch is split over
    async_checkpoint: bool = role_field(True, Role.EXECUTION)
    max_nonfinite_skips: int = role_field(3, Role.EXECUTION)  # as train.max_nonfinite_skips

    def __post_init__(self) -> None:
        try:
            check_choices(self)
        except ConfigError as e:
            raise FinetuneError(str(e)) from None
        problems = [(self.lm_coef >= 0, f"lm_coef must be >= 0, got {self.lm_coef}"),
                    (self.lr > 0, f"lr must be > 0, got {self.lr}"),
                    (self.batch_size > 0 and self.epochs > 0 and self.checkpoint_every > 0 and self.log_every > 0
                     and self.keep_checkpoints > 0 and self.devices > 0,
                     "batch_size, epochs, checkpoint_every, log_every, keep_checkpoints and devices must be > 0"),
                    (self.eval_every >= 0 and self.max_nonfinite_skips >= 0,
                     "eval_every and max_nonfinite_skips must be >= 0"),
                    (0 <= self.warmup_fraction < 1, f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")]
        for ok, message in problems:
            if not ok:
                raise FinetuneError(message)

    @property
    def aux_coef(self) -> float:
        return 0.0 if self.mode == "probe" else self.lm_coef

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FinetuneConfig":
        """The config a run's ``finetune.json`` holds (a field added since takes its default)."""
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise FinetuneError(f"unknown fine-tuning setting(s) {unknown}")
        return cls(**d)

    def roles(self) -> dict[str, Role]:
        return {f.name: role_of(self, f.name) for f in dataclasses.fields(self)}

    def differences(self, other: "FinetuneConfig") -> dict[str, tuple[Any, Any]]:
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}



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


class FinetuneProgram(TrainProgram):
    """A fine-tune's objective and start, trained by ``gptjax/training``: the task loss plus ``aux_coef`` times the
    LM loss on the task's text (``metrics``: ``loss``, the total; ``task_loss``; ``lm_loss``), AdamW on GPT-1's
    schedule (linear warmup, linear decay to 0; a probe trains the head only), from the pretrained decoder with its
    vocabulary extended and a new head (``scratch``: a fresh decoder). Parameters are ``{"decoder", "head"}``."""

    def __init__(self, cfg: FinetuneConfig, task: TaskModel, steps: int, pretrained_vocab: int, train: Encoded):
        self.cfg, self.task, self.pretrained_vocab, self.train = cfg, task, pretrained_vocab, train
        model = task.decoder
        head_shapes = {"w": (task.cfg.d_model, task.n_out), "b": (task.n_out,)}
        if cfg.mode == "probe":
            head_shapes.update(mean=(task.cfg.d_model,), std=(task.cfg.d_model,))
        head = {k: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=model.replicated)
                for k, shape in head_shapes.items()}
        abstract = {"decoder": model.abstract_params, "head": head}
        shardings = {"decoder": model.param_shardings, "head": {k: model.replicated for k in head}}
        tx, schedule = self._optimizer(steps, abstract)
        # the batch's rows split over the batch axes; its other dimensions (choices, length) stay whole
        self.rows = logical_sharding((ax.BATCH,), model.mesh, model.rules)
        super().__init__(model, abstract, shardings, tx, schedule, self.rows)

    def _optimizer(self, steps: int, params: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
        """Pre-training's optimizer (``training/optimizer.py``) set to GPT-1's fine-tuning recipe: AdamW (0.9,
        0.999, 1e-8), weight decay on every parameter, no clipping, a linear warmup over ``warmup_fraction`` of the
        steps then a linear decay to 0 over the rest (warmup-stable-decay with no stable phase). A probe freezes
        all but the head's weights."""
        c = self.cfg
        warmup = int(c.warmup_fraction * steps)
        recipe = OptimConfig(lr=c.lr, schedule="wsd", warmup_steps=warmup, decay_fraction=(steps - warmup) / steps,
                             min_lr_ratio=0.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=c.weight_decay, grad_clip=0.0)
        adamw, schedule = make_optimizer(recipe, steps, jax.tree.map(lambda _: True, params))
        if c.mode != "probe":
            return adamw, schedule
        labels = {"decoder": jax.tree.map(lambda _: "frozen", params["decoder"]),  # (a tree: optax's sharding
                  "head": {k: "train" if k in ("w", "b") else "frozen" for k in params["head"]}}  # walk needs one)
        return optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, labels), schedule

    def loss(self, params: dict, batch: dict) -> tuple[jax.Array, dict]:
        logits_BxC, lm = self.task.logits_and_lm(params, batch, self.cfg.mode == "probe")
        task = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, batch["labels"]).mean()
        total = task + self.cfg.aux_coef * lm
        return total, {"loss": total, "task_loss": task, "lm_loss": lm}

    def global_batch(self, local: dict[str, Any]) -> dict:
        return {k: jax.make_array_from_process_local_data(self.rows, v) for k, v in local.items()}

    def initial_state(self) -> dict:
        return self.init_from_params(self.initial_params())

    def initial_params(self) -> dict:
        key = jax.random.key(self.cfg.seed)
        k_vocab, k_head, k_init = jax.random.split(key, 3)
        if self.cfg.mode == "scratch":
            decoder = self.model.init_params(k_init)
        else:
            pretrained = load_run(self.cfg.init_from, None, self.mesh, tokenizer=False).params
            pretrained_cfg = dataclasses.replace(self.task.cfg, vocab_size=self.pretrained_vocab)
            decoder = self.model.put_params(extend_vocabulary(pretrained, pretrained_cfg, k_vocab))
        head = self.task.init_head(k_head)
        if self.cfg.mode == "probe":
            head.update(self._feature_statistics(decoder))
        return {"decoder": decoder, "head": head}

    def _feature_statistics(self, decoder: dict, examples: int = 512) -> dict:
        """Mean and standard deviation of the frozen features over (up to) the first ``examples`` training
        examples: a probe reads them standardised, as a linear probe on features that vary little around a large
        mean needs (the default model's on the novels task: std 0.23 against |mean| 0.46)."""
        pooled = jax.jit(lambda p, b: self.task.features(p, b, frozen=True)[0])
        data, n = self.train, min(examples, len(self.train))
        feats = [np.asarray(jax.device_get(pooled(decoder, data.take(np.arange(i, min(i + 64, n))))))
                 .reshape(-1, self.task.cfg.d_model) for i in range(0, n, 64)]
        feats = np.concatenate(feats)
        return {"mean": jnp.asarray(feats.mean(0)), "std": jnp.asarray(feats.std(0) + 1e-6)}


def epoch_steps(examples: int, batch_size: int) -> int:
    """Steps in one epoch of ``examples`` (the last partial batch is dropped; at least one)."""
    return max(1, examples // batch_size)


class TaskBatches:
    """The training batches in order: step ``s`` draws from epoch ``s // steps_per_epoch`` in that epoch's own
    seeded order, so the batch is a function of the seed and the step. Its state (the next step) is saved with each
    checkpoint and restored on resume, as a pre-training run's data position is."""

    def __init__(self, data: Encoded, batch_size: int, seed: int):
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.steps_per_epoch = epoch_steps(len(data), batch_size)
        self.step = 0

    def batch(self, step: int) -> dict[str, np.ndarray]:
        epoch, i = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.data))
        return self.data.take(order[i * self.batch_size:(i + 1) * self.batch_size])

    def __iter__(self) -> "TaskBatches":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        self.step += 1
        return self.batch(self.step - 1)

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict | bytes) -> None:
        self.step = int((json.loads(state) if isinstance(state, bytes) else state)["step"])

    def start_prefetch(self) -> None:  # (grain's restore calls it)
        pass


class AccuracyHook(Hook):
    """Every ``every`` steps (not at the end, which the run scores itself): the test accuracy, paused out of the
    throughput."""

    def __init__(self, every: int, finetuner: "Finetuner", reporter: Reporter, clock: Clock):
        self.every, self.finetuner, self.reporter, self.clock = every, finetuner, reporter, clock

    def after_step(self, step, end, state, metrics):
        if not self.every or step % self.every or step == self.finetuner.steps:
            return
        with self.clock.paused(state):
            accuracy = self.finetuner.accuracy(state["params"])[0]
        self.reporter.eval(step, test_accuracy=accuracy)


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
        self.steps_per_epoch = epoch_steps(len(self.data["train"]), cfg.batch_size)
        self.steps = max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        self.program = FinetuneProgram(cfg, self.model, self.steps, self.pretrained_vocab, self.data["train"])
        self._eval = jax.jit(lambda params, batch: self.model.logits_and_lm(params, batch, cfg.mode == "probe")[0])
        self.state: dict | None = None

    def spec(self) -> RunSpec:
        """What the checkpoint policy knows of this run: ``finetune.json`` holds its settings."""
        c = self.cfg
        return RunSpec(c, c.run_dir, self.steps, c.checkpoint_every, c.keep_checkpoints, c.async_checkpoint,
                       RunDir.FINETUNE, read_finetune_config, hint="Resume with the run's own settings; for others "
                       "choose another --run-dir (--init-from may name a pre-training run only).")

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
        run = self.run_dir
        if run.has_checkpoint_step() and not run.finetune_record.is_file():
            raise FinetuneError(f"{run.path} holds a pre-training run (checkpoint step "
                                f"{max(int(p.name) for p in run.checkpoints.iterdir() if p.name.isdigit())}, no "
                                f"{run.FINETUNE}): give it as --init-from and choose another --run-dir")
        try:
            return run_job(self.spec(), resume, None, lambda policy: self._run(policy, stop_after))
        except RunComplete as done:
            s, nan = done.summary, float("nan")
            return FinetuneResult(run.path, done.step, s.get("accuracy", nan), s.get("accuracy_stderr", nan),
                                  s.get("n_test", 0), s.get("chance", nan), s.get("train_loss"),
                                  complete_already=True)

    def _run(self, policy: CheckpointPolicy, stop_after: int | None) -> FinetuneResult:
        run, cfg, program = self.run_dir, self.cfg, self.program
        is_main = jax.process_index() == 0
        batches = TaskBatches(self.data["train"], cfg.batch_size, cfg.seed)
        state = policy.initial_state(program, batches)  # (a pretrained run that does not load: nothing written)
        start = int(jax.device_get(state["step"]))
        if is_main:
            write_atomic(run.finetune_record, json.dumps({"config": cfg.to_dict(),
                                                          "model": dataclasses.asdict(self.model_cfg),
                                                          "n_out": self.n_out}, indent=2))
        end = self.steps if stop_after is None else min(stop_after, self.steps)
        reporter = Reporter(run, enabled=is_main, progress=cfg.progress, total_steps=self.steps, initial_step=start,
                            desc=f"finetune ({cfg.mode})")
        clock = Clock()
        _, S, L = self.data["train"].tokens.shape
        log_hook = LogHook(cfg.log_every, reporter, clock, cfg.batch_size * S * L, flops_per_token(self.model_cfg, L),
                           measure_peak_flops(self.model_cfg.dtype, seconds=0.2), self.mesh.size,
                           lambda step: {"epochs": step / self.steps_per_epoch})
        preemption = PreemptionHook(policy, batches, clock)
        hooks = [log_hook, NonFiniteHook(cfg.max_nonfinite_skips, cfg.log_every, policy, reporter,
                                         setting="max_nonfinite_skips", advice="Lower --lr, or check the task data."),
                 AccuracyHook(cfg.eval_every, self, reporter, clock), CheckpointHook(policy, batches, clock, reporter),
                 preemption]
        try:
            state, _ = run_steps(program, batches, state, start, end, hooks, reporter, clock)
            self.state = state
            if end < self.steps:
                return FinetuneResult(run.path, end, float("nan"), float("nan"), 0, float("nan"), log_hook.last_loss)
            acc, n = self.accuracy(state["params"])
            reporter.eval(self.steps, test_accuracy=acc)
        finally:
            preemption.close()
            reporter.close()
        se = math.sqrt(acc * (1 - acc) / (n - 1)) if n > 1 else float("nan")
        chance = float(np.bincount(self.data["test"].labels).max() / n) if self.n_out > 1 else 1 / self.n_classes
        policy.checkpointer.wait()  # the summary describes a run whose final checkpoint is written
        if is_main:
            run.write_summary({"mode": cfg.mode, "task_type": cfg.task_type, "lm_coef": cfg.aux_coef,
                               "steps": self.steps, "accuracy": acc, "accuracy_stderr": se, "n_test": n,
                               "chance": chance, "train_loss": log_hook.last_loss,
                               "truncated": int(self.data["train"].truncated + self.data["test"].truncated)})
        return FinetuneResult(run.path, self.steps, acc, se, n, chance, log_hook.last_loss)


def read_finetune_config(run: RunDir) -> FinetuneConfig | None:
    """The settings a fine-tuning run directory was started with (``finetune.json``); None where there are none."""
    record = run.finetune_record
    if not record.is_file():
        return None
    try:
        return FinetuneConfig.from_dict(json.loads(record.read_text())["config"])
    except (ValueError, KeyError, TypeError) as e:
        raise FinetuneError(f"{record} does not read as a fine-tuning run's settings ({e}); restore it, or choose "
                            "another --run-dir") from None


def finetune(cfg: FinetuneConfig, resume: bool = False, stop_after: int | None = None) -> FinetuneResult:
    return Finetuner(cfg).run(resume, stop_after)


__all__ = ["FinetuneConfig", "FinetuneError", "FinetuneProgram", "FinetuneResult", "Finetuner", "Mode",
           "TaskBatches", "TaskModel", "extend_vocabulary", "finetune", "read_finetune_config"]
