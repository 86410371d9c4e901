"""Deduplication: precision and recall on planted near-duplicates, and documents/s and peak memory on 100k documents.

    python bench/dedup_bench.py                       # thresholds 0.7 and 0.8, 100,000 documents
    python bench/dedup_bench.py --documents 20000

Planted: 300 Austen paragraphs of at least 60 words, each followed by copies with each word replaced at rates
0, 1, 3, 5, 10 and 30% (the truth: a copy's exact word 5-gram Jaccard similarity with its base is at least the
threshold). Throughput: every paragraph of the embedded corpus, then edited copies at random rates, up to
``--documents``, through one ``Deduplicator`` at 0.8; peak memory is the process's max RSS growth. Prints JSON lines
with the CPU.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import time

from machine import cpu  # a sibling: bench/ is the script's directory

from gptjax.data import default_corpus_path, read_corpus, split_documents
from gptjax.data import Deduplicator, plant_near_duplicates, precision_recall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--documents", type=int, default=100_000)
    p.add_argument("--num-perm", type=int, default=256)
    a = p.parse_args()
    paras = split_documents(read_corpus(default_corpus_path()), None)
    machine = cpu()
    bases = [x for x in paras if len(x.split()) >= 60][:300]
    docs, origin = plant_near_duplicates(bases, (0.0, 0.01, 0.03, 0.05, 0.1, 0.3), seed=0)
    for threshold in (0.7, 0.8):
        r = precision_recall(docs, origin, threshold, num_perm=a.num_perm)
        print(json.dumps({"bench": "planted", **r, **machine}), flush=True)

    rng = random.Random(0)
    stream = list(paras)
    while len(stream) < a.documents:
        base = rng.choice(paras).split()
        rate = rng.choice([0.0, 0.02, 0.1, 0.5, 1.0])
        stream.append(" ".join(w if rng.random() >= rate else rng.choice(base) + "x" for w in base))
    stream = stream[:a.documents]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    d = Deduplicator(0.8, num_perm=a.num_perm)
    t = time.perf_counter()
    for x in stream:
        d.check(x)
    seconds = time.perf_counter() - t
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(json.dumps({"bench": "throughput", "documents": len(stream), "seconds": round(seconds, 1),
                      "docs_per_s": round(len(stream) / seconds), "words_per_doc": round(
                          sum(len(x.split()) for x in stream) / len(stream), 1),
                      "peak_rss_growth_mb": round(grown / 1024, 1), "dropped": d.dropped, **machine}), flush=True)


if __name__ == "__main__":
    main()
