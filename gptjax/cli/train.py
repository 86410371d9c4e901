"""``gptjax-train`` (or ``python -m gptjax.cli.train``): train a run; with no arguments, the embedded default.

Examples::

    gptjax-train                                  # ~4M-param model on the embedded Jane Austen corpus
    gptjax-train --set train.steps=1000 --set model.dtype=bfloat16
    gptjax-train --model-preset tiny-gpt2 --run-dir runs/gpt2ish
    gptjax-train --config experiments/austen.py   # a Python file defining config() -> RunConfig, or a JSON file
    gptjax-train --run-dir runs/austen --resume   # continue from the latest checkpoint
    gptjax-train --run-dir runs/ft --set train.init_from=runs/austen   # new run from another run's params
"""

from __future__ import annotations

import argparse
import sys

from gptjax.cli.common import add_config_args, config_from_args, setup_logging, user_errors


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptjax-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--run-dir", help="where tokenizer, checkpoints and metrics go")
    p.add_argument("--steps", type=int)
    p.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    p.add_argument("--stop-after", type=int, help="checkpoint and stop after this step (schedule unchanged)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--coordinator", help="multi-host: coordinator host:port (or 'auto'); env GPTJAX_COORDINATOR")
    p.add_argument("--num-processes", type=int, help="multi-host: process count; env GPTJAX_NUM_PROCESSES")
    p.add_argument("--process-id", type=int, help="multi-host: this process's id; env GPTJAX_PROCESS_ID")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    setup_logging()
    flags = [f"train.run_dir={a.run_dir}"] * bool(a.run_dir) + [f"train.steps={a.steps}"] * bool(a.steps)
    with user_errors():
        cfg = config_from_args(a, *flags)
    if a.print_config:
        print(cfg.to_json())
        return 0
    from gptjax.checkpoint.manager import CheckpointNotFound
    from gptjax.data.corpus import CorpusError
    from gptjax.data.tokenizer import TokenizerError
    from gptjax.sharding.distributed import maybe_initialize
    from gptjax.training.trainer import train

    maybe_initialize(a.coordinator, a.num_processes, a.process_id)
    with user_errors(CorpusError, TokenizerError, CheckpointNotFound, FileExistsError):
        train(cfg, resume=a.resume, stop_after=a.stop_after)
    return 0


if __name__ == "__main__":
    sys.exit(main())
