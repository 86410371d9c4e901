"""The one way a ``RunConfig`` is built from what a user gives: a base, a model preset, ``--set`` overrides.

Every entry point (``gptjax-train``, ``gptjax-plan``, the benchmark, experiment files) goes through
:func:`build_run_config`, so a field means the same thing everywhere::

    build_run_config("austen")                                   # a run preset
    build_run_config("experiments/austen.py")                    # an experiment file: config() -> RunConfig
    build_run_config("my_run.json", model_preset="tiny-gpt2", overrides=["train.steps=50"])
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from gptjax.config.presets import RUN_PRESETS, model_preset, run_preset
from gptjax.config.schema import ConfigError, RunConfig

DEFAULT_RUN = "austen"


def load_config_file(path: str | Path) -> dict:
    """A run config as a dict from a ``.json`` file or a ``.py`` file defining ``config()``."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {p} does not exist")
    if p.suffix == ".json":
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {p} is not valid JSON: {e}") from None
    if p.suffix == ".py":
        spec = importlib.util.spec_from_file_location(p.stem, p)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        if not hasattr(mod, "config"):
            raise ConfigError(f"{p} must define config() returning a RunConfig or a dict")
        cfg = mod.config()
        return cfg.to_dict() if isinstance(cfg, RunConfig) else cfg
    raise ConfigError(f"config file {p}: expected .json or .py")


def apply_overrides(d: dict, overrides: Sequence[str]) -> dict:
    """Apply ``section.field=value`` strings (values parsed as JSON, else kept as strings) to a config dict."""
    d = json.loads(json.dumps(d))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        *path, last = key.split(".")
        node = d
        for p in path:
            if not (isinstance(node, dict) and p in node):
                raise ConfigError(f"override {item!r}: unknown section {p!r}")
            node = node[p]
        node[last] = value
    return d


def base_dict(base: str | Path | Mapping | RunConfig | None) -> dict:
    """The base config as a complete dict (defaults filled in, so every field can be overridden)."""
    if base is None:
        base = DEFAULT_RUN
    if isinstance(base, RunConfig):
        return base.to_dict()
    if isinstance(base, Mapping):
        d = dict(base)
    elif isinstance(base, str) and base in RUN_PRESETS:
        d = run_preset(base)
    else:
        d = load_config_file(base)
    return RunConfig.from_dict(d).to_dict()


def build_config_dict(base: str | Path | Mapping | RunConfig | None = None, *, model_preset_name: str | None = None,
                      overrides: Sequence[str] = (), **model_fields: Any) -> dict:
    """``base`` (a run preset name, a .py/.json file, a dict or a RunConfig; default: the ``austen`` run), its
    model section replaced by ``model_preset_name`` if given, then ``model_fields``, then ``overrides``; as a
    dict, not yet validated as a whole (a caller may still derive fields from others)."""
    d = base_dict(base)
    if model_preset_name:
        d["model"] = dataclasses.asdict(model_preset(model_preset_name))
    d["model"].update(model_fields)
    return apply_overrides(d, overrides)


def build_run_config(base: str | Path | Mapping | RunConfig | None = None, *, model_preset_name: str | None = None,
                     overrides: Sequence[str] = (), **model_fields: Any) -> RunConfig:
    """The validated ``RunConfig`` of :func:`build_config_dict`."""
    return RunConfig.from_dict(build_config_dict(base, model_preset_name=model_preset_name, overrides=overrides,
                                                 **model_fields))
