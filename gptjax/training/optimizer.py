"""AdamW (or Muon for the hidden matrices) with warmup + cosine (or warmup-stable-decay) schedule and global-norm
clipping.

Weight decay applies to the parameters created with ``weight_decay`` metadata set (``model/layers.param``): by
the GPT-3 / LLaMA convention the matrices that feed matmuls (attention and MLP projections, an untied output
projection), not norms, biases, token or position embeddings (a tied table is not decayed). The optimizer
reads that metadata (``ShardedModel.weight_decay``); it knows no parameter names.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from gptjax.config import OptimConfig


def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(total_steps, warmup + 1), end)
    decay = max(1, int(round(cfg.decay_fraction * total_steps)))
    stable = max(total_steps - warmup - decay, 0)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.lr, warmup), optax.constant_schedule(cfg.lr),
         optax.linear_schedule(cfg.lr, end, decay)],
        [warmup, warmup + stable])


MUON_RMS = 0.2  # Muon's update scaled to AdamW's typical RMS (Liu et al. 2025, "Muon is scalable"): one lr for both


def make_optimizer(cfg: OptimConfig, total_steps: int, decay_mask: Any, lr_multipliers: Any = None,
                   muon_dims: Any = None) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (+ clipping) and its schedule; ``decay_mask`` is a tree of bools shaped like the params.
    ``lr_multipliers`` (μP, ``ShardedModel.lr_multipliers``): a tree of per-parameter factors on the learning rate
    (weight decay included, as AdamW's decay is scaled by the learning rate); None: plain AdamW.

    ``optim.name=muon`` (``muon_dims``: ``ShardedModel.muon_dims``, each hidden matrix's reduction and output axes,
    None for the rest): ``optax.contrib.muon``: Nesterov momentum orthogonalised by 5 Newton-Schulz steps for the
    hidden matrices (attention and MLP projections; a scan-stacked layers axis is a batch axis), their update
    scaled by ``0.2 * sqrt(max(fan_in, fan_out))`` so that it has AdamW's RMS and the one ``optim.lr`` and schedule
    serve both, decayed by ``optim.weight_decay``; the embedding, an untied unembedding, norms and biases take AdamW
    (``b1``, ``b2``, ``eps``; Nesterov momentum too, as optax's Muon applies it to both) without weight decay, as
    nanochat and modded-nanogpt split them. Sharded like the params (the momentum is one buffer per parameter):
    under FSDP / tensor parallelism XLA all-gathers each matrix's momentum for the Newton-Schulz matmuls and keeps
    the result sharded, one matrix-sized gather per hidden matrix per step."""
    schedule = lr_schedule(cfg, total_steps)
    if cfg.name == "muon":
        from optax.contrib import MuonDimensionNumbers, muon

        dims = jax.tree.map(lambda d: None if d is None else MuonDimensionNumbers(*d), muon_dims,
                            is_leaf=lambda x: x is None or (isinstance(x, tuple) and len(x) == 2
                                                            and all(isinstance(a, tuple) for a in x)))
        tx = muon(schedule, beta=cfg.muon_momentum, eps=cfg.eps, weight_decay=cfg.weight_decay, adam_b1=cfg.b1,
                  adam_b2=cfg.b2, adam_weight_decay=0.0, muon_weight_dimension_numbers=dims,
                  consistent_rms=MUON_RMS)
    elif lr_multipliers is None:
        tx = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask)
    else:  # optax.adamw's own chain with the factors before the learning rate
        tx = optax.chain(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
                         optax.add_decayed_weights(cfg.weight_decay, decay_mask), _scale_tree(lr_multipliers),
                         optax.scale_by_learning_rate(schedule))
    if cfg.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
    return tx, schedule


def _scale_tree(factors: Any) -> optax.GradientTransformation:
    """Multiply each update by its factor (a tree of floats shaped like the params)."""
    def update(updates, state, params=None):
        return jax.tree.map(lambda u, f: u * f if f != 1.0 else u, updates, factors), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
