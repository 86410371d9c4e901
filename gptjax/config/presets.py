"""Model presets, as data: each is a dict of ``ModelConfig`` fields.

Sources: GPT-1 (Radford et al. 2018), GPT-2 (Radford et al. 2019; sizes as released), GPT-3 (Brown et al. 2020,
Table 2.1: n_layers, d_model, n_heads, d_head; ctx 2048; FFN 4*d_model), LLaMA-2 (Touvron et al. 2023).
Stated deviations: every stack is pre-norm with a final norm (GPT-1 was post-norm); GPT-3's band width of its
locally banded layers is not given in the paper, 256 is assumed; dropout is not modelled.
"""

from __future__ import annotations

import copy

from gptjax.config.schema import ConfigError, ModelConfig

_GPT2_BASE = dict(vocab_size=50257, max_seq_len=1024, positions="learned", norm="layernorm", mlp="gelu",
                  use_bias=True, tie_embeddings=True, norm_eps=1e-5)
_GPT3_BASE = dict(_GPT2_BASE, max_seq_len=2048, attention="alternating", window=256)
_LLAMA2_BASE = dict(vocab_size=32000, max_seq_len=4096, positions="rope", rope_theta=10000.0, norm="rmsnorm",
                    mlp="swiglu", use_bias=False, tie_embeddings=False, norm_eps=1e-5)


def _gpt3(n_layers: int, d_model: int, n_heads: int, head_dim: int) -> dict:
    return dict(_GPT3_BASE, n_layers=n_layers, d_model=d_model, n_heads=n_heads, head_dim=head_dim,
                d_ff=4 * d_model)


MODEL_PRESETS: dict[str, dict] = {
    # GPT-1: 12x768, 12 heads, FFN 3072, BPE vocab 40478, ctx 512.
    "gpt1": dict(_GPT2_BASE, vocab_size=40478, max_seq_len=512, n_layers=12, d_model=768, n_heads=12, d_ff=3072),
    "gpt2-small": dict(_GPT2_BASE, n_layers=12, d_model=768, n_heads=12, d_ff=3072),
    "gpt2-medium": dict(_GPT2_BASE, n_layers=24, d_model=1024, n_heads=16, d_ff=4096),
    "gpt2-large": dict(_GPT2_BASE, n_layers=36, d_model=1280, n_heads=20, d_ff=5120),
    "gpt2-xl": dict(_GPT2_BASE, n_layers=48, d_model=1600, n_heads=25, d_ff=6400),
    "gpt3-125m": _gpt3(12, 768, 12, 64),
    "gpt3-350m": _gpt3(24, 1024, 16, 64),
    "gpt3-760m": _gpt3(24, 1536, 16, 96),
    # Table 2.1 lists 24 heads of 128 for the 1.3B model, which is 3072 wide, not d_model=2048, and would make
    # it 1.5B; 16 heads of 128 (as in the common open re-implementations) gives the stated 1.3B.
    "gpt3-1.3b": _gpt3(24, 2048, 16, 128),
    "gpt3-2.7b": _gpt3(32, 2560, 32, 80),
    "gpt3-6.7b": _gpt3(32, 4096, 32, 128),
    "gpt3-13b": _gpt3(40, 5140, 40, 128),  # the paper's d_model (5140) is not n_heads * d_head (5120)
    "gpt3-175b": _gpt3(96, 12288, 96, 128),
    "llama2-7b": dict(_LLAMA2_BASE, n_layers=32, d_model=4096, n_heads=32, d_ff=11008),
    "llama2-13b": dict(_LLAMA2_BASE, n_layers=40, d_model=5120, n_heads=40, d_ff=13824),
    "llama2-70b": dict(_LLAMA2_BASE, n_layers=80, d_model=8192, n_heads=64, n_kv_heads=8, d_ff=28672),
    # Tiny CPU presets: LLaMA-style (GQA, RoPE, RMSNorm, SwiGLU) and GPT-2-style.
    "tiny": dict(vocab_size=4096, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, d_ff=688, max_seq_len=256),
    "tiny-gpt2": dict(_GPT2_BASE, vocab_size=4096, max_seq_len=256, n_layers=4, d_model=256, n_heads=8, d_ff=1024),
    # nano: the smallest model that trains with the default data and run settings (a byte-fallback tokenizer
    # needs >= 262 pieces; the default train.seq_len is 256)
    "nano": dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=256),
}


def model_preset(name: str, **overrides) -> ModelConfig:
    """The ``ModelConfig`` of a preset, with fields optionally overridden."""
    if name not in MODEL_PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; presets: {', '.join(MODEL_PRESETS)}")
    return ModelConfig(**{**MODEL_PRESETS[name], **overrides})


# Run presets: whole RunConfig dicts (sections not given keep their defaults).
RUN_PRESETS: dict[str, dict] = {
    # The main job: a ~4M-parameter LLaMA-style model on the embedded Jane Austen corpus, minutes on a CPU.
    "austen": {
        "model": MODEL_PRESETS["tiny"],
        "data": {"corpus": "default"},
        "optim": {"lr": 3e-3, "warmup_steps": 30, "min_lr_ratio": 0.1, "weight_decay": 0.1},
        "train": {"run_dir": "runs/austen", "steps": 300, "batch_size": 16, "seq_len": 256, "log_every": 10,
                  "eval_every": 100, "eval_batches": 8, "checkpoint_every": 200},
    },
}


def run_preset(name: str) -> dict:
    """A copy of run preset ``name`` as a dict (sections not given keep their defaults)."""
    if name not in RUN_PRESETS:
        raise ConfigError(f"unknown run preset {name!r}; presets: {', '.join(RUN_PRESETS)}")
    return copy.deepcopy(RUN_PRESETS[name])
