"""Training (imports the layers below it): the optimizer, the jitted program, the checkpoint policy, the hooks
between steps, the step loop, and ``train`` which wires them."""

from gptjax.training.perf import measure_peak_flops
from gptjax.training.program import Program
from gptjax.training.seed import seed_run
from gptjax.training.trainer import TrainResult, train

__all__ = ["Program", "TrainResult", "measure_peak_flops", "seed_run", "train"]
