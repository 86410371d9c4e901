"""How long a checkpoint save pauses training: synchronous orbax saves against asynchronous ones, same run.

    python bench/checkpoint_bench.py                    # ~90M params (~1.1 GB of params + Adam state)
    python bench/checkpoint_bench.py --d-model 512 --layers 8 --saves 3

Trains a model on random tokens and saves the full train state (params, Adam moments, step, data iterator
state) every few steps, once with ``async_save=False`` and once with ``True``. Prints per-save stalls (the
time the step loop is blocked by ``save``) and the wall time of the whole loop, then their ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np


class _Iterator:  # the data iterator's checkpointable state, as grain's
    def get_state(self) -> dict:
        return {"position": 0}


def run(args, async_save: bool) -> dict:
    from gptjax.checkpoint import Checkpointer
    from gptjax.config import build_run_config
    from gptjax.sharding import single_device_mesh
    from gptjax.training import Program

    cfg = build_run_config(model_preset_name="tiny", d_model=args.d_model, n_layers=args.layers,
                           n_heads=args.d_model // 64, n_kv_heads=args.d_model // 64, d_ff=4 * args.d_model,
                           vocab_size=8192, max_seq_len=128,
                           overrides=["train.batch_size=2", "train.seq_len=128", "train.steps=1000"])
    prog = Program(cfg, single_device_mesh())
    state = prog.init(jax.random.key(0))
    data = np.random.default_rng(0).integers(0, 8192, (2, 129)).astype(np.int32)
    batch = prog.global_batch({"inputs": data[:, :-1], "targets": data[:, 1:],
                               "loss_mask": np.ones((2, 128), np.float32)})
    state, m = prog.train_step(state, batch)
    jax.block_until_ready(m)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
    with tempfile.TemporaryDirectory() as d:
        ck = Checkpointer(Path(d) / "ckpt", keep=2, async_save=async_save)
        stalls, t0 = [], time.perf_counter()
        for i in range(args.saves):
            for _ in range(args.steps_between):
                state, m = prog.train_step(state, batch)
            jax.block_until_ready(m)
            stalls.append(ck.save(i + 1, state, _Iterator()))
        ck.close()  # waits for the last background write
        wall = time.perf_counter() - t0
    return {"async": async_save, "state_mb": round(nbytes / 1e6, 1), "stalls_s": [round(s, 3) for s in stalls],
            "median_stall_s": round(statistics.median(stalls), 3), "wall_s": round(wall, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--saves", type=int, default=4)
    p.add_argument("--steps-between", type=int, default=5)
    args = p.parse_args()
    rows = [run(args, False), run(args, True)]
    for r in rows:
        print(json.dumps(r), flush=True)
    print(json.dumps({"async_over_sync_median_stall": round(rows[1]["median_stall_s"] / rows[0]["median_stall_s"], 3),
                      "async_over_sync_wall": round(rows[1]["wall_s"] / rows[0]["wall_s"], 3)}))


if __name__ == "__main__":
    sys.exit(main())
