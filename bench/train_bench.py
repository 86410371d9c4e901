"""Training throughput benchmark: gptjax vs a careful eager PyTorch loop of the same model, same machine.

    python bench/train_bench.py                      # tiny, gpt2ish (512), gpt2ish-2k, gpt2ish-8k; fp32, bf16
    python bench/train_bench.py --configs tiny --dtypes float32 --impls jax
    python bench/train_bench.py --configs gpt2ish-2k --attention dense --repeats 2
    python bench/train_bench.py --memory-curve --configs gpt2ish-1k gpt2ish-2k gpt2ish-4k gpt2ish-8k \
        --attention blockwise,dense --dtypes float32 --plot memory.png   # compile only: XLA's peak bytes

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

from gptjax.config import DTYPE_NAMES

CONFIGS = {
    "tiny": dict(vocab_size=4096, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, d_ff=688, seq_len=256,
                 batch_size=8),
    "gpt2ish": dict(vocab_size=8192, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, d_ff=2048, seq_len=512,
                    batch_size=2),
}
# the gpt2ish shape at long context, batch 1
CONFIGS.update({f"gpt2ish-{n // 1024}k": dict(CONFIGS["gpt2ish"], seq_len=n, batch_size=1) for n in (1024, 2048, 4096, 8192)})
DEFAULT_CONFIGS = ["tiny", "gpt2ish", "gpt2ish-2k", "gpt2ish-8k"]


def run_config(c: dict, dtype: str, steps: int = 10, attention: str = "auto"):
    """The benchmark's run config, built the way every gptjax entry point builds one."""
    from gptjax.config import build_run_config

    return build_run_config(
        model_preset_name="tiny", vocab_size=c["vocab_size"], d_model=c["d_model"], n_layers=c["n_layers"],
        n_heads=c["n_heads"], n_kv_heads=c["n_kv_heads"], d_ff=c["d_ff"], max_seq_len=c["seq_len"], dtype=dtype,
        attention_impl=attention, overrides=[f"train.batch_size={c['batch_size']}", f"train.seq_len={c['seq_len']}", f"train.steps={steps}"])


def run_jax(c: dict, dtype: str, steps: int, warmup: int, attention: str, budget: float) -> dict:
    import jax
    import numpy as np

    from gptjax.planning import memory_of
    from gptjax.sharding import make_mesh
    from gptjax.training import Program

    cfg = run_config(c, dtype, steps, attention)
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
    t, done = time.perf_counter(), 0
    for b in batches[warmup:]:
        state, m = prog.train_step(state, b)
        done += 1
        if budget and time.perf_counter() - t > budget:
            jax.block_until_ready(m)
            break
    loss = float(jax.device_get(m["loss"]))
    return {"step_time": (time.perf_counter() - t) / done, "steps": done, "loss": loss, "xla_step_bytes": int(xla_bytes)}


def run_torch(c: dict, dtype: str, steps: int, warmup: int, attention: str, budget: float) -> dict:
    from torch_peer import matmul_gflops, run  # a sibling: bench/ is the script's directory

    if dtype == "bfloat16" and c["d_model"] >= 512:
        # Without native bf16 (avx512_bf16 / AMX) torch's CPU bf16 matmul falls back to a slow kernel: a gpt2ish
        # row would take many minutes a step. Measure that and refuse the row, saying why (tiny still runs).
        bf16, fp32 = matmul_gflops("bfloat16"), matmul_gflops("float32")
        if bf16 < 0.2 * fp32:
            raise SystemExit(f"torch bf16 matmul runs at {bf16:.1f} GFLOP/s on this CPU vs {fp32:.1f} in fp32 "
                             "(no native bf16): row skipped")

    step_time, done, n_params, loss = run(c, dtype, steps, warmup, budget)
    return {"step_time": step_time, "steps": done, "loss": loss, "torch_params": n_params}


def default_steps(c: dict) -> int:
    """Timed steps: about 16k tokens, at least 2 (a gpt2ish 8k step takes tens of seconds on 2 cores)."""
    return max(2, min(10, 16384 // (c["batch_size"] * c["seq_len"])))


def memory_curve(configs: list[str], dtype: str, attentions: list[str], plot: str | None) -> None:
    """XLA's per-device peak bytes of the compiled train step (nothing allocated) for each config and attention
    kernel: how memory grows with the sequence."""
    import jax
    import jax.numpy as jnp

    from gptjax.planning import memory_of
    from gptjax.sharding import make_mesh
    from gptjax.training import Program

    curves: dict[str, list[tuple[int, float]]] = {}
    for attention in attentions:
        for name in configs:
            c = CONFIGS[name]
            cfg = run_config(c, dtype, 1, attention)
            prog = Program(cfg, make_mesh(cfg.mesh))
            tok = jax.ShapeDtypeStruct((c["batch_size"], c["seq_len"]), jnp.int32)
            mask = jax.ShapeDtypeStruct((c["batch_size"], c["seq_len"]), jnp.float32)
            batch = {"inputs": tok, "targets": tok, "loss_mask": mask}
            peak = memory_of(prog.train_step.lower(prog.abstract_state, batch).compile())["peak"]
            print(json.dumps({"config": name, "dtype": dtype, "attention": attention, "seq_len": c["seq_len"],
                              "xla_step_mb": round(peak / 2**20, 1)}), flush=True)
            curves.setdefault(attention, []).append((c["seq_len"], peak / 2**20))
    for attention, pts in curves.items():
        (l0, m0), (l1, m1) = pts[0], pts[-1]
        print(json.dumps({"attention": attention, "memory_ratio": round(m1 / m0, 2), "length_ratio": l1 / l0}))
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        for attention, pts in curves.items():
            ax.plot(*zip(*pts), marker="o", label=f"gptjax {attention}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (batch 1, gpt2ish)")
        ax.set_ylabel("compiled train-step peak (MB)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(plot, dpi=120)
        print(f"wrote {plot}")


def child(args: argparse.Namespace) -> None:
    from gptjax.model import count_params, flops_per_token
    from gptjax.training import measure_peak_flops

    c = CONFIGS[args.config]
    mcfg = run_config(c, args.dtype).model
    peaks = {d: measure_peak_flops(d) for d in DTYPE_NAMES}
    steps = args.steps or default_steps(c)
    out = (run_jax if args.impl == "jax" else run_torch)(c, args.dtype, steps, args.warmup, args.attention,
                                                                 args.budget)
    tokens = c["batch_size"] * c["seq_len"]
    tps = tokens / out["step_time"]
    flops = tps * flops_per_token(mcfg, c["seq_len"])
    row = {"config": args.config, "dtype": args.dtype, "impl": args.impl, "seq_len": c["seq_len"],
           "params": count_params(mcfg), "tokens_per_sec": round(tps, 1), "step_time_ms": round(out["step_time"] * 1e3, 1),
           "mfu": round(flops / peaks[args.dtype], 4), "mfu_vs_fp32_peak": round(flops / peaks["float32"], 4),
           "mfu_vs_bf16_peak": round(flops / peaks["bfloat16"], 4),
           "peak_gflops_fp32": round(peaks["float32"] / 1e9, 1), "peak_gflops_bf16": round(peaks["bfloat16"] / 1e9, 1),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
           **({"attention": args.attention} if args.impl == "jax" else {}),
           **{k: v for k, v in out.items() if k != "step_time"}}
    print(json.dumps(row), flush=True)


def _run_child(config: str, dtype: str, impl: str, a: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", config, dtype, impl, "--steps", str(a.steps or 0),
           "--warmup", str(a.warmup), "--attention", a.attention, "--budget", str(a.budget)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode or not line:
        return {"config": config, "dtype": dtype, "impl": impl, "error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(line[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, choices=list(CONFIGS))
    p.add_argument("--dtypes", nargs="+", default=list(DTYPE_NAMES), choices=DTYPE_NAMES)
    p.add_argument("--impls", nargs="+", default=["jax", "torch"], choices=["jax", "torch"])
    p.add_argument("--attention", default="auto", help="gptjax's attention kernel (model.attention_impl)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: about 16k tokens, at least 2)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--budget", type=float, default=300.0,
                   help="stop timing a row after this many seconds (at least one step; 0: no limit)")
    p.add_argument("--repeats", type=int, default=1, help="interleaved repeats of every row; the median is kept")
    p.add_argument("--memory-curve", action="store_true",
                   help="only compile the jax step of --configs for each --attention kernel and print XLA's peak bytes")
    p.add_argument("--plot", default=None, help="with --memory-curve: write the curve to this PNG")
    p.add_argument("--child", nargs=3, metavar=("CONFIG", "DTYPE", "IMPL"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        a.config, a.dtype, a.impl = a.child
        return child(a)
    if a.memory_curve:
        return memory_curve(a.configs, a.dtypes[0], a.attention.split(","), a.plot)
    runs: dict[tuple, list[dict]] = {}
    for rep in range(a.repeats):  # interleaved: every (config, dtype, impl) once per repeat
        for config in a.configs:
            for dtype in a.dtypes:
                for impl in a.impls:
                    row = _run_child(config, dtype, impl, a)
                    print(json.dumps({**row, "repeat": rep}), flush=True)
                    if "error" not in row:
                        runs.setdefault((config, dtype, impl), []).append(row)
    # the median run (by tokens/s) of each row
    rows = {key: sorted(rs, key=lambda r: r["tokens_per_sec"])[(len(rs) - 1) // 2] for key, rs in runs.items()}
    print("# summary (median of %d)" % a.repeats)
    for config in a.configs:
        for dtype in a.dtypes:
            j, t = rows.get((config, dtype, "jax")), rows.get((config, dtype, "torch"))
            if j and t:
                print(json.dumps({"config": config, "dtype": dtype, "jax_tokens_per_sec": j["tokens_per_sec"],
                                  "torch_tokens_per_sec": t["tokens_per_sec"],
                                  "jax_over_torch_tokens_per_sec": round(j["tokens_per_sec"] / t["tokens_per_sec"], 3),
                                  "jax_peak_rss_mb": j["peak_rss_mb"], "torch_peak_rss_mb": t["peak_rss_mb"],
                                  "jax_over_torch_peak_rss": round(j["peak_rss_mb"] / t["peak_rss_mb"], 3),
                                  "jax_mfu": j["mfu"], "torch_mfu": t["mfu"]}), flush=True)
        j32, j16 = rows.get((config, "float32", "jax")), rows.get((config, "bfloat16", "jax"))
        if j32 and j16:
            print(json.dumps({"config": config, "jax_bf16_over_fp32_tokens_per_sec":
                              round(j16["tokens_per_sec"] / j32["tokens_per_sec"], 3)}))


if __name__ == "__main__":
    main()
