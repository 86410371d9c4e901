"""Scaling-law fits: recovery of known laws from synthetic data by every approach, the exact Chinchilla
procedure (grid, Huber, L-BFGS), bootstrap intervals, FLOP counts, the sizing rule, and the CLI's errors."""

import csv
import json

import numpy as np
import pytest

from gptjax.config import ModelConfig, RunConfig
from gptjax.scaling import parametric
from gptjax.scaling.fit import fit_points, predict
from gptjax.scaling.flops import chinchilla_flops
from gptjax.scaling.isoflop import fit_envelope, fit_isoflop
from gptjax.scaling.points import ScalingInputError, collect_run, points_from_rows, write_points
from gptjax.scaling.sizing import model_for_params, scaling_params
from helpers import run_cli

# Chinchilla's own fit (Hoffmann et al. 2022, eq. 10) as the truth
TRUTH = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
A_TRUE = TRUTH["beta"] / (TRUTH["alpha"] + TRUTH["beta"])  # N_opt ~ C^a


def law(n, d):
    return TRUTH["E"] + TRUTH["A"] / n ** TRUTH["alpha"] + TRUTH["B"] / d ** TRUTH["beta"]


def isoflop_rows(noise=0.005, seed=0, budgets=np.geomspace(6e18, 3e21, 8), sizes=9, span=1.5):
    """An IsoFLOP design around the true optimum; multiplicative log-normal noise of ``noise``."""
    rng = np.random.default_rng(seed)
    G = (TRUTH["alpha"] * TRUTH["A"] / (TRUTH["beta"] * TRUTH["B"])) ** (1 / (TRUTH["alpha"] + TRUTH["beta"]))
    rows = []
    for c in budgets:
        n_opt = G * (c / 6) ** A_TRUE
        for k in np.linspace(-span, span, sizes):
            n = n_opt * np.exp(k)
            d = c / (6 * n)
            rows.append(dict(run=f"{c:.3g}/{n:.3g}", params=n, tokens=d, budget=c, final=1,
                             loss=law(n, d) * np.exp(rng.normal(0, noise)) if noise else law(n, d)))
    return rows


def test_parametric_exact_data_recovers_truth():
    """Noise-free points: the 4,500-start Huber/L-BFGS fit lands on the truth (checks the optimizer itself)."""
    rows = isoflop_rows(noise=0)
    n, d, l = (np.array([r[k] for r in rows]) for k in ("params", "tokens", "loss"))
    fit = parametric.fit_parametric(n, d, l)
    assert fit.objective < 1e-9
    for k, v in TRUTH.items():
        assert getattr(fit, k) == pytest.approx(v, rel=2e-3), k


def test_every_approach_recovers_known_law_from_noisy_points():
    """0.5% noise on 72 IsoFLOP points (and 12 loss curves for approach 1). Tolerances: about twice the 95%
    bootstrap half-widths measured on this design (alpha ~ +-0.03, a ~ +-0.02); approach 1 is coarser because
    its envelope can only pick one of the 12 curve sizes."""
    rows = isoflop_rows(noise=0.005)
    rng = np.random.default_rng(1)
    for n in np.geomspace(5e7, 1e10, 12):
        for i, d in enumerate(np.geomspace(1e9, 3e11, 30)):
            rows.append(dict(run=f"curve-{n:.3g}", params=n, tokens=d, final=0,
                             loss=law(n, d) * np.exp(rng.normal(0, 0.002))))
    fit = fit_points(points_from_rows(rows), bootstrap=40)
    for key in ("approach3", "vpnls"):
        s = getattr(fit, key)
        assert abs(s.alpha - TRUTH["alpha"]) < 0.06 and abs(s.beta - TRUTH["beta"]) < 0.04, (key, s)
        assert abs(s.E - TRUTH["E"]) < 0.1 and abs(s.a - A_TRUE) < 0.04, (key, s)
        lo, hi = s.ci["a"]
        assert lo < s.a < hi and hi - lo < 0.15
    assert abs(fit.approach2.a - A_TRUE) < 0.03 and abs(fit.approach2.b - (1 - A_TRUE)) < 0.03
    assert abs(fit.approach1.a - A_TRUE) < 0.06
    assert fit.warnings == []
    # top-level approach-3 keys of fit.json
    assert {"E", "A", "B", "alpha", "beta", "a", "b", "objective", "n_points"} <= set(fit.to_dict())
    # the frontier: C = 6 N_opt D_opt, and tokens per parameter = D/N
    p = predict(fit, flops=1e22)
    assert 6 * p.params * p.tokens == pytest.approx(1e22, rel=1e-9)
    assert p.tokens_per_param == pytest.approx(p.tokens / p.params)


def test_isoflop_recovers_a_known_exponent_and_flags_unbracketed_profiles():
    # profiles of an exact power law: loss depends on log(N / N_opt(C)) only, N_opt = 0.1 C^0.6
    rows = []
    for c in np.geomspace(1e17, 1e20, 5):
        n_opt = 0.1 * c ** 0.6
        for k in np.linspace(-1, 1, 7):
            rows.append(dict(params=n_opt * np.exp(k), tokens=c / (6 * n_opt * np.exp(k)), budget=c,
                             loss=2 + 0.05 * k * k))
    r = fit_isoflop(points_from_rows(rows))
    assert r.a == pytest.approx(0.6, abs=1e-9) and r.b == pytest.approx(0.4, abs=1e-9)
    assert r.warnings == []
    # one budget sampled only on the large side of its optimum: warned about and left out
    c = 1e21
    n_opt = 0.1 * c ** 0.6
    rows += [dict(params=n_opt * np.exp(k), tokens=c / (6 * n_opt * np.exp(k)), budget=c, loss=2 + 0.05 * k * k)
             for k in (0.8, 1.2, 1.6, 2.0)]
    r = fit_isoflop(points_from_rows(rows))
    assert len(r.warnings) == 1 and "1e+21" in r.warnings[0] and "bracket" in r.warnings[0]
    assert r.a == pytest.approx(0.6, abs=1e-9)


def test_envelope_uses_curves():
    rows = []
    for n in np.geomspace(1e6, 1e9, 25):
        for d in np.geomspace(1e7, 1e11, 40):
            rows.append(dict(run=f"r{n:.3g}", params=n, tokens=d, loss=law(n, d), final=0))
    r = fit_envelope(points_from_rows(rows))
    assert abs(r.a - A_TRUE) < 0.03
    with pytest.raises(ScalingInputError, match="approach 1 needs loss curves"):
        fit_envelope(points_from_rows([dict(run="x", params=1e6, tokens=1e7, loss=3.0)] * 3))


def test_chinchilla_flops_counts_every_term():
    """Appendix F, term by term, for a GQA SwiGLU model with banded layers; and close to 6 N D for a model
    whose matmuls dominate (as the paper's Table A4 shows)."""
    cfg = ModelConfig(vocab_size=1000, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, max_seq_len=128,
                      attention="alternating", window=32)
    s, d, h, k, hd, f, v = 128, 64, 4, 2, 16, 96, 1000
    attn = lambda sa: 2 * s * d * (h + 2 * k) * hd + 4 * s * sa * h * hd + 3 * h * s * sa + 2 * s * h * hd * d  # noqa
    fwd = 2 * s * v * d + (attn(128) + 2 * s * d * f * 3) + (attn(32) + 2 * s * d * f * 3) + 2 * s * d * v
    assert chinchilla_flops(cfg, 128, 10 * 128) == pytest.approx(3 * fwd * 10)
    big = ModelConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, d_ff=11008, max_seq_len=2048)
    from gptjax.model.accounting import count_params
    ratio = chinchilla_flops(big, 2048, 1e9) / (6 * count_params(big) * 1e9)
    assert 1.0 < ratio < 1.15


def test_sizing_rule_hits_targets():
    for target in (2e3, 5e3, 2e4, 1e5, 5e5, 2e6):
        m = model_for_params(target, 352, 128)
        n = scaling_params(m)
        assert abs(np.log(n / target)) < np.log(1.25), (target, n)
        assert m.d_model % m.n_heads == 0 and m.d_model % 8 == 0
    assert model_for_params(2e6, 352, 128).n_layers > model_for_params(2e4, 352, 128).n_layers


def test_collect_reads_a_run_directory(tmp_path):
    run = tmp_path / "r1"
    run.mkdir()
    cfg = RunConfig.from_dict({"model": dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, d_ff=128,
                                             max_seq_len=64),
                               "train": dict(steps=100, batch_size=4, seq_len=64)})
    (run / "config.json").write_text(cfg.to_json())
    rows = [{"step": s, "val_loss": 4.0 - s / 100} for s in (25, 50, 100)] + [{"step": 100, "loss": 3.1}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = collect_run(run)
    n = scaling_params(cfg.model)
    assert [r["tokens"] for r in out] == [25 * 256, 50 * 256, 100 * 256]
    assert [r["final"] for r in out] == [0, 0, 1] and out[-1]["loss"] == pytest.approx(3.0)
    assert out[-1]["flops"] == pytest.approx(6 * n * 100 * 256)
    with pytest.raises(ScalingInputError, match="not a gptjax run directory"):
        collect_run(tmp_path)


def _write(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return str(path)


@pytest.mark.parametrize("mutate, message", [
    (lambda rows: [{k: v for k, v in r.items() if k != "tokens"} for r in rows], "missing column(s) 'tokens'"),
    (lambda rows: [dict(r, loss=-1.0) if i == 3 else r for i, r in enumerate(rows)], "row 5, column 'loss' is -1"),
    (lambda rows: [dict(r, params="nan") if i == 0 else r for i, r in enumerate(rows)], "NaN"),
    (lambda rows: rows[:4], "at least 5 points, got 4"),
])
def test_fit_cli_bad_input_is_one_clear_error(tmp_path, mutate, message):
    path = _write(tmp_path / "p.csv", mutate(isoflop_rows(budgets=[1e19], sizes=9)))
    r = run_cli("scaling", "fit", path, "--approach", "3", "--out", str(tmp_path / "f.json"))
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and not (tmp_path / "f.json").exists()


def test_fit_and_predict_cli(tmp_path):
    rows = isoflop_rows(budgets=np.geomspace(1e19, 1e21, 4), sizes=7)
    path = write_points(rows, tmp_path / "points.csv")
    out, png = tmp_path / "fit.json", tmp_path / "fit.png"
    r = run_cli("scaling", "fit", str(path), "--approach", "all", "--bootstrap", "20",
                "--out", str(out), "--plot", str(png))
    # these points are finals only: "all" skips approach 1 with a warning; asking for it is one clear error
    assert r.returncode == 0 and "approach 1 skipped" in r.stderr, r.stderr
    fit = json.loads(out.read_text())
    assert abs(fit["approach2"]["a"] - A_TRUE) < 0.05 and fit["approach2"]["ci"]["a"] is not None
    assert abs(fit["alpha"] - TRUTH["alpha"]) < 0.06 and "approach1" not in fit
    assert png.stat().st_size > 10_000
    r = run_cli("scaling", "predict", str(out), "--flops", "1e21", "--json")
    p = json.loads(r.stdout)
    assert abs(p["loss"] - law(p["params"], p["tokens"])) < 0.02
    r = run_cli("scaling", "fit", str(path), "--approach", "1", "--out", str(tmp_path / "f1.json"))
    assert r.returncode == 2 and "approach 1 needs loss curves" in r.stderr
    r = run_cli("scaling", "fit", str(path), "--approach", "2", "--out", str(out))
    r = run_cli("scaling", "predict", str(out), "--flops", "1e21")
    assert r.returncode == 2 and "no approach3 section" in r.stderr


@pytest.mark.parametrize("name", ["fit.json", "wsd_fit.json"])
def test_committed_fit_files_round_trip_through_the_typed_result(name):
    """fit.json is a FitResult's data: reading the committed sweep's files and writing them again changes nothing,
    and the typed sections answer what the dicts did (approach 3's values are also at the top level)."""
    from gptjax.scaling import FitResult
    from helpers import ROOT

    data = json.loads((ROOT / "experiments" / "results" / "isoflop" / name).read_text())
    fit = FitResult.from_dict(data)
    assert json.dumps(fit.to_dict(), sort_keys=True) == json.dumps(data, sort_keys=True)
    assert fit.approach3.alpha == data["alpha"] == data["approach3"]["alpha"]
    assert fit.approach3.ci["a"] == data["approach3"]["ci"]["a"]
    if fit.approach2 is not None:
        assert [p.bracketed for p in fit.approach2.profiles] == [p["bracketed"] for p in data["approach2"]["profiles"]]
    with pytest.raises(ScalingInputError, match="no approach3 section"):
        FitResult(n_points=0, n_rows=0, source="none").parametric("3")


def test_degenerate_points_are_warned_about():
    """One table holding every (N, D) twice, under two loss definitions, fitted to alpha ~ 0.01 and 2e-14 tokens
    per parameter with exit 0 and no warning."""
    rows = isoflop_rows(budgets=np.geomspace(1e19, 1e21, 4), sizes=7)
    mixed = rows + [dict(r, loss=r["loss"] * 1.3, run=r["run"] + "-ppl") for r in rows]
    fit = fit_points(points_from_rows(mixed), ("3", "vpnls"))
    assert any("appears 2 times with losses" in w and "two loss definitions" in w for w in fit.warnings)
    assert any(w.startswith("approach 3: alpha=") and "edge of the search space" in w for w in fit.warnings)
    assert fit_points(points_from_rows(rows), ("3",)).warnings == []  # the clean table warns about nothing
