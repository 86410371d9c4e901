"""Training compute. The default is C = 6 N D. ``chinchilla_flops`` is the exact count of Hoffmann et al.
(2022), appendix F, for one sequence of ``seq_len`` tokens:

    embeddings      2 x seq x vocab x d_model
    attention/layer QKV projections  2 x seq x d_model x (q_heads + 2 kv_heads) x head_dim
                    QK^T logits      2 x seq x seq_att x q_heads x head_dim
                    softmax          3 x q_heads x seq x seq_att
                    softmax @ V      2 x seq x seq_att x q_heads x head_dim
                    output proj.     2 x seq x q_heads x head_dim x d_model
    MLP/layer       2 x seq x d_model x d_ff x (2 matrices; 3 for SwiGLU)
    final logits    2 x seq x d_model x vocab

forward = embeddings + layers x (attention + MLP) + logits; training = 3 x forward. The paper writes 3 x for
K, Q and V with full-width heads; grouped-query attention projects q_heads + 2 kv_heads heads. seq_att is the
sequence length for dense layers and min(window, seq) for banded ones (the paper has no banded layers and, like
it, no discount is taken for causal masking). Norms, biases and position embeddings are not counted.
"""

from __future__ import annotations

from gptjax.config import ModelConfig


def chinchilla_forward_flops(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs of one sequence of ``seq_len`` tokens (appendix F)."""
    s, d, v, hd = seq_len, cfg.d_model, cfg.vocab_size, cfg.resolved_head_dim
    h, k = cfg.n_heads, cfg.kv_heads
    embed = 2 * s * v * d
    mlp = 2 * s * d * cfg.d_ff * (3 if cfg.mlp == "swiglu" else 2)
    layers = 0.0
    for w in cfg.layer_windows():
        sa = min(w, s)
        attn = (2 * s * d * (h + 2 * k) * hd + 2 * s * sa * h * hd + 3 * h * s * sa + 2 * s * sa * h * hd
                + 2 * s * h * hd * d)
        layers += attn + mlp
    logits = 2 * s * d * v
    return float(embed + layers + logits)


def chinchilla_flops(cfg: ModelConfig, seq_len: int, tokens: float) -> float:
    """Training FLOPs for ``tokens`` tokens in sequences of ``seq_len``: 3 x forward (appendix F)."""
    return 3.0 * chinchilla_forward_flops(cfg, seq_len) * tokens / seq_len
