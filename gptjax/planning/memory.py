"""Per-device memory planning: analytic, and confirmed by AOT-compiling the real train step.

``analytic_plan`` needs no devices. Parameters, gradients and Adam moments are sharded by the same
logical-axis rules the trainer uses, so DDP / FSDP / tensor meshes come out exactly. Activations are the
residuals JAX saves for the backward pass of one block, read off the block's own jaxpr (``saved_residuals`` of
``gptjax.model.abstract_layer``, the model's public API) at the per-device shapes (batch / (data x fsdp), heads
and MLP / tensor), under the configured remat policy, times the number of layers; with remat, one layer's
un-checkpointed residuals are added for its recomputation. Logits add float32 logits and their gradient (with
``model.loss_chunk``, one chunk's and the head's gradient accumulator).
Compute-dtype copies of each layer's weights that the backward keeps are counted at their sharded size.

``compiled_memory`` lowers and compiles the real jitted train step against abstract ``ShapeDtypeStruct``
inputs on the current (possibly simulated) devices and reads XLA's per-device ``memory_analysis``; nothing is
allocated. XLA's figure also holds temporaries (all-gathered weights, optimizer update buffers), so it is the
one to trust; the analytic one says where the bytes go.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Mapping

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from gptjax.config import ModelConfig, RunConfig, batch_shards
from gptjax.config.dtypes import dtype_bytes
from gptjax.model import abstract_layer, abstract_params, choose_kernel, count_params
from gptjax.sharding.context import ContextLayout
from gptjax.sharding.rules import axes_size, logical_to_pspec, make_rules, spec_axes
from gptjax.training import Program

DEVICE_MEMORY_GB = {"h100-80gb": 80.0, "a100-80gb": 80.0, "a100-40gb": 40.0, "tpu-v5p": 95.0, "tpu-v5e": 16.0,
                    "tpu-v4": 32.0, "tpu-v6e": 32.0}


KV_ROW = "other slices' K/V (context parallel)"


@dataclass
class MemoryPlan:
    """Bytes per device."""

    params: int
    grads: int
    optimizer: int
    activations: int
    logits: int
    # context parallelism: the keys / values of the other sequence slices a device holds (all layers' gathered
    # slices, saved for the backward pass; with the ring, one layer's slices in flight and their gradients)
    gathered_kv: int = 0
    attention: str = ""  # the attention kernel the plan assumed
    mesh: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations + self.gathered_kv + self.logits

    def rows(self) -> list[tuple[str, int]]:
        return [("parameters", self.params), ("gradients", self.grads), ("optimizer (Adam mu, nu)", self.optimizer),
                ("activations (saved for backward)", self.activations),
                (KV_ROW, self.gathered_kv), ("logits + grad", self.logits),
                ("total", self.total)]


def sharded_numel(shape: tuple[int, ...], spec, mesh_sizes: Mapping[str, int]) -> int:
    """Elements of one device's shard of an array of ``shape`` partitioned by ``spec``."""
    entries = list(spec) + [None] * (len(shape) - len(spec))
    return math.prod(math.ceil(dim / axes_size(mesh_sizes, spec_axes(e))) for dim, e in zip(shape, entries))


def param_bytes_per_device(cfg: RunConfig, mesh_sizes: Mapping[str, int]) -> int:
    shapes, axes = abstract_params(cfg.model)
    rules = make_rules(cfg.mesh.rules)
    nbytes = dtype_bytes(cfg.model.param_dtype)
    total = 0
    for names, s in zip(jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple)), jax.tree.leaves(shapes)):
        spec = logical_to_pspec(names, rules, mesh_sizes, s.shape)
        total += sharded_numel(s.shape, spec, mesh_sizes) * nbytes
    return total


def idle_axes(cfg: RunConfig, mesh_sizes: Mapping[str, int]) -> list[str]:
    """Warnings for the mesh axes that shard parameters (fsdp, tensor) but divide none of this model's parameter
    dimensions: every device then holds those parameters whole, and the axis only replicates work."""
    shapes, axes = abstract_params(cfg.model)
    rules = make_rules(cfg.mesh.rules)
    used = set()
    for names, s in zip(jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple)), jax.tree.leaves(shapes)):
        used.update(a for entry in logical_to_pspec(names, rules, mesh_sizes, s.shape) for a in spec_axes(entry))
    idle = [a for a in ("fsdp", "tensor") if mesh_sizes.get(a, 1) > 1 and a not in used]
    return [f"mesh axis {a}={mesh_sizes[a]} divides no parameter dimension of this model (e.g. "
            f"{'heads, kv heads, d_ff, vocab' if a == 'tensor' else 'd_model'}): every device holds the parameters "
            f"it should shard whole" for a in idle]


def _saved_residual_bytes(m: ModelConfig, batch: int, seq: int, remat: str) -> int:
    try:
        from jax._src.ad_checkpoint import saved_residuals
    except ImportError as e:  # pragma: no cover - depends on the JAX version
        raise RuntimeError("this JAX version has no saved_residuals; use the AOT figures") from e

    block, state, x = abstract_layer(dataclasses.replace(m, remat=remat), batch, seq)
    total = 0
    for aval, where in saved_residuals(block, state, x):
        if "from the argument" in where and aval.shape != x.shape:
            continue  # the parameters themselves are counted as parameters
        total += aval.size * aval.dtype.itemsize
    return total


def local_block_config(m: ModelConfig, tensor: int) -> ModelConfig:
    """The block one device holds under ``tensor``-way Megatron sharding of heads and MLP."""
    if tensor == 1:
        return m
    kw = {}
    if m.n_heads % tensor == 0 and m.kv_heads % tensor == 0:
        kw.update(n_heads=m.n_heads // tensor, n_kv_heads=m.kv_heads // tensor,
                  head_dim=m.resolved_head_dim)
    if m.d_ff % tensor == 0:
        kw["d_ff"] = m.d_ff // tensor
    return dataclasses.replace(m, **kw)


def activation_bytes(m: ModelConfig, batch_per_device: int, seq: int, tensor: int) -> dict[str, int]:
    """Per device: residuals saved by all layers, the recompute working set, and weight copies."""
    local = local_block_config(m, tensor)
    b = max(batch_per_device, 1)
    one, two = (_saved_residual_bytes(local, k, seq, m.remat) for k in (b, 2 * b))
    per_layer_act = (two - one) * batch_per_device / b  # exactly linear in the batch
    weights = one - (two - one)  # the part that does not grow with the batch: compute-dtype weight copies
    working = 0
    if m.remat != "none":
        full1, full2 = (_saved_residual_bytes(local, k, seq, "none") for k in (b, 2 * b))
        working = (full2 - full1) * batch_per_device / b
    return {"saved": int(per_layer_act * m.n_layers), "working": int(working),
            "weight_copies": int(max(weights, 0) * m.n_layers)}


def analytic_plan(cfg: RunConfig, mesh_sizes: Mapping[str, int]) -> MemoryPlan:
    m, t = cfg.model, cfg.train
    params = param_bytes_per_device(cfg, mesh_sizes)
    batch_per_device = t.batch_size // batch_shards(mesh_sizes)
    context = mesh_sizes.get("context", 1)
    seq = t.seq_len // context  # context parallelism: each device holds a slice of the sequence
    tokens = batch_per_device * seq
    act = activation_bytes(m, batch_per_device, seq, mesh_sizes["tensor"])
    # ... but attends over all keys: the gathered keys and values of the other slices are saved for the backward
    # pass, every layer's; the ring holds one layer's: the slice computed with and the one arriving, keys and
    # values in the compute dtype and, in the backward pass, their float32 gradient accumulators
    local = local_block_config(m, mesh_sizes["tensor"])
    slice_elems = batch_per_device * seq * local.kv_heads * local.resolved_head_dim  # one of k / v, one slice
    if ContextLayout(("context",), context, cfg.mesh.context_strategy).passes_slices:
        gathered = slice_elems * 2 * 2 * (dtype_bytes(m.dtype) + 4)
    else:
        gathered = 2 * slice_elems * (context - 1) * dtype_bytes(m.dtype) * m.n_layers
    # compute-dtype weight copies are sharded like the parameters (the cast happens on the shard): the full
    # copies (the local block's times tensor) scaled by this device's share of the parameter bytes
    share = params / (dtype_bytes(m.param_dtype) * count_params(m))
    weight_copies = int(act["weight_copies"] * mesh_sizes["tensor"] * share)
    vocab = m.vocab_size / mesh_sizes["tensor"] if m.vocab_size % mesh_sizes["tensor"] == 0 else m.vocab_size
    if m.loss_chunk:  # the fused loss: one chunk's float32 logits and probabilities and its compute-dtype
        # gradient, and the float32 accumulator of the head's gradient (model/loss.py, fused_next_token_loss)
        logits = (batch_per_device * min(m.loss_chunk, seq) * vocab * (2 * 4 + dtype_bytes(m.dtype))
                  + 4 * vocab * m.d_model)
    else:  # the float32 logits and their gradient
        logits = tokens * 2 * 4 * vocab
    # AdamW keeps mu and nu in the parameters' dtype; gradients have the parameters' dtype too.
    return MemoryPlan(params=params, grads=params, optimizer=2 * params,
                      activations=act["saved"] + act["working"] + weight_copies, logits=int(logits),
                      gathered_kv=int(gathered), attention=attention_kernel(m, seq, context), mesh=dict(mesh_sizes))


def attention_kernel(m: ModelConfig, seq: int, context: int = 1) -> str:
    """The kernel the planned block runs (the rule of ``gptjax/model/kernels.py`` on this backend): with the
    sequence split over ``context`` devices a slice's queries attend over gathered keys (not self-attention),
    which the cuDNN / splash kernels cannot express, so those fall back to blockwise."""
    return choose_kernel(m.attention_impl, jax.default_backend(), seq, context == 1, False, dtype=m.dtype)


def compiled_memory(cfg: RunConfig, mesh: Mesh) -> dict[str, int]:
    """XLA's per-device memory analysis of the compiled train step (abstract inputs; nothing allocated)."""
    prog = Program(cfg, mesh)
    t = cfg.train
    tok = jax.ShapeDtypeStruct((t.batch_size, t.seq_len), jnp.int32, sharding=prog.model.batch_sharding)
    mask = jax.ShapeDtypeStruct((t.batch_size, t.seq_len), jnp.float32, sharding=prog.model.batch_sharding)
    batch = {"inputs": tok, "targets": tok, "loss_mask": mask}
    return memory_of(prog.train_step.lower(prog.abstract_state, batch).compile())


def memory_of(compiled) -> dict[str, int]:
    """Per-device bytes of a compiled executable: arguments, outputs, aliased (donated), temp, and the peak
    they imply (arguments + outputs - aliased + temp)."""
    ma = compiled.memory_analysis()
    out = {"arguments": ma.argument_size_in_bytes, "outputs": ma.output_size_in_bytes,
           "aliased": ma.alias_size_in_bytes, "temp": ma.temp_size_in_bytes}
    out["peak"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temp"]
    return out
