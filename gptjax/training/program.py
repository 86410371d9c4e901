"""The compiled training program: sharded state init, train step and eval step over a mesh.

Train state is a plain pytree ``{"step", "params", "opt_state"}`` (params as a pure dict of arrays, the model's
structure kept in a static ``GraphDef``), so every function here is pure and runs under ``jax.jit`` with explicit
in/out shardings derived from the logical-axis rules. Optimizer state is sharded like its parameters.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gptjax.config import RunConfig
from gptjax.model.decoder import Decoder, abstract_decoder
from gptjax.sharding.rules import activation_sharding, logical_sharding, make_rules, param_logical_axes
from gptjax.training.optimizer import make_optimizer

Batch = dict[str, jax.Array]


def cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean next-token NLL, mean log(Z)^2), both in float32."""
    logits_BxLxV = logits_BxLxV.astype(jnp.float32)
    lse_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
    target_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.mean(lse_BxL - target_BxL), jnp.mean(jnp.square(lse_BxL))


class Program:
    """Everything jitted for one run config on one mesh."""

    def __init__(self, cfg: RunConfig, mesh: Mesh, total_steps: int | None = None):
        self.cfg, self.mesh = cfg, mesh
        self.rules = make_rules(cfg.mesh.rules)
        self.graphdef, abstract_vars = abstract_decoder(cfg.model)
        self.logical_axes = param_logical_axes(abstract_vars)
        self.tx, self.schedule = make_optimizer(cfg.optim, total_steps or cfg.train.steps)
        self.replicated = NamedSharding(mesh, P())

        shapes = jax.eval_shape(self._init, jax.random.key(0))
        self.param_shardings = jax.tree.map(
            lambda names, s: logical_sharding(names, mesh, self.rules, s.shape, "/".join(map(str, names))),
            self.logical_axes, shapes["params"], is_leaf=lambda x: isinstance(x, tuple))
        opt_shardings = optax.tree_map_params(
            self.tx, lambda _, sh: sh, shapes["opt_state"], self.param_shardings,
            transform_non_params=lambda _: self.replicated,
            is_leaf=lambda x: isinstance(x, NamedSharding))
        self.state_shardings = {"step": self.replicated, "params": self.param_shardings, "opt_state": opt_shardings}
        self.abstract_state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                           shapes, self.state_shardings)
        self.batch_sharding = logical_sharding(("batch", "length"), mesh, self.rules)

        self.init = jax.jit(self._init, out_shardings=self.state_shardings)
        self.train_step = jax.jit(self._train_step, in_shardings=(self.state_shardings, self.batch_sharding),
                                  out_shardings=(self.state_shardings, self.replicated), donate_argnums=0)
        self.eval_step = jax.jit(self._eval_step, in_shardings=(self.param_shardings, self.batch_sharding),
                                 out_shardings=self.replicated)
        self.forward = jax.jit(self._forward, in_shardings=(self.param_shardings, None))

    # ---- pure functions ---------------------------------------------------------------------------------
    def _init(self, key: jax.Array) -> dict:
        params = nnx.split(Decoder(self.cfg.model, nnx.Rngs(params=key)))[1].to_pure_dict()
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": self.tx.init(params)}

    def _forward(self, params: Any, tokens_BxL: jax.Array) -> jax.Array:
        with activation_sharding(self.mesh, self.rules):
            return nnx.merge(self.graphdef, params)(tokens_BxL)

    def _loss(self, params: Any, batch: Batch) -> tuple[jax.Array, dict]:
        nll, z = cross_entropy(self._forward(params, batch["inputs"]), batch["targets"])
        return nll + self.cfg.model.z_loss * z, {"loss": nll, "z_loss": z}

    def _train_step(self, state: dict, batch: Batch) -> tuple[dict, dict]:
        (_, aux), grads = jax.value_and_grad(self._loss, has_aux=True)(state["params"], batch)
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {**aux, "grad_norm": optax.global_norm(grads), "lr": self.schedule(state["step"])}
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    def _eval_step(self, params: Any, batch: Batch) -> jax.Array:
        return self._loss(params, batch)[1]["loss"]

    # ---- host helpers -----------------------------------------------------------------------------------
    def global_batch(self, local: dict[str, Any]) -> Batch:
        """Assemble the global batch from this process's rows (``make_array_from_process_local_data``)."""
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in local.items()}
