"""``gptjax-sample --run-dir runs/austen --prompt "..."``: sample from a run's checkpoint (parameters only)."""

from __future__ import annotations

import argparse
import sys

from gptjax.cli.common import console_script, setup_logging, user_errors


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptjax-sample", description=__doc__)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--prompt", default="It is a truth universally acknowledged")
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    return p


@console_script("gptjax-sample")
def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    setup_logging()
    from gptjax.checkpoint import CheckpointNotFound, restore_params
    from gptjax.data.tokenizer import Tokenizer, TokenizerError
    from gptjax.inference.sample import check_sampling, generate
    from gptjax.model.sharded import ShardedModel
    from gptjax.runs import RunDir
    from gptjax.sharding.mesh import single_device_mesh

    with user_errors(CheckpointNotFound, TokenizerError, ValueError):
        check_sampling(a.temperature, a.top_k, a.top_p, a.tokens)
        if not a.prompt:
            raise ValueError("the prompt is empty; give --prompt some text")
        mesh = single_device_mesh()
        cfg, params = restore_params(a.run_dir, a.step, mesh)
        tok = Tokenizer.load(RunDir(a.run_dir).tokenizer)
    model = ShardedModel(cfg.model, mesh, cfg.mesh.rules)
    prompt = tok.encode(a.prompt)
    ids = generate(model.forward, params, prompt, a.tokens, cfg.model.max_seq_len, a.temperature, a.top_k, a.top_p,
                   a.seed)
    print(tok.decode(prompt + ids))
    return 0


if __name__ == "__main__":
    sys.exit(main())
