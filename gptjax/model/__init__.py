"""The model layer (imports ``config`` and ``sharding``): the decoder family, its KV cache, the one loss,
the attention kernels behind one call, analytic accounting, ``ShardedModel`` (a model placed on a mesh by the
rules), and what the memory planner traces (``abstract_params``, ``abstract_layer``)."""

from gptjax.model.accounting import count_params, flops_per_token, param_counts
from gptjax.model.cache import KVCache
from gptjax.model.decoder import Decoder, abstract_layer, abstract_params, stack_layers, unstack_layers
from gptjax.model.kernel_api import KernelOptions, MaskSpec
from gptjax.model.kernels import DENSE_MAX_LEN_CPU, KERNELS, attend, choose_kernel
from gptjax.model.loss import next_token_loss
from gptjax.model.sharded import Batch, ShardedModel

__all__ = ["Batch", "DENSE_MAX_LEN_CPU", "Decoder", "KERNELS", "KVCache", "KernelOptions", "MaskSpec",
           "ShardedModel", "abstract_layer", "abstract_params", "attend", "choose_kernel", "count_params",
           "flops_per_token", "next_token_loss", "param_counts", "stack_layers", "unstack_layers"]
