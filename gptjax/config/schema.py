"""Typed run configuration: model, data, optimizer, training loop, mesh.

Every config is a frozen dataclass validated in ``__post_init__``; a bad value raises :class:`ConfigError`
naming the field, the value and what would be accepted. ``RunConfig.from_dict`` builds a config from plain
data (JSON, a preset) and rejects unknown keys, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

from gptjax.config.axes import MESH_AXES
from gptjax.config.dtypes import DTYPE_NAMES



ATTENTION_IMPLS = ("auto", "dense", "blockwise", "cudnn", "splash")
CONTEXT_STRATEGIES = ("gather", "ring", "zigzag")
RING_STRATEGIES = ("ring", "zigzag")  # the strategies that pass key / value slices around (gptjax/model/ring.py)


class ConfigError(ValueError):
    """A configuration value is invalid; the message says which field and what is accepted."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _choice(name: str, value: Any, options: tuple) -> None:
    _check(value in options, f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, options))}")


def _positive(obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        _check(isinstance(v, int) and not isinstance(v, bool) and v > 0,
               f"{type(obj).__name__}.{n} must be a positive integer, got {v!r}")


@dataclass(frozen=True)
class ModelConfig:
    """One config space for the GPT family (GPT-1/2/3, LLaMA-style stacks)."""

    vocab_size: int = 4096
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int | None = None  # None: = n_heads (MHA); a divisor of n_heads: GQA; 1: MQA
    head_dim: int | None = None  # None: d_model // n_heads
    d_ff: int = 688
    max_seq_len: int = 256
    positions: str = "rope"  # rope | learned
    rope_theta: float = 10000.0
    norm: str = "rmsnorm"  # rmsnorm | layernorm (always pre-norm, with a final norm)
    norm_eps: float = 1e-5
    mlp: str = "swiglu"  # swiglu | gelu
    use_bias: bool = False  # biases in attention/MLP projections (GPT-1/2/3 use them)
    # q/k/v projection biases; None: as use_bias. GPT-Neo has output and MLP biases but none on q/k/v.
    qkv_bias: bool | None = None
    tie_embeddings: bool = True
    qk_norm: bool = False
    z_loss: float = 0.0  # coefficient of the log(Z)^2 auxiliary loss (PaLM uses 1e-4)
    attention: str = "dense"  # dense | alternating (GPT-3: even layers dense, odd layers banded)
    window: int = 256  # band width of banded layers: a query sees itself and window-1 previous tokens
    # attention kernel: auto | dense | blockwise | cudnn | splash (gptjax/model/kernels.py has the table and the
    # rule "auto" follows); attention_block: query / key tile of the blockwise and splash kernels
    attention_impl: str = "auto"
    attention_block: int = 512
    # with the sequence split over the mesh's context axis: all-gather keys / values for attention ("gather"), or
    # pass the slices around the devices ("ring", gptjax/model/ring.py: never more than two slices a device), or
    # the ring over the zig-zag layout ("zigzag": each device an early and a late chunk, the same causal work)
    context_strategy: str = "gather"
    dtype: str = "float32"  # compute dtype; softmax, norms and loss are always float32
    param_dtype: str = "float32"
    init_std: float = 0.02
    scan_layers: bool = False  # lax.scan over the layer stack (compile time flat in depth) or unrolled (faster on CPU)
    remat: str = "none"  # none | full | save_dots

    def __post_init__(self) -> None:
        _positive(self, "vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len")
        kv = self.kv_heads
        _check(isinstance(kv, int) and kv > 0 and self.n_heads % kv == 0,
               f"n_kv_heads={self.n_kv_heads!r} must divide n_heads={self.n_heads} "
               "(equal: MHA, a divisor: GQA, 1: MQA)")
        hd = self.resolved_head_dim
        _check(isinstance(hd, int) and hd > 0,
               f"head_dim={self.head_dim!r}: give a positive head_dim or a d_model divisible by n_heads "
               f"(d_model={self.d_model}, n_heads={self.n_heads})")
        _choice("positions", self.positions, ("rope", "learned"))
        if self.positions == "rope":
            _check(hd % 2 == 0, f"RoPE needs an even head_dim, got {hd}")
            _check(self.rope_theta > 0, f"rope_theta must be > 0, got {self.rope_theta}")
        _choice("norm", self.norm, ("rmsnorm", "layernorm"))
        _check(self.norm_eps > 0, f"norm_eps must be > 0, got {self.norm_eps}")
        _choice("mlp", self.mlp, ("swiglu", "gelu"))
        _check(not (self.qkv_bias and not self.use_bias),
               "qkv_bias=true needs use_bias=true (q/k/v biases without the output and MLP biases are not modelled)")
        _choice("attention", self.attention, ("dense", "alternating"))
        if self.attention == "alternating":
            _check(isinstance(self.window, int) and self.window >= 1,
                   f"window must be a positive integer for banded attention, got {self.window!r}")
        _choice("attention_impl", self.attention_impl, ATTENTION_IMPLS)
        _positive(self, "attention_block")
        _choice("context_strategy", self.context_strategy, CONTEXT_STRATEGIES)
        _check(self.z_loss >= 0, f"z_loss must be >= 0, got {self.z_loss}")
        _choice("dtype", self.dtype, DTYPE_NAMES)
        _choice("param_dtype", self.param_dtype, DTYPE_NAMES)
        _check(self.init_std > 0, f"init_std must be > 0, got {self.init_std}")
        _choice("remat", self.remat, ("none", "full", "save_dots"))

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


@dataclass(frozen=True)
class DataConfig:
    corpus: str = "default"  # a UTF-8 text file, or "default" for the embedded Jane Austen corpus
    doc_pattern: str | None = None  # regex (multiline) whose matches start a new document; None: blank lines
    val_fraction: float = 0.05
    seed: int = 0
    tokenizer: str | None = None  # an existing sentencepiece .model; None: train one into the run dir
    tokenizer_sample_chars: int = 20_000_000  # train the tokenizer on at most this many characters

    def __post_init__(self) -> None:
        _check(0 < self.val_fraction < 1, f"val_fraction must be in (0, 1), got {self.val_fraction}")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    schedule: str = "cosine"  # cosine (warmup + cosine decay) | wsd (warmup, constant, then linear decay)
    warmup_steps: int = 50
    decay_fraction: float = 0.2  # wsd: the last fraction of steps that decay
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # global-norm clip; 0 disables
    # Steps the lr schedule spans; None: train.steps. Extending a finished run pins it to the original length, so
    # the schedule is not re-stretched: past its end the lr stays at its final value (lr * min_lr_ratio).
    schedule_steps: int | None = None

    def __post_init__(self) -> None:
        _check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _check(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _choice("schedule", self.schedule, ("cosine", "wsd"))
        _check(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(0 < self.decay_fraction <= 1, f"decay_fraction must be in (0, 1], got {self.decay_fraction}")
        _check(0 <= self.b1 < 1 and 0 <= self.b2 < 1, f"b1, b2 must be in [0, 1), got {self.b1}, {self.b2}")
        _check(self.weight_decay >= 0 and self.grad_clip >= 0, "weight_decay and grad_clip must be >= 0")
        _check(self.schedule_steps is None or self.schedule_steps > 0,
               f"schedule_steps must be a positive integer or null, got {self.schedule_steps}")


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh. The product must equal the device count; one axis may be -1 to absorb the rest.

    The default rules shard the batch over (data, fsdp), parameters' embed dimension over fsdp and
    heads/mlp/vocab over tensor, so the shape alone picks DDP (data=N), FSDP/ZeRO-3 (fsdp=N), Megatron tensor
    parallelism (tensor=N), or hybrids: data=G, fsdp=N/G is FSDP inside groups of N/G devices with
    replication across the G groups (the "sharding factor" of hybrid sharding). ``context=C`` splits every
    activation along the sequence over C devices (context parallelism, for long sequences); attention gathers the
    keys and values over that axis, or passes them around it (``ModelConfig.context_strategy``).
    """

    data: int = -1
    fsdp: int = 1
    context: int = 1  # context parallelism: the sequence is split over this many devices (long context)
    tensor: int = 1
    # Hybrid sharding: FSDP within groups of this many devices, replicated across groups (sets fsdp; data
    # becomes the number of groups). Equivalent to data=N/k, fsdp=k.
    sharding_factor: int | None = None
    rules: dict = field(default_factory=dict)  # overrides of the logical-axis rules, e.g. {"embed": None}

    def __post_init__(self) -> None:
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

    def sizes(self) -> tuple[int, int, int, int]:
        """Axis sizes in ``MESH_AXES`` order (data, fsdp, context, tensor)."""
        fsdp = self.fsdp if self.sharding_factor is None else self.sharding_factor
        return (self.data, fsdp, self.context, self.tensor)

    def resolve(self, n_devices: int) -> dict[str, int]:
        """Concrete axis sizes for ``n_devices``; a clear error when they cannot multiply to it."""
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
        return sizes


@dataclass(frozen=True)
class TrainConfig:
    run_dir: str = "runs/default"
    steps: int = 300
    batch_size: int = 16  # global batch, in sequences
    seq_len: int = 256
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    peak_flops: float | None = None  # per device; None: measure with a short matmul benchmark at start
    sample_tokens: int = 120
    sample_prompt: str = "It is a truth universally acknowledged"
    progress: bool = True
    # Start from the parameters of another run directory (its latest checkpoint) with a fresh optimizer and
    # schedule; the model configs must agree (the scan / unrolled layout may differ).
    init_from: str | None = None
    # Non-finite guard: a step whose loss or gradient norm is not finite does not update the state; after this
    # many such steps in a row the run stops (0: stop at the first). A non-finite state is never saved.
    max_nonfinite_skips: int = 3
    async_checkpoint: bool = True  # write checkpoints in the background (orbax async) instead of pausing training

    def __post_init__(self) -> None:
        _positive(self, "steps", "batch_size", "seq_len", "log_every", "eval_every", "eval_batches",
                  "checkpoint_every", "keep_checkpoints")
        _check(self.sample_tokens >= 0, f"sample_tokens must be >= 0, got {self.sample_tokens}")
        _check(self.max_nonfinite_skips >= 0, f"max_nonfinite_skips must be >= 0, got {self.max_nonfinite_skips}")


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)

    def __post_init__(self) -> None:
        _check(self.train.seq_len <= self.model.max_seq_len,
               f"train.seq_len={self.train.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
        chunks = 2 * self.mesh.context
        _check(self.model.context_strategy != "zigzag" or self.mesh.context == 1 or self.train.seq_len % chunks == 0,
               f"model.context_strategy=zigzag splits the sequence into 2 x mesh.context = {chunks} equal chunks; "
               f"train.seq_len={self.train.seq_len} does not divide into {chunks}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RunConfig":
        return _from_dict(cls, d, "")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **sections: Any) -> "RunConfig":
        """``cfg.replace(model={"d_model": 128}, train={"steps": 10})``: a copy with fields changed."""
        d = self.to_dict()
        for section, values in sections.items():
            _check(section in d, f"unknown config section {section!r}; sections: {', '.join(d)}")
            d[section].update(values)
        return RunConfig.from_dict(d)


def field_type(hint: Any) -> tuple[type, bool]:
    """``(type, optional)`` of a field annotation: ``int | None`` -> ``(int, True)``, ``dict`` -> ``(dict, False)``."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    kinds = [a for a in args if a is not type(None)]
    kind = typing.get_origin(kinds[0]) or kinds[0]
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
    hints = typing.get_type_hints(cls)
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

