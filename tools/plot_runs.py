#!/usr/bin/env python
"""Plot one or more runs' metrics.jsonl: loss vs tokens (with validation and unigram baseline) and throughput.

    python tools/plot_runs.py runs/austen                       # -> runs/austen/curves.png
    python tools/plot_runs.py runs/a runs/b -o compare.png
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    from gptjax.eval.plots import plot_runs

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("-o", "--out", help="PNG path (default: <first run>/curves.png)")
    a = p.parse_args()
    missing = [r for r in a.runs if not (Path(r) / "metrics.jsonl").exists()]
    if missing:
        print(f"error: no metrics.jsonl in {', '.join(missing)}", file=sys.stderr)
        return 2
    print(plot_runs(a.runs, a.out or Path(a.runs[0]) / "curves.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
