"""The benchmark tools' own logic: the step profiler's reading of compiled HLO; and every script in bench/ runs,
at a tiny size, so that each figure in the docs has a script that still produces it."""

import importlib.util
import json
import subprocess
import sys
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


BENCH = Path(__file__).parents[1] / "bench"
HELPERS = {"machine.py", "torch_peer.py"}  # imported by the benchmarks, not run
# each script at a tiny size, through its own flags (--smoke where the sizes are not flags)
SMOKE = {
    "attention_bench.py": ["--lengths", "64", "--heads", "2", "--head-dim", "16", "--repeats", "1"],
    "checkpoint_bench.py": ["--d-model", "64", "--layers", "1", "--saves", "1", "--steps-between", "1"],
    "dedup_bench.py": ["--documents", "300", "--num-perm", "16"],
    "export_memory_bench.py": ["--layers", "1", "--d-model", "128", "--vocab", "512", "--shard", "1MB"],
    "generate_bench.py": ["--configs", "tiny", "--batches", "1", "--prompt", "8", "--new-tokens", "4",
                          "--recompute-tokens", "2"],
    "loader_bench.py": ["--smoke"],
    "prepare_bench.py": ["--smoke"],
    "profile_step.py": ["tiny", "float32", "--top", "3"],
    "scaling_fit_bench.py": ["--points", "30", "--scipy-starts", "5"],
    "train_bench.py": ["--configs", "tiny", "--dtypes", "float32", "--impls", "jax", "torch", "--steps", "1",
                       "--warmup", "1"],
}


def test_every_benchmark_has_a_smoke_size():
    assert set(SMOKE) == {p.name for p in BENCH.glob("*.py")} - HELPERS


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SMOKE))
def test_every_benchmark_runs_at_a_tiny_size(script, tmp_path):
    """bench/loader_bench.py and bench/prepare_bench.py failed on main ("'module' object is not callable") while
    the docs quoted their figures."""
    from helpers import cpu_env

    runs = [SMOKE[script]] + ([SMOKE[script] + ["--verify"]] if script == "checkpoint_bench.py" else [])
    for args in runs:
        r = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                           env=cpu_env(1), cwd=tmp_path, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        if script in ("profile_step.py", "scaling_fit_bench.py"):  # tables, not JSON lines
            assert len(r.stdout.splitlines()) >= 3, r.stdout
        else:
            assert any(line.startswith("{") and json.loads(line) for line in r.stdout.splitlines()), r.stdout[-2000:]
