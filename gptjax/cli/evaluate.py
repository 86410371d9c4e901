"""``gptjax-eval``: evaluate a run's checkpoint.

    gptjax-eval perplexity --run-dir runs/austen --file my_text.txt --stride 128
    gptjax-eval perplexity --run-dir runs/austen --split val
    gptjax-eval tasks --run-dir runs/austen --shots 0 2
    gptjax-eval build-tasks --out my_tasks --set data.corpus=my.txt

``perplexity``: perplexity and bits-per-byte of a UTF-8 text file, or of the run's validation split, with a
sliding window of ``--context`` tokens (default the model's) every ``--stride`` (default half of it); every token
is scored once, with at least context - stride tokens before it after the first window. Bits-per-byte do not
depend on the tokenizer: runs with different vocabularies compare. Prints one line and, with ``--json``, the
figures as JSON on stdout. (Of the split, the end-of-sequence tokens between documents are scored too and count
no bytes; the bytes are those of each document's text, as training's ``val_bpb`` counts them.)

``tasks``: in-context accuracy (zero- and few-shot, log-likelihood scoring packed many requests to a row) on the
built-in tasks or task directories (``gptjax/evals/tasks.py`` documents the format and how the built-in ones are
made), next to chance, with standard errors; ``--devices N`` splits the batch over N local devices (the same
numbers). ``build-tasks``: make the built-in tasks' files from a corpus's document split (test examples from its
validation documents, demonstrations from its training ones).

Exit codes: 0 done, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gptjax.cli.common import UserError, at_least, console_script, setup_logging, user_errors


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptjax-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    ppl = sub.add_parser("perplexity", help="perplexity and bits-per-byte of a text file or the validation split")
    ppl.add_argument("--run-dir", required=True, help="the run whose checkpoint is evaluated")
    ppl.add_argument("--step", type=int, help="checkpoint step (default: the latest intact one)")
    what = ppl.add_mutually_exclusive_group(required=True)
    what.add_argument("--file", help="a UTF-8 text file")
    what.add_argument("--split", choices=["val"], help="the run's prepared validation split")
    ppl.add_argument("--context", type=int, help="window length in tokens (default: the model's max_seq_len)")
    ppl.add_argument("--stride", type=int, help="tokens between window starts (default: half the window)")
    ppl.add_argument("--batch-size", type=at_least(1), default=8, help="windows scored together (default 8)")
    ppl.add_argument("--json", action="store_true", help="also print the figures as JSON")

    tasks = sub.add_parser("tasks", help="zero- and few-shot accuracy on in-context tasks")
    tasks.add_argument("--run-dir", required=True, help="the run whose checkpoint is evaluated")
    tasks.add_argument("--step", type=int, help="checkpoint step (default: the latest intact one)")
    tasks.add_argument("--task", action="append", help="a built-in task name or a task directory (repeat; default: "
                       "the built-in tasks)")
    tasks.add_argument("--shots", type=at_least(0), nargs="+", default=[0],
                       help="demonstrations per prompt (default 0)")
    tasks.add_argument("--limit", type=at_least(1), help="score the first N test examples of each task")
    tasks.add_argument("--seed", type=int, default=1234, help="seed of the demonstrations' draw (default 1234)")
    tasks.add_argument("--devices", type=at_least(1), default=1, help="local devices the batch is split over (default 1)")
    tasks.add_argument("--rows", type=at_least(1), default=8, help="packed rows per forward pass (default 8)")
    tasks.add_argument("--json", action="store_true", help="also print the scores as JSON lines")

    harness = sub.add_parser("harness", help="the lm-evaluation-harness command line with --model gptjax registered",
                             description="lm_eval's own command line (every lm_eval argument is passed on as "
                             "given; the common ones are listed here), with --model gptjax registered and the "
                             "built-in tasks found by name")
    for flag in ("--model", "--model_args", "--tasks", "--num_fewshot", "--limit", "--output_path",
                 "--include_path", "--batch_size", "--gen_kwargs", "--seed"):
        harness.add_argument(flag, help="as lm_eval's")
    harness.add_argument("--log_samples", action="store_true", help="as lm_eval's")

    build = sub.add_parser("build-tasks", help="write the built-in tasks' files from a corpus")
    build.add_argument("--out", required=True, help="directory to write one task directory per task into")
    build.add_argument("--set", action="append", default=[], metavar="data.FIELD=VALUE",
                       help="data settings of the split (default: the default run's), e.g. data.corpus=my.txt")
    build.add_argument("--test", type=at_least(1), default=500, help="test examples per task, at most (default 500)")
    build.add_argument("--train", type=at_least(0), default=1000, help="demonstration examples per task, at most")
    return p


@console_script("gptjax-eval")
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["harness"]:  # everything after it is lm_eval's (argparse would claim its options)
        return run_harness(argv[1:])
    a = parser().parse_args(argv)
    setup_logging()
    if a.command == "tasks":
        return run_tasks(a)
    if a.command == "build-tasks":
        return build_tasks(a)
    from gptjax.checkpoint import CheckpointNotFound, load_run
    from gptjax.data import CorpusError, TokenizerError
    from gptjax.evals.perplexity import score_split, score_text

    with user_errors(CheckpointNotFound, TokenizerError, CorpusError, ValueError):
        text = None
        if a.file:
            try:
                text = Path(a.file).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise UserError(f"cannot read {a.file} as UTF-8 text: {e}") from None
        run = load_run(a.run_dir, a.step)
        if text is not None:
            score = score_text(run.model, run.params, run.tokenizer, text, a.context, a.stride, a.batch_size)
            what = a.file
        else:
            score = score_split(run, a.split, a.context, a.stride, a.batch_size)
            what = "the validation split"
    print(f"{what}: {score.tokens} tokens, {score.bytes} bytes, {score.windows} windows of {score.context} "
          f"(stride {score.stride}): loss {score.loss:.4f} nats/token, perplexity {score.perplexity:.2f}, "
          f"{score.bits_per_byte:.4f} bits/byte")
    if a.json:
        print(json.dumps(score.as_dict()))
    return 0


def run_tasks(a: argparse.Namespace) -> int:
    from gptjax.checkpoint import CheckpointNotFound, load_run
    from gptjax.config import MeshConfig
    from gptjax.data import TokenizerError
    from gptjax.evals.scoring import Scorer
    from gptjax.evals.tasks import BUILTIN, TaskError, evaluate_task, load_task
    from gptjax.sharding import make_mesh

    import jax

    with user_errors(CheckpointNotFound, TokenizerError, TaskError, ValueError):
        if not 1 <= a.devices <= len(jax.local_devices()):
            raise UserError(f"--devices {a.devices}: this process has {len(jax.local_devices())} device(s)")
        tasks = [load_task(name) for name in (a.task or BUILTIN)]
        mesh = make_mesh(MeshConfig(data=a.devices), jax.local_devices()[:a.devices])
        loaded = load_run(a.run_dir, a.step, mesh)
        scorer = Scorer(loaded.model, loaded.params, rows=a.rows)
        for task in tasks:
            for shots in a.shots:
                score = evaluate_task(scorer, loaded.tokenizer, task, shots, a.seed, a.limit)
                print(score.line(), flush=True)
                if a.json:
                    print(json.dumps(score.as_dict()), flush=True)
    return 0


def run_harness(args: list[str]) -> int:
    """lm_eval's command line with the gptjax backend registered and the built-in tasks on its include path."""
    import tempfile

    try:
        import gptjax.evals.harness  # noqa: F401 - registers --model gptjax
        from lm_eval.__main__ import cli_evaluate
    except ImportError as e:
        raise SystemExit(f"error: the harness backend needs lm-evaluation-harness: pip install 'gptjax[eval]' ({e})")
    from gptjax.evals.tasks import BUILTIN, builtin_tasks_dir, write_harness_yaml

    with tempfile.TemporaryDirectory(prefix="gptjax-harness-tasks-") as tmp:
        for name in BUILTIN:
            write_harness_yaml(builtin_tasks_dir() / name, tmp)
        if "--include_path" in args:
            i = args.index("--include_path") + 1
            if i < len(args):  # the harness takes one directory: the user's tasks next to the built-in ones
                for f in Path(args[i]).glob("*.yaml"):
                    (Path(tmp) / f.name).write_bytes(f.read_bytes())
                args = args[:i - 1] + args[i + 1:]
        old = sys.argv
        sys.argv = ["lm_eval", *args, "--include_path", tmp]
        try:
            cli_evaluate()
        finally:
            sys.argv = old
    return 0


def build_tasks(a: argparse.Namespace) -> int:
    from gptjax.config import ConfigError, RunConfig, apply_overrides
    from gptjax.data import CorpusError, corpus_documents, train_val_documents
    from gptjax.evals.tasks import build_tasks as build, write_task

    with user_errors(ConfigError, CorpusError):
        if any(not s.startswith("data.") for s in a.set):
            raise UserError(f"--set takes data settings only (data.FIELD=VALUE), got {a.set}")
        cfg = RunConfig.from_dict(apply_overrides(RunConfig().to_dict(), a.set))
        path, _, _, docs = corpus_documents(cfg.data)
        train_docs, val_docs = train_val_documents(docs, cfg.data)
        for name, task in build(train_docs, val_docs, a.test, a.train).items():
            write_task(task, Path(a.out) / name)
            print(f"{Path(a.out) / name}: {len(task.test)} test examples from {len(val_docs)} validation documents, "
                  f"{len(task.train)} demonstrations from {len(train_docs)} training documents of {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
