"""AdamW with warmup + cosine (or warmup-stable-decay) schedule and global-norm clipping.

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


def make_optimizer(cfg: OptimConfig, total_steps: int, decay_mask: Any,
                   lr_multipliers: Any = None) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (+ clipping) and its schedule; ``decay_mask`` is a tree of bools shaped like the params.
    ``lr_multipliers`` (μP, ``ShardedModel.lr_multipliers``): a tree of per-parameter factors on the learning rate
    (weight decay included, as AdamW's decay is scaled by the learning rate); None: plain AdamW."""
    schedule = lr_schedule(cfg, total_steps)
    if lr_multipliers is None:
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
