"""gptjax.experiments: a sweep declared as runs, run resumably by local worker processes or a SLURM job array,
collected into scaling-law rows; the IsoFLOP design."""

import dataclasses
import json
import subprocess
import time
import re
from pathlib import Path

import pytest

from helpers import cpu_env, small_run
from gptjax.experiments import Run, Sweep, isoflop_runs, predict
from gptjax.runs import RunDir
from gptjax.scaling import model_for_params, scaling_params
from test_cluster import needs_slurm, wait_for

pytestmark = pytest.mark.slow


def runs(corpus, tmp_path, steps=(6, 9)):
    out = []
    for s in steps:
        cfg = small_run(tmp_path / "ignored", corpus, steps=s, eval_every=3, checkpoint_every=3, log_every=3,
                        batch_size=8, seq_len=32)
        out.append(Run(f"r{s}", cfg, meta={"budget": s * 1e6}))
    return out


def metrics_lines(run_dir):
    return (run_dir / "metrics.jsonl").read_text().splitlines()


def test_a_local_sweep_runs_resumes_and_skips_what_is_finished(tmp_path, small_corpus):
    from gptjax.training import train

    sweep = Sweep(tmp_path / "sweep", runs(small_corpus, tmp_path))
    assert [r.config.train.run_dir for r in sweep.runs] == [str(tmp_path / "sweep" / n) for n in ("r6", "r9")]
    # r9 was killed after step 3 (its checkpoint there): the sweep continues it, and trains r6 from scratch
    train(sweep.runs[1].config, stop_after=3)
    assert len(sweep.pending()) == 2
    sweep.run(workers=2, progress=False)
    assert not sweep.pending()
    r9 = [json.loads(ln) for ln in metrics_lines(tmp_path / "sweep" / "r9")]
    assert [r["step"] for r in r9 if "loss" in r] == [3, 6, 9]  # each step once: resumed, not restarted
    before = {r.name: (tmp_path / "sweep" / r.name / "summary.json").stat().st_mtime_ns for r in sweep.runs}
    sweep.run(workers=2, progress=False)  # again: nothing to do
    assert before == {r.name: (tmp_path / "sweep" / r.name / "summary.json").stat().st_mtime_ns for r in sweep.runs}
    rows = sweep.collect()
    assert {(r["run"], r["step"], r["final"]) for r in rows} == {("r6", 3, 0), ("r6", 6, 1), ("r9", 3, 0),
                                                                 ("r9", 6, 0), ("r9", 9, 1)}
    assert {r["run"]: r["budget"] for r in rows} == {"r6": 6e6, "r9": 9e6}  # the runs' meta


RUNNER = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from helpers import small_run
from gptjax.experiments import Run, Sweep

runs = [Run(f"r{{i}}", small_run(Path("ignored"), Path({corpus!r}), steps=1000, eval_every=1000, checkpoint_every=20,
                                 log_every=1, batch_size=8, seq_len=32)) for i in range(3)]
if __name__ == "__main__":
    Sweep(Path({root!r}), runs).run(workers=2, progress=False)
"""


def test_a_killed_runner_takes_its_workers_and_a_rerun_finishes_each_run_once(tmp_path, small_corpus):
    """kill -9 of a runner with two workers left them training (they even started queued runs), and the re-run
    died with RunLocked tracebacks; a second runner on the same root died with a traceback."""
    import signal
    import sys

    from gptjax.runs import HOST, RunLocked, WriterLock, process_alive

    root = tmp_path / "sweep"
    script = tmp_path / "runner.py"
    script.write_text(RUNNER.format(tests=str(Path(__file__).parent), corpus=str(small_corpus), root=str(root)))
    runner = subprocess.Popen([sys.executable, str(script)], env=cpu_env(1), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: all((root / n / "metrics.jsonl").is_file() for n in ("r0", "r1")), 300, "two workers training")
    workers = [json.loads((root / n / "writer.lock").read_text())["pid"] for n in ("r0", "r1")]
    assert all(pid != runner.pid for pid in workers)
    # a second runner is refused, naming the first
    second = Sweep(root, [])
    with pytest.raises(RunLocked, match=rf"pid {runner.pid} on .* \(sweep runner \(2 workers\)\)"):
        second.run(workers=1, progress=False)
    runner.send_signal(signal.SIGKILL)
    runner.wait()
    wait_for(lambda: not any(process_alive(HOST, pid) for pid in workers), 30, "workers gone")
    assert not (root / "r2").exists()  # no queued run started after the runner died
    rerun = subprocess.run([sys.executable, str(script)], env=cpu_env(1), capture_output=True, text=True,
                           timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    for name in ("r0", "r1", "r2"):
        steps = [json.loads(ln)["step"] for ln in metrics_lines(root / name) if '"loss"' in ln]
        assert steps == list(range(1, 1001)), name  # every step logged once: resumed, not restarted or doubled
    with WriterLock(RunDir(root / ".sweep")):  # released by the runner that finished
        pass


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_a_branch_starts_from_its_source_checkpoint(tmp_path, small_corpus, where, request):
    """On local disk, and with the sweep's root in a bucket (the branch's checkpoint copied object by object, its
    commit marker last; the runner's lock an object there)."""
    from gptjax import storage

    root = tmp_path / "sweep" if where == "local" else f"{request.getfixturevalue('bucket')}/sweep"
    base = runs(small_corpus, tmp_path, steps=(9,))[0]
    branch = Run("r9_from3", dataclasses.replace(base.config, optim=dataclasses.replace(base.config.optim, lr=1e-3)),
                 branch=("r9", 3))
    sweep = Sweep(root, [branch, base])
    assert [[r.name for r in p] for p in sweep.phases()] == [["r9"], ["r9_from3"]]
    sweep.run(workers=1, progress=False)
    source, child = ([json.loads(ln) for ln in storage.read_bytes(f"{root}/{name}/metrics.jsonl").splitlines()]
                     for name in ("r9", "r9_from3"))
    assert sweep.pending() == [] and not storage.read_bytes(f"{root}/.sweep/writer.lock")
    assert [r for r in child if r["step"] <= 3] == [r for r in source if r["step"] <= 3]  # the shared history
    assert [r["loss"] for r in child if r["step"] == 6 and "loss" in r] != [
        r["loss"] for r in source if r["step"] == 6 and "loss" in r]  # then its own lr


def test_isoflop_design_sizes_and_refusals():
    cfgs = {}

    def make(name, n, tokens):
        cfgs[name] = (n, tokens)
        return small_run(RunDir("x").path, "c.txt")

    design = isoflop_runs([1e10, 4e10], make, vocab_size=352, seq_len=128, sizes=5, size_step=1.6,
                          tokens_per_param=50.0)
    for c in (1e10, 4e10):
        ns = sorted(n for name, (n, _) in cfgs.items() if name.startswith(f"C{c:.0e}".replace("+", "")))
        assert len(ns) == 5 and all(1.3 < b / a < 2.0 for a, b in zip(ns, ns[1:]))  # 1.6x apart, rounded to shapes
        for n in ns:  # C = 6 N D exactly, N the sizing rule's non-embedding count
            name = f"C{c:.0e}_N{n}".replace("+", "")
            assert cfgs[name][1] == pytest.approx(c / (6 * n))
            assert scaling_params(model_for_params(n, 352, 128)) == n
    assert {r.meta["budget"] for r in design} == {1e10, 4e10}
    with pytest.raises(ValueError, match="more than max_tokens"):
        isoflop_runs([1e12], make, 352, 128, max_tokens=1e6)
    with pytest.raises(ValueError, match="run names repeat"):
        Sweep("x", [design[0], design[0]])


def test_a_prediction_is_written_before_training_and_measured_after(tmp_path, small_corpus):
    class Law:
        def loss(self, n, d):
            return 5.0

        def law(self):
            return {"E": 5.0}

    sweep = Sweep(tmp_path / "sweep", runs(small_corpus, tmp_path, steps=(6,)))
    before = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    first = predict(sweep, Law(), tmp_path / "prediction.json")
    assert first["runs"][0]["predicted_loss"] == 5.0 and not first["runs"][0]["trained_before_prediction"]
    assert first["fit"] == {"E": 5.0} and first["made_at"] >= before  # when, and from which law
    assert "measured_loss" not in first["runs"][0]
    sweep.run(progress=False)
    after = predict(sweep, None, tmp_path / "prediction.json")  # the law is not asked again
    final = sweep.collect(finals_only=True)[0]["loss"]
    assert after["runs"][0]["measured_loss"] == final
    assert after["max_abs_relative_error"] == pytest.approx(abs(5.0 - final) / final)


@needs_slurm
def test_a_sweep_as_a_slurm_job_array(tmp_path, small_corpus):
    """Two runs as two array tasks on the local SLURM cluster, a branch in a second array after them."""
    base = runs(small_corpus, tmp_path)
    branch = Run("r9_from6", base[1].config, branch=("r9", 6))
    sweep = Sweep(tmp_path / "sweep", [*base, branch])
    ids = sweep.slurm(submit=True, name="sweeptest",
                      env=["JAX_PLATFORMS=cpu", f"XLA_FLAGS={cpu_env(1)['XLA_FLAGS']}"])
    assert len(ids) == 2
    try:
        wait_for(lambda: not sweep.pending(), 400, f"the arrays {ids} ({tmp_path / 'sweep' / '.sweep' / 'logs'})")
    finally:
        subprocess.run(["scancel", *ids], capture_output=True)
    logs = sorted((tmp_path / "sweep" / ".sweep" / "logs").glob("*.out"))
    assert [p.name.rsplit("_", 1)[1] for p in logs] == ["0.out", "1.out", "2.out"]  # one log per array task
    assert {r["run"] for r in sweep.collect(finals_only=True)} == {"r6", "r9", "r9_from6"}
    def states():
        out = subprocess.run(["scontrol", "show", "job", *ids[:1]], capture_output=True, text=True).stdout
        return re.findall(r"JobState=(\S+)", out)

    assert wait_for(lambda: set(states()) <= {"COMPLETED"} and states(), 60, "the array's tasks to complete")
