"""Matmuls under the compute-dtype policy.

float32: plain ``jnp.einsum``. bfloat16: both operands are cast to bf16 and every matmul, forward *and*
backward, runs with bf16 inputs and float32 accumulation (``preferred_element_type``), then rounds to bf16.
JAX's default transpose of a mixed-precision dot would run the backward matmuls in float32 (or, with a bf16
accumulator, without the fast bf16 kernels), so the VJP is written out here. Valid for einsums in which every
operand index also appears in the output or the other operand (true for all of gptjax's).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _parse(spec: str) -> tuple[str, str, str]:
    ins, out = spec.replace(" ", "").split("->")
    a, b = ins.split(",")
    return a, b, out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _mixed_einsum(spec: str, a: jax.Array, b: jax.Array, out_dtype) -> jax.Array:
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(out_dtype)


def _mixed_fwd(spec, a, b, out_dtype):
    return _mixed_einsum(spec, a, b, out_dtype), (a, b)


def _mixed_bwd(spec, out_dtype, res, g):
    a, b = res
    sa, sb, so = _parse(spec)
    g = g.astype(a.dtype)
    da = jnp.einsum(f"{so},{sb}->{sa}", g, b, preferred_element_type=jnp.float32).astype(a.dtype)
    db = jnp.einsum(f"{sa},{so}->{sb}", a, g, preferred_element_type=jnp.float32).astype(b.dtype)
    return da, db


_mixed_einsum.defvjp(_mixed_fwd, _mixed_bwd)


def einsum(spec: str, a: jax.Array, b: jax.Array, dtype, out_dtype=None) -> jax.Array:
    """``einsum(spec, a, b)`` computed in ``dtype`` (float32 accumulation), result in ``out_dtype or dtype``."""
    out_dtype = out_dtype or dtype
    if jnp.dtype(dtype) == jnp.float32:
        return jnp.einsum(spec, a.astype(jnp.float32), b.astype(jnp.float32)).astype(out_dtype)
    return _mixed_einsum(spec, a.astype(dtype), b.astype(dtype), jnp.dtype(out_dtype))
