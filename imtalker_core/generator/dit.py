"""Flow-matching transformer (a DiT with frame-wise AdaLN and rotary self-attention).

Attribute names follow the official checkpoint (`fmt.*` entries of `generator.ckpt`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import GeneratorConfig


class RotaryEmbedding(nn.Module):
    """Rotary position frequencies for one attention head (`inv_freq`, `[head_dim/2]`)."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq)

    def forward(self, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin tables `[length, head_dim]` (the frequencies repeated twice)."""
        pos = torch.arange(length, device=self.inv_freq.device, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq.float())
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `[B, heads, N, head_dim]` by position (half-split convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Self-attention with a fused `qkv` projection and rotary positions."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """fc1 → tanh-GELU → fc2 (the `fc1`/`fc2` key names of the official checkpoint)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class FMTBlock(nn.Module):
    """Transformer block whose LayerNorms are shifted, scaled and gated per frame by the condition."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.attn = Attention(dim, num_heads)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        # Index 1 holds the weights (official layout: SiLU, Linear).
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=-1)
        norm = x.shape[-1:]
        x = x + gate_a * self.attn(_modulate(F.layer_norm(x, norm, eps=1e-6), shift_a, scale_a), rope)
        return x + gate_m * self.mlp(_modulate(F.layer_norm(x, norm, eps=1e-6), shift_m, scale_m))


class FinalLayer(nn.Module):
    """Frame-wise modulated LayerNorm → linear projection to motion latents."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(_modulate(F.layer_norm(x, x.shape[-1:], eps=1e-6), shift, scale))


class TimestepEmbedder(nn.Module):
    """Flow time t ∈ [0, 1] → `[N, hidden]` via sinusoidal features and a 2-layer MLP."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class SequenceEmbed(nn.Module):
    """Linear embedding of the per-frame [reference motion, motion] pair (attribute `proj`)."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class FlowMatchingTransformer(nn.Module):
    """Velocity field v(t, x | conditions) over a window of context + current frames.

    All sequence inputs are `[B, N, ·]` with N = context + window frames (official 10 + 50).
    """

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        h = cfg.hidden_size
        self.x_embedder = SequenceEmbed(2 * cfg.motion_dim, h)
        self.rotary_emb = RotaryEmbedding(h // cfg.num_heads, cfg.rope_base)
        self.t_embedder = TimestepEmbedder(h, cfg.time_embedding_dim)
        self.c_embedder = nn.Linear(cfg.cond_dim, h)
        self.blocks = nn.ModuleList(FMTBlock(h, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.decoder = FinalLayer(h, cfg.motion_dim)

    def forward(self, t: torch.Tensor, x: torch.Tensor, ref: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """t: `[1]` or `[B]` flow time; x: `[B, N, motion_dim]` noisy motion; ref: `[B, motion_dim]`
        reference motion; cond: `[B, N, cond_dim]` summed audio/pose/cam/gaze embeddings.
        Returns the velocity `[B, N, motion_dim]`."""
        n = x.shape[1]
        x = self.x_embedder(torch.cat([ref[:, None].expand(-1, n, -1), x], dim=-1))
        c = self.t_embedder(t)[:, None] + self.c_embedder(cond)
        rope = self.rotary_emb(n, x.dtype)
        for block in self.blocks:
            x = block(x, c, rope)
        return self.decoder(x, c)
