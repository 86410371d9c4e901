"""``gptjax-plan``: per-device memory plan for training a model on a device mesh — analytic, then confirmed by XLA;
with ``--flops`` or ``--hours``, the compute-optimal run a fitted scaling law gives for a budget.

    gptjax-plan --flops 1e12 --fit experiments/results/isoflop/fit.json --config runs/isoflop/C2e11_N40936/config.json
    gptjax-plan --hours 24 --chips 64 --device h100 --fit fit.json --config my_sweep_run/config.json
    gptjax-plan llama2-70b --mesh 1,64,8 --batch 256 --seq 4096 --device h100-80gb
    gptjax-plan gpt3-175b --mesh 1,128,8 --batch 512 --seq 2048 --remat full --device tpu-v5p
    gptjax-plan gpt2-small --mesh 8,1,1 --batch 64 --seq 1024 --no-compile
    gptjax-plan --config experiments/austen.py --set model.d_model=512 --mesh 1,8,1

The analytic figures shard every parameter by the trainer's own logical-axis rules (so FSDP / tensor / DDP
meshes come out exactly) and estimate activations from the model shape (see gptjax/planning/memory.py). The AOT
check builds reduced-depth copies of the model (default 2 and 4 layers), lowers and compiles the real jitted
train step on data x fsdp x tensor simulated CPU devices from abstract ShapeDtypeStructs (nothing allocated),
reads XLA's per-device memory_analysis, and extrapolates linearly in depth to the full model.

Compute plans (``gptjax.planning.compute`` says how each choice is made): N_opt and D_opt with their bootstrap
intervals, the predicted loss with its interval, the model from the sizing rule, batch and lr (the sweep's; μP
transfers the lr), a mesh with the memory planner's compiled check, steps and wall time from a measured MFU (a
CPU: the base run's measured throughput). ``--config`` is a run of the sweep the fit came from; the plan is
written as an experiment file (``--out``) whose run's summary reports the predicted against the measured loss.

One verdict, from the analytic figure, whatever the flags: it models the target device, where the compiled
figure is XLA:CPU's (which keeps bf16 buffers in float32, overstating a GPU's or TPU's bf16 step, and is
extrapolated from reduced depths). The compiled figure is shown as a check, with a caution where the two differ by
more than a quarter. Exit codes: 0 fits, 1 does not fit, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import replace
from pathlib import Path

from gptjax.cli.common import add_config_args, config_args, config_from_args, console_script, user_errors
from gptjax.config import DTYPE_NAMES, AttentionImpl, Remat, RunConfig, build_config_dict, choices
from gptjax.runs import RunDir, check_overwrite, write_atomic

GB = 1e9


def build_config(a: argparse.Namespace) -> RunConfig:
    """The shared config arguments, with the planner's flags (mesh, batch, sequence, precision, remat) applied;
    the sequence length defaults to the model's context."""
    model_fields = dict(dtype=a.dtype, param_dtype=a.param_dtype, remat=a.remat, scan_layers=True)
    if a.attention:
        model_fields["attention_impl"] = a.attention
    data, fsdp, tensor = a.mesh
    d = build_config_dict(**config_args(a), **model_fields)
    d["mesh"].update(data=data, fsdp=fsdp, context=a.context, tensor=tensor, sharding_factor=None)
    d["train"].update(batch_size=a.batch, seq_len=a.seq or d["model"]["max_seq_len"], steps=1000)
    return RunConfig.from_dict(d)


def mesh_sizes(a) -> dict[str, int]:
    return {"data": a.mesh[0], "fsdp": a.mesh[1], "context": a.context, "tensor": a.mesh[2]}


def _mesh_shape(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(x) for x in text.split(","))
        if len(shape) == 3 and all(x > 0 for x in shape):
            return shape
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"--mesh must be three positive integers data,fsdp,tensor, got {text!r}")


def _device_gb(text: str) -> float:
    from gptjax.planning.memory import DEVICE_MEMORY_GB

    if text in DEVICE_MEMORY_GB:
        return DEVICE_MEMORY_GB[text]
    try:
        gb = float(text)
    except ValueError:
        gb = math.nan
    if not (math.isfinite(gb) and gb > 0):
        raise argparse.ArgumentTypeError(f"--device {text!r}: give one of {', '.join(DEVICE_MEMORY_GB)} or a "
                                         "device memory in GB (a positive number)")
    return gb


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def parser() -> argparse.ArgumentParser:
    from gptjax.config import MODEL_PRESETS
    from gptjax.planning.memory import DEVICE_MEMORY_GB
    from gptjax.scaling.fit import PARAMETRIC_APPROACHES

    p = argparse.ArgumentParser(prog="gptjax-plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", choices=list(MODEL_PRESETS), metavar="MODEL_PRESET",
                   help="model preset (same as --model-preset)")
    add_config_args(p, default_preset=None)
    p.add_argument("--mesh", default=(1, 8, 1), type=_mesh_shape, help="data,fsdp,tensor (default 1,8,1)")
    p.add_argument("--context", type=_positive, default=1,
                   help="context-parallel devices: the sequence is split over them (default 1)")
    p.add_argument("--attention", default=None, choices=choices(AttentionImpl),
                   help="attention kernel (model.attention_impl; default: the config's)")
    p.add_argument("--batch", type=int, default=None, help="global batch in sequences (default: devices)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: the preset's context)")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPE_NAMES, help="compute dtype")
    p.add_argument("--param-dtype", default="float32", choices=DTYPE_NAMES)
    p.add_argument("--remat", default="full", choices=choices(Remat))
    p.add_argument("--device", default=None, type=_device_name,
                   help=f"{', '.join(DEVICE_MEMORY_GB)} or a size in GB (default h100-80gb); with --flops/--hours: "
                        "cpu (default) or one of those, a unique prefix will do (h100)")
    g = p.add_argument_group("compute plan (a fitted scaling law -> a run)")
    g.add_argument("--flops", type=float, help="compute budget C = 6 N D in FLOPs")
    g.add_argument("--hours", type=float, help="instead of --flops: the budget these chips spend in this time")
    g.add_argument("--fit", help="fit.json of gptjax-scaling fit or a sweep (approach 3 with bootstrap refits)")
    g.add_argument("--approach", default="3", choices=PARAMETRIC_APPROACHES, help="parametric fit to plan from")
    g.add_argument("--chips", type=_positive, default=1, help="devices the run gets (default 1)")
    g.add_argument("--mfu", type=float, help="model FLOPs utilisation to time the run with (default: measured)")
    g.add_argument("--peak-flops", type=float, help="FLOP/s per device, with --mfu on a cpu")
    g.add_argument("--out", help="experiment file to write (default experiments/plan_C<flops>.py); a file that "
                                 "gptjax-plan did not write is not replaced")
    g.add_argument("--force", action="store_true", help="replace --out whatever it holds")
    g.add_argument("--run-dir", help="the planned run's directory (default runs/plan_C<flops>)")
    p.add_argument("--compile-layers", default="2,4", help="reduced depths to AOT-compile (default 2,4)")
    p.add_argument("--no-compile", action="store_true", help="analytic figures only")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def _device_name(text: str) -> str:
    from gptjax.planning.compute import PlanError, device_name

    try:
        return device_name(text)  # validated here, so a bad --device is argparse's one line
    except PlanError:
        _device_gb(text)
        return text


@console_script("gptjax-plan")
def main(argv: list[str] | None = None) -> int:
    p = parser()
    a = p.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    a.model_preset = a.model_preset or a.model
    if a.flops is not None or a.hours is not None:
        return compute_plan(p, a)
    a.device = a.device or "h100-80gb"
    if a.device == "cpu":
        p.error("--device cpu is for compute plans (--flops / --hours); for a memory plan give a size in GB")
    if not (a.model_preset or a.config or a.preset):
        p.error("give a model preset (e.g. gptjax-plan gpt2-small) or --config / --preset")
    a.compile_layers = sorted({int(x) for x in a.compile_layers.split(",")})
    n_dev = math.prod(a.mesh) * a.context
    a.batch = a.batch or n_dev

    from gptjax.config import ConfigError
    from gptjax.planning.report import memory_report

    with user_errors():
        cfg = build_config(a)
        try:
            cfg.check_mesh_split(mesh_sizes(a))
        except ConfigError as e:  # the rule is the config's; the fields are this command's flags
            raise ConfigError(f"{e}; here --batch sets train.batch_size, --seq train.seq_len, --mesh data,fsdp,tensor "
                              "and --context mesh.context") from None
    capacity = _device_gb(a.device)
    logging.getLogger("gptjax.sharding.rules").setLevel(logging.ERROR)  # summarised per axis below
    try:
        report = memory_report(cfg, mesh_sizes(a), capacity, None if a.no_compile else a.compile_layers)
    except RuntimeError as e:  # the compiled check's child failed
        raise SystemExit(str(e)) from None
    result = {"preset": a.model_preset or a.config or a.preset, "devices": n_dev, "batch": a.batch,
              "dtype": a.dtype, "remat": a.remat, **report}
    exit_code = 0 if result["fits"] else 1
    for w in result["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    if a.json:
        print(json.dumps(result, indent=2))
        return exit_code

    m = cfg.model
    print(f"\n{result['preset']}: {result['params'] / 1e9:.2f}B params, {m.n_layers} layers, d_model {m.d_model}, "
          f"{m.n_heads} heads / {m.kv_heads} kv heads, vocab {m.vocab_size}")
    print(f"mesh data={a.mesh[0]} x fsdp={a.mesh[1]} x context={a.context} x tensor={a.mesh[2]} = {n_dev} devices "
          f"| global batch {a.batch} x {cfg.train.seq_len} tokens | compute {a.dtype}, params {a.param_dtype}, "
          f"remat {a.remat}, attention {result['attention']}\n")
    print(f"{'per device (analytic, full depth)':38s} {'GB':>10s}")
    print("-" * 50)
    for name, b in result["analytic_bytes"].items():
        print(f"{name:38s} {b / GB:10.2f}")
    if "aot" in result:
        print("\nAOT check: XLA memory_analysis of the compiled train step, per device, reduced depth")
        print(f"{'layers':>6s} {'analytic GB':>12s} {'compiled GB':>12s} {'(args':>8s} {'temp':>8s} "
              f"{'out-alias)':>10s}")
        for r in result["aot"]:
            print(f"{r['layers']:6d} {r['analytic'] / GB:12.3f} {r['peak'] / GB:12.3f} {r['arguments'] / GB:8.3f} "
                  f"{r['temp'] / GB:8.3f} {(r['outputs'] - r['aliased']) / GB:10.3f}")
        print(f"compiled, extrapolated to {m.n_layers} layers: {result['compiled_full_depth_peak'] / GB:.2f} GB")
    nbytes = result["analytic_bytes"]["total"]
    print(f"\n{a.device}: {'fits' if result['fits'] else 'DOES NOT FIT'} ({nbytes / GB:.2f} GB, "
          f"{100 * nbytes / (capacity * GB):.0f}% of {capacity:g} GB) — from the analytic figure")
    compiled = result.get("compiled_full_depth_peak")
    if compiled is not None and not 0.75 <= compiled / nbytes <= 1.25:
        print(f"  caution: XLA:CPU's compiled step, extrapolated, is {compiled / GB:.2f} GB "
              f"({compiled / nbytes:.2f}x the analytic figure)"
              + ("; for bf16 XLA:CPU keeps buffers in float32, so it overstates a GPU's or TPU's step"
                 if a.dtype == "bfloat16" else "") + ". Leave headroom for the runtime.")
    print()
    return exit_code


def compute_plan(p: argparse.ArgumentParser, a: argparse.Namespace) -> int:
    from gptjax.planning.compute import PlanError, plan_compute, plan_for_hours
    from gptjax.scaling import FitResult, ScalingInputError

    if (a.flops is None) == (a.hours is None):
        p.error("give --flops or --hours, not both")
    if not a.fit or not a.config:
        p.error("a compute plan needs --fit (a fitted law) and --config (a run of the sweep it was fitted on, "
                "e.g. runs/isoflop/<run>/config.json)")
    with user_errors(PlanError, ScalingInputError, FileNotFoundError):
        fit = FitResult.read(a.fit)
        base = config_from_args(a)
        given = Path(a.config)  # a run's own config.json: the run is where the file is, wherever the cwd
        kw = dict(approach=a.approach, chips=a.chips, device=a.device or "cpu", mfu=a.mfu, peak_flops=a.peak_flops,
                  run_dir=a.run_dir, base_run_dir=given.parent if given.name == RunDir.CONFIG else None)
        plan = plan_for_hours(fit, a.hours, base, **kw) if a.hours else plan_compute(fit, a.flops, base, **kw)
    tag = f"C{plan.flops:.0e}".replace("+", "")
    out = Path(a.out or f"experiments/plan_{tag}.py")
    with user_errors():  # before the compiled check: a refusal costs nothing
        check_overwrite(out, lambda head: head.startswith(EXPERIMENT_HEADER.encode()), "gptjax-plan", a.force)
    cfg = replace(plan.config, train=replace(plan.config.train, prediction=plan.prediction(a.fit)))
    result = plan.to_dict()
    check = None
    if not a.no_compile:
        check = compiled_check(cfg, plan)  # the config the experiment file will hold
    write_experiment(out, cfg, plan, a, check)
    if check is not None:
        result["compiled_check"] = check
    result["experiment_file"] = str(out)
    if a.json:
        print(json.dumps(result, indent=2, default=str))
        return 0
    print(describe_plan(plan, check, out))
    return 0


def _ci(ci, fmt="{:.4g}") -> str:
    return f" [{fmt.format(ci[0])}, {fmt.format(ci[1])}]" if ci else ""


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def describe_plan(plan, check: dict | None, out: Path) -> str:
    from gptjax.model import count_params

    o, c, m, t = plan.optimum, plan.optimum["ci"], plan.config.model, plan.config.train
    lines = [f"C = {plan.flops:.4g} FLOPs (approach {plan.approach}, 95% bootstrap intervals)",
             f"  N_opt = {o['params']:,.0f}{_ci(c['params'], '{:,.0f}')}   D_opt = {o['tokens']:,.0f}"
             f"{_ci(c['tokens'], '{:,.0f}')}   loss there = {o['loss']:.4f}{_ci(c['loss'], '{:.4f}')}",
             f"the run: N = {plan.params:,} (non-embedding), D = {plan.tokens:,} tokens -> predicted val_loss "
             f"{plan.loss:.4f}{_ci(plan.loss_ci, '{:.4f}')}"]
    lines += [f"  {k:6s} {v}" for k, v in plan.rules.items()]
    lines.append(f"  model  {m.d_model} wide x {m.n_layers} layers, {m.n_heads} heads, d_ff {m.d_ff} "
                 f"({count_params(m):,} parameters with the embedding), {m.parametrization}")
    lines.append(f"  train  {t.steps:,} steps x {t.batch_size} x {t.seq_len}, lr {plan.config.optim.lr:g}, warmup "
                 f"{plan.config.optim.warmup_steps}, {plan.config.optim.schedule}")
    mesh = " x ".join(f"{k}={v}" for k, v in plan.mesh.items())
    lines.append(f"  mesh   {mesh} on {plan.chips} {plan.device}: {plan.memory_bytes / GB:.3f} GB per device "
                 f"(analytic) of {plan.device_bytes / GB:.0f} GB")
    if check is not None:
        lines.append(f"         compiled check: {check['compiled_peak'] / GB:.3f} GB per device (XLA:CPU, "
                     f"{'fits' if check['fits'] else 'DOES NOT FIT'})")
    lines.append(f"  time   {plan.train_flops:.3g} training FLOPs / ({plan.chips} x {plan.throughput / 1e12:.4g} "
                 f"TFLOP/s) = {_hours(plan.wall_seconds)}; throughput: {plan.throughput_source}")
    lines += [f"warning: {w}" for w in plan.warnings]
    lines.append(f"wrote {out}; train it with: gptjax-train --config {out}")
    return "\n".join(lines)


def compiled_check(cfg, plan) -> dict:
    """The memory report of the planned config (scan-stacked, as the planner counts it): XLA's compiled per-device
    peak on simulated devices."""
    from gptjax.planning.report import memory_report

    m = cfg.model
    checked = replace(cfg, model=replace(m, scan_layers=True), mesh=replace(cfg.mesh, sharding_factor=None))
    try:
        got = memory_report(checked, plan.mesh, plan.device_bytes / GB, [m.n_layers] if m.n_layers <= 4 else [2, 4])
    except RuntimeError as e:
        raise SystemExit(str(e)) from None
    return {"compiled_peak": got["compiled_full_depth_peak"], "fits": got["fits_compiled"],
            "analytic": got["analytic_bytes"]["total"]}


EXPERIMENT_HEADER = 'r"""Planned by gptjax-plan'  # how an experiment file this command wrote begins


def write_experiment(out: Path, cfg, plan, a, check: dict | None) -> None:
    import pprint
    import textwrap


    d = cfg.to_dict()
    tok = d["data"].get("tokenizer")
    if tok and Path(tok).is_absolute() and Path(tok).is_relative_to(Path.cwd()):
        d["data"]["tokenizer"] = str(Path(tok).relative_to(Path.cwd()))
    command = " \\\n        ".join(textwrap.wrap("gptjax-plan " + " ".join(a.argv), 100, break_long_words=False,
                                                   break_on_hyphens=False))
    described = "\n".join(textwrap.fill(ln, 116, subsequent_indent=" " * 9)
                          for ln in describe_plan(plan, check, out).splitlines()[:-1])
    text = (f'{EXPERIMENT_HEADER}: the compute-optimal run at C = {plan.flops:.4g} FLOPs of {a.fit}.\n\n'
            f"    {command}\n\n" + described + "\n\n"
            f"Train it (its summary reports the measured against the predicted loss):\n\n"
            f"    gptjax-train --config {out}\n"
            '"""\n\nfrom gptjax import RunConfig\n\nCONFIG = ' + pprint.pformat(d, width=110, sort_dicts=True)
            + "\n\n\ndef config() -> RunConfig:\n    return RunConfig.from_dict(CONFIG)\n\n\n"
            'if __name__ == "__main__":\n    from gptjax.training import train\n\n    train(config())\n')
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, text)


if __name__ == "__main__":
    sys.exit(main())
