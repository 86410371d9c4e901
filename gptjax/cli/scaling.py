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

from gptjax.cli.common import user_errors
from gptjax.reporting.files import write_atomic


def _fit(a) -> int:
    from gptjax.scaling.fit import APPROACHES, fit_points
    from gptjax.scaling.points import read_points

    approaches = APPROACHES if a.approach == "all" else (a.approach,)
    points = read_points(a.points, params_col=a.params_col, tokens_col=a.tokens_col, loss_col=a.loss_col,
                         flops_col=a.flops_col)
    result = fit_points(points, approaches, bootstrap=a.bootstrap, drop_highest=a.drop_highest, seed=a.seed,
                        skip_inapplicable=a.approach == "all")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, json.dumps(result, indent=2) + "\n")
    for w in result["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    print(summary_text(result))
    if a.plot:
        from gptjax.scaling.plots import plot_fit

        print(f"plot: {plot_fit(points, result, a.plot, title=Path(a.points).name)}")
    print(f"fit: {out}")
    return 0


def _interval(section: dict, key: str) -> str:
    ci = section.get("ci", {}).get(key)
    return f" [{ci[0]:.4g}, {ci[1]:.4g}]" if ci else ""


def summary_text(result: dict) -> str:
    lines = [f"{result['n_points']} points"]
    for key, name in (("approach3", "approach 3 (Huber/L-BFGS)"), ("vpnls", "vpnls")):
        s = result.get(key)
        if s:
            lines.append(f"{name}: E={s['E']:.4g}{_interval(s, 'E')} A={s['A']:.4g}{_interval(s, 'A')} "
                         f"B={s['B']:.4g}{_interval(s, 'B')} alpha={s['alpha']:.4f}{_interval(s, 'alpha')} "
                         f"beta={s['beta']:.4f}{_interval(s, 'beta')}")
            lines.append(f"  N_opt ~ C^{s['a']:.4f}{_interval(s, 'a')}  D_opt ~ C^{s['b']:.4f}{_interval(s, 'b')}"
                         f"  tokens/param at C={s['reference_flops']:.3g}: {s['tokens_per_param_at_ref']:.3g}"
                         f"{_interval(s, 'tokens_per_param_at_ref')}  objective={s['objective']:.4g}")
    for key, name in (("approach2", "approach 2 (IsoFLOP)"), ("approach1", "approach 1 (envelope)")):
        s = result.get(key)
        if s:
            lines.append(f"{name}: N_opt ~ C^{s['a']:.4f}{_interval(s, 'a')}  D_opt ~ C^{s['b']:.4f}"
                         f"{_interval(s, 'b')}")
    if result.get("timings_s"):
        lines.append("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in result["timings_s"].items()))
    return "\n".join(lines)


def _collect(a) -> int:
    from gptjax.scaling.flops import chinchilla_flops
    from gptjax.scaling.points import ScalingInputError, collect_run, write_points

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
    from gptjax.scaling.fit import predict
    from gptjax.scaling.points import ScalingInputError

    path = Path(a.fit)
    try:
        fit = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ScalingInputError(f"cannot read fit file {path}: {e}") from None
    out = predict(fit, flops=a.flops, params=a.params, tokens=a.tokens, approach=a.approach)
    if a.json:
        print(json.dumps(out, indent=2))
    elif a.flops is not None:
        print(f"C={out['flops']:.4g} FLOPs (approach {a.approach}): N_opt={out['params']:.4g} "
              f"D_opt={out['tokens']:.4g} tokens/param={out['tokens_per_param']:.3g} loss={out['loss']:.4f}")
        if "approach2" in out:
            print(f"  approach 2 power laws: N_opt={out['approach2']['params']:.4g} "
                  f"D_opt={out['approach2']['tokens']:.4g}")
    else:
        print(f"N={out['params']:.4g} D={out['tokens']:.4g}: loss={out['loss']:.4f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gptjax-scaling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fit", help="fit scaling laws to a points CSV")
    f.add_argument("points")
    f.add_argument("--params-col", default="params")
    f.add_argument("--tokens-col", default="tokens")
    f.add_argument("--loss-col", default="loss")
    f.add_argument("--flops-col", default=None, help="compute column (default: C = 6 N D)")
    f.add_argument("--approach", choices=["1", "2", "3", "vpnls", "all"], default="all",
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
    r.add_argument("--approach", choices=["3", "vpnls"], default="3")
    r.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    from gptjax.scaling.points import ScalingInputError

    with user_errors(ScalingInputError):
        return {"fit": _fit, "collect": _collect, "predict": _predict}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
