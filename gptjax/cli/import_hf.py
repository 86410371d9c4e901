"""``gptjax-import HF_DIR --run-dir R [--set SECTION.FIELD=VALUE ...]``: a local Hugging Face model directory
(LLaMA, Qwen3, GPT-2, GPT-Neo; safetensors) as a gptjax run directory: ``config.json``, its sentencepiece
tokenizer if it has one (``tokenizer.model``), and a step-0 checkpoint, so that

    gptjax-train --run-dir R --resume      # continues training it (on the configured corpus)
    gptjax-sample --run-dir R              # samples it

The run's other settings come from the default run (``austen``) and ``--set`` (e.g. ``--set train.steps=1000
--set data.corpus=my.txt``); model fields the checkpoint fixes cannot be changed. Architecture features gptjax
cannot represent are refused by name. Exit codes: 0 done (or already imported), 2 bad input (nothing written).
"""

from __future__ import annotations

import argparse
import sys

from gptjax.cli.common import console_script, setup_logging, user_errors


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptjax-import", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("hf_dir", metavar="HF_DIR", help="a transformers model directory (local, s3://... or gs://...)")
    p.add_argument("--run-dir", required=True, help="the run directory to create")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a run setting (repeatable)")
    return p


@console_script("gptjax-import")
def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    setup_logging()
    from pathlib import Path

    from gptjax import storage
    from gptjax.checkpoint import CheckpointWriteError
    from gptjax.interop.families import UnsupportedArchitecture
    from gptjax.interop.hf_import import HFImportError, read_hf, run_config_for
    from gptjax.runs import RunLocked
    from gptjax.training.seed import AlreadySeeded, seed_run

    with user_errors(HFImportError, UnsupportedArchitecture, FileExistsError, RunLocked, CheckpointWriteError):
        imported = read_hf(a.hf_dir)
        cfg = run_config_for(imported, a.run_dir, a.set)
        if imported.tokenizer_proto is None:
            print(f"note: {a.hf_dir} has no sentencepiece tokenizer.model; training and sampling need one: "
                  "--set data.tokenizer=PATH.model", file=sys.stderr)
        where = a.hf_dir if storage.is_remote(a.hf_dir) else str(Path(a.hf_dir).absolute())
        source = {"hf_dir": where, "architecture": imported.family.architecture,
                  "config": cfg.to_dict()}
        try:
            run_dir = seed_run(cfg, imported.params, imported.tokenizer_proto, source)
        except AlreadySeeded as done:
            print(done)
            return 0
    print(f"imported {imported.family.architecture} from {a.hf_dir} into {run_dir} (step 0); continue with "
          f"gptjax-train --run-dir {run_dir} --resume")
    return 0


if __name__ == "__main__":
    sys.exit(main())
