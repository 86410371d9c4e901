"""``gptjax-scaling``: scaling-law fits (Chinchilla approaches 1, 2, 3 and variable projection) on a table of runs.

    gptjax-scaling collect runs/isoflop/C* --out points.csv          # the table, from run directories
    gptjax-scaling fit points.csv --approach all --bootstrap 1000 --out fit.json --plot fit.png
    gptjax-scaling predict fit.json --flops 1e21                    # N_opt, D_opt and the loss there
    gptjax-scaling predict fit.json --params 1e9 --tokens 2e10      # the loss of one run

Points: a CSV with columns params, tokens, loss (names set by --params-col etc.), optionally flops (default
6 N D), run and final (approach 1 uses every row of a run as its loss curve; the others use rows with final=1),
budget (groups IsoFLOP points; default: equal compute within 5%).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gptjax.cli.common import console_script, user_errors


def _fit(a) -> int:
    from gptjax.scaling import APPROACHES, fit_points, read_points

    approaches = APPROACHES if a.approach == "all" else (a.approach,)
    points = read_points(a.points, params_col=a.params_col, tokens_col=a.tokens_col, loss_col=a.loss_col,
                         flops_col=a.flops_col)
    result = fit_points(points, approaches, bootstrap=a.bootstrap, drop_highest=a.drop_highest, seed=a.seed,
                        skip_inapplicable=a.approach == "all")
    out = result.write(a.out)
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(result.summary())
    if a.plot:
        from gptjax.scaling import plot_fit

        print(f"plot: {plot_fit(points, result, a.plot, title=Path(a.points).name)}")
    print(f"fit: {out}")
    return 0


def _collect(a) -> int:
    from gptjax.scaling import ScalingInputError, chinchilla_flops, collect_run, write_points

    flops_fn = None
    if a.flops == "chinchilla":
        def flops_fn(cfg, n, d):  # noqa: E306
            return chinchilla_flops(cfg.model, cfg.train.seq_len, d)
    rows, skipped = [], []
    for r in a.runs:
        try:
            rows += collect_run(r, flops_fn=flops_fn)
        except ScalingInputError as e:
            if not a.skip_bad:
                raise
            skipped.append(str(e))
    if not rows:
        raise ScalingInputError("no run produced a point")
    for s in skipped:
        print(f"skipped: {s}", file=sys.stderr)
    n_final = sum(r["final"] for r in rows)
    print(f"{write_points(rows, a.out)}: {len(rows)} rows ({n_final} final) from {len(a.runs) - len(skipped)} runs")
    return 0


def _predict(a) -> int:
    from gptjax.scaling import FitResult, predict

    out = predict(FitResult.read(a.fit), flops=a.flops, params=a.params, tokens=a.tokens, approach=a.approach)
    ci = lambda k: (f" [{out.ci[k][0]:.4g}, {out.ci[k][1]:.4g}]" if out.ci and out.ci.get(k) else "")  # noqa: E731
    if a.json:
        print(json.dumps(out.to_dict(), indent=2))
    elif a.flops is not None:
        print(f"C={out.flops:.4g} FLOPs (approach {a.approach}): N_opt={out.params:.4g}{ci('params')} "
              f"D_opt={out.tokens:.4g}{ci('tokens')} tokens/param={out.tokens_per_param:.3g} "
              f"loss={out.loss:.4f}{ci('loss')}")
        if out.approach2:
            print(f"  approach 2 power laws: N_opt={out.approach2['params']:.4g} D_opt={out.approach2['tokens']:.4g}")
    else:
        print(f"N={out.params:.4g} D={out.tokens:.4g}: loss={out.loss:.4f}{ci('loss')}")
    if out.ci is None and a.json is False:
        print("  (no intervals: the fit stores no bootstrap refits; refit with --bootstrap 1000)", file=sys.stderr)
    return 0


def parser() -> argparse.ArgumentParser:
    from gptjax.scaling import APPROACHES, PARAMETRIC_APPROACHES

    p = argparse.ArgumentParser(prog="gptjax-scaling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fit", help="fit scaling laws to a points CSV")
    f.add_argument("points")
    f.add_argument("--params-col", default="params")
    f.add_argument("--tokens-col", default="tokens")
    f.add_argument("--loss-col", default="loss")
    f.add_argument("--flops-col", default=None, help="compute column (default: C = 6 N D)")
    f.add_argument("--approach", choices=[*APPROACHES, "all"], default="all",
                   help="all: every approach the points support (the others are skipped with a warning)")
    f.add_argument("--drop-highest", type=int, default=0, metavar="K", help="leave out the K highest-loss points")
    f.add_argument("--bootstrap", type=int, default=0, metavar="R", help="bootstrap resamples (e.g. 1000)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--out", required=True)
    f.add_argument("--plot", default=None, metavar="PNG")
    c = sub.add_parser("collect", help="build a points CSV from run directories")
    c.add_argument("runs", nargs="+")
    c.add_argument("--out", required=True)
    c.add_argument("--flops", choices=["6nd", "chinchilla"], default="6nd",
                   help="compute per run: 6 N D, or the Chinchilla appendix-F count from the model config")
    c.add_argument("--skip-bad", action="store_true", help="skip (and list) directories that are not finished runs")
    r = sub.add_parser("predict", help="N_opt, D_opt and loss at a compute budget, or the loss at (N, D)")
    r.add_argument("fit")
    r.add_argument("--flops", type=float)
    r.add_argument("--params", type=float)
    r.add_argument("--tokens", type=float)
    r.add_argument("--approach", choices=PARAMETRIC_APPROACHES, default="3")
    r.add_argument("--json", action="store_true")
    return p


@console_script("gptjax-scaling")
def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    from gptjax.scaling import ScalingInputError

    with user_errors(ScalingInputError):
        return {"fit": _fit, "collect": _collect, "predict": _predict}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
