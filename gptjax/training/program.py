"""The compiled training program: sharded state init, the train step, over a mesh.

Train state is a plain pytree ``{"step", "params", "opt_state", "nonfinite"}`` (params as a pure dict of arrays,
the model's structure kept in ``ShardedModel``'s static ``GraphDef``), so every function here is pure and runs under
``jax.jit`` with explicit in/out shardings derived from the logical-axis rules. Optimizer state is sharded like
its parameters.

Non-finite guard: a step whose loss or gradient norm is not finite applies no update (params and optimizer state
stay as they were; the step counter advances with the data). ``nonfinite`` counts such steps in a row
(``streak``) and remembers the step the streak started (``since``); the host stops the run past
``train.max_nonfinite_skips`` (``training/hooks.py``). So the state is never non-finite and never saved so.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from gptjax.checkpoint.restore import init_params_from
from gptjax.config import RunConfig
from gptjax.model.sharded import Batch, ShardedModel
from gptjax.training.optimizer import make_optimizer

log = logging.getLogger("gptjax")


def state_shardings_like_params(opt_shapes: Any, abstract_params: Any, param_shardings: Any, replicated: Any) -> Any:
    """Optimizer-state shardings: a leaf whose path ends with a parameter's path (its dict keys) and has that
    parameter's shape is sharded like it (Adam's moments, Muon's momentum); counters and the rest are replicated.
    (``optax.tree_map_params`` asks the optimizer to ``init`` a placeholder, which Muon's and a partition's label
    functions cannot take.)"""
    flat = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    by_path = {tuple(k.key for k in path): (leaf.shape, sh)
               for (path, leaf), sh in zip(flat, jax.tree.leaves(param_shardings))}

    def pick(path, leaf):
        keys = []
        for k in reversed(path):  # the trailing run of dict keys: the parameter's path inside the state
            if not isinstance(k, jax.tree_util.DictKey):
                break
            keys.insert(0, k.key)
        hit = by_path.get(tuple(keys))
        return hit[1] if hit is not None and hit[0] == leaf.shape else replicated

    return jax.tree_util.tree_map_with_path(pick, opt_shapes)


class TrainProgram:
    """Everything jitted for training one objective on one mesh: the sharded state, its start from parameters,
    and the train step with its non-finite guard. What is trained is the subclass's: ``loss(params, batch) ->
    (objective, metrics)`` (``metrics``: scalars, ``"loss"`` among them, each one checked for finiteness) and
    ``initial_state()`` (a fresh start); pre-training (:class:`Program`) and a fine-tune
    (``gptjax/finetune/trainer.py``) are the two, driven by the same loop and hooks (``training/loop.py``)."""

    def __init__(self, model: ShardedModel, abstract_params: Any, param_shardings: Any,
                 tx: optax.GradientTransformation, schedule: optax.Schedule, batch_sharding: Any):
        self.model, self.mesh, self.tx, self.schedule = model, model.mesh, tx, schedule
        opt_shapes = jax.eval_shape(tx.init, abstract_params)
        opt_shardings = state_shardings_like_params(opt_shapes, abstract_params, param_shardings, model.replicated)
        self.state_shardings = {"step": model.replicated, "params": param_shardings, "opt_state": opt_shardings,
                                "nonfinite": {"streak": model.replicated, "since": model.replicated}}
        counter = jax.ShapeDtypeStruct((), jnp.int32)
        shapes = {"step": counter, "params": abstract_params, "opt_state": opt_shapes,
                  "nonfinite": {"streak": counter, "since": counter}}
        self.abstract_state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                           shapes, self.state_shardings)
        self.init_from_params = jax.jit(self._state_from_params, in_shardings=(param_shardings,),
                                        out_shardings=self.state_shardings)
        self.train_step = jax.jit(self._train_step, in_shardings=(self.state_shardings, batch_sharding),
                                  out_shardings=(self.state_shardings, model.replicated), donate_argnums=0)

    # ---- what a subclass trains -------------------------------------------------------------------------
    def loss(self, params: Any, batch: Any) -> tuple[jax.Array, dict]:
        raise NotImplementedError

    def initial_state(self) -> dict:
        raise NotImplementedError

    # ---- pure functions ---------------------------------------------------------------------------------
    def _state_from_params(self, params: Any) -> dict:
        zero = jnp.zeros((), jnp.int32)
        return {"step": zero, "params": params, "opt_state": self.tx.init(params),
                "nonfinite": {"streak": zero, "since": zero}}

    def _train_step(self, state: dict, batch: Any) -> tuple[dict, dict]:
        (_, aux), grads = jax.value_and_grad(self.loss, has_aux=True)(state["params"], batch)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(grad_norm)
        for value in aux.values():
            finite = finite & jnp.isfinite(value)
        # A non-finite step leaves params and optimizer state as they were. A conditional rather than a
        # per-element select: selecting between new and old made XLA copy every donated optimizer-state buffer
        # at the start of the step (the new value and the fallback both read the old one), which is the whole
        # Adam state held twice through the activation peak (about 700 MB at gpt2ish).
        params, opt_state = jax.lax.cond(finite, self._apply_update, lambda operands: operands[:2],
                                         (state["params"], state["opt_state"], grads))
        streak, step = state["nonfinite"]["streak"], state["step"] + 1
        nonfinite = {"streak": jnp.where(finite, 0, streak + 1),
                     "since": jnp.where(finite, 0, jnp.where(streak == 0, step, state["nonfinite"]["since"]))}
        metrics = {**aux, "grad_norm": grad_norm, "lr": self.schedule(state["step"]), "finite": finite}
        return {"step": step, "params": params, "opt_state": opt_state, "nonfinite": nonfinite}, metrics

    def _apply_update(self, operands: tuple) -> tuple:
        params, opt_state, grads = operands
        updates, opt_state = self.tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def global_batch(self, local: dict[str, Any]) -> Any:
        return self.model.global_batch(local)


class Program(TrainProgram):
    """Pre-training one run config: the model's next-token loss (``{"loss", "z_loss"}``), AdamW on its schedule
    (``training/optimizer.py``), a start from ``train.seed`` or from ``train.init_from``'s parameters."""

    def __init__(self, cfg: RunConfig, mesh: Mesh, total_steps: int | None = None):
        self.cfg = cfg
        model = ShardedModel(cfg.model, mesh, cfg.mesh.rules, context_strategy=cfg.mesh.context_strategy)
        tx, schedule = make_optimizer(cfg.optim, total_steps or cfg.optim.schedule_steps or cfg.train.steps,
                                      model.weight_decay, model.lr_multipliers, model.muon_dims)
        super().__init__(model, model.abstract_params, model.param_shardings, tx, schedule, model.batch_sharding)
        self.init = jax.jit(self._init, out_shardings=self.state_shardings)

    def loss(self, params: Any, batch: Batch) -> tuple[jax.Array, dict]:
        objective, aux = self.model.loss(params, batch)
        return objective, {"loss": aux["loss"], "z_loss": aux["z_loss"]}

    def initial_state(self) -> dict:
        if self.cfg.train.init_from:
            log.info("initialising the parameters from %s (fresh optimizer state)", self.cfg.train.init_from)
            return self.init_from_params(init_params_from(self.cfg.train.init_from, self.model))
        return self.init(jax.random.key(self.cfg.train.seed))

    def _init(self, key: jax.Array) -> dict:
        return self._state_from_params(self.model.fresh_params(key))
