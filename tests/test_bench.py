"""The benchmark tools' own logic: the step profiler's reading of compiled HLO."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

spec = importlib.util.spec_from_file_location("profile_step", Path(__file__).parents[1] / "bench" / "profile_step.py")
profile_step = importlib.util.module_from_spec(spec)
spec.loader.exec_module(profile_step)


def test_profiler_counts_every_matmuls_flops_from_the_compiled_hlo():
    """Plain, batched, transposed-operand and fused matmuls: the FLOPs read from the HLO are 2 x output x contracted
    size, each counted once, and the elementwise ops around them are not matmuls."""
    x_BxTxD = jnp.ones((2, 48, 32))
    w_DxF = jnp.ones((32, 24))
    y_BxSxD = jnp.ones((2, 40, 32))

    def f(x_BxTxD, w_DxF, y_BxSxD):
        h_BxTxF = jax.nn.silu(x_BxTxD @ w_DxF)
        s_BxTxS = jnp.einsum("btd,bsd->bts", x_BxTxD, y_BxSxD)
        dw_DxF = jnp.einsum("btd,btf->df", x_BxTxD, h_BxTxF)
        return h_BxTxF.sum() + s_BxTxS.sum() + dw_DxF.sum()

    hlo = jax.jit(f).lower(x_BxTxD, w_DxF, y_BxSxD).compile().as_text()
    ops = profile_step.hlo_ops(hlo)
    dots = [(flops, signature) for kind, _, flops, signature in ops.values() if flops]
    expected = [2 * 2 * 48 * 24 * 32, 2 * 2 * 48 * 40 * 32, 2 * 32 * 24 * 2 * 48]
    assert sorted(flops for flops, _ in dots) == sorted(expected)
    assert all(" x " in signature and "->" in signature for _, signature in dots)
    assert all(flops for kind, _, flops, _ in ops.values() if kind == "dot")  # every matmul thunk has its FLOPs
    assert not any(flops for kind, _, flops, _ in ops.values() if kind != "dot")


@pytest.mark.parametrize("intervals, busy", [
    ([], 0.0),
    ([(0.0, 2.0)], 2.0),
    ([(0.0, 2.0), (1.0, 3.0), (5.0, 6.0)], 4.0),  # overlap counted once, the gap not at all
    ([(5.0, 6.0), (0.0, 10.0), (2.0, 3.0)], 10.0),  # nested, unsorted
])
def test_busy_time_is_the_union_of_the_ops_intervals(intervals, busy):
    assert profile_step.busy_time(intervals) == busy
