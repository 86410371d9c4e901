"""Export a run's checkpoint as a Hugging Face transformers directory, streaming.

``export_run(run_dir, out)`` writes ``config.json``, ``generation_config.json``, ``model.safetensors`` (or
``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json`` past ``max_shard_size``) and the tokenizer
(``tokenizer.json`` + config, and the original ``tokenizer.model``), which
``AutoModelForCausalLM.from_pretrained(out)`` / ``AutoTokenizer.from_pretrained(out)`` load with no extra code.

Streaming: every HF tensor's shape is known from the config, so each safetensors header is written first and the
tensors are then read from the checkpoint one at a time (one layer's slice of a scan-stacked parameter; see
``checkpoint/tensors.py``), converted, written and dropped. Peak memory is the largest single tensor (times the
small constant of a transpose and a dtype cast) plus the process's baseline, whatever the model or shard size.

Everything is written into a temporary sibling of ``out`` and renamed into place at the end
(:func:`gptjax.runs.atomic_directory`), so a failure leaves no half-written export; a previous gptjax export at
``out`` is replaced, any other non-empty directory is refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from gptjax import storage
from gptjax.checkpoint.tensors import CheckpointTensors
from gptjax.config.dtypes import DTYPES
from gptjax.data.tokenizer import Tokenizer
from gptjax.interop.families import HF_CONFIG, HF_TOKENIZER, HFTensor, family_for
from gptjax.interop.safetensors import INDEX, StreamWriter, parse_size, plan_shards, shard_names
from gptjax.interop.tokenizer import hf_tokenizer_files
from gptjax.runs import RunDir, atomic_directory, fault_reason

MARKER = "gptjax"  # the config.json key that records where an export came from
EXPORT_NAMES = (HF_CONFIG, "generation_config.json", HF_TOKENIZER, INDEX, "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json")  # besides model*.safetensors


class ExportError(ValueError):
    """The export cannot be made as asked; the message says why. Nothing has been written to ``out``."""


@dataclass
class ExportResult:
    out: Path
    architecture: str
    step: int
    files: list[str]
    total_bytes: int


def locate(reader: CheckpointTensors, src: str, layer: int | None) -> tuple[str, int | None]:
    """Where parameter ``src`` (``blocks.{}.attn.w_q`` form) of ``layer`` is stored, in either layer layout:
    ``(stored name, index along its leading axis or None)``."""
    if "{}" not in src:
        return src, None
    stacked = src.replace("{}.", "")
    return (stacked, layer) if stacked in reader.shapes else (src.format(layer), None)


def gptjax_param(reader: CheckpointTensors, src: str, layer: int | None) -> np.ndarray:
    return reader.read(*locate(reader, src, layer))


def _check_target(out: Path | str) -> set[str]:
    """``out`` (a local directory or a bucket's) may be written: absent, empty, or a previous gptjax export holding
    only the files it wrote (a re-export replaces the directory whole: files a user had added there were deleted
    without a word). Returns the names it holds."""
    if storage.is_remote(out):
        names = {str(p)[len(str(out)) + 1:] for p in storage.files_under(out)}
    else:
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise ExportError(f"--out {out} exists and is not a directory")
        names = {p.name for p in out.iterdir()} if out.is_dir() else set()
    if not names:
        return names
    config = storage.read_bytes(f"{out}/{HF_CONFIG}")
    try:
        written = set(json.loads(config)[MARKER].get("files") or ())
    except (TypeError, ValueError, KeyError, AttributeError):
        cut_short = storage.is_remote(out) and any(n.startswith("model") and n.endswith(".safetensors") for n in names)
        if config is not None or not cut_short:  # (a local export is renamed into place whole: never cut short)
            raise ExportError(f"--out {out} is a non-empty directory that is not a gptjax export; choose another "
                              "or empty it (a previous gptjax export there would be replaced)") from None
        written = set()  # an export cut short before its config.json (written last), or made before it listed files
    added = sorted(n for n in names if n not in written and not (
        not written and (n in EXPORT_NAMES or n.startswith("model") and n.endswith(".safetensors"))))
    if added:
        raise ExportError(f"--out {out} holds a previous export and files it did not write ({', '.join(added)}), "
                          "which replacing it would delete: move them, or choose another --out")
    return names


def export_run(run_dir: str | Path, out: str | Path, step: int | None = None, dtype: str = "float32",
               max_shard_size: str | int = "5GB", progress: bool = True) -> ExportResult:
    if storage.is_remote(out):
        return _export_to_bucket(run_dir, str(out).rstrip("/"), step, dtype, max_shard_size, progress)
    run, out = RunDir(run_dir), Path(out)
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    try:
        max_bytes = max_shard_size if isinstance(max_shard_size, int) else parse_size(max_shard_size)
    except ValueError as e:
        raise ExportError(f"--max-shard-size: {e}") from None
    _check_target(out)
    cfg = run.read_config()
    family = family_for(cfg.model)
    with CheckpointTensors(run, step) as reader:  # the step is pinned: retention cannot delete it meanwhile
        if not run.tokenizer.is_file():
            raise ExportError(f"{run.tokenizer} not found: the run's tokenizer is exported with its weights")
        tokenizer = Tokenizer.load(run.tokenizer)
        try:
            return _write(run, cfg, family, reader, tokenizer, out, dtype, max_bytes, progress)
        except (ValueError, OSError) as e:  # tensorstore reports a damaged chunk as ValueError
            if isinstance(e, ExportError):
                raise
            raise ExportError(f"reading checkpoint step {reader.step} of {run} failed: {fault_reason(e)}; nothing was "
                              f"written to {out} (an earlier step: --step)") from None


def _export_to_bucket(run_dir: str | Path, url: str, step: int | None, dtype: str, max_shard_size: str | int,
                      progress: bool) -> ExportResult:
    """An export into a bucket: written to a local staging directory (``storage.staging_dir``), then copied up
    with ``config.json`` last (the directory is a whole export exactly when it has one; the files of a previous
    export there are replaced, anything else there refuses it as a local directory would)."""
    storage.check_writable(url)
    held = _check_target(url)
    staging = storage.staging_dir(url)
    shutil.rmtree(staging, ignore_errors=True)
    try:
        result = export_run(run_dir, staging, step, dtype, max_shard_size, progress)
        for stale in held - set(json.loads((staging / HF_CONFIG).read_text())[MARKER]["files"]):
            storage.delete(f"{url}/{stale}")  # a previous export's shards this one does not have
        storage.delete(f"{url}/{HF_CONFIG}")  # no config.json while the others are replaced
        storage.push(staging, url, last=(HF_CONFIG,))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dataclasses.replace(result, out=storage.as_path(url))


def _write(run: RunDir, cfg, family, reader: CheckpointTensors, tokenizer: Tokenizer, out: Path, dtype: str,
           max_bytes: int, progress: bool) -> ExportResult:
    """Stream the pinned checkpoint into ``out`` (built beside it, renamed into place when complete)."""
    np_dtype = DTYPES[dtype]
    tok_files = hf_tokenizer_files(tokenizer.proto, cfg.model.max_seq_len)
    tensors = fold_mup(cfg.model, family.tensors(cfg.model))
    for t in tensors:  # config.json and the checkpoint must agree before anything is written
        for src in t.sources:
            if locate(reader, src, t.layer)[0] not in reader.shapes:
                raise ExportError(f"checkpoint step {reader.step} of {run} has no parameter "
                                  f"{src.format(t.layer)} that {run.config} implies")
    sizes = {t.name: int(np.prod(t.shape)) * np_dtype.itemsize for t in tensors}
    total = sum(sizes.values())
    shards = plan_shards(sizes.items(), max_bytes)
    files = shard_names(len(shards))
    by_name = {t.name: t for t in tensors}

    with atomic_directory(out) as tmp:
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"export {family.architecture}",
                   disable=not progress)
        for names, fname in zip(shards, files):
            specs = {n: (by_name[n].shape, np_dtype) for n in names}
            with StreamWriter(tmp / fname, specs) as w:
                for n in names:
                    w.write(n, _convert(reader, by_name[n], np_dtype))
                    bar.update(sizes[n])
        bar.close()
        if len(files) > 1:
            weight_map = {n: f for names, f in zip(shards, files) for n in names}
            (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=2))
        hf_cfg = family.hf_config(cfg.model, tokenizer.eos_id, dtype)
        hf_cfg[MARKER] = {"run_dir": run.url or str(run.path.absolute()), "step": reader.step,
                          "model": cfg.to_dict()["model"]}
        if cfg.model.width_mult != 1.0:
            hf_cfg["tie_word_embeddings"] = False  # the output multiplier makes lm_head its own tensor
            hf_cfg[MARKER]["folded"] = (f"μP at width multiplier {cfg.model.width_mult:g}: logits x 1/m in lm_head, "
                                        "attention scores x 1/sqrt(m) in q (q_norm under qk_norm)")
        hf_cfg[MARKER]["files"] = sorted([*files, HF_CONFIG, "generation_config.json", *tok_files, HF_TOKENIZER,
                                          *([INDEX] if len(files) > 1 else [])])
        (tmp / HF_CONFIG).write_text(json.dumps(hf_cfg, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(
            {"eos_token_id": tokenizer.eos_id, "bos_token_id": None, "pad_token_id": None}, indent=2))
        for name, content in tok_files.items():
            (tmp / name).write_text(json.dumps(content, ensure_ascii=False, indent=None if name == "tokenizer.json"
                                               else 2))
        shutil.copyfile(run.tokenizer, tmp / HF_TOKENIZER)
    return ExportResult(out, family.architecture, reader.step, files, total)


def fold_mup(cfg, tensors: list[HFTensor]) -> list[HFTensor]:
    """A μP model off its base width (m = d_model / mup_base_width != 1) as standard transformers weights: the
    logit multiplier 1/m goes into lm_head (a tied model's lm_head becomes the embedding / m, so the export is
    untied), the extra attention-score factor 1/sqrt(m) into the query: w_q and b_q, or the q-norm scale under
    qk_norm, where the norm would undo a scaled projection. Scores are bilinear in q, so this is exact up to one
    float32 rounding; the exported model is a standard one (import reads it back as such)."""
    m = cfg.width_mult
    if m == 1.0:
        return tensors
    q = (1.0 / math.sqrt(m))
    factors = {"attn.q_norm.scale": q} if cfg.qk_norm else {"attn.w_q": q, "attn.b_q": q}
    factors["unembedding"] = 1.0 / m

    def scaled(t: HFTensor) -> HFTensor:
        fs = [next((f for suffix, f in factors.items() if src.endswith(suffix)), None) for src in t.sources]
        if not any(fs):
            return t
        to_hf = t.to_hf
        return dataclasses.replace(t, to_hf=lambda *arrays: to_hf(*[a if f is None else a * np.float32(f)
                                                                   for a, f in zip(arrays, fs)]))

    out = [scaled(t) for t in tensors]
    if cfg.tie_embeddings:
        out.append(HFTensor("lm_head.weight", (cfg.vocab_size, cfg.d_model), ("embedding",),
                            lambda w: w * np.float32(1.0 / m), lambda w: (w * np.float32(m),)))
    return out


def _convert(reader: CheckpointTensors, t: HFTensor, dtype: np.dtype) -> np.ndarray:
    arrays = [gptjax_param(reader, src, t.layer).astype(np.float32) for src in t.sources]
    value = np.asarray(t.to_hf(*arrays))
    if tuple(value.shape) != t.shape:
        raise ExportError(f"{t.name}: made shape {value.shape} from {t.sources}, expected {t.shape}")
    return value.astype(dtype, order="C")  # one copy: the cast and the layout of a transpose together
