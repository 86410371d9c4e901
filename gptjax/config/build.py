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
import logging
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence

from gptjax.config.presets import RUN_PRESETS, model_preset, run_preset
from gptjax.config.schema import MOVED_FIELDS, ConfigError, RunConfig, field_type

log = logging.getLogger("gptjax")

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
        if not callable(getattr(mod, "config", None)):
            what = "has no config" if not hasattr(mod, "config") else f"has config = {mod.config!r}, not a function"
            raise ConfigError(f"{p} {what}: an experiment file defines config() returning a RunConfig or a dict")
        cfg = mod.config()
        if isinstance(cfg, RunConfig):
            return cfg.to_dict()
        if not isinstance(cfg, Mapping):
            raise ConfigError(f"{p}: config() returned {type(cfg).__name__} {cfg!r}; return a RunConfig or a dict")
        return dict(cfg)
    raise ConfigError(f"config file {p}: expected .json or .py")


def parse_override_value(raw: str, hint: Any, key: str) -> Any:
    """A ``--set`` value parsed by the field's type: bools take true/false/1/0, numbers must parse, optional
    fields take null/none, mappings take JSON."""
    kind, optional = field_type(hint)
    text = raw.strip()
    if optional and text.lower() in ("null", "none"):
        return None
    try:
        if kind is bool:
            return {"true": True, "1": True, "false": False, "0": False}[text.lower()]
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if kind is dict:
            value = json.loads(text)
            if not isinstance(value, dict):
                raise ValueError
            return value
    except (KeyError, ValueError):
        takes = {bool: "true/false/1/0", int: "an integer", float: "a number", dict: "a JSON object"}[kind]
        raise ConfigError(f"--set {key}={raw}: {key} takes {takes}{' or null' if optional else ''}") from None
    return raw


def apply_overrides(d: dict, overrides: Sequence[str]) -> dict:
    """Apply ``section.field=value`` strings to a config dict, each value parsed by the field's declared type."""
    d = json.loads(json.dumps(d))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        key, raw = item.split("=", 1)
        if key in MOVED_FIELDS:
            log.warning("--set %s: the field is now %s", key, MOVED_FIELDS[key])
            key = MOVED_FIELDS[key]
        parts = key.split(".")
        if len(parts) != 2:
            raise ConfigError(f"override {item!r}: the key must be section.field, e.g. model.d_model")
        section, name = parts
        sections = typing.get_type_hints(RunConfig)
        if section not in sections:
            raise ConfigError(f"override {item!r}: unknown section {section!r}; sections: {', '.join(sections)}")
        hints = typing.get_type_hints(sections[section])
        fields = [f.name for f in dataclasses.fields(sections[section])]
        if name not in fields:
            raise ConfigError(f"override {item!r}: unknown field {name!r} in {section}; valid: {', '.join(fields)}")
        d.setdefault(section, {})[name] = parse_override_value(raw, hints[name], key)
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
