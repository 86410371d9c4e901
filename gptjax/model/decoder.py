"""The decoder-only transformer: embeddings, a stack of pre-norm blocks, final norm, (un)embedding.

``ModelConfig.scan_layers`` picks the layer layout and execution:

* ``True``: the blocks' parameters are stacked on a leading ``layers`` axis and run under ``jax.lax.scan``
  (one compiled block: compile time flat in depth; what large models use).
* ``False``: one set of parameters per layer (``blocks/0``, ``blocks/1``, ...), run as an unrolled loop
  (faster on CPU: no per-layer slicing of stacked weights, no stacked-gradient updates).

``stack_layers`` / ``unstack_layers`` convert parameters between the two layouts. ``ModelConfig.remat`` picks
the rematerialisation policy for either.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gptjax.config import ModelConfig
from gptjax.model.attention import Attention
from gptjax.model.layers import MLP, Norm, param, rope_angles
from gptjax.model.ops import DTYPES, einsum
from gptjax.sharding.rules import constrain

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    # keep the weight-projection outputs (named in ops.einsum), recompute norms, activations and attention
    "save_dots": jax.checkpoint_policies.save_only_these_names("matmul"),
}

ACT_BxLxD = ("batch", "length", "act_embed")


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = Norm(cfg, cfg.d_model)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = Norm(cfg, cfg.d_model)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x_BxLxD: jax.Array, window: jax.Array, rope: tuple | None) -> jax.Array:
        x_BxLxD = x_BxLxD + self.attn(self.attn_norm(x_BxLxD), window, rope)
        x_BxLxD = constrain(x_BxLxD, ACT_BxLxD)
        x_BxLxD = x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD))
        return constrain(x_BxLxD, ACT_BxLxD)


def _stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
    @nnx.split_rngs(splits=cfg.n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs: nnx.Rngs) -> Block:
        return Block(cfg, rngs)

    blocks = create(rngs)
    for _, var in nnx.iter_graph(blocks):
        if isinstance(var, nnx.Param):
            var.set_metadata("logical_axes", ("layers",) + tuple(var.get_metadata()["logical_axes"]))
    return blocks


class Decoder(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = DTYPES[cfg.dtype]
        self.embedding = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg, cfg.init_std)
        self.pos_embedding = (param(rngs, (cfg.max_seq_len, cfg.d_model), ("pos", "embed"), cfg, cfg.init_std / 2)
                              if cfg.positions == "learned" else None)
        self.blocks = (_stacked_blocks(cfg, rngs) if cfg.scan_layers
                       else nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layers)]))
        self.final_norm = Norm(cfg, cfg.d_model)
        self.unembedding = (None if cfg.tie_embeddings else
                            param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg, cfg.init_std))

    def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
        """Next-token logits ``[B, L, vocab]`` in float32."""
        cfg = self.cfg
        B, L = tokens_BxL.shape
        # The lookup reads a replicated table: a gather from a vocab/embed-sharded table makes XLA's SPMD
        # partitioner rematerialise it inefficiently anyway (FSDP all-gathers weights before use regardless).
        table_VxD = constrain(self.embedding[...], (None, None))
        x_BxLxD = jnp.take(table_VxD, tokens_BxL, axis=0).astype(self.dtype)
        rope = None
        if cfg.positions == "learned":
            x_BxLxD = x_BxLxD + self.pos_embedding[...][:L].astype(self.dtype)[None]
        else:
            rope = rope_angles(jnp.arange(L), cfg.resolved_head_dim, cfg.rope_theta)
        x_BxLxD = constrain(x_BxLxD, ACT_BxLxD)
        x_BxLxD = self._run_blocks(x_BxLxD, rope)
        x_BxLxD = self.final_norm(x_BxLxD)
        if cfg.tie_embeddings:
            logits_BxLxV = einsum("bld,vd->blv", x_BxLxD, self.embedding[...], self.dtype, jnp.float32)
        else:
            logits_BxLxV = einsum("bld,dv->blv", x_BxLxD, self.unembedding[...], self.dtype, jnp.float32)
        return constrain(logits_BxLxV, ("batch", "length", "act_vocab"))

    def _run_blocks(self, x_BxLxD: jax.Array, rope: tuple | None) -> jax.Array:
        cfg = self.cfg
        windows = cfg.layer_windows()
        if cfg.scan_layers:
            graphdef, stacked = nnx.split(self.blocks)
            block = _block_fn(cfg, graphdef, rope)
            x_BxLxD, _ = jax.lax.scan(lambda x, layer: (block(x, *layer), None), x_BxLxD,
                                      (stacked, jnp.asarray(windows, jnp.int32)))
        else:
            for layer, window in zip(self.blocks, windows):
                graphdef, state = nnx.split(layer)
                x_BxLxD = _block_fn(cfg, graphdef, rope)(x_BxLxD, state, window)
        return x_BxLxD


def _block_fn(cfg: ModelConfig, graphdef: nnx.GraphDef, rope: tuple | None):
    """``f(x, block_state, window) -> x`` for one block, rematerialised per ``cfg.remat``."""

    def f(x_BxLxD, state, window):
        return nnx.merge(graphdef, state)(x_BxLxD, window, rope)

    if cfg.remat == "none":
        return f
    return jax.checkpoint(f, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)


def stack_layers(params: dict) -> dict:
    """Per-layer parameters (``blocks/0``, ``blocks/1``, ...) -> stacked (``blocks`` with a leading layer axis)."""
    blocks = params["blocks"]
    layers = [blocks[i] for i in sorted(blocks)]
    return {**params, "blocks": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}


def unstack_layers(params: dict, n_layers: int) -> dict:
    """Stacked block parameters -> one dict per layer (the unrolled layout)."""
    return {**params, "blocks": {i: jax.tree.map(lambda a: a[i], params["blocks"]) for i in range(n_layers)}}


def abstract_decoder(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's graph definition and abstract state (``ShapeDtypeStruct`` values): nothing is allocated."""
    return nnx.split(nnx.eval_shape(lambda: Decoder(cfg, nnx.Rngs(0))))
