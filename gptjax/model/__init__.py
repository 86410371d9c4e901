"""The model layer (imports ``config`` and ``sharding``): the decoder family, its KV cache, the one loss,
analytic accounting, and ``ShardedModel`` (a model placed on a mesh by the rules)."""

from gptjax.model.accounting import count_params, flops_per_token, param_counts
from gptjax.model.cache import KVCache
from gptjax.model.decoder import Decoder, stack_layers, unstack_layers
from gptjax.model.loss import next_token_loss
from gptjax.model.sharded import Batch, ShardedModel

__all__ = ["Batch", "Decoder", "KVCache", "ShardedModel", "count_params", "flops_per_token", "next_token_loss",
           "param_counts", "stack_layers", "unstack_layers"]
