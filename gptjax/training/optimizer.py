"""AdamW with warmup + cosine (or warmup-stable-decay) schedule and global-norm clipping.

Weight decay applies to the parameters created with ``weight_decay`` metadata set (``model/layers.param``): by
the GPT-3 / LLaMA convention the matrices that feed matmuls (attention and MLP projections, an untied output
projection), not norms, biases, token or position embeddings (a tied table is not decayed). The optimizer
reads that metadata (``ShardedModel.weight_decay``); it knows no parameter names.
"""

from __future__ import annotations

from typing import Any

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


def make_optimizer(cfg: OptimConfig, total_steps: int,
                   decay_mask: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (+ clipping) and its schedule; ``decay_mask`` is a tree of bools shaped like the params."""
    schedule = lr_schedule(cfg, total_steps)
    tx = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask)
    if cfg.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
    return tx, schedule
