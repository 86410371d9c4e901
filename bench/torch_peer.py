"""The PyTorch peer of the training benchmarks: the same model, written as a careful PyTorch loop.

Two architectures, as gptjax builds them (same parameter count and FLOPs for the same config):

* ``llama`` (default): RMSNorm, RoPE, GQA through ``F.scaled_dot_product_attention``, SwiGLU, tied embeddings
  unless ``tie_embeddings=False``;
* ``gpt2``: LayerNorm, learned positions, biases, GELU (tanh) MLP, tied embeddings.

AdamW with gradient clipping, bf16 through ``torch.autocast``. On CPU (``bench/train_bench.py``) an eager loop
with foreach AdamW and SDPA's fused causal CPU kernel; on CUDA (``tools/gpu_check.py``) what a careful PyTorch user
runs there: ``torch.compile`` of the model, fused AdamW, SDPA's flash kernel.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight).to(x.dtype)


def rope_tables(seq: int, head_dim: int, theta: float = 10000.0):
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    ang = torch.arange(seq).float()[:, None] * inv[None]
    return ang.cos(), ang.sin()


def apply_rope(x, cos, sin):  # x: [B, N, L, H]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Block(nn.Module):
    def __init__(self, d, n_heads, n_kv, d_ff, gpt2: bool = False):
        super().__init__()
        self.n_heads, self.n_kv, self.hd, self.gpt2 = n_heads, n_kv, d // n_heads, gpt2
        norm = (lambda: nn.LayerNorm(d)) if gpt2 else (lambda: RMSNorm(d))
        self.attn_norm, self.mlp_norm = norm(), norm()
        self.wqkv = nn.Linear(d, (n_heads + 2 * n_kv) * self.hd, bias=gpt2)
        self.wo = nn.Linear(n_heads * self.hd, d, bias=gpt2)
        self.w_gate_up = nn.Linear(d, (1 if gpt2 else 2) * d_ff, bias=gpt2)
        self.w_down = nn.Linear(d_ff, d, bias=gpt2)

    def forward(self, x, cos, sin):
        B, L, _ = x.shape
        q, k, v = self.wqkv(self.attn_norm(x)).split(
            [self.n_heads * self.hd, self.n_kv * self.hd, self.n_kv * self.hd], dim=-1)
        q = q.view(B, L, self.n_heads, self.hd).transpose(1, 2)
        k = k.view(B, L, self.n_kv, self.hd).transpose(1, 2)
        v = v.view(B, L, self.n_kv, self.hd).transpose(1, 2)
        if not self.gpt2:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv != self.n_heads)
        x = x + self.wo(o.transpose(1, 2).reshape(B, L, -1))
        if self.gpt2:
            return x + self.w_down(F.gelu(self.w_gate_up(self.mlp_norm(x)), approximate="tanh"))
        gate, up = self.w_gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.w_down(F.silu(gate) * up)


class TorchGPT(nn.Module):
    def __init__(self, vocab, d, n_layers, n_heads, n_kv, d_ff, seq, arch: str = "llama", tie_embeddings=True):
        super().__init__()
        gpt2 = arch == "gpt2"
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq, d) if gpt2 else None
        self.blocks = nn.ModuleList(Block(d, n_heads, n_kv, d_ff, gpt2) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d) if gpt2 else RMSNorm(d)
        self.unembed = None if tie_embeddings else nn.Linear(d, vocab, bias=False)
        cos, sin = rope_tables(seq, d // n_heads)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, tokens):
        x = self.embed(tokens)
        if self.pos is not None:
            x = x + self.pos.weight[: tokens.shape[1]]
        for b in self.blocks:
            x = b(x, self.cos, self.sin)
        return F.linear(self.norm(x), self.embed.weight if self.unembed is None else self.unembed.weight)


def make_step(cfg: dict, dtype: str, device: str = "cpu", compile: bool = False):
    """One training step (forward, loss, backward, clip, AdamW) of the peer for ``cfg`` (the benchmark's config
    dict; optional ``arch`` and ``tie_embeddings``) and its parameter count. ``step`` returns the loss as a tensor
    (reading it synchronises a CUDA device)."""
    torch.manual_seed(0)
    model = TorchGPT(cfg["vocab_size"], cfg["d_model"], cfg["n_layers"], cfg["n_heads"], cfg["n_kv_heads"],
                     cfg["d_ff"], cfg["seq_len"], cfg.get("arch", "llama"), cfg.get("tie_embeddings", True)).to(device)
    tables = [model.embed.weight] + ([model.pos.weight] if model.pos is not None else [])  # lookups: no decay
    decay = [p for p in model.parameters() if p.dim() >= 2 and not any(p is t for t in tables)]
    no_decay = [p for p in model.parameters() if not any(p is q for q in decay)]
    cuda = device.startswith("cuda")
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=3e-4, betas=(0.9, 0.95), **({"fused": True} if cuda else {"foreach": True}))
    n_params = sum(p.numel() for p in model.parameters())
    forward = torch.compile(model) if compile else model

    def step(inputs, targets):
        with torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            logits = forward(inputs)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.detach()

    return step, n_params


def matmul_gflops(dtype: str, n: int = 512, seconds: float = 0.5) -> float:
    """Best observed GFLOP/s of an n^3 torch matmul in ``dtype`` (bf16: autocast's kernel)."""
    import time

    dt = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    a = torch.ones(n, n, dtype=dt)
    a @ a
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def run(cfg: dict, dtype: str, steps: int, warmup: int, budget: float = 0.0):
    """Mean step time over ``steps`` timed steps (fewer once ``budget`` seconds have passed, at least one),
    the number timed, the parameter count and the last loss."""
    import time

    torch.set_num_threads(max(1, torch.get_num_threads()))
    step, n_params = make_step(cfg, dtype)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, cfg["vocab_size"], (steps + warmup, cfg["batch_size"], cfg["seq_len"] + 1), generator=g)
    for i in range(warmup):
        step(data[i, :, :-1], data[i, :, 1:])
    t, losses = time.perf_counter(), []
    for i in range(steps):
        losses.append(step(data[warmup + i, :, :-1], data[warmup + i, :, 1:]).item())
        if budget and time.perf_counter() - t > budget:
            break
    return (time.perf_counter() - t) / len(losses), len(losses), n_params, losses[-1]
