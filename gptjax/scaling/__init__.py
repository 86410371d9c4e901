"""Scaling laws: Chinchilla approaches 1 (envelope), 2 (IsoFLOP profiles) and 3 (parametric, Huber/L-BFGS from
the paper's 4,500-start grid), a variable-projection fit, bootstrap intervals, the compute-optimal frontier,
FLOP counts, and a sizing rule for sweeps. Consumes config, model and reporting; nothing in gptjax imports it
but the CLI."""

from gptjax.scaling.fit import fit_points, predict
from gptjax.scaling.flops import chinchilla_flops
from gptjax.scaling.parametric import ParametricFit, fit_parametric, fit_vpnls
from gptjax.scaling.points import Points, ScalingInputError, collect_run, read_points, write_points

__all__ = ["ParametricFit", "Points", "ScalingInputError", "chinchilla_flops", "collect_run", "fit_parametric",
           "fit_points", "fit_vpnls", "predict", "read_points", "write_points"]
