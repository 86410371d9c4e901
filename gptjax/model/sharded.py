"""A model on a mesh: its graph, abstract parameters, their shardings, and jitted pure functions of params.

``ShardedModel`` is what every consumer of parameters shares (training adds the optimizer on top;
checkpoint restore, sampling, evaluation and export use it as is), so the logical-axis rules are applied in
exactly one way wherever params live.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gptjax.config import ContextStrategy, ModelConfig
from gptjax.config import axes as ax
from gptjax.model.cache import KVCache
from gptjax.model.decoder import Decoder, abstract_decoder
from gptjax.model.layers import lr_multiplier, param_metadata
from gptjax.model.loss import fused_next_token_loss, next_token_loss
from gptjax.sharding.context import ContextLayout
from gptjax.sharding.rules import MeshAxes, activation_sharding, logical_sharding, make_rules, tree_shardings

Batch = dict[str, jax.Array]  # inputs, targets, loss_mask [, positions, segment_ids]: each [B, L]


class ShardedModel:
    def __init__(self, cfg: ModelConfig, mesh: Mesh, rules: Mapping[str, MeshAxes] | None = None, *,
                 context_strategy: ContextStrategy | str = ContextStrategy.GATHER):
        """``rules``: overrides of the logical-axis rules; ``context_strategy``: how attention reaches the keys of
        a sequence split over the mesh's context axis (``mesh.context_strategy``)."""
        self.cfg, self.mesh = cfg, mesh
        self.rules = make_rules(rules)
        self.context_strategy = ContextStrategy(context_strategy)
        self.graphdef, abstract_vars = abstract_decoder(cfg)
        self.logical_axes = param_metadata(abstract_vars, "logical_axes")
        self.weight_decay = param_metadata(abstract_vars, "weight_decay")
        # Adam learning-rate factors by μP role (None under the standard parametrization: the optimizer is AdamW)
        self.lr_multipliers = (jax.tree.map(lambda role: lr_multiplier(role, cfg), param_metadata(abstract_vars,
                                                                                                "mup_role"))
                               if cfg.parametrization == "mup" else None)
        # Muon's view of each hidden matrix (None: the parameter is AdamW's): the embed axis is the input of a
        # projection into the residual stream's heads / MLP and the output of one back into it; a scan-stacked
        # layers axis is a batch axis (each layer's matrix orthogonalised on its own)
        self.muon_dims = jax.tree.map(_muon_dims, self.logical_axes, param_metadata(abstract_vars, "mup_role"),
                                      is_leaf=lambda x: isinstance(x, tuple))
        shapes = abstract_vars.to_pure_dict()
        self.param_shardings = tree_shardings(self.logical_axes, shapes, mesh, self.rules)
        self.abstract_params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                            shapes, self.param_shardings)
        self.replicated = NamedSharding(mesh, P())
        self.batch_sharding = logical_sharding(ax.TOKENS_BxL, mesh, self.rules)
        self.init_params = jax.jit(self.fresh_params, out_shardings=self.param_shardings)
        self.forward = jax.jit(self.apply, in_shardings=(self.param_shardings, None))
        self.eval_step = jax.jit(self._eval_step, in_shardings=(self.param_shardings, self.batch_sharding),
                                 out_shardings=self.replicated)

    # ---- pure functions (trace them inside jit) -------------------------------------------------------------
    def fresh_params(self, key: jax.Array) -> dict:
        """The initial parameters, pure (trace it inside jit: the train state is built from it); ``init_params`` is
        its jitted form, placed on the shardings."""
        return nnx.split(Decoder(self.cfg, nnx.Rngs(params=key)))[1].to_pure_dict()

    def apply(self, params: Any, tokens_BxL: jax.Array, positions_BxL: jax.Array | None = None,
              segment_ids_BxL: jax.Array | None = None) -> jax.Array:
        """Logits ``[B, L, V]`` (float32), activations constrained by the rules on this mesh."""
        order = self.layout(tokens_BxL.shape)
        if order is None:
            return self._logits(params, tokens_BxL, positions_BxL, segment_ids_BxL)
        laid = self._laid_out({"inputs": tokens_BxL, "positions": positions_BxL, "segment_ids": segment_ids_BxL},
                              order)
        return self._logits(params, laid["inputs"], laid["positions"], laid["segment_ids"])[:, np.argsort(order)]

    def layout(self, shape_BxL: tuple[int, int]) -> np.ndarray | None:
        """The order the sequence runs in on this mesh (``ContextLayout.order``): ``None`` (as given), or with
        the zig-zag strategy and a context split the zig-zag order, which balances causal attention's work."""
        return ContextLayout.of(self.mesh, self.rules, shape_BxL, self.context_strategy).order(shape_BxL[1])

    @staticmethod
    def _laid_out(batch: Batch, order: np.ndarray) -> Batch:
        """Every ``[B, L]`` entry of ``batch`` in ``order``; positions (the slots, when not given) go along, so
        positional encodings see each token's own slot."""
        B, L = batch["inputs"].shape
        if batch.get("positions") is None:
            batch = {**batch, "positions": jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))}
        return {k: None if v is None else v[:, order] for k, v in batch.items()}

    def _logits(self, params: Any, tokens_BxL, positions_BxL, segment_ids_BxL) -> jax.Array:
        with activation_sharding(self.mesh, self.rules, self.context_strategy):
            return nnx.merge(self.graphdef, params)(tokens_BxL, positions_BxL, segment_ids_BxL)

    def features(self, params: Any, tokens_BxL: jax.Array, positions_BxL: jax.Array | None = None,
                 segment_ids_BxL: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """``(hidden_BxLxD, logits_BxLxV)`` (``Decoder.features``) on this mesh, the sequence as given."""
        with activation_sharding(self.mesh, self.rules, self.context_strategy):
            return nnx.merge(self.graphdef, params).features(tokens_BxL, positions_BxL, segment_ids_BxL)

    def decode(self, params: Any, tokens_BxL: jax.Array, cache: KVCache, positions_BxL: jax.Array | None = None,
               segment_ids_BxL: jax.Array | None = None, logits_at_B: jax.Array | None = None
               ) -> tuple[jax.Array, KVCache]:
        with activation_sharding(self.mesh, self.rules, self.context_strategy):
            return nnx.merge(self.graphdef, params).decode(tokens_BxL, cache, positions_BxL, segment_ids_BxL,
                                                           logits_at_B)

    def loss(self, params: Any, batch: Batch) -> tuple[jax.Array, dict]:
        """``(nll + z_loss coefficient * z, aux)`` on a batch; ``aux["loss"]`` is the masked mean nll."""
        order = self.layout(batch["inputs"].shape)
        if order is not None:  # the loss is a sum over tokens: lay the targets out as the inputs, not the logits back
            batch = self._laid_out(batch, order)
        args = (batch["inputs"], batch.get("positions"), batch.get("segment_ids"))
        if self.cfg.loss_chunk:
            with activation_sharding(self.mesh, self.rules, self.context_strategy):
                model = nnx.merge(self.graphdef, params)
                hidden_BxLxD, (head, vocab_major) = model.hidden(*args), model.head()
            return fused_next_token_loss(hidden_BxLxD, head, batch["targets"], batch.get("loss_mask"),
                                         vocab_major=vocab_major, chunk=self.cfg.loss_chunk, dtype=model.dtype,
                                         z_coef=self.cfg.z_loss)
        nll, aux = next_token_loss(self._logits(params, *args), batch["targets"], batch.get("loss_mask"))
        return nll + self.cfg.z_loss * aux["z_loss"], {**aux, "loss": nll}

    def _eval_step(self, params: Any, batch: Batch) -> dict:
        return self.loss(params, batch)[1]

    # ---- host helpers -------------------------------------------------------------------------------------
    def init_cache(self, batch: int, slots: int | None = None, per_row: bool = False) -> KVCache:
        cache = KVCache.init(self.cfg, batch, slots, per_row=per_row)
        return jax.device_put(cache, cache.shardings(self.mesh, self.rules))

    def global_batch(self, local: Mapping[str, Any]) -> Batch:
        """Assemble the global batch from this process's rows (``make_array_from_process_local_data``)."""
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in local.items()}

    def put_params(self, params: Any) -> Any:
        """Host (or differently placed) params onto this mesh's shardings."""
        return jax.device_put(jax.tree.map(jnp.asarray, params), self.param_shardings)


def _muon_dims(axes: tuple, role: str) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """``(reduction axes, output axes)`` of a hidden matrix named by logical ``axes``; None for the rest."""
    if role != "hidden":
        return None
    dims = [i for i, name in enumerate(axes) if name != ax.LAYERS]
    embed = [i for i in dims if axes[i] == ax.EMBED]
    rest = tuple(i for i in dims if i not in embed)
    return (tuple(embed), rest) if dims[0] in embed else (rest, tuple(embed))
