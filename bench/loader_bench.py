"""The training input from prepared shards: tokens/s delivered to host batches against what a training step
consumes, and peak memory for two corpora 10x apart in size; from local disk and from a bucket, inline and with
loader processes.

    python bench/loader_bench.py                  # prepares two corpora under /tmp/gptjax-loader-bench (once)
    python bench/loader_bench.py --scale 2 20 --batches 300 --workers 0 2
    python bench/loader_bench.py --bucket s3://gptjax/bench   # also read from a bucket (tools/storage_servers)

The corpora are the embedded Austen text repeated ``--scale`` times (paragraphs as documents), tokenized with a
2,048-piece tokenizer by ``gptjax-data prepare``. Loader rows: a fresh process iterates ``--batches`` batches of
16 x 256 tokens (document masking on, as training reads prepared data) through ``train_dataset`` with each
``--workers`` count (0: the trainer's own thread), and reports tokens/s and its peak RSS (of the process, not its
workers). With ``--bucket`` the prepared directory is copied there and read back through a fresh host cache:
``cold_s`` is the time to the first 100 batches (fewer in a smoke run), shards fetched on the way; then the rate
is the local one. The step row: a gptjax train step of the gpt2ish shape (91M, fp32, 2 x 512, the training benchmark's)
on this machine, in the same run. JSON lines with the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from machine import cpu  # a sibling: bench/ is the script's directory

ROOT = Path("/tmp/gptjax-loader-bench")


def prepared(scale: int, root: Path = ROOT, smoke: bool = False) -> Path:
    from gptjax.data import PrepareSettings, Tokenizer, default_corpus_path, prepare, read_corpus, split_documents

    root.mkdir(parents=True, exist_ok=True)
    tok = root / "tok.model"
    text = read_corpus(default_corpus_path())
    text = text[:text.index("CHAPTER", 200_000)] if smoke else text
    if not tok.exists():
        Tokenizer.train(split_documents(text, None), 512 if smoke else 2048, sample_chars=2_000_000).save(tok)
    src = root / f"austen-x{scale}.txt"
    if not src.exists():
        src.write_text("\n\n".join([text] * scale))
    out = root / f"austen-x{scale}"
    prepare([src], tok, out, settings=PrepareSettings(docs_per_shard=4096, val_fraction=0.005), progress=False)
    return out


def child(directory: str, batches: int, workers: int) -> None:
    from gptjax.data import PreparedCorpus, PreparedData, train_dataset

    data = PreparedData(directory)
    corpus = PreparedCorpus(data, data.tokenizer())
    t = time.perf_counter()
    it = iter(train_dataset(corpus.windows(256), 256, 16, 0, workers=workers))
    for _ in range(min(100, batches)):
        next(it)
    cold = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
    seconds = time.perf_counter() - t
    it.close()
    assert set(batch) == {"inputs", "targets", "loss_mask", "segment_ids", "positions"}
    print(json.dumps({"corpus_tokens": corpus.tokens[0], "workers": workers, "batches": batches,
                      "tokens_per_s": round(batches * 16 * 256 / seconds), "cold_s": round(cold, 2),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


def run_child(directory: str, batches: int, workers: int, env: dict | None = None) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", directory, str(batches), str(workers)],
                       capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})
    if r.returncode:
        raise SystemExit(f"the loader child failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def step_tokens_per_s(smoke: bool = False) -> float:
    import jax
    import numpy as np

    from gptjax.config import build_run_config
    from gptjax.sharding import make_mesh
    from gptjax.training import Program

    shape = dict(d_model=64, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=128) if smoke else dict(
        d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, d_ff=2048)
    cfg = build_run_config(model_preset_name="tiny", vocab_size=8192, max_seq_len=512, **shape,
                           overrides=["train.batch_size=2", "train.seq_len=512", "train.steps=3"])
    prog = Program(cfg, make_mesh(cfg.mesh))
    state = prog.init(jax.random.key(0))
    d = np.random.default_rng(0).integers(0, 8192, (2, 513)).astype(np.int32)
    batch = prog.global_batch({"inputs": d[:, :-1], "targets": d[:, 1:], "loss_mask": np.ones((2, 512), np.float32)})
    state, m = prog.train_step(state, batch)
    jax.block_until_ready(m)
    t = time.perf_counter()
    for _ in range(2):
        state, m = prog.train_step(state, batch)
    jax.block_until_ready(m)
    return 2 * 2 * 512 / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=int, nargs=2, default=[2, 20])
    p.add_argument("--batches", type=int, default=300)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="loader process counts (0: inline)")
    p.add_argument("--bucket", help="also read the corpora from here (s3://... or gs://..., through the clients' "
                   "own environment: tools/storage_servers env)")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--smoke", action="store_true", help="200 KB of the text at scales 1 and 2, 5 batches, a 1-layer "
                   "step: that the script runs (tests/test_bench.py), no figure")
    a = p.parse_args()
    if a.child:
        return child(a.child[0], int(a.child[1]), int(a.child[2]))
    if a.smoke:
        a.scale, a.batches = [1, 2], 5
    machine = cpu()
    rows = []
    for scale in a.scale:
        directory = prepared(scale, ROOT / "smoke" if a.smoke else ROOT, a.smoke)
        places = [("local", str(directory), None)]
        if a.bucket:
            from gptjax.storage import push

            url = f"{a.bucket.rstrip('/')}/{directory.name}"
            push(directory, url)
            places.append(("bucket", url, directory.parent / "cache"))
        for where, source, cache in places:
            for workers in a.workers:
                if cache is not None:
                    shutil.rmtree(cache, ignore_errors=True)  # cold: every shard comes from the bucket
                env = {"GPTJAX_CACHE_DIR": str(cache)} if cache is not None else None
                rows.append({"bench": "loader", "from": where, "scale": scale,
                             **run_child(source, a.batches, workers, env), **machine})
                print(json.dumps(rows[-1]), flush=True)
    step = step_tokens_per_s(a.smoke)
    local = [r for r in rows if r["from"] == "local" and r["workers"] == a.workers[0]]
    print(json.dumps({"bench": "step", "config": "smoke: 1 layer of 64" if a.smoke else "gpt2ish fp32 2 x 512",
                      "tokens_per_s": round(step, 1),
                      "loader_over_step": round(min(r["tokens_per_s"] for r in rows) / step, 1),
                      "rss_ratio_for_10x_corpus": round(local[-1]["peak_rss_mb"] / local[0]["peak_rss_mb"], 3),
                      "bucket_over_local": {w: round(_rate(rows, "bucket", w) / _rate(rows, "local", w), 3)
                                            for w in a.workers} if a.bucket else None,
                      **machine}), flush=True)


def _rate(rows: list[dict], where: str, workers: int) -> float:
    """The tokens/s of the largest corpus read from ``where`` with ``workers``."""
    return [r for r in rows if r["from"] == where and r["workers"] == workers][-1]["tokens_per_s"]


if __name__ == "__main__":
    main()
