"""``gptjax-eval``: evaluate a run's checkpoint.

    gptjax-eval perplexity --run-dir runs/austen --file my_text.txt --stride 128
    gptjax-eval perplexity --run-dir runs/austen --split val

``perplexity``: perplexity and bits-per-byte of a UTF-8 text file, or of the run's validation split, with a
sliding window of ``--context`` tokens (default the model's) every ``--stride`` (default half of it); every token
is scored once, with at least context - stride tokens before it after the first window. Bits-per-byte do not
depend on the tokenizer: runs with different vocabularies compare. Prints one line and, with ``--json``, the
figures as JSON on stdout. (Of the split, the end-of-sequence tokens between documents are scored too and count
no bytes.)

Exit codes: 0 done, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gptjax.cli.common import UserError, console_script, setup_logging, user_errors


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
    ppl.add_argument("--batch-size", type=int, default=8, help="windows scored together (default 8)")
    ppl.add_argument("--json", action="store_true", help="also print the figures as JSON")
    return p


@console_script("gptjax-eval")
def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    setup_logging()
    from gptjax.checkpoint import CheckpointNotFound, restore_params
    from gptjax.data import Tokenizer, TokenizerError, split_file
    from gptjax.evals.perplexity import score_ids, score_text
    from gptjax.model import ShardedModel
    from gptjax.runs import RunDir
    from gptjax.sharding import single_device_mesh

    with user_errors(CheckpointNotFound, TokenizerError, ValueError):
        text = None
        if a.file:
            try:
                text = Path(a.file).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise UserError(f"cannot read {a.file} as UTF-8 text: {e}") from None
        run = RunDir(a.run_dir)
        mesh = single_device_mesh()
        cfg, params = restore_params(a.run_dir, a.step, mesh)
        model = ShardedModel(cfg.model, mesh, cfg.mesh.rules)
        tokenizer = Tokenizer.load(run.tokenizer)
        if text is not None:
            score = score_text(model, params, tokenizer, text, a.context, a.stride, a.batch_size)
            what = a.file
        else:
            import numpy as np

            split = split_file(run, a.split)
            if not split.is_file():
                raise UserError(f"{split} not found: the run has no prepared validation split")
            ids = np.load(split)
            n_bytes = len(tokenizer.decode([int(t) for t in ids]).encode("utf-8"))
            score = score_ids(model, params, [tokenizer.eos_id, *ids.tolist()], a.context, a.stride, a.batch_size,
                              n_bytes)
            what = "the validation split"
    print(f"{what}: {score.tokens} tokens, {score.bytes} bytes, {score.windows} windows of {score.context} "
          f"(stride {score.stride}): loss {score.loss:.4f} nats/token, perplexity {score.perplexity:.2f}, "
          f"{score.bits_per_byte:.4f} bits/byte")
    if a.json:
        print(json.dumps(score.as_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
