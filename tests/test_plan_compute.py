"""gptjax-plan --flops / --hours: from a fitted law to a run. The plan spends the budget it was given at the shape the
sizing rule gives, predicts the loss there with the fit's bootstrap interval, picks a mesh that fits, times the run;
the experiment file it writes trains, and the run's summary reports the measured against the predicted loss."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest

from helpers import ONE_DEVICE_ENV, run_cli, small_run
from gptjax.config import build_run_config
from gptjax.model import count_params, flops_per_token
from gptjax.planning.compute import PlanError, measured_mfu, plan_compute, plan_for_hours
from gptjax.runs import RunDir
from gptjax.scaling import FitResult, ParametricResult, model_for_params, scaling_params

LAW = dict(E=0.72, A=9.5, B=714.0, alpha=0.25, beta=0.52)


def synthetic_fit(samples: bool = True) -> FitResult:
    rng = np.random.default_rng(0)
    rows = None
    if samples:  # refits scattered around the law, as a bootstrap gives them
        rows = [[LAW["E"] * math.exp(rng.normal(0, 0.05)), LAW["A"] * math.exp(rng.normal(0, 0.1)),
                 LAW["B"] * math.exp(rng.normal(0, 0.1)), LAW["alpha"] + rng.normal(0, 0.01),
                 LAW["beta"] + rng.normal(0, 0.01)] for _ in range(200)]
    law = ParametricResult(**LAW, objective=0.0, n_points=25, samples=rows, bootstrap_n=200 if samples else None)
    return FitResult(n_points=25, n_rows=25, source="synthetic", approach3=law)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, small_corpus):
    """A trained run standing for a sweep's: its config is the plan's base, its metrics the CPU's throughput."""
    from gptjax.training import train

    cfg = small_run(tmp_path_factory.mktemp("sweep") / "base", small_corpus)
    cfg = replace(cfg, model=model_for_params(3000, cfg.model.vocab_size, cfg.train.seq_len))
    train(cfg)
    return cfg


def test_a_plan_spends_its_budget_at_the_rules_shape_and_predicts_with_intervals(base_run):
    fit, flops = synthetic_fit(), 1e8
    plan = plan_compute(fit, flops, base_run)
    law = fit.approach3
    opt = law.optimal(flops)
    assert plan.optimum["params"] == pytest.approx(opt["params"]) and plan.config.model == replace(
        base_run.model, **{k: getattr(model_for_params(opt["params"], base_run.model.vocab_size, 64), k)
                           for k in ("d_model", "n_layers", "n_heads", "d_ff")})
    n = scaling_params(plan.config.model)
    t = plan.config.train
    assert plan.params == n and plan.tokens == t.steps * t.batch_size * t.seq_len
    # the budget is spent to within one step's tokens
    assert abs(6 * n * plan.tokens - flops) <= 6 * n * t.batch_size * t.seq_len / 2
    assert plan.loss == pytest.approx(float(law.loss(n, plan.tokens)))
    for key, value in (("params", opt["params"]), ("tokens", opt["tokens"]), ("loss", opt["loss"])):
        lo, hi = plan.optimum["ci"][key]
        assert lo < value < hi
    assert plan.loss_ci[0] < plan.loss < plan.loss_ci[1]
    # the sweep's batch, lr and warmup fraction; the eval cadence follows the new length
    assert (t.batch_size, t.seq_len, plan.config.optim.lr) == (8, 64, base_run.optim.lr)
    assert plan.config.optim.warmup_steps == max(1, round(t.steps * 2 / 12))
    assert "not re-tuned" in plan.rules["lr"]
    # the wall time is the training FLOPs over what the base run measured
    rows = [json.loads(ln) for ln in RunDir(base_run.train.run_dir).metrics.read_text().splitlines()]
    tps = float(np.median([r["tokens_per_sec"] for r in rows if "tokens_per_sec" in r][1:]))
    thr = tps * flops_per_token(base_run.model, 64)
    assert plan.throughput == pytest.approx(thr)
    assert plan.wall_seconds == pytest.approx(flops_per_token(plan.config.model, 64) * plan.tokens / thr)
    # a fit without bootstrap refits plans the same run, without intervals
    bare = plan_compute(synthetic_fit(samples=False), flops, base_run)
    assert bare.config == plan.config and bare.loss_ci is None and bare.optimum["ci"]["params"] is None


def test_at_scale_the_mesh_is_the_first_that_fits_and_hours_give_their_budget(base_run):
    fit = synthetic_fit()
    small = plan_compute(fit, 1e17, base_run, chips=8, device="h100")
    assert small.device == "h100-80gb" and small.mesh["data"] == 8 and small.config.train.batch_size == 8
    big = plan_compute(fit, 1e20, base_run, chips=8, device="h100")  # ~14B parameters: data parallel cannot hold it
    assert big.mesh["data"] == 1 and big.mesh["fsdp"] * big.mesh["tensor"] == 8
    assert big.memory_bytes <= 80e9 and count_params(big.config.model) > 1e10
    assert big.config.model.d_model % 128 == 0  # a width FSDP splits
    assert big.throughput == pytest.approx(989e12 * measured_mfu("h100-80gb", count_params(big.config.model)))
    assert measured_mfu("h100-80gb", 1e12) == pytest.approx(0.5169)  # clamped to the largest model measured
    day = plan_for_hours(fit, 24, base_run, chips=64, device="h100")
    assert day.wall_seconds == pytest.approx(24 * 3600, rel=0.01)
    assert small.warnings == []  # the synthetic fit has no reference budget; a real one's says how far it reaches
    far = plan_compute(replace(fit, approach3=replace(fit.approach3, reference_flops=1e12)),
                       1e17, base_run, chips=8, device="h100")
    assert "100,000x the largest budget" in far.warnings[0]
    with pytest.raises(PlanError, match="fits no mesh of 1 a100-40gb"):
        plan_compute(fit, 1e20, base_run, chips=1, device="a100-40")
    with pytest.raises(PlanError, match="could be a100-80gb or a100-40gb"):
        plan_compute(fit, 1e17, base_run, device="a100")
    with pytest.raises(PlanError, match="no measured throughput"):
        plan_compute(fit, 1e8, replace(base_run, train=replace(base_run.train, run_dir="/nonexistent")))


def test_the_plans_experiment_file_trains_and_its_summary_reports_predicted_against_measured(base_run, tmp_path):
    fit_path = tmp_path / "fit.json"
    synthetic_fit().write(fit_path)
    base_json = tmp_path / "base.json"
    base_json.write_text(base_run.to_json())
    out, run_dir = tmp_path / "plan.py", tmp_path / "planned"
    r = run_cli("plan", "--flops", "1e8", "--fit", str(fit_path), "--config", str(base_json), "--out", str(out),
                "--run-dir", str(run_dir), env=ONE_DEVICE_ENV)
    assert r.returncode == 0, r.stderr
    assert "predicted val_loss" in r.stdout and "compiled check" in r.stdout and f"wrote {out}" in r.stdout
    cfg = build_run_config(str(out))
    pred = cfg.train.prediction
    assert cfg.train.run_dir == str(run_dir) and pred["fit"] == str(fit_path) and len(pred["interval"]) == 2
    assert pred["loss"] == pytest.approx(float(synthetic_fit().approach3.loss(pred["params"], pred["tokens"])))
    r = run_cli("train", "--config", str(out), env=ONE_DEVICE_ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = RunDir(run_dir).read_summary()
    got = summary["prediction"]
    assert got["predicted_loss"] == pred["loss"] and got["measured_val_loss"] == summary["val_loss"]
    assert got["relative_error"] == pytest.approx((pred["loss"] - summary["val_loss"]) / summary["val_loss"])
    assert got["within_interval"] == (pred["interval"][0] <= summary["val_loss"] <= pred["interval"][1])
    assert "plan: predicted val_loss" in r.stdout
    # the plan replaces its own experiment file, but no file it did not write (a run's config.json was replaced,
    # and resume, serve and eval then failed): one line, the file as it was; --force replaces it
    again = ["plan", "--flops", "1e8", "--fit", str(fit_path), "--config", str(base_json), "--no-compile"]
    assert run_cli(*again, "--out", str(out), env=ONE_DEVICE_ENV).returncode == 0
    config_json = RunDir(run_dir).config
    before = config_json.read_bytes()
    r = run_cli(*again, "--out", str(config_json), env=ONE_DEVICE_ENV)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"{config_json} exists and was not written by gptjax-plan" in r.stderr and "--force" in r.stderr
    assert config_json.read_bytes() == before
    forced = tmp_path / "mine.txt"
    forced.write_text("notes")
    assert run_cli(*again, "--out", str(forced), "--force", env=ONE_DEVICE_ENV).returncode == 0
    assert forced.read_text().startswith('r"""Planned by gptjax-plan')


def test_bad_plan_requests_are_one_line_errors(tmp_path):
    fit_path = tmp_path / "fit.json"
    synthetic_fit().write(fit_path)
    r = run_cli("plan", "--flops", "1e8", "--fit", str(fit_path), env=ONE_DEVICE_ENV)
    assert r.returncode == 2 and "needs --fit" in r.stderr and "--config" in r.stderr
    r = run_cli("plan", "--flops", "-1", "--fit", str(fit_path), "--config", "nonexistent.json", env=ONE_DEVICE_ENV)
    assert r.returncode == 2 and r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("plan", "--flops", "1e8", "--device", "b200", "--fit", str(fit_path), env=ONE_DEVICE_ENV)
    assert r.returncode == 2 and "--device" in r.stderr


def test_budgets_out_of_reach_are_refused_and_a_runs_config_finds_its_metrics_from_anywhere(base_run, tmp_path):
    """--flops 1e60 and --hours 1e30 were MemoryError tracebacks; --flops 1 printed a plan 1.8e7x over budget; a
    run trained with a relative --run-dir, planned from another directory, was "a run with no measured
    throughput"."""
    import shutil
    import subprocess
    import sys

    fit_path = tmp_path / "fit.json"
    synthetic_fit().write(fit_path)
    run = tmp_path / "elsewhere" / "runs" / "base"
    shutil.copytree(base_run.train.run_dir, run)
    stored = json.loads((run / "config.json").read_text())
    stored["train"]["run_dir"] = "runs/base"  # as trained with --run-dir runs/base from tmp_path/elsewhere
    (run / "config.json").write_text(json.dumps(stored))
    plan = [sys.executable, "-m", "gptjax.cli.plan", "--fit", str(fit_path), "--config",
            "elsewhere/runs/base/config.json", "--no-compile", "--out", str(tmp_path / "p.py")]
    for budget, words in ((["--flops", "1e60"], "past the 1e+13 this planner shapes"),
                          (["--hours", "1e30"], "past the 1e+13 this planner shapes"),
                          (["--flops", "1"], "less than one step of the smallest model")):
        r = subprocess.run([*plan, *budget], capture_output=True, text=True, env=ONE_DEVICE_ENV, cwd=tmp_path,
                           timeout=300)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and words in r.stderr, (budget, r.stderr[-2000:])
    r = subprocess.run([*plan, "--flops", "1e8"], capture_output=True, text=True, env=ONE_DEVICE_ENV, cwd=tmp_path,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "throughput: measured by elsewhere/runs/base" in r.stdout
