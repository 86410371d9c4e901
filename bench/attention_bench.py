"""Attention kernels alone: forward + backward time and memory per sequence length, gptjax dense vs blockwise
vs torch's ``scaled_dot_product_attention`` (its fused causal CPU kernel), in one run.

    python bench/attention_bench.py                          # 512 .. 8192 tokens, float32
    python bench/attention_bench.py --lengths 1024 2048 --dtype bfloat16 --repeats 3

One layer of the gpt2ish shape (batch 1, 12 heads of 64), causal. Times are the best of ``--repeats`` calls
of the jitted forward + backward (a sum of the output as the loss), rows interleaved. Memory is XLA's temp
bytes for the compiled forward + backward (``memory_analysis``); the dense kernel's grows with L^2. The last
column says which kernel ``attention_impl="auto"`` picks on CPU at that length (``DENSE_MAX_LEN_CPU``).
"""

from __future__ import annotations

import argparse
import json
import time

from gptjax.config import DTYPE_NAMES


def best_time(f, repeats: int) -> float:
    f()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", nargs="+", type=int, default=[512, 1024, 2048, 4096, 8192])
    p.add_argument("--dtype", default="float32", choices=DTYPE_NAMES)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dense-max", type=int, default=4096, help="skip the dense kernel above this length")
    p.add_argument("--no-torch", action="store_true")
    a = p.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from gptjax.model import DENSE_MAX_LEN_CPU, MaskSpec, attend, choose_kernel
    from gptjax.planning import memory_of

    dt = jnp.float32 if a.dtype == "float32" else jnp.bfloat16
    H, N = a.head_dim, a.heads
    torch = None
    if not a.no_torch:
        import torch

        torch.manual_seed(0)
    for L in a.lengths:
        r = np.random.default_rng(0)
        q = jnp.asarray(r.normal(size=(1, N, 1, L, H)) / np.sqrt(H), dt)
        k, v = (jnp.asarray(r.normal(size=(1, N, L, H)), dt) for _ in range(2))
        row = {"seq_len": L, "dtype": a.dtype, "auto_picks": choose_kernel("auto", "cpu", L, True, False)}
        for impl in ("dense", "blockwise"):
            if impl == "dense" and L > a.dense_max:
                continue

            def loss(q, k, v, impl=impl):
                o = attend(q, k, v, MaskSpec(window=L), impl=impl, block=512, dtype=dt)
                return jnp.sum(o.astype(jnp.float32))

            step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
            compiled = step.lower(q, k, v).compile()
            row[f"{impl}_ms"] = round(1e3 * best_time(lambda: jax.block_until_ready(compiled(q, k, v)), a.repeats), 1)
            row[f"{impl}_temp_mb"] = round(memory_of(compiled)["temp"] / 2**20, 1)
        if torch is not None:
            tdt = torch.float32 if a.dtype == "float32" else torch.bfloat16
            tq = torch.randn(1, N, L, H, dtype=tdt, requires_grad=True)
            tk = torch.randn(1, N, L, H, dtype=tdt, requires_grad=True)
            tv = torch.randn(1, N, L, H, dtype=tdt, requires_grad=True)

            def torch_step():
                torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True).float().sum().backward()

            row["torch_sdpa_ms"] = round(1e3 * best_time(torch_step, a.repeats), 1)
            row["blockwise_over_torch_speed"] = round(row["torch_sdpa_ms"] / row["blockwise_ms"], 3)
        print(json.dumps(row), flush=True)
    print(json.dumps({"DENSE_MAX_LEN_CPU": DENSE_MAX_LEN_CPU}))


if __name__ == "__main__":
    main()
