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

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from gptjax.config import RunConfig
from gptjax.model.sharded import Batch, ShardedModel
from gptjax.training.optimizer import make_optimizer


class Program:
    """Everything jitted for training one run config on one mesh."""

    def __init__(self, cfg: RunConfig, mesh: Mesh, total_steps: int | None = None):
        self.cfg, self.mesh = cfg, mesh
        self.model = model = ShardedModel(cfg.model, mesh, cfg.mesh.rules, context_strategy=cfg.mesh.context_strategy)
        self.tx, self.schedule = make_optimizer(cfg.optim, total_steps or cfg.optim.schedule_steps or cfg.train.steps,
                                                model.weight_decay, model.lr_multipliers)
        opt_shapes = jax.eval_shape(self.tx.init, model.abstract_params)
        opt_shardings = optax.tree_map_params(
            self.tx, lambda _, sh: sh, opt_shapes, model.param_shardings,
            transform_non_params=lambda _: model.replicated, is_leaf=lambda x: isinstance(x, NamedSharding))
        self.state_shardings = {"step": model.replicated, "params": model.param_shardings, "opt_state": opt_shardings,
                                "nonfinite": {"streak": model.replicated, "since": model.replicated}}
        counter = jax.ShapeDtypeStruct((), jnp.int32)
        shapes = {"step": counter, "params": model.abstract_params, "opt_state": opt_shapes,
                  "nonfinite": {"streak": counter, "since": counter}}
        self.abstract_state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                           shapes, self.state_shardings)

        self.init = jax.jit(self._init, out_shardings=self.state_shardings)
        self.init_from_params = jax.jit(self._state_from_params, in_shardings=(model.param_shardings,),
                                        out_shardings=self.state_shardings)
        self.train_step = jax.jit(self._train_step, in_shardings=(self.state_shardings, model.batch_sharding),
                                  out_shardings=(self.state_shardings, model.replicated), donate_argnums=0)

    # ---- pure functions ---------------------------------------------------------------------------------
    def _state_from_params(self, params: Any) -> dict:
        zero = jnp.zeros((), jnp.int32)
        return {"step": zero, "params": params, "opt_state": self.tx.init(params),
                "nonfinite": {"streak": zero, "since": zero}}

    def _init(self, key: jax.Array) -> dict:
        return self._state_from_params(self.model.fresh_params(key))

    def _train_step(self, state: dict, batch: Batch) -> tuple[dict, dict]:
        (_, aux), grads = jax.value_and_grad(self.model.loss, has_aux=True)(state["params"], batch)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(aux["loss"]) & jnp.isfinite(aux["z_loss"]) & jnp.isfinite(grad_norm)
        # A non-finite step leaves params and optimizer state as they were. A conditional rather than a
        # per-element select: selecting between new and old made XLA copy every donated optimizer-state buffer
        # at the start of the step (the new value and the fallback both read the old one), which is the whole
        # Adam state held twice through the activation peak (about 700 MB at gpt2ish).
        params, opt_state = jax.lax.cond(finite, self._apply_update, lambda operands: operands[:2],
                                         (state["params"], state["opt_state"], grads))
        streak, step = state["nonfinite"]["streak"], state["step"] + 1
        nonfinite = {"streak": jnp.where(finite, 0, streak + 1),
                     "since": jnp.where(finite, 0, jnp.where(streak == 0, step, state["nonfinite"]["since"]))}
        metrics = {"loss": aux["loss"], "z_loss": aux["z_loss"], "grad_norm": grad_norm,
                   "lr": self.schedule(state["step"]), "finite": finite}
        return {"step": step, "params": params, "opt_state": opt_state, "nonfinite": nonfinite}, metrics

    def _apply_update(self, operands: tuple) -> tuple:
        params, opt_state, grads = operands
        updates, opt_state = self.tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def global_batch(self, local: dict[str, Any]) -> Batch:
        return self.model.global_batch(local)
