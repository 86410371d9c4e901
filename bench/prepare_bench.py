"""Preparation: tokens/s per worker of ``gptjax-data prepare`` against sentencepiece's own encode rate on the same
text (its ceiling), and the scaling from 1 to 2 workers.

    python bench/prepare_bench.py                     # the two builtin corpora x 2, an 8,192-piece tokenizer
    python bench/prepare_bench.py --vocab-size 2048 --copies 1

The text: ``gptjax-data builtin austen`` and ``stdlib`` (prose and code, 14 MB), each ``--copies`` times (so that
the workers' start-up, ~0.3 s, is a small part), written under /tmp/gptjax-prepare-bench with the tokenizer
(once). The ceiling row: one process encodes every document with
sentencepiece on one thread, the documents already in memory (nothing read, hashed or written). The prepare rows:
``prepare`` into a fresh directory with 1 and 2 workers (each worker encodes on one thread), wall time from the
call to the manifest, so reading JSONL, the split hash, shard writing and fsync all count. ``per_worker_ratio``:
tokens/s per worker over the ceiling. The three are measured in turn ``--repeat`` times and each is the best of
its tries (this machine's speed varies by 20% from minute to minute). JSON lines with the CPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from machine import cpu  # a sibling: bench/ is the script's directory

ROOT = Path("/tmp/gptjax-prepare-bench")


def inputs(vocab_size: int, copies: int, root: Path = ROOT, smoke: bool = False) -> tuple[list[Path], Path]:
    from gptjax.data import train_tokenizer, write_builtin

    root.mkdir(parents=True, exist_ok=True)
    once = [root / f"{name}.jsonl" for name in ("austen", "stdlib")]
    for path in once:
        if not path.exists():
            write_builtin(path.stem, path)
            if smoke:  # the first 300 documents of each
                path.write_text("".join(path.read_text().splitlines(keepends=True)[:300]))
    tok = root / f"tok-{vocab_size}.model"
    if not tok.exists():
        train_tokenizer(once, vocab_size, progress=False).save(tok)
    sources = []
    for path in once:
        copy = root / f"{path.stem}-x{copies}.jsonl"
        if not copy.exists():
            copy.write_text(path.read_text() * copies)
        sources.append(copy)
    return sources, tok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--docs-per-shard", type=int, default=64,
                   help="small (~1 MB), so that 2 workers have chunks to share")
    p.add_argument("--copies", type=int, default=2, help="each corpus this many times over (default 2: 28 MB)")
    p.add_argument("--repeat", type=int, default=4)
    p.add_argument("--smoke", action="store_true", help="300 documents of each corpus, 512 pieces, once: that the "
                   "script runs (tests/test_bench.py), no figure")
    a = p.parse_args()
    from gptjax.data import PrepareSettings, Tokenizer, prepare, read_documents

    root = ROOT / "smoke" if a.smoke else ROOT
    if a.smoke:
        a.vocab_size, a.copies, a.repeat = 512, 1, 1
    sources, tok_path = inputs(a.vocab_size, a.copies, root, a.smoke)
    machine = cpu()
    tok = Tokenizer.load(tok_path)
    docs = [d.text for s in sources for d in read_documents(s)]
    tokens = sum(len(x) + 1 for x in tok.encode_batch(docs))  # with each document's </s>, as the shards hold them
    best = {"ceiling": float("inf"), 1: float("inf"), 2: float("inf")}
    for _ in range(a.repeat):  # interleaved, so that a slow spell of a shared machine hits all three alike
        t = time.perf_counter()
        tok.encode_batch(docs, threads=1)
        best["ceiling"] = min(best["ceiling"], time.perf_counter() - t)
        for workers in (1, 2):
            out = root / f"out-{workers}"
            shutil.rmtree(out, ignore_errors=True)
            t = time.perf_counter()
            m = prepare(sources, tok_path, out, workers=workers, progress=False,
                        settings=PrepareSettings(docs_per_shard=a.docs_per_shard))
            best[workers] = min(best[workers], time.perf_counter() - t)
            got = m["totals"]["train"]["tokens"] + m["totals"]["val"]["tokens"]
            assert got == tokens, (got, tokens)  # the same text, every token
    common = {"documents": len(docs), "bytes": sum(len(d.encode()) for d in docs), "tokens": tokens,
              "vocab_size": a.vocab_size, "repeat": a.repeat}
    ceiling = tokens / best["ceiling"]
    print(json.dumps({"bench": "sentencepiece_encode_1_thread", **common, "seconds": round(best["ceiling"], 3),
                      "tokens_per_s": round(ceiling), **machine}), flush=True)
    for workers in (1, 2):
        rate = tokens / best[workers]
        print(json.dumps({"bench": "prepare", "workers": workers, **common, "seconds": round(best[workers], 3),
                          "tokens_per_s": round(rate), "per_worker_ratio": round(rate / workers / ceiling, 3),
                          "speedup_vs_1_worker": round(best[1] / best[workers], 3), **machine}), flush=True)

if __name__ == "__main__":
    main()
