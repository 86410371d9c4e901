"""A sizing rule for scaling sweeps: the LLaMA-style model (MHA, RoPE, RMSNorm, SwiGLU, tied embeddings) whose
non-embedding parameter count is closest to a target N.

Rule: depth n_layers = round((N / 12,288)^(1/3)) (at least 1), i.e. an aspect ratio d_model ~ 32 x n_layers;
width d_model = the multiple of 8 nearest sqrt(N / (12 n_layers)) (12 d^2 per block: 4 d^2 attention plus a
SwiGLU MLP of 3 d d_ff with d_ff = 8/3 d); then d_ff, a multiple of 8 in [d_model, 6 d_model], takes up the rest
of the target, so sizes are fine-grained even where one width step is a 2x jump in N; heads of 16 dimensions
(8 where d_model is not a multiple of 16). N counts the
blocks and the final norm, not the token embedding (tied with the output layer), as in Kaplan et al. (2020):
with the small vocabularies of CPU sweeps, the embedding would otherwise dominate the smallest models.
"""

from __future__ import annotations

import math

from gptjax.config import ModelConfig
from gptjax.model import param_counts

HEAD_DIM = 16
WIDTH_STEP = 8  # widths are multiples of 8; heads are 16 wide where the width allows, else 8


def model_for_params(target_n: float, vocab_size: int, max_seq_len: int, width_step: int = WIDTH_STEP,
                     **fields) -> ModelConfig:
    """The model the rule gives for ``target_n`` non-embedding parameters; extra ``fields`` override it.
    ``width_step``: d_model is a multiple of it (a plan for many devices asks for 128, so that FSDP can split
    the width; the rule's curve is the same)."""
    if not target_n > 0:
        raise ValueError(f"target parameter count must be > 0, got {target_n}")
    n_layers = max(1, round((target_n / 12_288) ** (1 / 3)))
    d_model = width_step * max(2 if width_step == WIDTH_STEP else 1,
                               round(math.sqrt(target_n / (12 * n_layers)) / width_step))
    # the MLP width takes up the rest of the target (8/3 d_model on the rule's curve), within [d, 6 d]
    per_layer = (target_n - d_model) / n_layers - 4 * d_model * d_model - 2 * d_model
    d_ff = 8 * round(per_layer / (3 * d_model) / 8)
    d_ff = int(min(max(d_ff, max(8, 8 * round(d_model / 8))), 6 * d_model))
    head_dim = HEAD_DIM if d_model % HEAD_DIM == 0 else WIDTH_STEP
    return ModelConfig(**{**dict(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers,
                                 n_heads=d_model // head_dim, d_ff=d_ff, max_seq_len=max_seq_len, positions="rope",
                                 norm="rmsnorm", mlp="swiglu", tie_embeddings=True, use_bias=False), **fields})


def scaling_params(cfg: ModelConfig) -> int:
    """N as the scaling fits count it: the non-embedding parameters."""
    return param_counts(cfg)["non_embedding"]
