"""Command line: ``python -m gptjax.train`` (or ``gptjax-train``) trains the embedded default run.

Examples::

    gptjax-train                                  # ~4M-param model on the embedded Jane Austen corpus
    gptjax-train --set train.steps=1000 --set model.dtype=bfloat16
    gptjax-train --model-preset tiny-gpt2 --run-dir runs/gpt2ish
    gptjax-train --config experiments/austen.py   # a Python file defining config() -> RunConfig, or a JSON file
    gptjax-train --run-dir runs/austen --resume   # continue from the latest checkpoint
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import sys
from pathlib import Path

from gptjax.config import ConfigError, RunConfig, apply_overrides
from gptjax.presets import MODEL_PRESETS, RUN_PRESETS, model_preset, run_preset


def load_config_file(path: str) -> dict:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {p} does not exist")
    if p.suffix == ".json":
        return json.loads(p.read_text())
    if p.suffix == ".py":
        spec = importlib.util.spec_from_file_location(p.stem, p)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        if not hasattr(mod, "config"):
            raise ConfigError(f"{p} must define config() returning a RunConfig or a dict")
        cfg = mod.config()
        return cfg.to_dict() if isinstance(cfg, RunConfig) else cfg
    raise ConfigError(f"config file {p}: expected .json or .py")


def build_config(args: argparse.Namespace) -> RunConfig:
    d = load_config_file(args.config) if args.config else run_preset(args.preset)
    d = RunConfig.from_dict(d).to_dict()  # fill defaults so that every field can be overridden
    if args.model_preset:
        d["model"] = dataclasses.asdict(model_preset(args.model_preset))
    overrides = list(args.set or [])
    if args.run_dir:
        overrides.append(f"train.run_dir={args.run_dir}")
    if args.steps:
        overrides.append(f"train.steps={args.steps}")
    return RunConfig.from_dict(apply_overrides(d, overrides))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptjax-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="austen", choices=sorted(RUN_PRESETS), help="run preset (default: austen)")
    p.add_argument("--config", help="a .py file with config() or a .json RunConfig; replaces --preset")
    p.add_argument("--model-preset", help=f"model preset: {', '.join(MODEL_PRESETS)}")
    p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help="override a field (repeatable)")
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
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "orbax", "jax._src", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = build_config(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(cfg.to_json())
        return 0
    from gptjax.sharding.distributed import maybe_initialize
    from gptjax.training.loop import train
    from gptjax.checkpoint.manager import CheckpointNotFound
    from gptjax.data.corpus import CorpusError
    from gptjax.data.tokenizer import TokenizerError

    maybe_initialize(args.coordinator, args.num_processes, args.process_id)
    try:
        train(cfg, resume=args.resume, stop_after=args.stop_after)
    except (ConfigError, CorpusError, TokenizerError, CheckpointNotFound, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
