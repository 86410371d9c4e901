"""The sweep itself (``gptjax.experiments`` documents it): runs, the resumable local runner, the SLURM arrays,
collecting."""

from __future__ import annotations

import concurrent.futures as cf
import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

from gptjax import storage
from gptjax.config import RunConfig
from gptjax.runs import DamagedFile, RunDir, WriterLock, atomic_directory, write_atomic

SWEEP_DIR = ".sweep"  # under the sweep's root: one config per run, by index, for the array tasks


@dataclass(frozen=True)
class Run:
    name: str
    config: RunConfig
    meta: dict = field(default_factory=dict)
    branch: tuple[str, int] | None = None  # (a run of this sweep, its checkpoint step) to start from


class Sweep:
    def __init__(self, root: str | Path, runs: Iterable[Run]):
        self.root = storage.as_path(root)  # a local directory, or a bucket's (s3://..., gs://...)
        self.runs: list[Run] = []
        for r in runs:
            cfg = replace(r.config, train=replace(r.config.train, run_dir=str(self.root / r.name)))
            self.runs.append(replace(r, config=cfg))
        names = [r.name for r in self.runs]
        if len(set(names)) != len(names):
            raise ValueError(f"run names repeat: {sorted({n for n in names if names.count(n) > 1})}")
        missing = [r.branch[0] for r in self.runs if r.branch and r.branch[0] not in names]
        if missing:
            raise ValueError(f"branches from runs not in the sweep: {missing}")

    def __len__(self) -> int:
        return len(self.runs)

    def finished(self, run: Run) -> bool:
        return RunDir(run.config.train.run_dir).is_finished(run.config.train.steps)

    def pending(self) -> list[Run]:
        return [r for r in self.runs if not self.finished(r)]

    def phases(self) -> list[list[Run]]:
        """Runs that start fresh, then the branches (which need the others' checkpoints)."""
        return [p for p in ([r for r in self.runs if not r.branch], [r for r in self.runs if r.branch]) if p]

    # ---- running ---------------------------------------------------------------------------------------------
    def run(self, workers: int = 1, progress: bool = True, label: str = "sweep") -> None:
        """Train every unfinished run, ``workers`` at a time (separate processes, one XLA thread each). One runner
        per sweep root (``<root>/.sweep/writer.lock``: a second is refused with ``RunLocked`` naming the first), and
        its workers die with it (``kill -9`` of a runner left its workers training, starting queued runs; a re-run
        then died with ``RunLocked``): a re-run resumes what they left, each run once."""
        with WriterLock(RunDir(self.root / SWEEP_DIR), command=f"{label} runner ({workers} workers)"):
            self._run(workers, progress, label)

    def _run(self, workers: int, progress: bool, label: str) -> None:
        from tqdm import tqdm

        for phase in self.phases():
            todo = [r for r in phase if not self.finished(r)]
            bar = tqdm(total=len(phase), initial=len(phase) - len(todo), desc=label, unit="run", disable=not progress)
            if workers <= 1:
                for r in todo:
                    train_run(self.root, r.config.to_dict(), self._branch_dir(r))
                    bar.update()
            else:
                ctx = multiprocessing.get_context("spawn")
                with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                                            initargs=(os.getpid(),)) as ex:
                    futures = [ex.submit(train_run, self.root, r.config.to_dict(), self._branch_dir(r)) for r in todo]
                    for fut in cf.as_completed(futures):
                        fut.result()
                        bar.update()
            bar.close()

    def _branch_dir(self, run: Run) -> tuple[str, int] | None:
        return (str(self.root / run.branch[0]), run.branch[1]) if run.branch else None

    def write_configs(self) -> Path:
        """``<root>/.sweep/<index>.json`` for every run (its config and branch), what an array task reads."""
        d = self.root / SWEEP_DIR
        if not storage.is_remote(d):
            d.mkdir(parents=True, exist_ok=True)
        for i, r in enumerate(self.runs):
            write_atomic(d / f"{i}.json", json.dumps({"name": r.name, "config": r.config.to_dict(),
                                                      "branch": self._branch_dir(r)}))
        return d

    def slurm(self, submit: bool = False, name: str = "sweep", parallel: int | None = None,
              time: str | None = None, partition: str | None = None, env: Sequence[str] = ()) -> list[str]:
        """The sweep as SLURM job arrays (one per phase, the branches' array after the first's with
        ``--dependency=afterok``); with ``submit``, submitted: returns the job ids, else the scripts' paths.
        ``parallel``: at most this many array tasks at once (``--array=...%N``)."""
        from gptjax.launch import Job, slurm_script, submit as sbatch, with_env

        self.write_configs()
        root = str(self.root) if storage.is_remote(self.root) else str(self.root.resolve())
        # the job scripts and SLURM's logs are files of this machine: beside the sweep, or for a sweep on a bucket
        # in a local directory named by its URL
        local = (storage.staging_dir(self.root) if storage.is_remote(self.root) else self.root.resolve()) / SWEEP_DIR
        (local / "logs").mkdir(parents=True, exist_ok=True)
        out, previous = [], None
        for k, phase in enumerate(self.phases()):
            indices = [self.runs.index(r) for r in phase]
            spec = ",".join(map(str, indices)) + (f"%{parallel}" if parallel else "")
            extra = [f"--array={spec}"] + ([f"--dependency=afterok:{previous}"] if previous and submit else [])
            job = with_env(Job((sys.executable, "-m", "gptjax.experiments", root, "{array_index}"),
                               name=f"{name}-{k}", time=time), list(env))
            path = local / f"{name}-{k}.sbatch"
            path.write_text(slurm_script(job, partition, extra=tuple(extra), log_dir=str(local / "logs")))
            if submit:
                previous = sbatch(path)
                out.append(previous)
            else:
                out.append(str(path))
        return out

    # ---- results ---------------------------------------------------------------------------------------------
    def collect(self, finals_only: bool = False) -> list[dict]:
        """Every finished run's scaling-law rows (``gptjax.scaling.collect_run``), each with its run's ``meta``."""
        from gptjax.scaling import collect_run

        rows = []
        for r in self.runs:
            if self.finished(r):
                rows += [{**row, **r.meta} for row in collect_run(r.config.train.run_dir)
                         if row["final"] or not finals_only]
        return rows


def fit_rows(rows: list[dict], out: str | Path, name: str, approaches: Sequence[str], bootstrap: int = 1000,
             title: str = "", heldout: list[dict] | None = None, points_file: str | None = None):
    """Fit collected rows (``gptjax.scaling.fit_points``) and write them (``points_file``, default
    ``<name>_points.csv``), ``<name>.json`` and ``<name>.png`` into ``out``; ``heldout`` rows are drawn as crosses.
    Returns ``(points, fit)``."""
    from gptjax.scaling import fit_points, plot_fit, points_from_rows, write_points

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    csv = out / (points_file or f"{name}_points.csv")
    write_points(rows, csv)
    points = points_from_rows(rows, where=str(csv))
    result = fit_points(points, approaches, bootstrap=bootstrap)
    result.write(out / f"{name}.json")
    held = points_from_rows(heldout, where="held-out runs").finals() if heldout else None
    plot_fit(points, result, out / f"{name}.png", title=title, heldout=held)
    return points, result


def predict(sweep: Sweep, law, path: str | Path) -> dict:
    """Each run's loss as ``law.loss(N, D)`` predicts it, written to ``path`` once, before the runs are trained
    (the file records whether each had already been); later calls add the measured final losses of the finished
    runs and the relative errors. Returns the file's content."""
    from gptjax.scaling import scaling_params

    path = Path(path)
    if not path.is_file():
        runs = []
        for r in sweep.runs:
            n, t = scaling_params(r.config.model), r.config.train
            d = t.steps * t.batch_size * t.seq_len
            runs.append({"run": r.name, "params": n, "tokens": d, "flops": 6.0 * n * d,
                         "predicted_loss": float(law.loss(n, d)), "trained_before_prediction": sweep.finished(r)})
        made_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())  # before any of them is trained
        head = {"made_at": made_at, **({"fit": law.law()} if hasattr(law, "law") else {})}  # the law, if it says
        write_atomic(path, json.dumps({**head, "runs": runs}, indent=2) + "\n")
    pred = json.loads(path.read_text())
    measured = {row["run"]: row["loss"] for row in sweep.collect(finals_only=True)}
    for r in pred["runs"]:
        if r["run"] in measured:
            r["measured_loss"] = measured[r["run"]]
            r["relative_error"] = (r["predicted_loss"] - r["measured_loss"]) / r["measured_loss"]
    errors = [abs(r["relative_error"]) for r in pred["runs"] if "relative_error" in r]
    if errors:
        pred["max_abs_relative_error"] = max(errors)
    write_atomic(path, json.dumps(pred, indent=2) + "\n")
    return pred


def isoflop_runs(budgets: Sequence[float], make_config: Callable[[str, int, float], RunConfig], vocab_size: int,
                 seq_len: int, sizes: int = 5, size_step: float = 1.6, tokens_per_param: float = 20.0,
                 max_tokens: float | None = None) -> list[Run]:
    """An IsoFLOP design: per budget C, ``sizes`` model sizes ``size_step`` apart around the one with
    ``tokens_per_param`` tokens per parameter (N from the sizing rule, ``gptjax.scaling.model_for_params``), each
    trained on D = C / 6N tokens. ``make_config(name, n, tokens)`` builds a run's config. ``max_tokens``: refuse a
    run that would see more (e.g. one epoch of the corpus)."""
    from gptjax.scaling import model_for_params, scaling_params

    runs = []
    for c in budgets:
        n_guess = math.sqrt(c / (6 * tokens_per_param))
        seen = set()
        for k in range(sizes):
            n = scaling_params(model_for_params(n_guess * size_step ** (k - (sizes - 1) / 2), vocab_size, seq_len))
            if n in seen:
                continue
            seen.add(n)
            tokens = c / (6 * n)
            if max_tokens and tokens > max_tokens:
                raise ValueError(f"budget {c:.3g}: a {n}-parameter model would train on {tokens:,.0f} tokens, more "
                                 f"than max_tokens={max_tokens:,.0f}; lower the budget or the size spread")
            name = f"C{c:.0e}_N{n}".replace("+", "")
            runs.append(Run(name, make_config(name, n, tokens), meta={"budget": c}))
    return runs


# ---- one run (a worker process or an array task) -------------------------------------------------------------
def _one_thread() -> None:  # one XLA thread per process when several runs share the cores
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()


def _worker_init(runner: int) -> None:
    """A worker process: one XLA thread, and killed when its runner dies (Linux's parent-death signal; checked once
    after it is set, in case the runner died first)."""
    _one_thread()
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # no glibc: the worker outlives a killed runner, as before
        return
    if os.getppid() != runner:
        os._exit(1)


def train_run(root: str | Path, cfg_dict: dict, branch: tuple[str, int] | None = None) -> str:
    import logging

    from gptjax.training import train

    logging.getLogger("gptjax").setLevel(logging.WARNING)
    cfg = RunConfig.from_dict(cfg_dict)
    if branch is not None:
        branch_from(cfg, *branch)
        train(cfg, resume=True, resume_step=branch[1])
    else:
        train(cfg, resume="auto")
    return cfg.train.run_dir


def branch_from(cfg: RunConfig, source_dir: str, step: int) -> None:
    """Make ``cfg``'s run directory a copy of ``source_dir`` at ``step`` (its checkpoint, tokenizer, data, metrics
    up to that step) with ``cfg`` as its config, so resuming continues the same optimizer state and data order.
    Built whole or not at all; a branch that already holds the step is left as it is."""
    run, source = RunDir(cfg.train.run_dir), RunDir(source_dir)
    if run.url:  # on a bucket: the checkpoint object by object, its commit marker last, then the run's files
        if (run.checkpoints / str(step) / storage.COMMIT_MARKER).exists():
            return
        storage.copy_tree(source.checkpoints / str(step), run.checkpoints / str(step), last=storage.COMMIT_MARKER)
        _branch_files(source, run, step, cfg)
        run.push()
        return
    if (run.checkpoints / str(step)).is_dir():
        return
    with atomic_directory(run.path) as tmp:
        new = RunDir(tmp)
        shutil.copytree(source.checkpoints / str(step), new.checkpoints / str(step))
        _branch_files(source, new, step, cfg)


def _branch_files(source: RunDir, new: RunDir, step: int, cfg: RunConfig) -> None:
    """A branch's files besides the checkpoint: the source's data and tokenizer, its metrics up to ``step``, and
    the branch's config."""
    if source.data.is_dir():
        shutil.copytree(source.data, new.data, dirs_exist_ok=True)
    if source.tokenizer.is_file():
        shutil.copy(source.tokenizer, new.tokenizer)
    lines = [ln for ln in source.metrics.read_text().splitlines() if json.loads(ln).get("step", 0) <= step]
    new.metrics.write_text("".join(ln + "\n" for ln in lines))
    new.write_config(cfg)


def run_index(root: str | Path, index: int) -> str:
    """Train run ``index`` of the sweep whose configs ``Sweep.write_configs`` wrote under ``root``."""
    path = storage.as_path(root) / SWEEP_DIR / f"{index}.json"
    try:
        spec = json.loads(path.read_text())
        config, branch = spec["config"], tuple(spec["branch"]) if spec["branch"] else None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DamagedFile(f"{path} does not read ({type(e).__name__}: {e}): write the sweep's configs again "
                          "(Sweep.write_configs, or sweep.slurm())") from None
    return train_run(root, config, branch)
