"""From a fitted scaling law and a compute budget to a run: ``plan_compute(fit, flops, base)``.

The fit (``fit.json`` of ``gptjax-scaling fit`` or a sweep) gives N_opt and D_opt at the budget, and the loss
there, each with a 95% interval read from the bootstrap's refits. The run is the ``base`` config (a run of the
sweep the fit came from: its vocabulary, sequence length, data, optimizer) with:

* **shape** from the sweep's sizing rule (``gptjax.scaling.model_for_params``) at N_opt (over several devices,
  widths from 1,024 on are multiples of 128, so that FSDP and tensor parallelism split them); the tokens then follow
  from the budget at the shape's actual N (C = 6 N D), so the run spends the budget it was planned for, and the
  predicted loss is read at that (N, D), with its interval;
* **batch**: the sweep's, in sequences (the fit measured losses at that batch; a plan that changed it would
  predict a run the fit never saw), rounded up to a multiple of the batch shards;
* **learning rate**: the sweep's. Under μP (``model.parametrization=mup``) that is the transfer itself: the
  per-parameter multipliers scale it from ``mup_base_width`` to the planned width. Under standard
  parametrisation it is the sweep's rule (one lr for every size), stated in the plan, not a claim that it is the
  best lr at the new size; warmup keeps the sweep's fraction of the steps;
* **mesh**: over ``chips`` devices, the first of data parallel, FSDP, FSDP x tensor (2, 4, 8) whose analytic
  per-device memory (``gptjax.planning.memory``) fits the device; the CLI then runs the memory planner's
  compiled check on the written experiment file;
* **time**: training FLOPs (``flops_per_token`` x tokens, attention included) over the chips' throughput. On an
  accelerator the throughput is the datasheet peak x a measured MFU (``MEASURED_MFU``: this project's own H100 /
  H200 runs, interpolated in log-parameters between the two models measured); on a CPU it is what the base run
  measured (its logged tokens per second x its FLOPs per token).
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path

from gptjax.config import RunConfig, batch_shards
from gptjax.model import count_params, flops_per_token
from gptjax.planning.memory import DEVICE_MEMORY_GB, analytic_plan
from gptjax.runs import RunDir
from gptjax.scaling import FitResult, model_for_params, scaling_params

# bf16 dense datasheet peaks, FLOP/s per chip
DEVICE_PEAK_FLOPS = {"h100-80gb": 989e12, "h200-141gb": 989e12, "a100-80gb": 312e12, "a100-40gb": 312e12,
                     "tpu-v5p": 459e12, "tpu-v5e": 197e12, "tpu-v4": 275e12, "tpu-v6e": 918e12}
# MFU measured by this project (tools/gpu_check.py, fused loss): (parameters, MFU) of GPT-2-small 64 x 1024 and
# TinyLlama 16 x 2048; bench/results/gpu-2026-11-27.jsonl (H100) and gpu-2026-11-26.jsonl (H200, plain loss)
MEASURED_MFU = {"h100-80gb": ((124_475_904, 0.3512), (1_100_048_384, 0.5169)),
                "h200-141gb": ((124_475_904, 0.3648), (1_100_048_384, 0.5324))}
TENSOR_SPLITS = (2, 4, 8)
EXTRAPOLATION_WARNING = 100  # a plan this many times past the fit's largest budget says so
SHARDABLE_WIDTH = 1024  # from this width on, a plan over several devices rounds d_model to a multiple of 128
MAX_PLANNED_PARAMS = 1e13  # 10T parameters: past any model trained; --flops 1e60 ran the sizing rule out of memory
OVER_BUDGET = 2.0  # a plan whose one-step-minimum spends more than this times the budget is refused


class PlanError(ValueError):
    """The plan cannot be made as asked; the message says what to change."""


def device_name(text: str) -> str:
    """A device of the tables, by its name or a unique prefix (``h100`` -> ``h100-80gb``), or ``cpu``."""
    if text == "cpu" or text in DEVICE_MEMORY_GB:
        return text
    hits = [k for k in DEVICE_MEMORY_GB if k.startswith(text)]
    if len(hits) == 1:
        return hits[0]
    raise PlanError(f"--device {text!r}: give cpu or one of {', '.join(DEVICE_MEMORY_GB)}"
                    + (f" ({text!r} could be {' or '.join(hits)})" if hits else ""))


def measured_mfu(device: str, params: float) -> float:
    """MFU at ``params`` from the two models measured on ``device``: linear in log(params), clamped to them."""
    (n0, m0), (n1, m1) = MEASURED_MFU[device]
    t = min(max((math.log(params) - math.log(n0)) / (math.log(n1) - math.log(n0)), 0.0), 1.0)
    return m0 + t * (m1 - m0)


def measured_throughput(base: RunConfig, base_run_dir: str | Path | None = None) -> tuple[float, str]:
    """FLOP/s per device that the base run measured: median logged tokens per second (the first log row, which
    holds the compilation, left out) x its FLOPs per token. ``base_run_dir``: where the base run is (the directory
    of the ``config.json`` given; default its ``train.run_dir``, which is relative to where it was trained)."""
    run = RunDir(base_run_dir or base.train.run_dir)
    rows = []
    if run.metrics.is_file():
        rows = [r for r in run.read_metrics() if "tokens_per_sec" in r]
    if len(rows) < 2:
        raise PlanError(f"the base run {run} has no measured throughput (metrics.jsonl with at least two logged "
                        "steps): pass a finished run's config.json as --config, or give --mfu and --peak-flops")
    tps = statistics.median(r["tokens_per_sec"] for r in rows[1:])
    fpt = flops_per_token(base.model, base.train.seq_len)
    where = run.path.relative_to(Path.cwd()) if run.path.is_relative_to(Path.cwd()) else run.path
    return tps * fpt, f"measured by {where}: {tps:,.0f} tokens/s x {fpt:,.0f} FLOPs/token"


@dataclass
class ComputePlan:
    flops: float
    approach: str
    optimum: dict  # N_opt, D_opt and the loss there: {"params", "tokens", "loss"} and their "ci"
    config: RunConfig  # the planned run
    params: int  # its N (non-embedding, as the fit counts)
    tokens: int
    loss: float  # predicted at (params, tokens)
    loss_ci: list[float] | None
    device: str
    chips: int
    mesh: dict[str, int]
    memory_bytes: int  # analytic, per device
    device_bytes: float
    throughput: float  # FLOP/s per chip
    throughput_source: str
    train_flops: float  # flops_per_token x tokens
    rules: dict[str, str] = field(default_factory=dict)  # how batch, lr, mesh were chosen
    warnings: list[str] = field(default_factory=list)

    @property
    def wall_seconds(self) -> float:
        return self.train_flops / (self.chips * self.throughput)

    def prediction(self, fit_path: str) -> dict:
        """What the run's ``train.prediction`` holds: its summary compares the measured loss with it."""
        out = {"loss": self.loss, "fit": fit_path, "approach": self.approach, "flops": self.flops,
               "params": self.params, "tokens": self.tokens, "wall_seconds": round(self.wall_seconds, 1)}
        if self.loss_ci:
            out["interval"] = self.loss_ci
        return out

    def to_dict(self) -> dict:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "config"}
        out["wall_seconds"] = self.wall_seconds
        m, t = self.config.model, self.config.train
        out["model"] = {"d_model": m.d_model, "n_layers": m.n_layers, "n_heads": m.n_heads, "d_ff": m.d_ff,
                        "total_params": count_params(m)}
        out["train"] = {"steps": t.steps, "batch_size": t.batch_size, "seq_len": t.seq_len,
                        "lr": self.config.optim.lr, "warmup_steps": self.config.optim.warmup_steps}
        return out


def host_memory_bytes() -> float:
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def mesh_candidates(chips: int) -> list[dict[str, int]]:
    out = [{"data": chips, "fsdp": 1, "context": 1, "tensor": 1}]
    if chips > 1:
        out.append({"data": 1, "fsdp": chips, "context": 1, "tensor": 1})
        out += [{"data": 1, "fsdp": chips // t, "context": 1, "tensor": t} for t in TENSOR_SPLITS
                if chips % t == 0 and t < chips]
    return out


def plan_compute(fit: FitResult, flops: float, base: RunConfig, *, approach: str = "3", chips: int = 1,
                 device: str = "cpu", mfu: float | None = None, peak_flops: float | None = None,
                 run_dir: str | None = None, base_run_dir: str | Path | None = None) -> ComputePlan:
    if not (flops > 0 and math.isfinite(flops)):
        raise PlanError(f"--flops must be a positive number, got {flops}")
    if chips < 1:
        raise PlanError(f"--chips must be >= 1, got {chips}")
    device = device_name(device)
    law = fit.parametric(approach)
    opt = {k: float(v) for k, v in law.optimal(flops).items() if k in ("params", "tokens", "loss")}
    if not opt["params"] <= MAX_PLANNED_PARAMS:
        raise PlanError(f"C = {flops:.3g} FLOPs gives N_opt = {opt['params']:.3g} parameters, past the "
                        f"{MAX_PLANNED_PARAMS:.0e} this planner shapes: give a smaller --flops or --hours")
    opt["ci"] = {k: law.interval(lambda f, k=k: float(f.optimal(flops)[k])) for k in ("params", "tokens", "loss")}

    # shape from the sizing rule, keeping everything else of the base model (dtype, parametrization, kernels)
    rule = model_for_params(opt["params"], base.model.vocab_size, base.train.seq_len)
    if chips > 1 and rule.d_model >= SHARDABLE_WIDTH:  # widths FSDP and tensor parallelism can split
        rule = model_for_params(opt["params"], base.model.vocab_size, base.train.seq_len, width_step=128)
    model = replace(base.model, d_model=rule.d_model, n_layers=rule.n_layers, n_heads=rule.n_heads,
                    n_kv_heads=None, d_ff=rule.d_ff, max_seq_len=max(base.model.max_seq_len, base.train.seq_len))
    n = scaling_params(model)
    seq = base.train.seq_len

    capacity = host_memory_bytes() if device == "cpu" else DEVICE_MEMORY_GB[device] * 1e9
    chosen = None
    for mesh in mesh_candidates(chips):
        shards = batch_shards(mesh)
        batch = shards * math.ceil(base.train.batch_size / shards)  # the smallest that RunConfig.check_mesh_split takes
        steps = max(1, round(flops / (6 * n) / (batch * seq)))
        cfg = _run_config(base, model, batch, steps, mesh, run_dir or f"runs/plan_C{flops:.0e}".replace("+", ""))
        # (counted scan-stacked: the same bytes, traced once instead of once per layer)
        memory = analytic_plan(replace(cfg, model=replace(cfg.model, scan_layers=True)), mesh).total
        if memory <= capacity:
            chosen = (mesh, cfg, memory)
            break
    if chosen is None:
        raise PlanError(f"the planned model ({count_params(model):,} parameters, batch {base.train.batch_size} x "
                        f"{seq}) fits no mesh of {chips} {device} devices ({capacity / 1e9:.0f} GB each): give more "
                        "--chips or a smaller budget")
    mesh, cfg, memory = chosen
    tokens = cfg.train.steps * cfg.train.batch_size * seq
    if 6 * n * tokens > OVER_BUDGET * flops:  # (--flops 1 printed a plan 1.8e7 times over budget)
        raise PlanError(f"C = {flops:.3g} FLOPs is less than one step of the smallest model the sizing rule gives "
                        f"({n:,} parameters x {cfg.train.batch_size} x {seq} tokens x 6 = {6 * n * tokens:.3g} "
                        "FLOPs): give a larger --flops or --hours")
    loss = float(law.loss(n, tokens))
    loss_ci = law.interval(lambda f: float(f.loss(n, tokens)))

    if mfu is not None or device != "cpu":
        peak = peak_flops or (DEVICE_PEAK_FLOPS.get(device) if device != "cpu" else None)
        if peak is None:
            raise PlanError("--mfu on a cpu needs --peak-flops (FLOP/s per device)")
        if mfu is None:
            if device not in MEASURED_MFU:
                raise PlanError(f"no MFU has been measured on {device} (measured: {', '.join(MEASURED_MFU)}); "
                                "give --mfu")
            mfu, source = measured_mfu(device, count_params(model)), "MFU measured by this project (gpu_check)"
        else:
            source = "the given --mfu"
        throughput, source = peak * mfu, f"{peak / 1e12:g} TFLOP/s peak x MFU {mfu:.3f} ({source})"
    else:
        throughput, source = measured_throughput(base, base_run_dir)
    train_flops = flops_per_token(model, seq) * tokens
    shards = batch_shards(mesh)
    rules = {
        "shape": f"sizing rule at N_opt = {opt['params']:,.0f}: d_model {model.d_model}, {model.n_layers} layers, "
                 f"d_ff {model.d_ff} (N = {n:,})",
        "tokens": f"C / (6 N) = {flops:.3g} / (6 x {n:,}) -> {cfg.train.steps:,} steps x {cfg.train.batch_size} x "
                  f"{seq} = {tokens:,}",
        "batch": f"the sweep's {base.train.batch_size} sequences" + (
            f", rounded up to {cfg.train.batch_size} (a multiple of the {shards} batch shards)"
            if cfg.train.batch_size != base.train.batch_size else ""),
        "lr": (f"{base.optim.lr:g}, transferred by μP from base width {base.model.mup_base_width} to "
               f"{model.d_model}" if model.parametrization == "mup" else
               f"{base.optim.lr:g}, the sweep's one lr for every size (standard parametrisation: not re-tuned "
               "for this width; μP would transfer it)"),
        "mesh": f"first of data / fsdp / fsdp x tensor over {chips} device(s) whose analytic memory fits",
    }
    warnings = []
    largest = getattr(law, "reference_flops", math.nan)  # the fit's largest budget
    if flops > EXTRAPOLATION_WARNING * largest:
        warnings.append(f"C = {flops:.3g} is {flops / largest:,.0f}x the largest budget the law was fitted on "
                        f"({largest:.3g}): the prediction is extrapolated that far (see its interval)")
    return ComputePlan(flops=flops, approach=approach, optimum=opt, config=cfg, params=n, tokens=tokens,
                       loss=loss, loss_ci=loss_ci, device=device, chips=chips, mesh=mesh, memory_bytes=memory,
                       device_bytes=capacity, throughput=throughput, throughput_source=source,
                       train_flops=train_flops, rules=rules, warnings=warnings)


def _run_config(base: RunConfig, model, batch: int, steps: int, mesh: dict, run_dir: str) -> RunConfig:
    warmup = max(1, round(steps * base.optim.warmup_steps / max(1, base.train.steps)))
    every = max(1, steps // 4)
    train = replace(base.train, run_dir=run_dir, steps=steps, batch_size=batch, eval_every=every,
                    log_every=max(1, min(base.train.log_every, every)), checkpoint_every=every, init_from=None,
                    prediction=None)
    return replace(base, model=model, train=train, optim=replace(base.optim, warmup_steps=warmup),
                   mesh=replace(base.mesh, data=mesh["data"], fsdp=mesh["fsdp"], context=1, tensor=mesh["tensor"],
                                sharding_factor=None))


def plan_for_hours(fit: FitResult, hours: float, base: RunConfig, **kw) -> ComputePlan:
    """The plan whose wall time is ``hours``: the budget from the chips' throughput, corrected twice for the
    planned model's FLOPs per token (attention and the embedding, which C = 6 N D leaves out)."""
    if not (hours > 0 and math.isfinite(hours)):
        raise PlanError(f"--hours must be a positive number, got {hours}")
    guess = plan_compute(fit, 1e15, base, **kw)
    flops = hours * 3600 * guess.chips * guess.throughput
    for _ in range(3):
        plan = plan_compute(fit, flops, base, **kw)
        flops *= hours * 3600 / plan.wall_seconds
    return plan_compute(fit, flops, base, **kw)
