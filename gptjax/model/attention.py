"""Causal self-attention: MHA / GQA / MQA, optional qk-norm, RoPE, dense or locally banded masks, segment masks
(packed documents do not attend across their boundaries) and an optional KV cache."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from gptjax.config import ModelConfig
from gptjax.config import axes as ax
from gptjax.config.dtypes import DTYPES
from gptjax.model.layers import Norm, apply_rope, param
from gptjax.model.ops import einsum, softmax
from gptjax.sharding.rules import constrain

NEG_INF = jnp.finfo(jnp.float32).min  # additive mask value: exp underflows to exactly 0


def causal_mask(q_len: int, k_len: int, window: jax.Array | int, offset: jax.Array | int | None = None) -> jax.Array:
    """``[q_len, k_len]`` bool: query i (in slot ``offset + i``; default: the last ``q_len`` of ``k_len`` slots)
    sees key slot j iff ``j <= slot`` and ``slot - j < window``."""
    i = jnp.arange(q_len)[:, None] + (k_len - q_len if offset is None else offset)
    j = jnp.arange(k_len)[None, :]
    return (j <= i) & (i - j < window)


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """What a query may see besides causality and the window: its slot offset (the cache index, 0 without a
    cache) and, for packed sequences, the segment ids of queries and keys (equal ids see each other)."""

    offset: jax.Array | int = 0
    q_segment_ids_BxL: jax.Array | None = None
    k_segment_ids_BxS: jax.Array | None = None

    def bias(self, q_len: int, k_len: int, window: jax.Array | int) -> jax.Array:
        """Additive float32 mask: ``[L, S]``, or ``[B, L, S]`` with segment ids."""
        allowed_LxS = causal_mask(q_len, k_len, window, self.offset)
        if self.q_segment_ids_BxL is None:
            return jnp.where(allowed_LxS, 0.0, NEG_INF)
        same_BxLxS = self.q_segment_ids_BxL[:, :, None] == self.k_segment_ids_BxS[:, None, :]
        return jnp.where(allowed_LxS[None] & same_BxLxS, 0.0, NEG_INF)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, h, k, hd, std = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.resolved_head_dim, cfg.init_std
        self.n_heads, self.n_kv_heads, self.head_dim = h, k, hd
        self.dtype = DTYPES[cfg.dtype]
        self.w_q = param(rngs, (d, h, hd), (ax.EMBED, ax.HEADS, ax.HEAD_DIM), cfg, std)
        self.w_k = param(rngs, (d, k, hd), (ax.EMBED, ax.KV_HEADS, ax.HEAD_DIM), cfg, std)
        self.w_v = param(rngs, (d, k, hd), (ax.EMBED, ax.KV_HEADS, ax.HEAD_DIM), cfg, std)
        self.w_o = param(rngs, (h, hd, d), (ax.HEADS, ax.HEAD_DIM, ax.EMBED), cfg, std / math.sqrt(2 * cfg.n_layers))
        # biases are never decayed (b_q/b_k/b_v are per-head matrices, so rank alone would decay them)
        if cfg.has_qkv_bias:
            self.b_q = param(None, (h, hd), (ax.HEADS, ax.HEAD_DIM), cfg, value=0.0, decay=False)
            self.b_k = param(None, (k, hd), (ax.KV_HEADS, ax.HEAD_DIM), cfg, value=0.0, decay=False)
            self.b_v = param(None, (k, hd), (ax.KV_HEADS, ax.HEAD_DIM), cfg, value=0.0, decay=False)
        else:
            self.b_q = self.b_k = self.b_v = None
        self.b_o = param(None, (d,), (ax.EMBED,), cfg, value=0.0, decay=False) if cfg.use_bias else None
        self.q_norm = Norm(cfg, hd, ax.HEAD_DIM) if cfg.qk_norm else None
        self.k_norm = Norm(cfg, hd, ax.HEAD_DIM) if cfg.qk_norm else None

    def _project(self, x_BxLxD, w, b):
        y = einsum("bld,dnh->blnh", x_BxLxD, w[...], self.dtype)
        return y if b is None else y + b[...].astype(self.dtype)

    def __call__(self, x_BxLxD: jax.Array, window: jax.Array | int, rope: tuple | None, mask: MaskSpec,
                 kv: tuple[jax.Array, jax.Array] | None = None) -> tuple[jax.Array, tuple | None]:
        """``(out_BxLxD, kv)``. With ``kv`` (this layer's cache buffers ``[B, S, K, H]``), the new keys and values
        are written at slot ``mask.offset`` and the queries attend over all S slots; the updated buffers are
        returned (``None`` without a cache)."""
        B, L, _ = x_BxLxD.shape
        K, G = self.n_kv_heads, self.n_heads // self.n_kv_heads
        q_BxLxNxH = self._project(x_BxLxD, self.w_q, self.b_q)
        k_BxLxKxH = self._project(x_BxLxD, self.w_k, self.b_k)
        v_BxLxKxH = self._project(x_BxLxD, self.w_v, self.b_v)
        if self.q_norm is not None:
            q_BxLxNxH, k_BxLxKxH = self.q_norm(q_BxLxNxH), self.k_norm(k_BxLxKxH)
        if rope is not None:
            q_BxLxNxH, k_BxLxKxH = apply_rope(q_BxLxNxH, *rope), apply_rope(k_BxLxKxH, *rope)
        q_BxLxNxH = constrain(q_BxLxNxH, (ax.BATCH, ax.LENGTH, ax.ACT_HEADS, None))
        k_BxLxKxH = constrain(k_BxLxKxH, (ax.BATCH, ax.LENGTH, ax.ACT_KV_HEADS, None))
        if kv is not None:  # write this call's keys / values into the cache, then attend over every slot
            start = (0, mask.offset, 0, 0)
            k_BxSxKxH = jax.lax.dynamic_update_slice(kv[0], k_BxLxKxH.astype(kv[0].dtype), start)
            v_BxSxKxH = jax.lax.dynamic_update_slice(kv[1], v_BxLxKxH.astype(kv[1].dtype), start)
            kv = (k_BxSxKxH, v_BxSxKxH)
            k_BxLxKxH, v_BxLxKxH = k_BxSxKxH.astype(self.dtype), v_BxSxKxH.astype(self.dtype)
        S = k_BxLxKxH.shape[1]
        # Heads-major layout; the G query heads that share a key/value head are stacked along the query axis,
        # so both attention matmuls are plain batched matmuls over (batch, kv head): N = K * G.
        q_BxKxGLxH = (q_BxLxNxH.reshape(B, L, K, G, self.head_dim).transpose(0, 2, 3, 1, 4)
                      .reshape(B, K, G * L, self.head_dim) * jnp.asarray(1.0 / math.sqrt(self.head_dim), self.dtype))
        k_BxKxSxH, v_BxKxSxH = k_BxLxKxH.transpose(0, 2, 1, 3), v_BxLxKxH.transpose(0, 2, 1, 3)
        s_BxKxGLxS = einsum("bkqh,bkmh->bkqm", q_BxKxGLxH, k_BxKxSxH, self.dtype, jnp.float32, name="attention")
        # additive mask (0 or the most negative float): cheaper on CPU than a select before the softmax
        bias = mask.bias(L, S, window)
        bias = jnp.tile(bias, (G, 1)) if bias.ndim == 2 else jnp.tile(bias, (1, G, 1))[:, None]
        p_BxKxGLxS = softmax(s_BxKxGLxS + bias).astype(self.dtype)
        o_BxKxGLxH = einsum("bkqm,bkmh->bkqh", p_BxKxGLxS, v_BxKxSxH, self.dtype, name="attention")
        o_BxLxNxH = (o_BxKxGLxH.reshape(B, K, G, L, self.head_dim).transpose(0, 3, 1, 2, 4)
                     .reshape(B, L, self.n_heads, self.head_dim))
        out_BxLxD = einsum("blnh,nhd->bld", o_BxLxNxH, self.w_o[...], self.dtype)
        return (out_BxLxD if self.b_o is None else out_BxLxD + self.b_o[...].astype(self.dtype)), kv
