"""``gptjax-train`` (or ``python -m gptjax.cli.train``): train a run; with no arguments, the embedded default.

Examples::

    gptjax-train                                  # ~4M-param model on the embedded Jane Austen corpus
    gptjax-train --set train.steps=1000 --set model.dtype=bfloat16
    gptjax-train --model-preset tiny-gpt2 --run-dir runs/gpt2ish
    gptjax-train --config experiments/austen.py   # a Python file defining config() -> RunConfig, or a JSON file
    gptjax-train --run-dir runs/austen --resume   # continue from the latest intact checkpoint, its own config
    gptjax-train --run-dir runs/austen --resume --extend-steps 600   # train longer; the lr schedule is kept
    gptjax-train --run-dir runs/ft --set train.init_from=runs/austen   # new run from another run's params

Running the same command again on a finished run prints its summary and exits 0. Exit codes: 0 done, 2 bad
input (one line on stderr, nothing written), 3 stopped because the loss diverged (non-finite), 75 pre-empted by
SIGTERM / SIGINT after saving a checkpoint (resume with --resume).
"""

from __future__ import annotations

import argparse
import sys

from gptjax.cli.common import (UserError, add_config_args, config_from_args, console_script, setup_logging,
                               user_errors)
from gptjax import storage
from gptjax.config import build_run_config


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptjax-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--run-dir", help="where tokenizer, checkpoints and metrics go")
    p.add_argument("--steps", type=int)
    p.add_argument("--resume", nargs="?", const="yes", choices=["yes", "auto"],
                   help="continue the run in --run-dir from its latest intact checkpoint, with its config.json; "
                        "'--resume auto': continue if there is a checkpoint, else start (what a requeued job runs)")
    p.add_argument("--resume-step", type=int, help="with --resume: continue from this checkpoint step")
    p.add_argument("--extend-steps", type=int, metavar="N",
                   help="with --resume: train to N steps in all; the lr schedule is not re-stretched (past its end "
                        "the lr stays at its final value)")
    p.add_argument("--stop-after", type=int, help="checkpoint and stop after this step (schedule unchanged)")
    p.add_argument("--profile", metavar="START:END", help="a JAX profiler trace of these steps into <run>/profile "
                   "(train.profile)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--coordinator", help="multi-host: coordinator host:port (or 'auto'); env GPTJAX_COORDINATOR")
    p.add_argument("--num-processes", type=int, help="multi-host: process count; env GPTJAX_NUM_PROCESSES")
    p.add_argument("--process-id", type=int, help="multi-host: this process's id; env GPTJAX_PROCESS_ID")
    return p


@console_script("gptjax-train")
def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    setup_logging()
    flags = ([f"train.run_dir={a.run_dir}"] * bool(a.run_dir) + [f"train.steps={a.steps}"] * bool(a.steps)
             + [f"train.profile={a.profile}"] * bool(a.profile))
    from gptjax.checkpoint.manager import CheckpointNotFound, CheckpointWriteError

    with user_errors(CheckpointNotFound):
        if (a.resume_step is not None or a.extend_steps) and not a.resume:
            raise UserError("--resume-step and --extend-steps go with --resume")
        from gptjax.training.checkpointing import resolve_resume

        # the run directory named by the arguments; resuming, the run's own config.json is the base unless a
        # --config / --model-preset is given (then it must agree with it), and only what is given changes
        run_dir = config_from_args(a, *flags).train.run_dir
        explicit = build_run_config(a.config or a.preset, model_preset_name=a.model_preset) if (
            a.config or a.model_preset) else None
        cfg, resuming = resolve_resume(run_dir, {"yes": True}.get(a.resume, a.resume), explicit, [*flags, *a.set],
                                       a.extend_steps, fresh=a.preset)
    if a.print_config:
        print(cfg.to_json())
        return 0
    from gptjax.data.corpus import CorpusError
    from gptjax.data.sources import SourceError
    from gptjax.data.tokenizer import TokenizerError
    from gptjax.runs import RunDir, RunLocked
    from gptjax.sharding.distributed import PreflightError, check_mesh, check_shared_dir, maybe_initialize
    from gptjax.training.hooks import StopTraining
    from gptjax.training.job import RunWriteError
    from gptjax.training.trainer import train

    with user_errors(PreflightError):
        if maybe_initialize(a.coordinator, a.num_processes, a.process_id):
            check_mesh(cfg)
            if not storage.is_remote(cfg.train.run_dir):  # a bucket is one place for every process
                check_shared_dir(cfg.train.run_dir)
    try:
        with user_errors(CorpusError, SourceError, TokenizerError, CheckpointNotFound, CheckpointWriteError,
                         FileExistsError, RunLocked, RunWriteError, log=RunDir(cfg.train.run_dir).log):
            train(cfg, resume=resuming, stop_after=a.stop_after, resume_step=a.resume_step)
    except StopTraining as stop:
        print(f"gptjax-train: {stop}", file=sys.stderr)
        return stop.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
