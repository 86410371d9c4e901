"""``gptjax-serve --run-dir runs/austen``: an OpenAI-compatible completions server over a run's checkpoint
(``POST /v1/completions``, streamed or not, with ``logprobs`` and ``echo``; ``GET /v1/models``), on loopback by
default, decoding concurrent requests together with the continuous-batching engine.

    curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"prompt": "It is a truth", "max_tokens": 20, "temperature": 0}'

Any OpenAI client works: ``OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")``. The model's name is the
run directory's (``--model-name`` to change it). Exit codes: 0 after Ctrl-C or SIGTERM, 2 bad input.
"""

from __future__ import annotations

import argparse
import signal
import sys

from gptjax.cli.common import UserError, console_script, setup_logging, user_errors
from gptjax.cli.engine_args import add_engine_args


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptjax-serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p, slots=8)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--model-name", help="the model's name in the API (default: the run directory's name)")
    return p


@console_script("gptjax-serve")
def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    setup_logging()
    from pathlib import Path

    from gptjax.checkpoint import CheckpointNotFound
    from gptjax.cli.engine_args import load_engine
    from gptjax.data.tokenizer import TokenizerError
    from gptjax.inference import GenerationError
    from gptjax.inference.server import CompletionServer

    with user_errors(CheckpointNotFound, TokenizerError, GenerationError):
        engine = load_engine(a)
        name = a.model_name or Path(a.run_dir).resolve().name
        try:
            server = CompletionServer(engine, name, a.host, a.port)
        except OSError as e:
            raise UserError(f"cannot listen on {a.host}:{a.port}: {e.strerror or e}") from None
    signal.signal(signal.SIGTERM, _stop)
    print(f"serving {name} ({a.run_dir}) on {server.url}/v1 with {engine.slots} slots; Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("gptjax-serve: stopped", file=sys.stderr)
    finally:
        server.close()
    return 0


def _stop(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM (a scheduler, ``kill``) stops the server as Ctrl-C does


if __name__ == "__main__":
    sys.exit(main())
