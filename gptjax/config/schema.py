"""Typed run configuration: model, data, optimizer, training loop, mesh.

Every config is a frozen dataclass validated in ``__post_init__``; a bad value raises :class:`ConfigError`
naming the field, the value and what would be accepted. ``RunConfig.from_dict`` builds a config from plain
data (JSON, a preset) and rejects unknown keys, so a typo never silently falls back to a default.

Each choice set is one type (a ``Literal``, or an ``Enum`` where the choice carries behaviour): the validation,
the error message and the command lines' ``choices=`` all read it (:func:`choices`).

Each field declares its :class:`Role` where it is declared: what a change to it does. Which fields may differ
between a checkpoint and the model that loads its parameters, on resume, or at HF import is derived from the roles
(:func:`fields_with_role`), never listed by hand.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping

from gptjax.config.axes import DCN_AXES, MESH_AXES
from gptjax.config.dtypes import DType

# ---- choice sets ----------------------------------------------------------------------------------------------
Positions = Literal["rope", "learned"]
Norm = Literal["rmsnorm", "layernorm"]  # always pre-norm, with a final norm
Mlp = Literal["swiglu", "gelu"]
# dense: every layer attends to the whole causal context; alternating: GPT-3's even layers dense, odd layers banded
AttentionPattern = Literal["dense", "alternating"]
# the attention kernel: "auto" or one of gptjax/model/kernels.py's table (which the tests check against this)
AttentionImpl = Literal["auto", "dense", "blockwise", "cudnn", "splash"]
Remat = Literal["none", "full", "save_dots"]
Parametrization = Literal["standard", "mup"]  # μP: Yang et al. 2022 (Tensor Programs V), Adam
Schedule = Literal["cosine", "wsd"]  # warmup + cosine decay | warmup, constant, then linear decay
Optimizer = Literal["adamw", "muon"]  # muon: Muon for hidden matrices, AdamW for the rest (training/optimizer.py)


class ContextStrategy(enum.StrEnum):
    """How attention reaches the keys of the other devices' slices when the sequence is split over the mesh's
    context axis (the layout itself: ``gptjax/sharding/context.py``)."""

    GATHER = "gather"  # all-gather keys and values (each device then holds every slice's, every layer's)
    RING = "ring"  # pass the slices around the devices (gptjax/model/ring.py): never more than two a device
    ZIGZAG = "zigzag"  # the ring over the zig-zag layout: each device an early and a late chunk, the same work

    @property
    def passes_slices(self) -> bool:
        """Keys / values travel around a ring of devices instead of being gathered."""
        return self is not ContextStrategy.GATHER

    @property
    def chunks_per_device(self) -> int:
        """Equal chunks of the sequence one device holds: 2 in the zig-zag layout (chunks d and 2C - 1 - d)."""
        return 2 if self is ContextStrategy.ZIGZAG else 1


def choices(choice_type: Any) -> tuple[str, ...]:
    """The values of a choice type (a ``Literal`` or an ``Enum``), in declaration order."""
    if isinstance(choice_type, type) and issubclass(choice_type, enum.Enum):
        return tuple(m.value for m in choice_type)
    return typing.get_args(choice_type)


# ---- field roles ----------------------------------------------------------------------------------------------
class Role(enum.Enum):
    """What changing a field does; every field has one (``tests/test_config.py`` fails on a field without)."""

    PARAMETERS = "defines the parameters"  # their shapes, meaning or storage dtype: must agree wherever they load
    FUNCTION = "defines the function"  # what the same parameters compute (rope base, norm epsilon, attention band)
    LAYOUT = "lays out the parameters"  # how they are stored (scan-stacked or per layer): converted on load
    TRAJECTORY = "changes the optimizer trajectory"  # data, objective, optimizer, schedule, seeds, precision
    CADENCE = "cadence"  # when the run observes or saves itself: logging, evaluation, checkpoints, samples
    EXECUTION = "execution"  # how and where the same computation runs: mesh, kernels, remat, run directory


RoleSpec = Role | Callable[[Any], Role]  # a role, or one that depends on the section's other fields


def role_field(default: Any, role: RoleSpec, *, factory: bool = False) -> Any:
    """A dataclass field with its role (``factory``: ``default`` is a default factory; ``dataclasses.MISSING``: no
    default). Every config dataclass declares its fields so, the run config's sections and a fine-tune's."""
    kw = {"default_factory": default} if factory else {"default": default}
    return field(metadata={"role": role}, **kw)


_f = role_field


def role_of(section: Any, name: str) -> Role:
    """The role of field ``name`` of a config section instance (a role may depend on the section's values)."""
    spec = {f.name: f for f in dataclasses.fields(section)}[name].metadata.get("role")
    if spec is None:
        raise ConfigError(f"{type(section).__name__}.{name} declares no role")
    return spec(section) if callable(spec) else spec


class ConfigError(ValueError):
    """A configuration value is invalid; the message says which field and what is accepted."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _positive(obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        _check(isinstance(v, int) and not isinstance(v, bool) and v > 0,
               f"{type(obj).__name__}.{n} must be a positive integer, got {v!r}")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _choice_type(hint: Any) -> Any | None:
    """The choice type inside a field annotation (``Norm``, ``ContextStrategy``, ``DType | None``), or None."""
    for h in (hint, *typing.get_args(hint)):
        if typing.get_origin(h) is Literal or (isinstance(h, type) and issubclass(h, enum.Enum)):
            return h
    return None


def check_choices(obj: Any) -> None:
    """A ``ConfigError`` unless every choice field of ``obj`` holds one of its type's values (an ``Enum`` field is
    coerced to a member)."""
    for name, hint in _hints(type(obj)).items():
        kind = _choice_type(hint)
        value = getattr(obj, name)
        if kind is None or value is None:
            continue
        options = choices(kind)
        _check(value in options, f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, options))}")
        if isinstance(kind, type) and not isinstance(value, kind):
            object.__setattr__(obj, name, kind(value))


def _learned_positions_fix_the_table(m: "ModelConfig") -> Role:
    """``max_seq_len`` sizes the position table of learned positions; with RoPE it only bounds the sequence."""
    return Role.PARAMETERS if m.positions == "learned" else Role.FUNCTION


@dataclass(frozen=True)
class ModelConfig:
    """One config space for the GPT family (GPT-1/2/3, LLaMA-style stacks)."""

    vocab_size: int = _f(4096, Role.PARAMETERS)
    d_model: int = _f(256, Role.PARAMETERS)
    n_layers: int = _f(4, Role.PARAMETERS)
    n_heads: int = _f(8, Role.PARAMETERS)
    n_kv_heads: int | None = _f(None, Role.PARAMETERS)  # None: = n_heads (MHA); a divisor of n_heads: GQA; 1: MQA
    head_dim: int | None = _f(None, Role.PARAMETERS)  # None: d_model // n_heads
    d_ff: int = _f(688, Role.PARAMETERS)
    max_seq_len: int = _f(256, _learned_positions_fix_the_table)
    positions: Positions = _f("rope", Role.PARAMETERS)
    rope_theta: float = _f(10000.0, Role.FUNCTION)
    norm: Norm = _f("rmsnorm", Role.PARAMETERS)
    norm_eps: float = _f(1e-5, Role.FUNCTION)
    mlp: Mlp = _f("swiglu", Role.PARAMETERS)
    use_bias: bool = _f(False, Role.PARAMETERS)  # biases in attention/MLP projections (GPT-1/2/3 use them)
    # q/k/v projection biases; None: as use_bias. GPT-Neo has output and MLP biases but none on q/k/v.
    qkv_bias: bool | None = _f(None, Role.PARAMETERS)
    tie_embeddings: bool = _f(True, Role.PARAMETERS)
    qk_norm: bool = _f(False, Role.PARAMETERS)
    z_loss: float = _f(0.0, Role.TRAJECTORY)  # coefficient of the log(Z)^2 auxiliary loss (PaLM uses 1e-4)
    attention: AttentionPattern = _f("dense", Role.FUNCTION)
    window: int = _f(256, Role.FUNCTION)  # band width of banded layers: a query sees itself and window-1 before it
    # attention kernel (gptjax/model/kernels.py has the table and the rule "auto" follows); attention_block: query /
    # key tile of the blockwise and splash kernels
    attention_impl: AttentionImpl = _f("auto", Role.EXECUTION)
    attention_block: int = _f(512, Role.EXECUTION)
    dtype: DType = _f("float32", Role.TRAJECTORY)  # compute dtype; softmax, norms and loss are always float32
    param_dtype: DType = _f("float32", Role.PARAMETERS)
    init_std: float = _f(0.02, Role.TRAJECTORY)
    # "mup": maximal-update parametrization relative to a model of d_model = mup_base_width (model/layers.py,
    # param: hidden matrices' init / sqrt(m) and Adam lr / m, logits / m, attention scores / sqrt(m), m = d_model /
    # mup_base_width); at the base width it is the standard parametrization exactly
    parametrization: Parametrization = _f("standard", Role.FUNCTION)
    mup_base_width: int = _f(256, Role.FUNCTION)
    # lax.scan over the layer stack (compile time flat in depth) or unrolled (faster on CPU)
    scan_layers: bool = _f(False, Role.LAYOUT)
    remat: Remat = _f("none", Role.EXECUTION)
    # > 0: the training loss runs the unembedding and cross-entropy this many positions at a time with the gradient
    # formed in the same pass, never holding [B, L, vocab] float32 logits (model/loss.py, fused_next_token_loss);
    # 0: the plain logits path. The same numbers either way (to float rounding).
    loss_chunk: int = _f(0, Role.EXECUTION)

    def __post_init__(self) -> None:
        _positive(self, "vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len")
        check_choices(self)
        kv = self.kv_heads
        _check(isinstance(kv, int) and kv > 0 and self.n_heads % kv == 0,
               f"n_kv_heads={self.n_kv_heads!r} must divide n_heads={self.n_heads} "
               "(equal: MHA, a divisor: GQA, 1: MQA)")
        hd = self.resolved_head_dim
        _check(isinstance(hd, int) and hd > 0,
               f"head_dim={self.head_dim!r}: give a positive head_dim or a d_model divisible by n_heads "
               f"(d_model={self.d_model}, n_heads={self.n_heads})")
        if self.positions == "rope":
            _check(hd % 2 == 0, f"RoPE needs an even head_dim, got {hd}")
            _check(self.rope_theta > 0, f"rope_theta must be > 0, got {self.rope_theta}")
        _check(self.norm_eps > 0, f"norm_eps must be > 0, got {self.norm_eps}")
        _check(not (self.qkv_bias and not self.use_bias),
               "qkv_bias=true needs use_bias=true (q/k/v biases without the output and MLP biases are not modelled)")
        if self.attention == "alternating":
            _check(isinstance(self.window, int) and self.window >= 1,
                   f"window must be a positive integer for banded attention, got {self.window!r}")
        _positive(self, "attention_block")
        _check(self.z_loss >= 0, f"z_loss must be >= 0, got {self.z_loss}")
        _check(isinstance(self.loss_chunk, int) and self.loss_chunk >= 0,
               f"loss_chunk must be 0 (full logits) or a positive number of positions, got {self.loss_chunk!r}")
        _check(self.init_std > 0, f"init_std must be > 0, got {self.init_std}")
        _check(isinstance(self.mup_base_width, int) and self.mup_base_width > 0,
               f"mup_base_width must be a positive width, got {self.mup_base_width!r}")

    @property
    def width_mult(self) -> float:
        """μP's width multiplier m = d_model / mup_base_width (1 under the standard parametrization)."""
        return self.d_model / self.mup_base_width if self.parametrization == "mup" else 1.0

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def has_qkv_bias(self) -> bool:
        return self.use_bias if self.qkv_bias is None else self.qkv_bias

    @property
    def resolved_head_dim(self) -> int:
        if self.head_dim is not None:
            return self.head_dim
        return self.d_model // self.n_heads if self.d_model % self.n_heads == 0 else -1

    @property
    def attention_kind(self) -> str:
        return {1: "MQA", self.n_heads: "MHA"}.get(self.kv_heads, "GQA") if self.n_heads > 1 else "MHA"

    def layer_windows(self) -> tuple[int, ...]:
        """Per-layer attention window: max_seq_len for dense layers, ``window`` for banded ones."""
        dense = self.max_seq_len
        if self.attention == "dense":
            return (dense,) * self.n_layers
        return tuple(dense if i % 2 == 0 else min(self.window, dense) for i in range(self.n_layers))

    def parameter_differences(self, other: "ModelConfig") -> dict[str, tuple[Any, Any]]:
        """The fields that define the parameters (:attr:`Role.PARAMETERS`) and differ in ``other``:
        ``{name: (here, there)}``. Parameters load from one model into the other iff this is empty."""
        return {f.name: (getattr(self, f.name), getattr(other, f.name)) for f in dataclasses.fields(self)
                if role_of(self, f.name) is Role.PARAMETERS and getattr(self, f.name) != getattr(other, f.name)}


@dataclass(frozen=True)
class DataConfig:
    # a UTF-8 text file, a directory prepared by gptjax-data prepare, or "default" for the embedded Austen corpus
    corpus: str = _f("default", Role.TRAJECTORY)
    # regex (multiline) whose matches start a new document; None: blank lines
    doc_pattern: str | None = _f(None, Role.TRAJECTORY)
    val_fraction: float = _f(0.05, Role.TRAJECTORY)
    seed: int = _f(0, Role.TRAJECTORY)
    tokenizer: str | None = _f(None, Role.TRAJECTORY)  # an existing sentencepiece .model; None: train one
    tokenizer_sample_chars: int = _f(20_000_000, Role.TRAJECTORY)  # train the tokenizer on at most this many chars
    # attention and positions restart at each document of a packed sequence (segment ids); None: on for prepared
    # data (a directory made by gptjax-data prepare), off for a text corpus (GPT-2/3 practice; the default run)
    document_masking: bool | None = _f(None, Role.TRAJECTORY)
    # several prepared directories drawn by weight, {directory: weight} (GPT-3 Table 2.2); each is named by its
    # directory's name in the metrics (tokens/<name>, epochs/<name>, val_loss/<name>). Replaces data.corpus.
    mixture: dict = _f(dict, Role.TRAJECTORY, factory=True)
    # processes that read and assemble training batches beside the trainer (0: its own thread). The batches and the
    # saved data position are the same for any count; one process delivered 2.1M tokens/s of prepared data here
    # (bench/loader_bench.py), so feeding 3.7M tokens/s (8 H100s on GPT-2 small) takes two or more
    loader_workers: int = _f(0, Role.EXECUTION)

    def __post_init__(self) -> None:
        _check(isinstance(self.loader_workers, int) and self.loader_workers >= 0,
               f"data.loader_workers={self.loader_workers!r}: a count of processes, 0 or more")
        _check(0 < self.val_fraction < 1, f"val_fraction must be in (0, 1), got {self.val_fraction}")
        for path, weight in self.mixture.items():
            _check(isinstance(weight, (int, float)) and not isinstance(weight, bool) and weight > 0,
                   f"data.mixture[{path!r}] = {weight!r}: a weight must be a positive number")
        _check(not self.mixture or self.corpus == "default",
               f"data.corpus={self.corpus!r} and data.mixture are both set; a mixture names its directories itself, "
               "so leave data.corpus at its default")


@dataclass(frozen=True)
class OptimConfig:
    name: Optimizer = _f("adamw", Role.TRAJECTORY)
    lr: float = _f(3e-3, Role.TRAJECTORY)
    min_lr_ratio: float = _f(0.1, Role.TRAJECTORY)
    schedule: Schedule = _f("cosine", Role.TRAJECTORY)
    warmup_steps: int = _f(50, Role.TRAJECTORY)
    decay_fraction: float = _f(0.2, Role.TRAJECTORY)  # wsd: the last fraction of steps that decay
    b1: float = _f(0.9, Role.TRAJECTORY)
    b2: float = _f(0.95, Role.TRAJECTORY)
    eps: float = _f(1e-8, Role.TRAJECTORY)
    weight_decay: float = _f(0.1, Role.TRAJECTORY)
    grad_clip: float = _f(1.0, Role.TRAJECTORY)  # global-norm clip; 0 disables
    # Steps the lr schedule spans; None: train.steps. Extending a finished run pins it to the original length, so
    # the schedule is not re-stretched: past its end the lr stays at its final value (lr * min_lr_ratio).
    schedule_steps: int | None = _f(None, Role.TRAJECTORY)
    muon_momentum: float = _f(0.95, Role.TRAJECTORY)  # Muon's momentum (its Nesterov beta)

    def __post_init__(self) -> None:
        check_choices(self)
        _check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _check(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _check(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(0 < self.decay_fraction <= 1, f"decay_fraction must be in (0, 1], got {self.decay_fraction}")
        _check(0 <= self.b1 < 1 and 0 <= self.b2 < 1, f"b1, b2 must be in [0, 1), got {self.b1}, {self.b2}")
        _check(self.weight_decay >= 0 and self.grad_clip >= 0, "weight_decay and grad_clip must be >= 0")
        _check(self.schedule_steps is None or self.schedule_steps > 0,
               f"schedule_steps must be a positive integer or null, got {self.schedule_steps}")
        _check(0 <= self.muon_momentum < 1, f"muon_momentum must be in [0, 1), got {self.muon_momentum}")


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh. The product must equal the device count; one axis may be -1 to absorb the rest.

    The default rules shard the batch over (data, fsdp), parameters' embed dimension over fsdp and
    heads/mlp/vocab over tensor, so the shape alone picks DDP (data=N), FSDP/ZeRO-3 (fsdp=N), Megatron tensor
    parallelism (tensor=N), or hybrids: data=G, fsdp=N/G is FSDP inside groups of N/G devices with
    replication across the G groups (the "sharding factor" of hybrid sharding). ``context=C`` splits every
    activation along the sequence over C devices (context parallelism, for long sequences); attention gathers the
    keys and values over that axis, or passes them around it (``context_strategy``).
    """

    data: int = _f(-1, Role.EXECUTION)
    fsdp: int = _f(1, Role.EXECUTION)
    context: int = _f(1, Role.EXECUTION)  # context parallelism: the sequence is split over this many devices
    tensor: int = _f(1, Role.EXECUTION)
    # Hybrid sharding: FSDP within groups of this many devices, replicated across groups (sets fsdp; data
    # becomes the number of groups). Equivalent to data=N/k, fsdp=k.
    sharding_factor: int | None = _f(None, Role.EXECUTION)
    rules: dict = _f(dict, Role.EXECUTION, factory=True)  # overrides of the logical-axis rules, e.g. {"embed": None}
    context_strategy: ContextStrategy = _f(ContextStrategy.GATHER, Role.EXECUTION)
    # Multi-slice meshes: the devices form this many slices (TPU slices joined over DCN; GPU nodes over InfiniBand;
    # simulated: equal groups in device order), and ``dcn`` says how many ways each axis is split across them
    # (MaxText's dcn_*_parallelism): {} means {"data": slices}, data parallelism over the slow links. Inside a
    # slice an axis has size / dcn[axis] devices. Only data and fsdp may span slices (config/axes.py, DCN_AXES).
    slices: int = _f(1, Role.EXECUTION)
    dcn: dict = _f(dict, Role.EXECUTION, factory=True)

    def __post_init__(self) -> None:
        check_choices(self)
        sizes = self.sizes()
        for name, v in zip(MESH_AXES, sizes):
            _check(isinstance(v, int) and (v > 0 or v == -1),
                   f"mesh.{name} must be a positive integer or -1, got {v!r}")
        _check(sum(v == -1 for v in sizes) <= 1, f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
        if self.sharding_factor is not None:
            _check(isinstance(self.sharding_factor, int) and self.sharding_factor > 0,
                   f"mesh.sharding_factor must be a positive integer, got {self.sharding_factor!r}")
            _check(self.fsdp in (1, self.sharding_factor),
                   f"give either mesh.fsdp={self.fsdp} or mesh.sharding_factor={self.sharding_factor}, not both")
        _check(isinstance(self.slices, int) and not isinstance(self.slices, bool) and self.slices > 0,
               f"mesh.slices must be a positive integer, got {self.slices!r}")
        for axis, ways in self.dcn.items():
            _check(axis in DCN_AXES, f"mesh.dcn[{axis!r}]: only {' and '.join(DCN_AXES)} may span slices (context "
                   "and tensor communicate inside every layer; keep them within a slice)"
                   if axis in MESH_AXES else f"mesh.dcn[{axis!r}]: not a mesh axis; axes: {', '.join(MESH_AXES)}")
            _check(isinstance(ways, int) and not isinstance(ways, bool) and ways > 0,
                   f"mesh.dcn[{axis!r}] must be a positive integer, got {ways!r}")
        across = math.prod(self.dcn_sizes().values())
        _check(across == self.slices, f"mesh.dcn={self.dcn} splits the axes {across} ways across slices, but "
               f"mesh.slices={self.slices}; the product of the dcn sizes must equal the slice count")

    def sizes(self) -> tuple[int, int, int, int]:
        """Axis sizes in ``MESH_AXES`` order (data, fsdp, context, tensor)."""
        fsdp = self.fsdp if self.sharding_factor is None else self.sharding_factor
        return (self.data, fsdp, self.context, self.tensor)

    def dcn_sizes(self) -> dict[str, int]:
        """How many ways each mesh axis is split across slices (every axis 1 on one slice)."""
        dcn = self.dcn or ({"data": self.slices} if self.slices > 1 else {})
        return {a: dcn.get(a, 1) for a in MESH_AXES}

    def resolve(self, n_devices: int) -> dict[str, int]:
        """Concrete axis sizes for ``n_devices``; a clear error when they cannot multiply to it or do not split
        over the slices."""
        sizes = dict(zip(MESH_AXES, self.sizes()))
        fixed = math.prod(v for v in sizes.values() if v != -1)
        free = [k for k, v in sizes.items() if v == -1]
        if free:
            _check(n_devices % fixed == 0,
                   f"mesh {sizes}: the fixed axes multiply to {fixed}, which does not divide the "
                   f"{n_devices} available devices")
            sizes[free[0]] = n_devices // fixed
        _check(math.prod(sizes.values()) == n_devices,
               f"mesh {sizes} has {math.prod(sizes.values())} devices but {n_devices} are available; "
               "make the product equal the device count or set one axis to -1")
        for axis, ways in self.dcn_sizes().items():
            _check(sizes[axis] % ways == 0, f"mesh.{axis}={sizes[axis]} does not split over the {ways} slices "
                   f"mesh.dcn gives it; make mesh.{axis} a multiple of {ways}")
        return sizes


@dataclass(frozen=True)
class TrainConfig:
    run_dir: str = _f("runs/default", Role.EXECUTION)  # where the run lives (a moved run directory resumes)
    steps: int = _f(300, Role.TRAJECTORY)
    batch_size: int = _f(16, Role.TRAJECTORY)  # global batch, in sequences
    seq_len: int = _f(256, Role.TRAJECTORY)
    seed: int = _f(0, Role.TRAJECTORY)
    log_every: int = _f(10, Role.CADENCE)
    eval_every: int = _f(100, Role.CADENCE)
    eval_batches: int = _f(8, Role.CADENCE)
    checkpoint_every: int = _f(100, Role.CADENCE)
    keep_checkpoints: int = _f(3, Role.CADENCE)
    # per device; None: measure with a short matmul benchmark at start
    peak_flops: float | None = _f(None, Role.CADENCE)
    sample_tokens: int = _f(120, Role.CADENCE)
    sample_prompt: str = _f("It is a truth universally acknowledged", Role.CADENCE)
    progress: bool = _f(True, Role.CADENCE)
    # Start from the parameters of another run directory (its latest checkpoint) with a fresh optimizer and
    # schedule; the model configs must agree (the scan / unrolled layout may differ).
    init_from: str | None = _f(None, Role.TRAJECTORY)
    # In-context tasks (gptjax/evals/tasks.py; built-in names or task directories, comma-separated, "" for none):
    # zero-shot on the first task_examples test examples of each every task_eval_every steps (0: never in the
    # loop), and at the end of training zero- and task_shots-shot on the first final_task_examples.
    tasks: str = _f("austen_cloze,austen_next_sentence", Role.CADENCE)
    task_eval_every: int = _f(100, Role.CADENCE)
    task_examples: int = _f(64, Role.CADENCE)
    final_task_examples: int = _f(200, Role.CADENCE)
    task_shots: int = _f(2, Role.CADENCE)
    # Non-finite guard: a step whose loss or gradient norm is not finite does not update the state; after this
    # many such steps in a row the run stops (0: stop at the first). A non-finite state is never saved.
    max_nonfinite_skips: int = _f(3, Role.EXECUTION)
    # write checkpoints in the background (orbax async) instead of pausing training
    async_checkpoint: bool = _f(True, Role.EXECUTION)
    # What a scaling-law plan predicts for this run (gptjax-plan --flops writes it: "loss", "interval", "fit",
    # "flops"); the run's summary reports it against the measured final validation loss.
    prediction: dict | None = _f(None, Role.CADENCE)
    # "START:END": a JAX profiler trace of steps START to END (inclusive) into <run>/profile, for TensorBoard's
    # profile plugin or XProf ("" for none; gptjax-train --profile START:END)
    profile: str = _f("", Role.CADENCE)
    # a Weights & Biases project to log the run to ("" for none; the wandb extra; WANDB_MODE=offline works)
    wandb_project: str = _f("", Role.CADENCE)

    def __post_init__(self) -> None:
        _positive(self, "steps", "batch_size", "seq_len", "log_every", "eval_every", "eval_batches",
                  "checkpoint_every", "keep_checkpoints")
        if self.profile:
            self.profile_steps  # noqa: B018 - parses it: a bad range is refused with the config
        _check(self.sample_tokens >= 0, f"sample_tokens must be >= 0, got {self.sample_tokens}")
        _check(self.max_nonfinite_skips >= 0, f"max_nonfinite_skips must be >= 0, got {self.max_nonfinite_skips}")
        for name in ("task_eval_every", "task_examples", "final_task_examples", "task_shots"):
            _check(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        if self.prediction is not None:
            loss = self.prediction.get("loss")
            _check(isinstance(loss, (int, float)) and not isinstance(loss, bool) and loss > 0,
                   f"train.prediction needs a positive number 'loss' (the predicted final validation loss), got "
                   f"{self.prediction!r}")

    @property
    def profile_steps(self) -> tuple[int, int] | None:
        """``train.profile`` as ``(first, last)`` step, or None."""
        if not self.profile:
            return None
        first, sep, last = self.profile.partition(":")
        _check(bool(sep) and first.strip().isdigit() and last.strip().isdigit() and 0 < int(first) <= int(last),
               f"train.profile={self.profile!r}: give START:END, two step numbers with 0 < START <= END (e.g. 20:25)")
        return int(first), int(last)

    @property
    def task_names(self) -> list[str]:
        return [t.strip() for t in self.tasks.split(",") if t.strip()]


# Fields that moved between sections: an old key found where a config is read is taken to the new place, so run
# directories written before the move still load and resume.
MOVED_FIELDS = {"model.context_strategy": "mesh.context_strategy"}


def batch_shards(sizes: Mapping[str, int]) -> int:
    """How many ways a mesh of axis ``sizes`` splits the batch: data x fsdp."""
    return sizes.get("data", 1) * sizes.get("fsdp", 1)


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)

    def __post_init__(self) -> None:
        _check(not (self.optim.name == "muon" and self.model.parametrization == "mup"),
               "optim.name=muon with model.parametrization=mup: μP's per-parameter learning rates are derived for "
               "Adam, and Muon's orthogonalised updates (scaled to AdamW's RMS by their shape) already keep their "
               "spectral size across widths; use model.parametrization=standard with Muon")
        _check(self.train.seq_len <= self.model.max_seq_len,
               f"train.seq_len={self.train.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
        strategy, context = self.mesh.context_strategy, self.mesh.context
        chunks = strategy.chunks_per_device * context  # an uneven contiguous split is refused with the mesh
        _check(context == 1 or strategy.chunks_per_device == 1 or self.train.seq_len % chunks == 0,
               f"mesh.context_strategy={strategy} splits the sequence into {strategy.chunks_per_device} x "
               f"mesh.context = {chunks} equal chunks; train.seq_len={self.train.seq_len} does not divide into "
               f"{chunks}")

    def check_mesh_split(self, sizes: Mapping[str, int]) -> None:
        """The one rule of how a batch splits over a mesh of ``sizes`` (its axis sizes): the batch divides into the
        data x fsdp shards (:func:`batch_shards`), the sequence into the context shards. (Written before at the
        trainer, the memory planner, the distributed preflight and the compute plan's rounding.)"""
        shards = batch_shards(sizes)
        _check(self.train.batch_size % shards == 0,
               f"train.batch_size={self.train.batch_size} is not divisible by data x fsdp = {shards} (the "
               "batch-parallel devices)")
        _check(self.train.seq_len % sizes.get("context", 1) == 0,
               f"train.seq_len={self.train.seq_len} is not divisible by mesh.context={sizes.get('context', 1)} (each "
               "context-parallel device holds an equal slice of the sequence)")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RunConfig":
        return _from_dict(cls, migrate(d), "")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self, dict_factory=_plain)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **sections: Any) -> "RunConfig":
        """``cfg.replace(model={"d_model": 128}, train={"steps": 10})``: a copy with fields changed."""
        d = self.to_dict()
        for section, values in sections.items():
            _check(section in d, f"unknown config section {section!r}; sections: {', '.join(d)}")
            d[section].update(values)
        return RunConfig.from_dict(d)

    def warnings(self) -> list[str]:
        """What is valid but probably not meant: a warmup as long as the run (the lr never reaches its peak and
        never decays)."""
        steps = self.optim.schedule_steps or self.train.steps
        out = []
        if self.optim.warmup_steps >= steps:
            out.append(f"optim.warmup_steps={self.optim.warmup_steps} is not shorter than the schedule's {steps} "
                       "steps: the lr never reaches optim.lr and never decays; lower optim.warmup_steps")
        return out

    def roles(self) -> dict[str, Role]:
        """``{"section.field": role}`` for every field, as this config's values decide them."""
        return {f"{s.name}.{f.name}": role_of(getattr(self, s.name), f.name)
                for s in dataclasses.fields(self) for f in dataclasses.fields(getattr(self, s.name))}

    def differences(self, other: "RunConfig") -> dict[str, tuple[Any, Any]]:
        """``{"section.field": (here, there)}`` for every field whose value differs in ``other``."""
        a, b = _flat(self), _flat(other)
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}


def fields_with_role(section: type, *roles: Role) -> tuple[str, ...]:
    """Names of the fields of config class ``section`` (at its defaults) whose role is one of ``roles``."""
    instance = section()
    return tuple(f.name for f in dataclasses.fields(section) if role_of(instance, f.name) in roles)


def _flat(cfg: RunConfig) -> dict[str, Any]:
    return {f"{section}.{k}": v for section, fields in cfg.to_dict().items() for k, v in fields.items()}


def _plain(items: list[tuple[str, Any]]) -> dict:
    """A section as plain data: choice enums as their strings."""
    return {k: v.value if isinstance(v, enum.Enum) else v for k, v in items}


def migrate(d: Mapping[str, Any]) -> Mapping[str, Any]:
    """A copy of ``d`` with every field of :data:`MOVED_FIELDS` in its new section (a config written before the
    move); an old and a new value that disagree are an error."""
    if not isinstance(d, Mapping):
        return d
    d = {k: dict(v) if isinstance(v, Mapping) else v for k, v in d.items()}
    for old, new in MOVED_FIELDS.items():
        (osec, oname), (nsec, nname) = old.split("."), new.split(".")
        if isinstance(d.get(osec), dict) and oname in d[osec]:
            value = d[osec].pop(oname)
            target = d.setdefault(nsec, {})
            if target.setdefault(nname, value) != value:
                raise ConfigError(f"{old}={value!r} (the field's old place) and {new}={target[nname]!r} disagree; "
                                  f"keep {new}")
    return d


def field_type(hint: Any) -> tuple[type, bool]:
    """``(type, optional)`` of a field annotation: ``int | None`` -> ``(int, True)``, ``dict`` -> ``(dict, False)``;
    a choice type counts as ``str``."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    kinds = [a for a in args if a is not type(None)]
    kind = str if _choice_type(kinds[0]) is not None else typing.get_origin(kinds[0]) or kinds[0]
    return kind, len(kinds) < len(args)


_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}


def check_value(value: Any, hint: Any, name: str) -> Any:
    """``value`` if it has the field's type (an int is taken as a float), else a ``ConfigError`` naming both."""
    kind, optional = field_type(hint)
    if value is None and optional:
        return None
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str),
          dict: lambda v: isinstance(v, Mapping)}[kind](value)
    _check(ok, f"{name} must be {_KIND_NAMES[kind]}{' or null' if optional else ''}, got {value!r}")
    return float(value) if kind is float else value


def _from_dict(cls: type, d: Mapping[str, Any], where: str) -> Any:
    if isinstance(d, cls):
        return d
    _check(isinstance(d, Mapping), f"{where or 'config'} must be a mapping, got {type(d).__name__}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(d) - set(fields))
    _check(not unknown, f"unknown field(s) {unknown} in {where or cls.__name__}; valid: {', '.join(fields)}")
    kwargs = {}
    for name, value in d.items():
        hint = hints[name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            value = _from_dict(hint, value, f"{where}{name}.")
        else:
            value = check_value(value, hint, f"{where}{name}")
        kwargs[name] = value
    return cls(**kwargs)
