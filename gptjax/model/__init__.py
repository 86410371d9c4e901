"""Model definition: the decoder family, its layers, and analytic accounting."""

from gptjax.model.accounting import count_params, flops_per_token, param_counts
from gptjax.model.decoder import Decoder

__all__ = ["Decoder", "count_params", "flops_per_token", "param_counts"]
