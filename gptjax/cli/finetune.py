"""``gptjax-finetune``: fine-tune a pretrained run on a task with a linear head, as GPT-1 did.

    gptjax-finetune --make-novels-task data/novels        # a 6-class task from the embedded corpus
    gptjax-finetune --init-from runs/austen --task-type classification \\
        --train data/novels/train.jsonl --test data/novels/test.jsonl --run-dir runs/novels

Task types and their JSONL rows (``gptjax/finetune/data.py``): ``classification`` ``{"text", "label"}``,
``entailment`` ``{"premise", "hypothesis", "label"}``, ``similarity`` ``{"text_a", "text_b", "label"}``,
``multiple_choice`` ``{"context", "choices", "label"}``. ``--mode probe`` trains only the head on the frozen
decoder (a linear probe); ``--mode scratch`` the same architecture from random initialisation. ``--lm-coef``: the
weight of the auxiliary language-modelling loss (GPT-1's 0.5; 0 turns it off).

The run directory behaves as gptjax-train's: an existing run is refused unless ``--resume`` (which continues from
its latest checkpoint; the settings must agree) or it is this very run, finished (then its summary is printed).
SIGTERM / Ctrl-C save a checkpoint and exit 75.

Exit codes: 0 done, 2 bad input (one line on stderr), 75 pre-empted (continue with --resume).
"""

from __future__ import annotations

import argparse
import json
import sys

from gptjax.cli.common import console_script, setup_logging, user_errors


def parser() -> argparse.ArgumentParser:
    from gptjax.config import choices
    from gptjax.finetune.data import TaskType
    from gptjax.finetune.trainer import FinetuneConfig, Mode

    d = FinetuneConfig("", "classification", "", "", "")
    p = argparse.ArgumentParser(prog="gptjax-finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--make-novels-task", metavar="DIR", help="write the built-in novel classification task "
                   "(train.jsonl, test.jsonl) into DIR and exit")
    p.add_argument("--init-from", help="the pretrained run directory (gptjax-train or gptjax-import)")
    p.add_argument("--task-type", choices=choices(TaskType))
    p.add_argument("--train", help="training rows (JSONL)")
    p.add_argument("--test", help="test rows (JSONL)")
    p.add_argument("--run-dir", help="the fine-tuning run's directory")
    p.add_argument("--mode", choices=choices(Mode), default=d.mode)
    p.add_argument("--lm-coef", type=float, default=d.lm_coef, help=f"auxiliary LM loss weight (default {d.lm_coef})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr}, GPT-1's)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--epochs", type=float, default=d.epochs)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--log-every", type=int, default=d.log_every, help=f"training metrics every N steps (default "
                   f"{d.log_every})")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="test accuracy every N steps (0: at the end)")
    p.add_argument("--devices", type=int, default=1, help="local devices the batch is split over")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its latest checkpoint")
    return p


@console_script("gptjax-finetune")
def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    setup_logging()
    from gptjax.checkpoint import CheckpointNotFound, CheckpointWriteError
    from gptjax.data import TokenizerError
    from gptjax.finetune import novels
    from gptjax.finetune.data import FinetuneDataError
    from gptjax.finetune.trainer import FinetuneConfig, FinetuneError, finetune
    from gptjax.runs import RunLocked
    from gptjax.training.job import RunWriteError
    from gptjax.training.hooks import StopTraining

    with user_errors(FinetuneError, FinetuneDataError, CheckpointNotFound, CheckpointWriteError, TokenizerError,
                     RunLocked, RunWriteError, FileExistsError):
        if a.make_novels_task:
            for split, path in novels.write(a.make_novels_task).items():
                print(f"{path}: {sum(1 for _ in open(path))} {split} rows")
            return 0
        missing = [f"--{k.replace('_', '-')}" for k in ("init_from", "task_type", "train", "test", "run_dir")
                   if getattr(a, k) is None]
        if missing:
            raise FinetuneError(f"missing {', '.join(missing)}")
        cfg = FinetuneConfig(a.init_from, a.task_type, a.train, a.test, a.run_dir, mode=a.mode, lm_coef=a.lm_coef,
                             lr=a.lr, batch_size=a.batch_size, epochs=a.epochs, seed=a.seed,
                             log_every=a.log_every, checkpoint_every=a.checkpoint_every, eval_every=a.eval_every,
                             devices=a.devices)
        try:
            r = finetune(cfg, resume=a.resume)
        except StopTraining as stop:
            print(f"gptjax-finetune: {stop}", file=sys.stderr)
            return stop.exit_code
    done = "already finished: " if r.complete_already else ""
    print(f"{done}{cfg.mode} ({cfg.task_type}, lm_coef {cfg.lm_coef if cfg.mode != 'probe' else 0}): test accuracy "
          f"{r.accuracy:.3f} ± {r.accuracy_stderr:.3f} (chance {r.chance:.3f}, n={r.n_test}) after {r.step} steps")
    print("summary: " + json.dumps({"accuracy": r.accuracy, "accuracy_stderr": r.accuracy_stderr, "n_test": r.n_test,
                                    "chance": r.chance, "steps": r.step, "run_dir": str(r.run_dir)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
