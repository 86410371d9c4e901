"""``gptjax-checkpoint verify RUN [--step S]``: check a run's checkpoints without restoring them: every item and
commit marker there, and every file against the CRC-32 recorded when its save completed
(``gptjax/checkpoint/manager.py``). One line per step; nothing is moved or changed (a resume moves a damaged step
aside itself).

Exit codes: 0 every step checked is intact, 1 a step is damaged, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import sys

from gptjax.cli.common import console_script, user_errors


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptjax-checkpoint", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="check every file of a run's checkpoints against its recorded checksum")
    v.add_argument("run_dir", help="the gptjax run directory")
    v.add_argument("--step", type=int, help="only this step (default: all of them)")
    return p


@console_script("gptjax-checkpoint")
def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    from gptjax.checkpoint import CHECKSUMS, step_problem
    from gptjax.checkpoint.pinned import steps_in
    from gptjax.runs import CheckpointNotFound, RunDir

    run = RunDir(a.run_dir)
    with user_errors(CheckpointNotFound):
        run.read_config()  # a run whose config.json does not read cannot be resumed or read either
        steps = steps_in(run.checkpoints)
        if not steps:
            raise CheckpointNotFound(f"no checkpoint in {run.checkpoints} (is {run} a gptjax run directory?)")
        if a.step is not None and a.step not in steps:
            raise CheckpointNotFound(f"no checkpoint for step {a.step} in {run.checkpoints}; available: {steps}")
    damaged = 0
    for step in [a.step] if a.step is not None else steps:
        path = run.checkpoints / str(step)
        why = step_problem(path)
        damaged += why is not None
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        state = (f"DAMAGED: {why}" if why else "intact" if (path / CHECKSUMS).is_file() else
                 f"intact as far as its files tell (no {CHECKSUMS}: saved before checksums were recorded)")
        print(f"step {step}: {state} ({size / 1e6:.1f} MB)")
    return 1 if damaged else 0


if __name__ == "__main__":
    sys.exit(main())
