"""``gptjax-mup``: μP tools. ``coord-check`` trains one model at several widths for a few steps, under the standard
parametrization and under μP, and plots each layer's activation size against width (Yang et al. 2022, fig. 5):
flat under μP, growing under the standard parametrization.

Examples::

    gptjax-mup coord-check --out coord_check.png                  # widths 64..1024, 4 Adam steps at lr 1e-2
    gptjax-mup coord-check --widths 64 256 1024 --steps 2 --lr 3e-3 --out cc.png --json cc.json

Exit codes: 0 done, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gptjax.cli.common import UserError, console_script, setup_logging, user_errors
from gptjax.runs import PNG_MAGIC, check_overwrite


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptjax-mup", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("coord-check", help="activation size against width, standard vs μP (a PNG)")
    c.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    c.add_argument("--steps", type=int, default=4, help="Adam steps (one fixed batch)")
    c.add_argument("--lr", type=float, default=1e-2, help="the same for every width")
    c.add_argument("--base-width", type=int, default=64, help="μP's base width (mup_base_width)")
    c.add_argument("--out", default="coord_check.png")
    c.add_argument("--json", help="also write the rows (parametrization, width, step, layer, rms)")
    return p


@console_script("gptjax-mup")
def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    setup_logging()
    with user_errors():
        if len(a.widths) < 2 or min(a.widths) < 8 or a.steps < 1:
            raise UserError("--widths needs two or more widths of at least 8, --steps at least 1")
        if not Path(a.out).parent.is_dir():
            raise UserError(f"--out {a.out}: directory {Path(a.out).parent} does not exist")
        check_overwrite(a.out, lambda head: head.startswith(PNG_MAGIC), "gptjax-mup")  # a PNG only
    from gptjax.experiments.mup import coord_check, plot, spread

    rows = coord_check(sorted(a.widths), steps=a.steps, lr=a.lr, base_width=a.base_width)
    plot(rows, a.out)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    for p in ("standard", "mup"):
        worst = max(spread(rows, p, a.steps).items(), key=lambda kv: kv[1])
        print(f"{p:8s} after {a.steps} steps: activation RMS spread over widths {min(a.widths)}-{max(a.widths)} "
              f"up to {worst[1]:.2f}x ({worst[0]})")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
