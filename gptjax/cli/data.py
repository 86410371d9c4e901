"""``gptjax-data``: prepare corpora larger than memory for training, offline and in parallel.

    gptjax-data train-tokenizer corpus/*.jsonl.zst books.txt --vocab-size 32000 --out tok.model
    gptjax-data prepare corpus/*.jsonl.zst books.txt --tokenizer tok.model --out data/web --workers 8
    gptjax-data info data/web
    gptjax-data verify data/web                          # every shard against the manifest's hashes
    gptjax-data builtin stdlib --out stdlib.jsonl       # a real corpus every machine has (or: austen)

Sources are plain text (documents split at blank lines, or at lines matching ``--doc-pattern``), JSONL with a text
field (plain, ``.gz``, ``.zst``) and Parquet; none is read whole. ``train-tokenizer``: sentencepiece BPE with byte
fallback on a seeded uniform sample of the documents. ``prepare``: token documents in ArrayRecord shards with a
manifest (``gptjax/data/shards.py`` documents the layout); run it again after a kill and it resumes, ending with
the same bytes; run it again when done and it says so. ``info``: the manifest's summary. ``verify``: every shard
against the manifest's SHA-256 (exit 1 naming each damaged file).

Exit codes: 0 done, 1 verify found damage, 2 bad input (one line on stderr naming the file and line or row).
"""

from __future__ import annotations

import argparse
import json
import sys

from gptjax.cli.common import console_script, user_errors
from gptjax.data.builtin import BUILTIN, write_builtin
from gptjax.data.sources import BAD_ROWS


def _source_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("sources", nargs="+", help="text, JSONL (.jsonl, .jsonl.gz, .jsonl.zst) or Parquet files")
    p.add_argument("--text-field", default="text", help="JSONL field / Parquet column of the text (default text)")
    p.add_argument("--doc-pattern", help="plain text: a regex matching the line that starts each document "
                   "(default: documents are separated by blank lines)")
    p.add_argument("--bad-rows", choices=BAD_ROWS, default=BAD_ROWS[0],
                   help="a JSONL line that is not JSON or lacks the field: stop with its line (default) or skip "
                   "and count it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptjax-data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train-tokenizer", help="train a sentencepiece BPE tokenizer on a sample of the sources")
    _source_options(t)
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--out", required=True, help="the tokenizer model file to write")
    t.add_argument("--sample-docs", type=int, default=100_000, help="documents sampled (default 100000)")
    t.add_argument("--sample-chars", type=int, default=20_000_000,
                   help="characters of the sample the BPE trainer reads (default 20M)")
    t.add_argument("--seed", type=int, default=0)
    prep = sub.add_parser("prepare", help="tokenize the sources into ArrayRecord shards with a manifest")
    _source_options(prep)
    prep.add_argument("--tokenizer", required=True, help="a sentencepiece model (gptjax-data train-tokenizer)")
    prep.add_argument("--out", required=True, help="the prepared directory")
    prep.add_argument("--workers", type=int, default=1, help="tokenizing processes (default 1)")
    prep.add_argument("--docs-per-shard", type=int, default=4096, help="documents per shard (default 4096)")
    prep.add_argument("--dedup", type=float, metavar="THRESHOLD",
                      help="drop exact duplicates and near duplicates whose word 5-gram Jaccard similarity with an "
                      "earlier document is at least THRESHOLD (MinHash LSH; e.g. 0.8); counted in the manifest")
    prep.add_argument("--contamination", nargs="+", default=[], metavar="EVAL_FILE",
                      help="evaluation texts (plain text, or task JSONL: every string of a row): count the documents "
                      "sharing a 13-word n-gram with them, per source (GPT-3 §4)")
    prep.add_argument("--drop-contaminated", action="store_true", help="with --contamination: drop those documents")
    prep.add_argument("--quality", metavar="CLASSIFIER", help="a classifier from quality-train: keep a document of "
                      "score s when np.random.pareto(9) > 1 - s (GPT-3 Appendix A; the draw is seeded by the text)")
    prep.add_argument("--val-fraction", type=float, default=0.005,
                      help="share of documents in the validation split, chosen by a hash of the text (default 0.005)")
    q = sub.add_parser("quality-train", help="fit GPT-3's quality classifier: good reference text against the raw pool")
    q.add_argument("--good", nargs="+", required=True, help="sources of good reference text")
    q.add_argument("--raw", nargs="+", required=True, help="sources of the raw pool")
    q.add_argument("--out", required=True, help="the classifier file to write (.npz)")
    q.add_argument("--text-field", default="text", help="JSONL field / Parquet column of the text (default text)")
    q.add_argument("--held-out", type=float, default=0.2, help="share of each side held out for the accuracy "
                   "printed (default 0.2)")
    q.add_argument("--max-docs", type=int, default=50_000, help="documents read from each side (default 50000)")
    q.add_argument("--seed", type=int, default=0)
    b = sub.add_parser("builtin", help="write a real corpus this machine has as JSONL: the embedded novels "
                       "(austen) or the interpreter's standard library (stdlib)")
    b.add_argument("name", choices=sorted(BUILTIN))
    b.add_argument("--out", required=True, help="the JSONL file to write")
    v = sub.add_parser("verify", help="check every shard of a prepared directory against the manifest's hashes")
    v.add_argument("dir")
    v.add_argument("--no-progress", action="store_true", help="no progress bar")
    info = sub.add_parser("info", help="what a prepared directory holds")
    info.add_argument("dir")
    info.add_argument("--json", action="store_true", help="print the whole manifest")
    return p


@console_script("gptjax-data")
def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    from gptjax.data.shards import PrepareSettings, PreparedData, prepare, train_tokenizer
    from gptjax.data.sources import SourceError
    from gptjax.data.tokenizer import TokenizerError

    with user_errors(SourceError, TokenizerError):
        if a.command == "quality-train":
            return quality_train(a)
        if a.command == "builtin":
            n = write_builtin(a.name, a.out)
            print(f"wrote {a.out}: {n} documents")
            return 0
        if a.command == "verify":
            data = PreparedData(a.dir)
            problems = data.verify(progress=not a.no_progress)
            for path, why in problems.items():
                print(f"DAMAGED: {path}: {why}")
            n = sum(len(v) for v in data.manifest["shards"].values())
            print(f"{a.dir}: {len(problems)} of {n} shards damaged; gptjax-data prepare with the same inputs "
                  "prepares them again, to the same bytes"
                  if problems else f"{a.dir}: intact ({n} shards, each matching the manifest's SHA-256)")
            return 1 if problems else 0
        if a.command == "info":
            data = PreparedData(a.dir)
            if a.json:
                print(json.dumps(data.manifest, indent=1))
            else:
                summarize(data.manifest, a.dir)
            return 0
        settings = PrepareSettings(text_field=a.text_field, doc_pattern=a.doc_pattern, bad_rows=a.bad_rows,
                                   **({"docs_per_shard": a.docs_per_shard, "val_fraction": a.val_fraction,
                                       "dedup": a.dedup, "contamination": tuple(a.contamination),
                                       "drop_contaminated": a.drop_contaminated, "quality": a.quality}
                                      if a.command == "prepare" else {}))
        if a.command == "train-tokenizer":
            tok = train_tokenizer(a.sources, a.vocab_size, sample_docs=a.sample_docs, sample_chars=a.sample_chars,
                                  seed=a.seed, settings=settings, progress=not a.no_progress)
            tok.save(a.out)
            print(f"wrote {a.out}: {tok.vocab_size} pieces")
            return 0
        manifest = prepare(a.sources, a.tokenizer, a.out, workers=a.workers, settings=settings,
                           progress=not a.no_progress)
        summarize(manifest, a.out)
    return 0


def quality_train(a: argparse.Namespace) -> int:
    """Fit on all but a held-out share of each side, print the held-out accuracy, write the classifier."""
    from gptjax.data.quality import train_quality_classifier

    clf = train_quality_classifier(a.good, a.raw, text_field=a.text_field, held_out=a.held_out,
                                   max_docs=a.max_docs, seed=a.seed)
    if "held_out_accuracy" in clf.meta:
        held = clf.meta["held_out"]
        print(f"held-out accuracy {clf.meta['held_out_accuracy']:.3f} ({held['good']} good, {held['raw']} raw); "
              f"the Pareto rule keeps {clf.meta['kept_by_pareto']['good']:.1%} of good and "
              f"{clf.meta['kept_by_pareto']['raw']:.1%} of raw")
    clf.save(a.out)
    print(f"wrote {a.out}")
    return 0


def summarize(manifest: dict, where: str) -> None:
    for s in manifest["sources"]:
        skipped, dropped = sum(s.get("skipped", {}).values()), sum(s.get("dropped", {}).values())
        print(f"{s['path']}: {s.get('documents', '?')} documents"
              + (f", {skipped} rows skipped ({', '.join(f'{k}: {v}' for k, v in s['skipped'].items())})"
                 if skipped else "")
              + (f", {dropped} dropped ({', '.join(f'{k}: {v}' for k, v in s['dropped'].items())})"
                 if dropped else "")
              + (f", {s['contaminated']} share a 13-gram with the evaluation texts (e.g. "
                 f"{', '.join(s['contaminated_examples'][:2])})" if s.get("contaminated") else ""))
    t = manifest["totals"]
    shards = manifest["shards"]
    print(f"{where}: train {t['train']['documents']} documents, {t['train']['tokens']} tokens in "
          f"{len(shards['train'])} shards; val {t['val']['documents']} documents, {t['val']['tokens']} tokens in "
          f"{len(shards['val'])} shards (tokenizer {manifest['tokenizer']['sha256'][:12]}, "
          f"{manifest['tokenizer']['vocab_size']} pieces)")


if __name__ == "__main__":
    sys.exit(main())
