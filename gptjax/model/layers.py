"""Building blocks: parameters with logical axes and weight-decay metadata, norms, MLPs, rotary embeddings."""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptjax.config import ModelConfig
from gptjax.config import axes as ax
from gptjax.config.dtypes import DTYPES
from gptjax.model.ops import einsum
from gptjax.sharding.rules import constrain, placement_key


MUP_ROLES = ("embedding", "hidden", "output", "vector")


def param(rngs: nnx.Rngs | None, shape: Sequence[int], axes: Sequence[str | None], cfg: ModelConfig,
          std: float | None = None, value: float | None = None, decay: bool | None = None,
          role: str | None = None) -> nnx.Param:
    """A parameter of ``shape`` named by logical ``axes``: normal(std) initialised, or filled with ``value``.

    ``decay`` (metadata ``weight_decay``, read by the optimizer) says whether AdamW decays it; by default
    matrices are decayed and vectors (norm scales, biases) are not. It is decided here, where the parameter is
    made, so a stacked (scan) layout with its extra leading axis keeps the decision.

    ``role`` (metadata ``mup_role``: embedding, hidden, output, vector; by default hidden for initialised matrices,
    vector for the rest) is what μP scales: a hidden matrix, whose fan-in grows with the width, is initialised
    with ``std / sqrt(m)`` and gets Adam learning rate ``lr / m`` (``lr_multiplier``); the others keep both, the
    output's 1/m being a multiplier on the logits (so a tied embedding serves as input and output)."""
    assert len(shape) == len(axes), (shape, axes)
    role = role or ("hidden" if value is None and len(shape) >= 2 else "vector")
    assert role in MUP_ROLES, role
    if role == "hidden" and std is not None:
        std = std / math.sqrt(cfg.width_mult)
    dtype = DTYPES[cfg.param_dtype]
    if value is not None:
        data = jnp.full(shape, value, dtype)
    else:
        data = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(data, logical_axes=tuple(axes), weight_decay=len(shape) >= 2 if decay is None else decay,
                     mup_role=role)


def lr_multiplier(role: str, cfg: ModelConfig) -> float:
    """The factor on Adam's learning rate for a parameter of μP ``role`` (1 under the standard parametrization)."""
    return 1.0 / cfg.width_mult if role == "hidden" else 1.0


def param_metadata(abstract_vars: Any, key: str) -> dict:
    """Nested dict (the params' pure-dict structure) of each parameter's metadata ``key`` (e.g.
    ``"logical_axes"``, ``"weight_decay"``), read from an (abstract) ``nnx.State`` of a model."""
    out: dict = {}
    for path, var in nnx.to_flat_state(abstract_vars):
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        value = var.get_metadata()[key]
        node[path[-1]] = tuple(value) if isinstance(value, list) else value
    return out


class Norm(nnx.Module):
    """RMSNorm or LayerNorm over the last axis, computed in float32, returned in the compute dtype."""

    def __init__(self, cfg: ModelConfig, dim: int, axis_name: str = ax.NORM):
        self.kind, self.eps, self.dtype = cfg.norm, cfg.norm_eps, DTYPES[cfg.dtype]
        self.scale = param(None, (dim,), (axis_name,), cfg, value=1.0)
        self.bias = param(None, (dim,), (axis_name,), cfg, value=0.0) if cfg.norm == "layernorm" else None

    def __call__(self, x: jax.Array) -> jax.Array:
        bias = None if self.bias is None else self.bias[...]
        return _norm(x, self.scale[...], bias, self.kind, self.eps, self.dtype)


@functools.partial(jax.checkpoint, static_argnums=(3, 4, 5))
def _norm(x, scale, bias, kind: str, eps: float, dtype):
    """Rematerialised: the backward pass recomputes the normalisation from ``x`` instead of keeping its float32
    intermediates (three activation-sized arrays a norm; the consumer's matmul keeps the output anyway)."""
    x = x.astype(jnp.float32)
    if kind == "layernorm":
        x = x - jnp.mean(x, axis=-1, keepdims=True)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
    x = x * scale.astype(jnp.float32)
    if bias is not None:
        x = x + bias.astype(jnp.float32)
    return x.astype(dtype)


class MLP(nnx.Module):
    """SwiGLU (LLaMA) or GELU (GPT) feed-forward block."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f, std = cfg.d_model, cfg.d_ff, cfg.init_std
        self.kind, self.dtype = cfg.mlp, DTYPES[cfg.dtype]
        self.w_up = param(rngs, (d, f), (ax.EMBED, ax.MLP), cfg, std)
        self.w_gate = param(rngs, (d, f), (ax.EMBED, ax.MLP), cfg, std) if cfg.mlp == "swiglu" else None
        self.w_down = param(rngs, (f, d), (ax.MLP, ax.EMBED), cfg, std / math.sqrt(2 * cfg.n_layers))
        self.b_up = param(None, (f,), (ax.MLP,), cfg, value=0.0) if cfg.use_bias else None
        self.b_down = param(None, (d,), (ax.EMBED,), cfg, value=0.0) if cfg.use_bias else None

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        up_BxLxF = einsum("bld,df->blf", x_BxLxD, self.w_up[...], self.dtype)
        if self.b_up is not None:
            up_BxLxF = up_BxLxF + self.b_up[...].astype(self.dtype)
        gate_BxLxF = (einsum("bld,df->blf", x_BxLxD, self.w_gate[...], self.dtype) if self.kind == "swiglu"
                      else None)
        out_BxLxD = _mlp_out(up_BxLxF, gate_BxLxF, self.w_down[...], self.dtype, placement_key())
        if self.b_down is not None:
            out_BxLxD = out_BxLxD + self.b_down[...].astype(self.dtype)
        return out_BxLxD


@functools.partial(jax.checkpoint, static_argnums=(3, 4))
def _mlp_out(up_BxLxF, gate_BxLxF, w_down_FxD, dtype, placement: tuple | None):
    """Activation and down projection, rematerialised: the backward pass keeps only the two (one for GELU)
    up-projection outputs and recomputes the activation from them (the down projection's forward matmul is
    dead there and dropped). Kept, the activation's float32 intermediates and the hidden ``h`` cost six
    ``[B, L, d_ff]`` arrays a layer instead of two (measured at gpt2ish, 8k tokens: 4.7 GB of 10 GB).
    ``placement`` (``placement_key()``) only keys JAX's cache of this trace by the mesh it constrains to."""
    if gate_BxLxF is not None:  # SwiGLU
        h_BxLxF = jax.nn.silu(gate_BxLxF.astype(jnp.float32)).astype(dtype) * up_BxLxF
    else:
        h_BxLxF = jax.nn.gelu(up_BxLxF.astype(jnp.float32), approximate=True).astype(dtype)
    h_BxLxF = constrain(h_BxLxF, (ax.BATCH, ax.LENGTH, ax.ACT_MLP))
    return einsum("blf,fd->bld", h_BxLxF, w_down_FxD, dtype)


def rope_angles(positions: jax.Array | int, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables for rotary embeddings at ``positions`` (``[L]`` or ``[B, L]``): ``[..., head_dim/2]``.

    An int ``L`` means positions ``0..L-1`` (training without explicit positions): the tables are then computed
    once on the host and enter the program as constants. Computed inside the program, XLA fuses cos / sin into
    every consumer and re-evaluates them per element of each layer's q and k, forward and backward (profiled at
    gpt2ish: ~0.4 s of a 5.5-8 s CPU step; XLA:CPU drops optimization barriers before fusion)."""
    if isinstance(positions, int):
        return tuple(jnp.asarray(t) for t in _rope_table(positions, head_dim, float(theta)))
    angles = positions.astype(jnp.float32)[..., None] * _inv_freq(head_dim, float(theta))
    return jnp.cos(angles), jnp.sin(angles)


@functools.lru_cache(maxsize=32)
def _inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """``theta^(-2i/head_dim)`` in float32, computed on the host for both paths (the angles are then one exact
    float32 multiply in either; only the cos / sin implementations differ, by an ulp or so)."""
    return (np.float32(1.0) / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32)
                                                     / np.float32(head_dim)))).astype(np.float32)


@functools.lru_cache(maxsize=32)
def _rope_table(length: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    angles = np.arange(length, dtype=np.float32)[:, None] * _inv_freq(head_dim, theta)[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x_BxLxNxH: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate pairs (i, i + head_dim/2) by position-dependent angles ("rotate-half", as in HF LLaMA). ``cos`` and
    ``sin`` are ``[L, head_dim/2]`` (the same positions for every row) or ``[B, L, head_dim/2]``."""
    x = x_BxLxNxH.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    cos, sin = (cos[None, :, None, :], sin[None, :, None, :]) if cos.ndim == 2 else (cos[:, :, None], sin[:, :, None])
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxLxNxH.dtype)
