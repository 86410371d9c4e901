"""What every console script shares: the config arguments (``--config``, ``--preset``, ``--model-preset``,
``--set``), logging set-up, and turning the errors users cause into one line and exit code 2."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from typing import Iterator

from gptjax.config import MODEL_PRESETS, RUN_PRESETS, ConfigError, RunConfig, build_run_config


def add_config_args(p: argparse.ArgumentParser, default_preset: str | None = "austen") -> None:
    p.add_argument("--preset", default=default_preset, choices=sorted(RUN_PRESETS),
                   help=f"run preset (default: {default_preset})")
    p.add_argument("--config", help="a .py file with config() or a .json RunConfig; replaces --preset")
    p.add_argument("--model-preset", help=f"model preset: {', '.join(MODEL_PRESETS)}")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a field (repeatable), e.g. --set model.dtype=bfloat16")


def config_from_args(a: argparse.Namespace, *extra_overrides: str, **model_fields) -> RunConfig:
    """The run config from the shared arguments; ``extra_overrides`` come from a script's own flags and are
    applied before ``--set`` (so ``--set`` wins)."""
    return build_run_config(**config_args(a, *extra_overrides), **model_fields)


def config_args(a: argparse.Namespace, *extra_overrides: str) -> dict:
    """The shared arguments as keyword arguments of ``build_run_config`` / ``build_config_dict``."""
    return dict(base=a.config or a.preset, model_preset_name=a.model_preset, overrides=[*extra_overrides, *a.set])


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "orbax", "jax._src", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class UserError(Exception):
    """An error in what the user asked for; the message is the whole story."""


@contextlib.contextmanager
def user_errors(*kinds: type[BaseException]) -> Iterator[None]:
    """Turn ``ConfigError`` and ``kinds`` into ``error: <message>`` on stderr and ``SystemExit(2)``."""
    try:
        yield
    except (ConfigError, UserError, *kinds) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
