"""Peak FLOP/s of the current device, measured with a short matmul benchmark, and MFU."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from gptjax.config.dtypes import DTYPES
from gptjax.model.ops import einsum


def measure_peak_flops(dtype: str = "float32", n: int = 1024, seconds: float = 1.0) -> float:
    """Best observed FLOP/s of an ``n x n x n`` matmul in the model's compute path (``dtype``) on one device.

    bfloat16 uses bf16 inputs with float32 accumulation, as the model does. Takes about ``seconds``.
    """
    dt = DTYPES[dtype]
    device = jax.local_devices()[0]
    a = jax.device_put(jnp.ones((n, n), dt), device)
    b = jax.device_put(jnp.ones((n, n), dt), device)
    f = jax.jit(lambda a, b: einsum("ij,jk->ik", a, b, dt))
    f(a, b).block_until_ready()
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best


def mfu(tokens_per_second: float, flops_per_token: float, peak_flops_per_device: float, n_devices: int) -> float:
    return tokens_per_second * flops_per_token / (peak_flops_per_device * n_devices)
