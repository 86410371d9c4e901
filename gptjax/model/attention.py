"""Causal self-attention: MHA / GQA / MQA, optional qk-norm, RoPE, dense or locally banded masks."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from gptjax.config import ModelConfig
from gptjax.model.layers import Norm, apply_rope, param
from gptjax.model.ops import DTYPES, einsum, softmax
from gptjax.sharding.rules import constrain


def causal_mask(q_len: int, k_len: int, window: jax.Array | int) -> jax.Array:
    """``[q_len, k_len]`` bool: query i sees key j iff ``j <= i`` and ``i - j < window``."""
    i = jnp.arange(q_len)[:, None] + (k_len - q_len)
    j = jnp.arange(k_len)[None, :]
    return (j <= i) & (i - j < window)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, h, k, hd, std = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.resolved_head_dim, cfg.init_std
        self.n_heads, self.n_kv_heads, self.head_dim = h, k, hd
        self.dtype = DTYPES[cfg.dtype]
        self.w_q = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), cfg, std)
        self.w_k = param(rngs, (d, k, hd), ("embed", "kv_heads", "head_dim"), cfg, std)
        self.w_v = param(rngs, (d, k, hd), ("embed", "kv_heads", "head_dim"), cfg, std)
        self.w_o = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), cfg, std / math.sqrt(2 * cfg.n_layers))
        if cfg.use_bias:
            self.b_q = param(None, (h, hd), ("heads", "head_dim"), cfg, value=0.0)
            self.b_k = param(None, (k, hd), ("kv_heads", "head_dim"), cfg, value=0.0)
            self.b_v = param(None, (k, hd), ("kv_heads", "head_dim"), cfg, value=0.0)
            self.b_o = param(None, (d,), ("embed",), cfg, value=0.0)
        else:
            self.b_q = self.b_k = self.b_v = self.b_o = None
        self.q_norm = Norm(cfg, hd, "head_dim") if cfg.qk_norm else None
        self.k_norm = Norm(cfg, hd, "head_dim") if cfg.qk_norm else None

    def _project(self, x_BxLxD, w, b):
        y = einsum("bld,dnh->blnh", x_BxLxD, w[...], self.dtype)
        return y if b is None else y + b[...].astype(self.dtype)

    def __call__(self, x_BxLxD: jax.Array, window: jax.Array | int, rope: tuple | None) -> jax.Array:
        B, L, _ = x_BxLxD.shape
        K, G = self.n_kv_heads, self.n_heads // self.n_kv_heads
        q_BxLxNxH = self._project(x_BxLxD, self.w_q, self.b_q)
        k_BxLxKxH = self._project(x_BxLxD, self.w_k, self.b_k)
        v_BxLxKxH = self._project(x_BxLxD, self.w_v, self.b_v)
        if self.q_norm is not None:
            q_BxLxNxH, k_BxLxKxH = self.q_norm(q_BxLxNxH), self.k_norm(k_BxLxKxH)
        if rope is not None:
            q_BxLxNxH, k_BxLxKxH = apply_rope(q_BxLxNxH, *rope), apply_rope(k_BxLxKxH, *rope)
        q_BxLxNxH = constrain(q_BxLxNxH, ("batch", "length", "act_heads", None))
        k_BxLxKxH = constrain(k_BxLxKxH, ("batch", "length", "act_kv_heads", None))
        # Heads-major layout; the G query heads that share a key/value head are stacked along the query axis,
        # so both attention matmuls are plain batched matmuls over (batch, kv head): N = K * G.
        q_BxKxGLxH = (q_BxLxNxH.reshape(B, L, K, G, self.head_dim).transpose(0, 2, 3, 1, 4)
                      .reshape(B, K, G * L, self.head_dim) * jnp.asarray(1.0 / math.sqrt(self.head_dim), self.dtype))
        k_BxKxLxH, v_BxKxLxH = k_BxLxKxH.transpose(0, 2, 1, 3), v_BxLxKxH.transpose(0, 2, 1, 3)
        s_BxKxGLxL = einsum("bkqh,bkmh->bkqm", q_BxKxGLxH, k_BxKxLxH, self.dtype, jnp.float32,
                            name="attention")
        # additive mask (0 or the most negative float): cheaper on CPU than a select before the softmax
        bias_GLxL = jnp.tile(jnp.where(causal_mask(L, L, window), 0.0, jnp.finfo(jnp.float32).min), (G, 1))
        p_BxKxGLxL = softmax(s_BxKxGLxL + bias_GLxL).astype(self.dtype)
        o_BxKxGLxH = einsum("bkqm,bkmh->bkqh", p_BxKxGLxL, v_BxKxLxH, self.dtype, name="attention")
        o_BxLxNxH = (o_BxKxGLxH.reshape(B, K, G, L, self.head_dim).transpose(0, 3, 1, 2, 4)
                     .reshape(B, L, self.n_heads, self.head_dim))
        out_BxLxD = einsum("blnh,nhd->bld", o_BxLxNxH, self.w_o[...], self.dtype)
        return out_BxLxD if self.b_o is None else out_BxLxD + self.b_o[...].astype(self.dtype)
