"""``gptjax-plot RUN [RUN ...]``: loss vs tokens (with validation and unigram baseline) and throughput of runs.

    gptjax-plot runs/austen                       # -> runs/austen/curves.png
    gptjax-plot runs/a runs/b -o compare.png
"""

from __future__ import annotations

import argparse
import sys

from gptjax.cli.common import UserError, console_script, user_errors


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptjax-plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("-o", "--out", help="PNG path (default: <first run>/curves.png)")
    return p


@console_script("gptjax-plot")
def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    from gptjax.reporting.plots import plot_runs
    from gptjax.runs import PNG_MAGIC, RunDir, check_overwrite

    runs = [RunDir(r) for r in a.runs]
    out = a.out or runs[0].curves
    with user_errors():
        missing = [str(r) for r in runs if not r.metrics.exists()]
        if missing:
            raise UserError(f"no {RunDir.METRICS} in {', '.join(missing)}")
        check_overwrite(out, lambda head: head.startswith(PNG_MAGIC), "gptjax-plot")  # a PNG only
        print(plot_runs(runs, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
