"""Scaling laws: Chinchilla approaches 1 (envelope), 2 (IsoFLOP profiles) and 3 (parametric, Huber/L-BFGS from
the paper's 4,500-start grid), a variable-projection fit, bootstrap intervals, the compute-optimal frontier,
FLOP counts, a sizing rule for sweeps, and the figures. Results are typed (``FitResult`` and its sections, with
``to_dict`` / ``from_dict`` for fit.json). Consumes config, runs, model and reporting; nothing in gptjax imports it
but the CLI."""

from gptjax.scaling.fit import APPROACHES, PARAMETRIC_APPROACHES, FitResult, Prediction, fit_points, predict
from gptjax.scaling.flops import chinchilla_flops
from gptjax.scaling.isoflop import EnvelopeFit, IsoFLOPFit, Profile, fit_envelope, fit_isoflop
from gptjax.scaling.parametric import (HUBER_DELTA, ParametricFit, ParametricResult, fit_parametric, fit_vpnls,
                                       grid_starts)
from gptjax.scaling.plots import plot_fit
from gptjax.scaling.points import (Points, ScalingInputError, collect_run, points_from_rows, read_points,
                                   write_points)
from gptjax.scaling.sizing import model_for_params, scaling_params

__all__ = ["APPROACHES", "PARAMETRIC_APPROACHES", "EnvelopeFit", "FitResult", "HUBER_DELTA", "IsoFLOPFit",
           "ParametricFit", "ParametricResult", "Points", "Prediction", "Profile", "ScalingInputError",
           "chinchilla_flops", "collect_run", "fit_envelope", "fit_isoflop", "fit_parametric", "fit_points",
           "fit_vpnls", "grid_starts", "model_for_params", "plot_fit", "points_from_rows", "predict", "read_points",
           "scaling_params", "write_points"]
