"""Axis names, in one place: the mesh axes and the logical axes that parameters, activations and the KV cache
are named by (``gptjax/sharding/rules.py`` maps the logical names to mesh axes).

Shapes are written with these names in mind: ``x_BxLxD`` is (``BATCH``, ``LENGTH``, ``ACT_EMBED``).
"""

from __future__ import annotations

# ---- mesh axes ---------------------------------------------------------------------------------------------
DATA = "data"  # data parallelism: the batch is split, parameters replicated
FSDP = "fsdp"  # fully sharded data parallelism: the batch and the parameters' embed dimension are split
CONTEXT = "context"  # context (sequence) parallelism: activations split along the sequence, K/V gathered or ringed
TENSOR = "tensor"  # Megatron tensor parallelism: heads, MLP and vocabulary are split
MESH_AXES = (DATA, FSDP, CONTEXT, TENSOR)
# The axes that may span slices (DCN between TPU slices, InfiniBand between GPU nodes): their collectives are one
# gradient reduction (data) or a per-layer gather overlapped with compute (fsdp); context and tensor communicate
# inside every layer, on the critical path, and stay inside a slice.
DCN_AXES = (DATA, FSDP)

# ---- logical axes of activations ---------------------------------------------------------------------------
BATCH = "batch"
LENGTH = "length"
ACT_EMBED = "act_embed"
ACT_HEADS = "act_heads"
ACT_KV_HEADS = "act_kv_heads"
ACT_MLP = "act_mlp"
ACT_VOCAB = "act_vocab"

# ---- logical axes of parameters ----------------------------------------------------------------------------
EMBED = "embed"
VOCAB = "vocab"
HEADS = "heads"
KV_HEADS = "kv_heads"
MLP = "mlp"
HEAD_DIM = "head_dim"
LAYERS = "layers"
POS = "pos"
NORM = "norm"

# ---- logical axes of the KV cache (batch, kv heads and head_dim are shared with the activations) -----------
CACHE_LENGTH = "cache_length"

# ---- named shapes used in more than one module -------------------------------------------------------------
TOKENS_BxL = (BATCH, LENGTH)
ACT_BxLxD = (BATCH, LENGTH, ACT_EMBED)
# one layer's cache buffers: keys with head_dim before slots (the layout the score matmul reads), values not
KEY_CACHE_BxKxHxS = (BATCH, ACT_KV_HEADS, HEAD_DIM, CACHE_LENGTH)
VALUE_CACHE_BxKxSxH = (BATCH, ACT_KV_HEADS, CACHE_LENGTH, HEAD_DIM)
