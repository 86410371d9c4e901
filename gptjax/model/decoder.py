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
from gptjax.config import axes as ax
from gptjax.config.dtypes import DTYPES
from gptjax.model.attention import Attention, MaskSpec
from gptjax.model.cache import KVCache, write_at
from gptjax.model.layers import MLP, Norm, param, param_metadata, rope_angles
from gptjax.model.ops import einsum
from gptjax.sharding.rules import constrain

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    # keep the weight-projection outputs (named in ops.einsum), recompute norms, activations and attention
    "save_dots": jax.checkpoint_policies.save_only_these_names("matmul"),
}


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = Norm(cfg, cfg.d_model)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = Norm(cfg, cfg.d_model)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x_BxLxD: jax.Array, window: jax.Array, rope: tuple | None, mask: MaskSpec,
                 kv: tuple | None = None) -> tuple[jax.Array, tuple | None]:
        attn_BxLxD, kv = self.attn(self.attn_norm(x_BxLxD), window, rope, mask, kv)
        x_BxLxD = constrain(x_BxLxD + attn_BxLxD, ax.ACT_BxLxD)
        x_BxLxD = x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD))
        return constrain(x_BxLxD, ax.ACT_BxLxD), kv


def _stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
    @nnx.split_rngs(splits=cfg.n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs: nnx.Rngs) -> Block:
        return Block(cfg, rngs)

    blocks = create(rngs)
    for _, var in nnx.iter_graph(blocks):
        if isinstance(var, nnx.Param):
            var.set_metadata("logical_axes", (ax.LAYERS,) + tuple(var.get_metadata()["logical_axes"]))
    return blocks


class Decoder(nnx.Module):
    """Decoder-only transformer.

    * ``model(tokens_BxL, positions_BxL=None, segment_ids_BxL=None) -> logits_BxLxV`` (float32). Positions
      default to ``0..L-1``; with segment ids a token attends only to earlier tokens of its own segment (packed
      documents), so each document's logits are those it would get alone (given positions restarting at 0).
    * ``model.decode(tokens_BxL, cache, positions_BxL=None, segment_ids_BxL=None) -> (logits_BxLxV, cache)``:
      the same computation reading and extending a :class:`KVCache` (prefill with the prompt, then one token
      at a time); positions default to the cache's slot numbers.
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = DTYPES[cfg.dtype]
        self.embedding = param(rngs, (cfg.vocab_size, cfg.d_model), (ax.VOCAB, ax.EMBED), cfg, cfg.init_std,
                               decay=False, role="embedding")
        self.pos_embedding = (param(rngs, (cfg.max_seq_len, cfg.d_model), (ax.POS, ax.EMBED), cfg,
                                    cfg.init_std / 2, decay=False, role="embedding")
                              if cfg.positions == "learned" else None)
        self.blocks = (_stacked_blocks(cfg, rngs) if cfg.scan_layers
                       else nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layers)]))
        self.final_norm = Norm(cfg, cfg.d_model)
        self.unembedding = (None if cfg.tie_embeddings else
                            param(rngs, (cfg.d_model, cfg.vocab_size), (ax.EMBED, ax.VOCAB), cfg, cfg.init_std,
                                  role="output"))

    def __call__(self, tokens_BxL: jax.Array, positions_BxL: jax.Array | None = None,
                 segment_ids_BxL: jax.Array | None = None) -> jax.Array:
        """Next-token logits ``[B, L, vocab]`` in float32."""
        return self.unembed(self._forward(tokens_BxL, positions_BxL, segment_ids_BxL, None)[0])

    def decode(self, tokens_BxL: jax.Array, cache: KVCache, positions_BxL: jax.Array | None = None,
               segment_ids_BxL: jax.Array | None = None, logits_at_B: jax.Array | None = None
               ) -> tuple[jax.Array, KVCache]:
        """Logits of ``tokens_BxL`` fed after what ``cache`` holds, and the extended cache. ``logits_at_B``: only
        each row's logits at that index (``[B, 1, vocab]``), as a prefill needs: all of them were most of the
        time of a 16 x 512 prefill on CPU (a 134 MB float32 array for the tiny model's 4096-token vocabulary)."""
        hidden_BxLxD, cache = self._forward(tokens_BxL, positions_BxL, segment_ids_BxL, cache, logits_at_B)
        return self.unembed(hidden_BxLxD), cache

    def features(self, tokens_BxL: jax.Array, positions_BxL: jax.Array | None = None,
                 segment_ids_BxL: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """``(hidden_BxLxD, logits_BxLxV)``: the final-normed hidden states, which a task head reads (GPT-1 §3.2),
        and the next-token logits."""
        hidden_BxLxD = self._forward(tokens_BxL, positions_BxL, segment_ids_BxL, None)[0]
        return hidden_BxLxD, self.unembed(hidden_BxLxD)

    def hidden(self, tokens_BxL: jax.Array, positions_BxL: jax.Array | None = None,
               segment_ids_BxL: jax.Array | None = None) -> jax.Array:
        """The final-normed hidden states ``[B, L, D]``, without the logits (the fused loss unembeds them)."""
        return self._forward(tokens_BxL, positions_BxL, segment_ids_BxL, None)[0]

    def head(self) -> tuple[jax.Array, bool]:
        """The unembedding matrix and whether it is ``[V, D]`` (tied to the embedding) rather than ``[D, V]``."""
        cfg = self.cfg
        w = self.embedding[...] if cfg.tie_embeddings else self.unembedding[...]
        if cfg.width_mult != 1.0:  # μP's output multiplier, on the weights so the fused loss applies it too
            w = w * jnp.asarray(1.0 / cfg.width_mult, w.dtype)
        return w, cfg.tie_embeddings

    def init_cache(self, batch: int, slots: int | None = None) -> KVCache:
        return KVCache.init(self.cfg, batch, slots)

    def coordinates(self, tokens_BxL: jax.Array) -> dict[str, jax.Array]:
        """The residual stream after the embedding and after each block, and the logits: what μP's coordinate
        check measures across widths (``gptjax.experiments.mup``)."""
        trace: dict[str, jax.Array] = {}
        trace["logits"] = self.unembed(self._forward(tokens_BxL, None, None, None, trace=trace)[0])
        return trace

    def unembed(self, hidden_BxLxD: jax.Array) -> jax.Array:
        """The next-token logits ``[B, L, vocab]`` (float32) of final-normed hidden states: every entry point is
        :meth:`_forward`'s hidden states, with this head applied or not."""
        cfg = self.cfg
        if cfg.tie_embeddings:
            logits_BxLxV = einsum("bld,vd->blv", hidden_BxLxD, self.embedding[...], self.dtype, jnp.float32)
        else:
            logits_BxLxV = einsum("bld,dv->blv", hidden_BxLxD, self.unembedding[...], self.dtype, jnp.float32)
        if cfg.width_mult != 1.0:  # μP: the output multiplier 1/m
            logits_BxLxV = logits_BxLxV * (1.0 / cfg.width_mult)
        return constrain(logits_BxLxV, (ax.BATCH, ax.LENGTH, ax.ACT_VOCAB))

    def _forward(self, tokens_BxL, positions_BxL, segment_ids_BxL, cache, logits_at_B=None,
                 trace: dict | None = None) -> tuple[jax.Array, KVCache | None]:
        """``(hidden_BxLxD, cache)``: the final-normed hidden states (only at ``logits_at_B`` where given) and the
        extended cache (None without one)."""
        cfg = self.cfg
        B, L = tokens_BxL.shape
        if positions_BxL is None and cache is not None:
            start = cache.index[:, None] if cache.per_row else cache.index
            positions_BxL = jnp.broadcast_to(start + jnp.arange(L, dtype=jnp.int32), (B, L))
        # The lookup reads a replicated table: a gather from a vocab/embed-sharded table makes XLA's SPMD
        # partitioner rematerialise it inefficiently anyway (FSDP all-gathers weights before use regardless).
        table_VxD = constrain(self.embedding[...], (None, None))
        x_BxLxD = jnp.take(table_VxD, tokens_BxL, axis=0).astype(self.dtype)
        rope = None
        if cfg.positions == "learned":
            pos_BxLxD = (self.pos_embedding[...][:L][None] if positions_BxL is None
                         else jnp.take(self.pos_embedding[...], positions_BxL, axis=0))
            x_BxLxD = x_BxLxD + pos_BxLxD.astype(self.dtype)
        else:
            rope = rope_angles(L if positions_BxL is None else positions_BxL, cfg.resolved_head_dim,
                               cfg.rope_theta)
        if cache is None:
            mask = MaskSpec(0, segment_ids_BxL, segment_ids_BxL)
        else:  # the cache remembers every slot's segment (1 when none is given), so later calls mask by it
            q_seg_BxL = (jnp.ones((B, L), jnp.int32) if segment_ids_BxL is None
                         else segment_ids_BxL.astype(jnp.int32))
            # a call that fills every slot starts at slot 0 (a prefill into a cache of its own length): saying so
            # statically makes it self-attention, for which the causal kernels (blockwise, cuDNN) apply
            offset = 0 if cache.slots == L else cache.index
            k_seg_BxS = write_at(cache.segment_ids_BxS, q_seg_BxL, offset)
            mask = MaskSpec(offset, q_seg_BxL, k_seg_BxS)
        x_BxLxD = constrain(x_BxLxD, ax.ACT_BxLxD)
        if trace is not None:
            trace["embedding"] = x_BxLxD
        x_BxLxD, kv = self._run_blocks(x_BxLxD, rope, mask, cache, trace)
        if logits_at_B is not None:
            x_BxLxD = jnp.take_along_axis(x_BxLxD, logits_at_B[:, None, None], axis=1)
        x_BxLxD = self.final_norm(x_BxLxD)
        if cache is not None:
            cache = KVCache(kv[0], kv[1], mask.k_segment_ids_BxS, cache.index + L)
        return x_BxLxD, cache

    def _run_blocks(self, x_BxLxD: jax.Array, rope: tuple | None, mask: MaskSpec, cache: KVCache | None,
                    trace: dict | None = None):
        cfg = self.cfg
        windows = cfg.layer_windows()
        remat = cfg.remat if cache is None else "none"  # decoding takes no gradients
        if cfg.scan_layers:
            graphdef, stacked = nnx.split(self.blocks)
            if cache is None and trace is None:
                block = _block_fn(cfg, graphdef, rope, mask, remat)
                x_BxLxD, _ = jax.lax.scan(lambda x, layer: (block(x, *layer)[0], None), x_BxLxD,
                                          (stacked, jnp.asarray(windows, jnp.int32)))
                return x_BxLxD, None
            # decoding (and a trace) unrolls the layers (decoding: over the cache's per-layer buffers, see
            # gptjax/model/cache.py)
            layers = [(graphdef, jax.tree.map(lambda a, i=i: a[i], stacked)) for i in range(cfg.n_layers)]
        else:
            layers = [nnx.split(layer) for layer in self.blocks]
        ks, vs = [], []
        for i, ((graphdef, state), window) in enumerate(zip(layers, windows)):
            kv = None if cache is None else (cache.k_BxKxHxS[i], cache.v_BxKxSxH[i])
            x_BxLxD, kv = _block_fn(cfg, graphdef, rope, mask, remat)(x_BxLxD, state, window, kv)
            if trace is not None:
                trace[f"block {i}"] = x_BxLxD
            if kv is not None:
                ks.append(kv[0])
                vs.append(kv[1])
        return x_BxLxD, (None if cache is None else (tuple(ks), tuple(vs)))


def _block_fn(cfg: ModelConfig, graphdef: nnx.GraphDef, rope: tuple | None, mask: MaskSpec, remat: str):
    """``f(x, block_state, window, kv=None) -> (x, kv)`` for one block, rematerialised per ``remat``."""

    def f(x_BxLxD, state, window, kv=None):
        return nnx.merge(graphdef, state)(x_BxLxD, window, rope, mask, kv)

    if remat == "none":
        return f
    return jax.checkpoint(f, policy=REMAT_POLICIES[remat], prevent_cse=not cfg.scan_layers)


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


def abstract_params(cfg: ModelConfig) -> tuple[dict, dict]:
    """``(shapes, logical_axes)``: the parameters as ``ShapeDtypeStruct`` leaves and, in the same structure,
    the logical axis names of each (what the sharding rules map to mesh axes). Nothing is allocated."""
    _, state = abstract_decoder(cfg)
    return state.to_pure_dict(), param_metadata(state, "logical_axes")


def abstract_layer(cfg: ModelConfig, batch: int, seq: int):
    """One block of ``cfg`` on ``[batch, seq]`` tokens as a pure function, for tracing without allocating:
    ``(f, params, x)`` with ``f(params, x_BxLxD) -> x_BxLxD`` (self-attention over the whole sequence,
    rematerialised by ``cfg.remat`` as training does) and abstract ``params`` and ``x``. The memory planner reads
    the residuals this function saves for its backward pass."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Block(cfg, nnx.Rngs(0))))
    x = jax.ShapeDtypeStruct((batch, seq, cfg.d_model), DTYPES[cfg.dtype])

    def f(state, x_BxLxD):
        rope = rope_angles(seq, cfg.resolved_head_dim, cfg.rope_theta) if cfg.positions == "rope" else None
        return nnx.merge(graphdef, state)(x_BxLxD, seq, rope, MaskSpec())[0]

    if cfg.remat != "none":
        f = jax.checkpoint(f, policy=REMAT_POLICIES[cfg.remat])
    return f, state, x
