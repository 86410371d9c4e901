"""Read a local Hugging Face model directory (LLaMA, Qwen3, GPT-2, GPT-Neo; safetensors, sharded or not) as a
gptjax ``ModelConfig`` and parameters.

Everything is checked before anything is returned: the architecture (a feature gptjax cannot represent is an
error naming it), every tensor present with its expected shape, no tensor left over that would carry meaning
gptjax drops, and tensors gptjax does not have (e.g. a LLaMA MLP's gate bias) all zero. ``config.json`` files
written by gptjax's export carry the source run's model config; its non-architecture fields (compute dtype,
layout, z-loss, ...) and its bias settings are taken back, so ``import(export(run))`` restores the run's params
exactly.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from gptjax import storage
from gptjax.config import ConfigError, ModelConfig, Role, RunConfig, build_run_config, fields_with_role
from gptjax.interop.families import HF_CONFIG, HF_TOKENIZER, Family, UnsupportedArchitecture, family_of_hf
from gptjax.interop.safetensors import Reader, SafetensorsError

# Model fields an HF config does not determine (it carries the parameters and their function): how a run trains
# and executes, and its parameter layout. They may be chosen anew at import (``--set``); an export's recorded
# values are restored, as is its storage dtype (the HF files' dtype is the export's choice, not the run's).
SETTABLE_FIELDS = fields_with_role(ModelConfig, Role.TRAJECTORY, Role.LAYOUT, Role.EXECUTION)
_FREE_FIELDS = SETTABLE_FIELDS + ("param_dtype",)


class HFImportError(ValueError):
    """The HF directory cannot be imported; the message names the file, tensor or feature."""


@dataclass
class ImportedModel:
    model: ModelConfig
    params: dict  # per-layer layout (blocks/0, blocks/1, ...), float32 numpy arrays
    family: Family
    tokenizer_proto: bytes | None  # the directory's sentencepiece model, if it has one


def run_config_for(imported: ImportedModel, run_dir: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """The import policy: the run config of a run seeded from ``imported`` (the default run's settings, the
    checkpoint's model, a sequence length the model takes), with ``overrides`` (``--set``), which may change the
    model fields of :data:`SETTABLE_FIELDS` only: the others are fixed by the checkpoint's parameters."""
    fields = dataclasses.asdict(imported.model)
    seq = [f"train.seq_len={imported.model.max_seq_len}"] if imported.model.max_seq_len < 256 else []
    cfg = build_run_config("austen", overrides=[f"train.run_dir={run_dir}", *seq, *overrides], **fields)
    changed = [k for k, v in fields.items() if getattr(cfg.model, k) != v and k not in SETTABLE_FIELDS]
    if changed:
        raise HFImportError(f"--set cannot change model field(s) the checkpoint fixes: {', '.join(changed)}")
    return cfg


def read_hf_config(hf_dir: str | Path) -> dict:
    path = Path(hf_dir) / HF_CONFIG
    if not path.is_file():
        raise HFImportError(f"{path} not found: is {hf_dir} a Hugging Face model directory?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise HFImportError(f"{path} is not valid JSON: {e}") from None


def _set(params: dict, src: str, layer: int | None, value: np.ndarray) -> None:
    keys: list[Any] = src.format(layer).split(".")
    node = params
    for k in keys[:-1]:
        node = node.setdefault(int(k) if k.isdigit() else k, {})
    node[keys[-1]] = value


def read_hf(hf_dir: str | Path) -> ImportedModel:
    """A transformers model directory: local, or a bucket's (copied into this process's working copy, removed at
    exit: the safetensors are read through memory maps)."""
    if storage.is_remote(hf_dir):
        if storage.read_bytes(f"{str(hf_dir).rstrip('/')}/{HF_CONFIG}") is None:
            raise HFImportError(f"{hf_dir}/{HF_CONFIG} not found: is {hf_dir} a Hugging Face model directory?")
        return read_hf(storage.working_copy(hf_dir))
    hf_dir = Path(hf_dir)
    hf = read_hf_config(hf_dir)
    family = family_of_hf(hf)
    try:
        model = family.model_config(hf)
    except (KeyError, TypeError) as e:
        raise HFImportError(f"{hf_dir / HF_CONFIG}: missing or malformed field {e}") from None
    except ConfigError as e:
        raise UnsupportedArchitecture(f"{hf_dir / HF_CONFIG} describes a model gptjax cannot build: {e}") from None
    try:
        reader = Reader(hf_dir)
    except SafetensorsError as e:
        raise HFImportError(str(e)) from None
    recorded = (hf.get("gptjax") or {}).get("model")
    candidates = [model]
    if recorded:
        free = {k: recorded[k] for k in _FREE_FIELDS if k in recorded}
        model = dataclasses.replace(model, **free)
        spelled = dataclasses.replace(model, **{k: recorded[k] for k in ("head_dim", "n_kv_heads") if k in recorded})
        if (spelled.resolved_head_dim, spelled.kv_heads) == (model.resolved_head_dim, model.kv_heads):
            model = spelled  # the same architecture, in the run's own spelling (None for the defaults)
        biases = {k: recorded[k] for k in ("use_bias", "qkv_bias") if k in recorded}
        candidates = [dataclasses.replace(model, **biases), model]
    problem = None
    for candidate in candidates:  # the recorded bias setting holds if the tensors it omits are all zero
        try:
            params = _read_params(family, candidate, reader, hf_dir)
        except _NonZero as e:
            problem = problem or e
            continue
        proto = (hf_dir / HF_TOKENIZER).read_bytes() if (hf_dir / HF_TOKENIZER).is_file() else None
        return ImportedModel(candidate, params, family, proto)
    raise UnsupportedArchitecture(str(problem))


class _NonZero(HFImportError):
    pass


def _read_params(family: Family, model: ModelConfig, reader: Reader, hf_dir: Path) -> dict:
    tensors = family.tensors(model)
    expected = {t.name for t in tensors}
    names = set(reader.names())
    missing = [t.name for t in tensors if t.name not in names]
    if missing:
        raise HFImportError(f"{hf_dir}: tensor(s) missing for this {family.architecture} config: "
                           f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} ({len(missing)} in all)")
    extra = sorted(n for n in names - expected if not n.endswith(family.ignored_suffixes))
    tied_head = "lm_head.weight" in extra and model.tie_embeddings
    if tied_head:
        extra.remove("lm_head.weight")
    if extra:
        raise UnsupportedArchitecture(
            f"{hf_dir}: tensor(s) this {family.architecture} config does not have (a feature gptjax does not "
            f"model?): {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
    params: dict = {}
    for t in tensors:
        if reader.shape(t.name) != t.shape:
            raise HFImportError(f"{hf_dir}: tensor {t.name} has shape {list(reader.shape(t.name))}, expected "
                               f"{list(t.shape)} from config.json")
        value = reader.read(t.name).astype(np.float32)
        if not t.sources:
            if np.any(value != 0):
                raise _NonZero(f"{hf_dir}: tensor {t.name} is not zero, and gptjax's {family.architecture} mapping "
                               "has no parameter for it")
            continue
        for src, part in zip(t.sources, t.from_hf(value)):
            _set(params, src, t.layer, np.ascontiguousarray(part))
    if tied_head:
        embed = params["embedding"]
        if not np.array_equal(reader.read("lm_head.weight").astype(np.float32), embed):
            raise UnsupportedArchitecture(f"{hf_dir}: lm_head.weight differs from the input embedding, but "
                                          "config.json says tie_word_embeddings=true")
    return params
