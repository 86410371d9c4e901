"""AdamW with warmup + cosine (or warmup-stable-decay) schedule and global-norm clipping.

Weight decay convention (GPT-3 / LLaMA / nanoGPT-style, stated): decay applies to the matrices that feed
matmuls inside the blocks (attention and MLP projections) and to an untied output projection; it is not applied
to norms, biases, token embeddings or position embeddings. With tied embeddings the shared table is not decayed.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from gptjax.config import OptimConfig

NO_DECAY_NAMES = ("embedding", "pos_embedding")


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


def decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay: rank >= 2 and not an (input/position) embedding table.
    Stacked block weights (``blocks/<name>``, scan layout) carry a leading layer axis, so their rank is one
    more than the matrix's; per-layer weights (``blocks/<i>/<name>``) do not."""

    def keep(path, leaf) -> bool:
        keys = [getattr(p, "key", getattr(p, "idx", p)) for p in path]
        stacked = "blocks" in keys and not isinstance(keys[keys.index("blocks") + 1], int)
        return leaf.ndim - stacked >= 2 and keys[-1] not in NO_DECAY_NAMES

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = lr_schedule(cfg, total_steps)
    tx = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask)
    if cfg.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
    return tx, schedule
