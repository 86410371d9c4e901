"""Causal self-attention: MHA / GQA / MQA, optional qk-norm, RoPE, dense or locally banded masks, segment masks
(packed documents do not attend across their boundaries) and an optional KV cache."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from gptjax.config import ModelConfig
from gptjax.config import axes as ax
from gptjax.config.dtypes import DTYPES
from gptjax.model.cache import write_at
from gptjax.model.kernel_api import MaskSpec, causal_mask  # noqa: F401  (causal_mask: re-exported)
from gptjax.model.kernels import attend
from gptjax.model.layers import Norm, apply_rope, param
from gptjax.model.ops import einsum
from gptjax.sharding.rules import constrain


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, h, k, hd, std = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.resolved_head_dim, cfg.init_std
        self.n_heads, self.n_kv_heads, self.head_dim = h, k, hd
        # scores scaled by 1/sqrt(hd); μP by 1/(sqrt(hd) sqrt(m)) = sqrt(hd_base) / hd with head_dim growing with
        # the width (hd_base = hd / m): 1/head_dim scaling that equals the standard one at the base width
        self.score_scale = 1.0 / math.sqrt(hd * cfg.width_mult)
        self.dtype = DTYPES[cfg.dtype]
        self.impl, self.block, self.windows = cfg.attention_impl, cfg.attention_block, cfg.layer_windows()
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
        """``(out_BxLxD, kv)``. With ``kv`` (this layer's cache buffers, keys ``[B, K, H, S]`` and values
        ``[B, K, S, H]``), the new keys and values are written at slot ``mask.offset`` and the queries attend over
        all S slots; the updated buffers are returned (``None`` without a cache)."""
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
        k_BxKxLxH, v_BxKxLxH = k_BxLxKxH.transpose(0, 2, 1, 3), v_BxLxKxH.transpose(0, 2, 1, 3)
        if kv is not None:  # write this call's keys / values into the cache, then attend over every slot
            kv = (write_at(kv[0], k_BxLxKxH.transpose(0, 2, 3, 1), mask.offset, axis=3),  # keys as [B, K, H, L]
                  write_at(kv[1], v_BxKxLxH, mask.offset, axis=2))
            keys, v_BxKxSxH = kv[0].astype(self.dtype), kv[1].astype(self.dtype)  # keys: [B, K, H, S]
        else:  # S = L: the call's own tokens
            keys, v_BxKxSxH = k_BxKxLxH, v_BxKxLxH
        # Heads-major layout, the G query heads that share a key/value head grouped under it (N = K * G):
        # every kernel takes q [B, K, G, L, H] and k / v [B, K, S, H], so K/V are never repeated.
        q_BxKxGxLxH = (q_BxLxNxH.reshape(B, L, K, G, self.head_dim).transpose(0, 2, 3, 1, 4)
                       * jnp.asarray(self.score_scale, self.dtype))
        o_BxKxGxLxH = attend(q_BxKxGxLxH, keys, v_BxKxSxH, mask.with_window(window, self.windows),
                             impl=self.impl, block=self.block, dtype=self.dtype, keys_transposed=kv is not None)
        if kv is None:
            # merging K and G is free (adjacent axes), and the projection then keeps for its backward pass the very
            # array the attention kernel keeps: one copy of the output a layer, not a second transposed one
            o_BxNxLxH = o_BxKxGxLxH.reshape(B, self.n_heads, L, self.head_dim)
            out_BxLxD = einsum("bnlh,nhd->bld", o_BxNxLxH, self.w_o[...], self.dtype)
        else:  # decoding: transpose the (few) outputs, not w_o, which XLA:CPU otherwise copied at every step
            NH = self.n_heads * self.head_dim
            o_BxLxNH = o_BxKxGxLxH.transpose(0, 3, 1, 2, 4).reshape(B, L, NH)
            out_BxLxD = einsum("blf,fd->bld", o_BxLxNH, self.w_o[...].reshape(NH, -1), self.dtype)
        return (out_BxLxD if self.b_o is None else out_BxLxD + self.b_o[...].astype(self.dtype)), kv
