"""``gptjax-plot RUN [RUN ...]``: loss vs tokens (with validation and unigram baseline) and throughput of runs.

    gptjax-plot runs/austen                       # -> runs/austen/curves.png
    gptjax-plot runs/a runs/b -o compare.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gptjax.cli.common import UserError, user_errors


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gptjax-plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("-o", "--out", help="PNG path (default: <first run>/curves.png)")
    a = p.parse_args(argv)
    from gptjax.reporting.plots import plot_runs

    with user_errors():
        missing = [r for r in a.runs if not (Path(r) / "metrics.jsonl").exists()]
        if missing:
            raise UserError(f"no metrics.jsonl in {', '.join(missing)}")
    print(plot_runs(a.runs, a.out or Path(a.runs[0]) / "curves.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
