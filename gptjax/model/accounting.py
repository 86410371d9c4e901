"""Analytic parameter counts and training FLOPs per token.

FLOPs convention (PaLM, Chowdhery et al. 2022, App. B), for one token of training (forward + backward):

    flops_per_token = 6 * N_matmul + 12 * sum_over_layers(n_heads * head_dim * T_attended)

``N_matmul`` counts every weight that takes part in a matmul: the blocks' projection matrices and the output
(un)embedding, tied or not; it excludes the input lookup, position embeddings, norms and biases. The attention
term counts the QK^T and AV matmuls (2 matmuls x 2 FLOPs x 3 for fwd+bwd), with ``T_attended`` = sequence
length for dense layers and min(window, seq) for banded ones. No discount is taken for causal masking, as is
the convention for MFU.
"""

from __future__ import annotations

from gptjax.config import ModelConfig


def block_param_counts(cfg: ModelConfig) -> dict[str, int]:
    d, h, k, hd, f = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.resolved_head_dim, cfg.d_ff
    norm = d * (2 if cfg.norm == "layernorm" else 1)
    attn = d * hd * (h + 2 * k) + h * hd * d
    mlp = d * f * (3 if cfg.mlp == "swiglu" else 2)
    bias = (hd * (h + 2 * k) * cfg.has_qkv_bias + d + f + d) if cfg.use_bias else 0
    qk_norm = 2 * hd * (2 if cfg.norm == "layernorm" else 1) if cfg.qk_norm else 0
    return {"attn": attn, "mlp": mlp, "norms": 2 * norm + qk_norm, "bias": bias}


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts by group; ``total`` is what the model holds."""
    blocks = sum(block_param_counts(cfg).values()) * cfg.n_layers
    embed = cfg.vocab_size * cfg.d_model
    out = {
        "embedding": embed,
        "pos_embedding": cfg.max_seq_len * cfg.d_model if cfg.positions == "learned" else 0,
        "blocks": blocks,
        "final_norm": cfg.d_model * (2 if cfg.norm == "layernorm" else 1),
        "unembedding": 0 if cfg.tie_embeddings else embed,
    }
    out["total"] = sum(out.values())
    out["non_embedding"] = out["total"] - out["embedding"] - out["pos_embedding"] - out["unembedding"]
    return out


def count_params(cfg: ModelConfig) -> int:
    return param_counts(cfg)["total"]


def matmul_params(cfg: ModelConfig) -> int:
    b = block_param_counts(cfg)
    return (b["attn"] + b["mlp"]) * cfg.n_layers + cfg.vocab_size * cfg.d_model


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs (fwd + bwd) per token at context ``seq_len`` (default ``max_seq_len``)."""
    seq = seq_len or cfg.max_seq_len
    attn = sum(12 * cfg.n_heads * cfg.resolved_head_dim * min(w, seq) for w in cfg.layer_windows())
    return 6.0 * matmul_params(cfg) + attn
