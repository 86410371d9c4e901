"""How long a checkpoint save pauses training: synchronous orbax saves against asynchronous ones, same run; with
``--verify``, what checking a step against its checksums costs a restore.

    python bench/checkpoint_bench.py                    # ~90M params (~1.1 GB of params + Adam state)
    python bench/checkpoint_bench.py --d-model 512 --layers 8 --saves 3
    python bench/checkpoint_bench.py --verify --layers 14   # 105M params: restore with and without verification
    python bench/checkpoint_bench.py --bucket s3://gptjax/bench --layers 14   # save / restore: local disk vs bucket

``--bucket URL``: one synchronous save (orbax's write and the CRC-32 record, read back) and one restore of the
whole train state, to a local temporary directory and to ``URL`` (``tools/storage_servers up`` gives an S3 server
on loopback; AWS_* variables point at it), in the same run: seconds, MB/s and bucket-over-local ratios.

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


def program(args):
    from gptjax.config import build_run_config
    from gptjax.sharding import single_device_mesh
    from gptjax.training import Program

    cfg = build_run_config(model_preset_name="tiny", d_model=args.d_model, n_layers=args.layers,
                           n_heads=args.d_model // 64, n_kv_heads=args.d_model // 64, d_ff=4 * args.d_model,
                           vocab_size=8192, max_seq_len=128,
                           overrides=["train.batch_size=2", "train.seq_len=128", "train.steps=1000"])
    return Program(cfg, single_device_mesh())


def run(args, async_save: bool, where: str = "local") -> dict:
    from gptjax.checkpoint import Checkpointer
    from gptjax.storage import is_remote, remove_tree

    prog = program(args)
    state = prog.init(jax.random.key(0))
    data = np.random.default_rng(0).integers(0, 8192, (2, 129)).astype(np.int32)
    batch = prog.global_batch({"inputs": data[:, :-1], "targets": data[:, 1:],
                               "loss_mask": np.ones((2, 128), np.float32)})
    state, m = prog.train_step(state, batch)
    jax.block_until_ready(m)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
    with tempfile.TemporaryDirectory() as d:
        directory = f"{where.rstrip('/')}/{time.time_ns()}" if is_remote(where) else str(Path(d) / "ckpt")
        ck = Checkpointer(directory, keep=2, async_save=async_save)
        stalls, t0 = [], time.perf_counter()
        for i in range(args.saves):
            for _ in range(args.steps_between):
                state, m = prog.train_step(state, batch)
            jax.block_until_ready(m)
            stalls.append(ck.save(i + 1, state, _Iterator()))
        ck.close()  # waits for the last background write
        wall = time.perf_counter() - t0
        if is_remote(directory):
            remove_tree(directory)
    return {"where": "bucket" if is_remote(where) else "local disk", "async": async_save, "state_mb": round(nbytes / 1e6, 1), "stalls_s": [round(s, 3) for s in stalls],
            "median_stall_s": round(statistics.median(stalls), 3), "wall_s": round(wall, 2)}


def verify_cost(args) -> dict:
    """One saved step restored ``args.saves`` times each way, alternating: orbax's restore alone, and the check
    every restore now makes first (``step_problem``: items, markers, and each file's CRC-32) followed by it."""
    from gptjax.checkpoint import Checkpointer, step_problem, write_checksums

    prog = program(args)
    state = prog.init(jax.random.key(0))
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
    params = sum(x.size for x in jax.tree.leaves(state["params"]))
    times = {"restore_s": [], "verify_s": [], "verify_and_restore_s": []}
    with tempfile.TemporaryDirectory() as d:
        ck = Checkpointer(Path(d) / "ckpt", keep=1, async_save=False)
        ck.save(1, state, _Iterator())
        t = time.perf_counter()
        write_checksums(Path(d) / "ckpt" / "1")  # what the save already did, timed alone
        checksum_s = time.perf_counter() - t
        del state
        for _ in range(args.saves):
            for verify in (False, True):
                t = time.perf_counter()
                if verify:
                    assert step_problem(Path(d) / "ckpt" / "1") is None
                    times["verify_s"].append(time.perf_counter() - t)
                restored = ck.restore(prog.abstract_state, step=1)
                jax.block_until_ready(restored)
                times["verify_and_restore_s" if verify else "restore_s"].append(time.perf_counter() - t)
                del restored
        ck.close()
    med = {k: round(statistics.median(v), 3) for k, v in times.items()}
    return {"params_M": round(params / 1e6, 1), "state_mb": round(nbytes / 1e6, 1),
            "write_checksums_s": round(checksum_s, 3), **{f"median_{k}": v for k, v in med.items()},
            "verified_over_plain_restore": round(med["verify_and_restore_s"] / med["restore_s"], 3)}


def throughput(args, where: str) -> dict:
    """One synchronous save (with its checksums) and one restore of the train state to ``where``."""
    from gptjax.checkpoint import Checkpointer
    from gptjax.storage import is_remote, remove_tree

    prog = program(args)
    state = prog.init(jax.random.key(0))
    jax.block_until_ready(state)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
    params = sum(x.size for x in jax.tree.leaves(state["params"]))
    with tempfile.TemporaryDirectory() as d:
        directory = f"{where.rstrip('/')}/{time.time_ns()}" if is_remote(where) else str(Path(d) / "ckpt")
        ck = Checkpointer(directory, keep=1, async_save=False)
        t = time.perf_counter()
        ck.save(1, state, _Iterator())
        save_s = time.perf_counter() - t
        t = time.perf_counter()
        restored = ck.restore(prog.abstract_state, step=1)
        jax.block_until_ready(restored)
        restore_s = time.perf_counter() - t
        ck.close()
        if is_remote(directory):
            remove_tree(directory)
    mb = nbytes / 1e6
    return {"where": "bucket" if is_remote(where) else "local disk", "params_M": round(params / 1e6, 1),
            "state_mb": round(mb, 1), "save_s": round(save_s, 2), "restore_s": round(restore_s, 2),
            "save_mb_s": round(mb / save_s, 1), "restore_mb_s": round(mb / restore_s, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--saves", type=int, default=4)
    p.add_argument("--steps-between", type=int, default=5)
    p.add_argument("--verify", action="store_true", help="measure the cost of checksum verification on restore")
    p.add_argument("--bucket", metavar="URL", help="also save and restore to this s3:// or gs:// URL; compare")
    args = p.parse_args()
    if args.bucket:
        from machine import cpu

        local, bucket = throughput(args, "local"), throughput(args, args.bucket)
        for r in (local, bucket):
            print(json.dumps({**r, **cpu()}), flush=True)
        local_async, bucket_async = run(args, True), run(args, True, args.bucket)  # what training is paused for
        for r in (local_async, bucket_async):
            print(json.dumps(r), flush=True)
        print(json.dumps({"bucket_over_local_save_s": round(bucket["save_s"] / local["save_s"], 2),
                          "bucket_over_local_restore_s": round(bucket["restore_s"] / local["restore_s"], 2),
                          "bucket_over_local_async_wall": round(bucket_async["wall_s"] / local_async["wall_s"], 2)}))
        return
    if args.verify:
        from machine import cpu  # a sibling: bench/ is the script's directory

        print(json.dumps({**verify_cost(args), **cpu()}))
        return
    rows = [run(args, False), run(args, True)]
    for r in rows:
        print(json.dumps(r), flush=True)
    print(json.dumps({"async_over_sync_median_stall": round(rows[1]["median_stall_s"] / rows[0]["median_stall_s"], 3),
                      "async_over_sync_wall": round(rows[1]["wall_s"] / rows[0]["wall_s"], 3)}))


if __name__ == "__main__":
    sys.exit(main())
