"""``gptjax-sample --run-dir runs/austen --prompt "..."``: generate from a run's checkpoint with the generation
engine (KV cache, continuous batching; speculative decoding with ``--draft-run-dir``), streaming the text to the
terminal as it is produced.

Several prompts (``--prompt`` repeated, or ``--prompts-file`` with one per line) and ``--num-samples`` samples of
each are decoded together; they are printed in order, the one being printed streaming while the others decode
alongside. Sample ``i`` of a prompt uses seed ``--seed + i``. A prompt that does not fit the context with
``--tokens`` new tokens is refused (nothing is cut silently).

Exit codes: 0 done, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import sys
import time

from gptjax.cli.common import UserError, console_script, setup_logging, user_errors
from gptjax.cli.engine_args import (add_engine_args, add_generation_args, generation_config, load_engine,
                                    sized_slots)

DEFAULT_PROMPT = "It is a truth universally acknowledged"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptjax-sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p, slots=None)
    p.add_argument("--prompt", action="append", help=f"a prompt (repeatable; default {DEFAULT_PROMPT!r})")
    p.add_argument("--prompts-file", help="a text file with one prompt per line (empty lines skipped)")
    p.add_argument("--num-samples", type=int, default=1, help="samples of each prompt (default 1)")
    add_generation_args(p, tokens=200)
    return p


def prompts_of(a: argparse.Namespace) -> list[str]:
    prompts = list(a.prompt or [])
    if a.prompts_file:
        try:
            with open(a.prompts_file, encoding="utf-8") as f:
                prompts += [line.rstrip("\n") for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read --prompts-file {a.prompts_file}: {e}") from None
        if not prompts:
            raise UserError(f"--prompts-file {a.prompts_file} has no prompts (one per line)")
    if any(not p for p in prompts):
        raise UserError("a --prompt is empty; give some text")
    return prompts or [DEFAULT_PROMPT]


@console_script("gptjax-sample")
def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    setup_logging()
    from gptjax.checkpoint import CheckpointNotFound
    from gptjax.data.tokenizer import TokenizerError
    from gptjax.inference import GenerationError

    with user_errors(CheckpointNotFound, TokenizerError, GenerationError):
        if a.num_samples < 1:
            raise UserError(f"--num-samples must be >= 1, got {a.num_samples}")
        config = generation_config(a)
        prompts = prompts_of(a)
        jobs = [(k, p, i) for k, p in enumerate(prompts) for i in range(a.num_samples)]
        a.slots = sized_slots(a.slots, len(jobs))
        engine = load_engine(a)
        pieces: list[list[str]] = [[] for _ in jobs]
        requests = [engine.request(p, config.replace(seed=a.seed + i), pieces[j].append)
                    for j, (_, p, i) in enumerate(jobs)]
    for r in requests:
        engine.submit(r)
    start, shown = time.perf_counter(), 0
    for j, (request, (k, prompt, i)) in enumerate(zip(requests, jobs)):
        if len(jobs) > 1:
            print(f"=== prompt {k + 1}, sample {i + 1} (seed {a.seed + i}) ===")
        print(prompt, end="", flush=True)
        while True:
            done = request.done.is_set()  # read before the flush: what came before it is all printed
            print("".join(pieces[j]), end="", flush=True)
            pieces[j].clear()
            if done:
                break
            engine.step()
        print("\n" if len(jobs) > 1 else "", flush=True)
        shown += len(request.completion.token_ids)
    seconds = time.perf_counter() - start
    summary = (f"{shown} tokens in {seconds:.2f} s ({shown / seconds:.1f} tokens/s, {engine.slots} "
               f"slot{'s' if engine.slots > 1 else ''}, prefill and compilation included)")
    if engine.draft is not None:
        acceptance = ", ".join(f"{x:.2f}" for x in engine.stats.acceptance)
        summary += (f"; speculative: {engine.stats.tokens_per_round:.2f} tokens per target pass, acceptance per "
                    f"draft position {acceptance}")
    print(summary, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
