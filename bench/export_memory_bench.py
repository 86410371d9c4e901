"""Peak memory of a streaming HF export against the model's size.

Builds a run directory holding a LLaMA-style model far larger than the shard size (random parameters, saved as a
gptjax checkpoint in the scan-stacked layout, the one where a naive export would restore whole stacks), then runs
``gptjax-export`` in a child process and reads the child's peak RSS (``ru_maxrss``). For scale, a second child
only imports the same modules and opens the checkpoint (the process's baseline), and a third restores the whole
parameter tree the non-streaming way (``load_run``).

    python bench/export_memory_bench.py                      # ~0.8 GB model, 50 MB shards
    python bench/export_memory_bench.py --layers 8 --shard 50MB

Prints one table: model bytes, shard size, the largest single tensor, peak RSS of each child.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child_peak(code: str) -> tuple[float, float]:
    """(peak RSS in bytes, seconds) of ``python -c code`` in a fresh process (it reports its own ru_maxrss)."""
    t = time.perf_counter()
    code += "\nimport resource; print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    kb = int(r.stdout.split("PEAK_KB")[-1])
    return kb * 1024, time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--shard", default="50MB")
    p.add_argument("--workdir", default=None)
    a = p.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="gptjax-export-bench-"))
    run = work / "run"
    d = a.d_model
    model = dict(vocab_size=a.vocab, d_model=d, n_layers=a.layers, n_heads=d // 64, n_kv_heads=d // 128,
                 d_ff=int(8 * d / 3) // 64 * 64, max_seq_len=2048, tie_embeddings=False, scan_layers=True)
    if not run.exists():  # a child builds it, so this process's own peak stays out of the measurements
        subprocess.run([sys.executable, "-c", f"""
import jax, numpy as np
from gptjax.config import RunConfig, ModelConfig, TrainConfig
from gptjax.data import Tokenizer, default_corpus_path, read_corpus, split_documents
from gptjax.model import ShardedModel, unstack_layers
from gptjax.sharding import single_device_mesh
from gptjax.training import seed_run
m = ModelConfig(**{model!r})
cfg = RunConfig(model=m, train=TrainConfig(run_dir={str(run)!r}, seq_len=256, batch_size=1))
tok = Tokenizer.train(split_documents(read_corpus(default_corpus_path()), None), {a.vocab}, sample_chars=2_000_000)
params = unstack_layers(jax.device_get(ShardedModel(m, single_device_mesh()).init_params(jax.random.key(0))), m.n_layers)
seed_run(cfg, params, tok.proto, {{}})
"""], check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    from gptjax.config import ModelConfig
    from gptjax.model import param_counts

    cfg = ModelConfig(**model)
    model_bytes = param_counts(cfg)["total"] * 4
    largest = max(cfg.vocab_size * d, d * cfg.d_ff) * 4

    baseline, _ = child_peak(f"""
import gptjax.interop.export, gptjax.cli.export, numpy, jax
from gptjax.checkpoint import CheckpointTensors
r = CheckpointTensors({str(run)!r}); r.read('final_norm.scale')
""")
    out = work / "hf"
    export_peak, export_s = child_peak(f"""
from gptjax.cli.export import main
main(['--run-dir', {str(run)!r}, '--out', {str(out)!r}, '--max-shard-size', {a.shard!r}, '--no-progress'])
""")
    full_peak, _ = child_peak(f"""
import jax
from gptjax.checkpoint import load_run
params = load_run({str(run)!r}, tokenizer=False).params
jax.block_until_ready(params)
""")
    files = sorted(p.name for p in out.glob("*.safetensors"))
    mb = lambda x: f"{x / 1e6:,.0f} MB"  # noqa: E731
    rows = [("model (float32)", mb(model_bytes)), ("shard size", a.shard), ("files written", str(len(files))),
            ("largest single tensor", mb(largest)),
            ("peak RSS, imports + open checkpoint (baseline)", mb(baseline)),
            ("peak RSS, gptjax-export (streaming)", mb(export_peak)),
            ("  export minus baseline", mb(export_peak - baseline)),
            ("  export minus baseline, as a fraction of the model", f"{(export_peak - baseline) / model_bytes:.3f}"),
            ("peak RSS, load_run (whole tree, for scale)", mb(full_peak)),
            ("export wall time", f"{export_s:.1f} s")]
    width = max(len(r[0]) for r in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    print(json.dumps({"model_bytes": model_bytes, "shard": a.shard, "files": len(files), "baseline_rss": baseline,
                      "export_rss": export_peak, "restore_rss": full_peak, "export_s": export_s}))


if __name__ == "__main__":
    main()
