"""Training throughput benchmark: gptjax vs a careful eager PyTorch loop of the same model, same machine.

    python bench/train_bench.py                      # tiny and gpt2ish, float32 and bfloat16, jax and torch
    python bench/train_bench.py --configs tiny --dtypes float32 --impls jax

Each (config, dtype, impl) runs in its own subprocess, trains on random tokens for a fixed number of steps after
warm-up, and prints one JSON line: tokens/s, step time, MFU (against the peak FLOP/s gptjax measures at the
start of the run) and peak memory (process max RSS; for jax also the compiled step's own figure from
``memory_analysis``). Then one line per pair with the jax/torch throughput ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {
    "tiny": dict(vocab_size=4096, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, d_ff=688, seq_len=256,
                 batch_size=8),
    "gpt2ish": dict(vocab_size=8192, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, d_ff=2048, seq_len=512,
                    batch_size=2),
}


def run_config(c: dict, dtype: str, steps: int = 10):
    """The benchmark's run config, built the way every gptjax entry point builds one."""
    from gptjax.config import build_run_config

    return build_run_config(
        model_preset_name="tiny", vocab_size=c["vocab_size"], d_model=c["d_model"], n_layers=c["n_layers"],
        n_heads=c["n_heads"], n_kv_heads=c["n_kv_heads"], d_ff=c["d_ff"], max_seq_len=c["seq_len"], dtype=dtype,
        overrides=[f"train.batch_size={c['batch_size']}", f"train.seq_len={c['seq_len']}", f"train.steps={steps}"])


def run_jax(c: dict, dtype: str, steps: int, warmup: int) -> dict:
    import jax
    import numpy as np

    from gptjax.planning.memory import memory_of
    from gptjax.sharding.mesh import make_mesh
    from gptjax.training.program import Program

    cfg = run_config(c, dtype, steps)
    prog = Program(cfg, make_mesh(cfg.mesh))
    state = prog.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    data = rng.integers(0, c["vocab_size"], (steps + warmup, c["batch_size"], c["seq_len"] + 1)).astype(np.int32)
    ones = np.ones((c["batch_size"], c["seq_len"]), np.float32)
    batches = [prog.global_batch({"inputs": d[:, :-1], "targets": d[:, 1:], "loss_mask": ones}) for d in data]
    xla_bytes = memory_of(prog.train_step.lower(state, batches[0]).compile())["peak"]
    for b in batches[:warmup]:
        state, m = prog.train_step(state, b)
    jax.block_until_ready(m)
    t = time.perf_counter()
    for b in batches[warmup:]:
        state, m = prog.train_step(state, b)
    loss = float(jax.device_get(m["loss"]))
    return {"step_time": (time.perf_counter() - t) / steps, "loss": loss, "xla_step_bytes": int(xla_bytes)}


def run_torch(c: dict, dtype: str, steps: int, warmup: int) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    from torch_peer import run

    step_time, n_params, loss = run(c, dtype, steps, warmup)
    return {"step_time": step_time, "loss": loss, "torch_params": n_params}


def child(args: argparse.Namespace) -> None:
    from gptjax.model.accounting import count_params, flops_per_token
    from gptjax.training.perf import measure_peak_flops

    c = CONFIGS[args.config]
    mcfg = run_config(c, args.dtype).model
    peak = measure_peak_flops(args.dtype)
    out = (run_jax if args.impl == "jax" else run_torch)(c, args.dtype, args.steps, args.warmup)
    tokens = c["batch_size"] * c["seq_len"]
    tps = tokens / out["step_time"]
    row = {"config": args.config, "dtype": args.dtype, "impl": args.impl, "params": count_params(mcfg),
           "tokens_per_sec": round(tps, 1), "step_time_ms": round(out["step_time"] * 1e3, 2),
           "mfu": round(tps * flops_per_token(mcfg, c["seq_len"]) / peak, 4), "peak_gflops": round(peak / 1e9, 1),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
           **{k: v for k, v in out.items() if k != "step_time"}}
    print(json.dumps(row), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--impls", nargs="+", default=["jax", "torch"], choices=["jax", "torch"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--child", nargs=3, metavar=("CONFIG", "DTYPE", "IMPL"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        a.config, a.dtype, a.impl = a.child
        return child(a)
    rows = {}
    for config in a.configs:
        for dtype in a.dtypes:
            for impl in a.impls:
                cmd = [sys.executable, __file__, "--child", config, dtype, impl, "--steps", str(a.steps),
                       "--warmup", str(a.warmup)]
                r = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
                line = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
                if r.returncode or not line:
                    print(json.dumps({"config": config, "dtype": dtype, "impl": impl,
                                      "error": (r.stderr.strip().splitlines() or ["?"])[-1]}), flush=True)
                    continue
                print(line[-1], flush=True)
                rows[config, dtype, impl] = json.loads(line[-1])
    for config in a.configs:
        for dtype in a.dtypes:
            j, t = rows.get((config, dtype, "jax")), rows.get((config, dtype, "torch"))
            if j and t:
                print(json.dumps({"config": config, "dtype": dtype,
                                  "jax_over_torch_tokens_per_sec": round(j["tokens_per_sec"] / t["tokens_per_sec"], 3),
                                  "jax_over_torch_peak_rss": round(j["peak_rss_mb"] / t["peak_rss_mb"], 3)}))
        j32, j16 = rows.get((config, "float32", "jax")), rows.get((config, "bfloat16", "jax"))
        if j32 and j16:
            print(json.dumps({"config": config, "jax_bf16_over_fp32_tokens_per_sec":
                              round(j16["tokens_per_sec"] / j32["tokens_per_sec"], 3)}))


if __name__ == "__main__":
    main()
