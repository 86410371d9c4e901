"""What ``gptjax-sample`` and ``gptjax-serve`` share: the run (and draft run) to load, the engine's slots, and the
generation settings as flags."""

from __future__ import annotations

import argparse

from gptjax.cli.common import UserError


def add_engine_args(p: argparse.ArgumentParser, slots: int | None) -> None:
    """``slots``: the default of ``--slots``; None: the caller sizes the engine to its work (``sized_slots``)."""
    p.add_argument("--run-dir", required=True, help="the run whose checkpoint generates")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest intact one)")
    p.add_argument("--draft-run-dir", help="a smaller run with the same tokenizer: speculative decoding with it as "
                                           "the draft model")
    p.add_argument("--draft-step", type=int, help="the draft run's checkpoint step (default: its latest)")
    p.add_argument("--draft-tokens", type=int, default=4, help="tokens the draft proposes per step (default 4)")
    p.add_argument("--slots", type=int, default=slots, help="rows decoded together (default " + (
        f"{slots})" if slots is not None else f"one per sample, at most {MAX_SIZED_SLOTS})"))


MAX_SIZED_SLOTS = 16


def sized_slots(requested: int | None, samples: int) -> int:
    """``--slots``, or one row per sample (at most 16): every decode step computes every row, so one prompt in a
    16-row engine paid a batch-16 step per token (the issue's gpt2ish measurement: 256 tokens in 22.6 s at 16
    slots, 8.0 s at 2)."""
    return requested if requested is not None else min(MAX_SIZED_SLOTS, max(1, samples))


def add_generation_args(p: argparse.ArgumentParser, tokens: int) -> None:
    p.add_argument("--tokens", type=int, default=tokens, help=f"new tokens at most (default {tokens})")
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample from the top-p nucleus (1: all)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL's penalty on seen tokens (1: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end a sample where this text appears (repeatable; the text is cut)")


def generation_config(a: argparse.Namespace):
    from gptjax.inference import GenerationConfig

    return GenerationConfig(max_new_tokens=a.tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                            repetition_penalty=a.repetition_penalty, seed=a.seed, stop=tuple(a.stop))


def load_engine(a: argparse.Namespace):
    """The engine over ``--run-dir``'s checkpoint (and ``--draft-run-dir``'s), on this process's first device."""
    from gptjax.checkpoint import load_run
    from gptjax.inference import Engine
    from gptjax.runs import RunDir

    target = load_run(a.run_dir, a.step)
    draft = None
    if a.draft_run_dir:
        draft_run = RunDir(a.draft_run_dir)
        if not draft_run.tokenizer.is_file():
            raise UserError(f"{a.draft_run_dir} has no tokenizer ({draft_run.tokenizer}); is it a gptjax run "
                            "directory?")
        if draft_run.tokenizer.read_bytes() != target.tokenizer.proto:
            raise UserError(f"the draft run's tokenizer ({draft_run.tokenizer}) differs from the target's "
                            f"({RunDir(a.run_dir).tokenizer}); speculative decoding needs the same tokenizer: train "
                            "the draft with the target's (data.tokenizer)")
        loaded = load_run(draft_run, a.draft_step, target.model.mesh, tokenizer=False)
        draft = (loaded.model, loaded.params)
    return Engine(target.model, target.params, target.tokenizer, slots=a.slots, draft=draft,
                  draft_tokens=a.draft_tokens)
