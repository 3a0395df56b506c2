"""Synthesis network: aligned features (coarsest first) → RGB frame `[B, 3, S, S]` in [0, 1]."""
from __future__ import annotations

import torch
from torch import nn

from ..config import RendererConfig
from ..layers.attention import SwinBlock, TransformerBlock
from ..layers.conv_blocks import ConvResBlock


class LevelAttention(nn.Module):
    """The attention stage of one synthesis level: a transformer block below the threshold,
    a plain and a shifted window block at or above it (attribute `blocks`, official name)."""

    def __init__(self, cfg: RendererConfig, dim: int, resolution: int):
        super().__init__()
        if resolution >= cfg.swin_res_threshold:
            w = cfg.window_size
            self.blocks = nn.ModuleList([SwinBlock(dim, resolution, cfg.num_heads, w, 0),
                                         SwinBlock(dim, resolution, cfg.num_heads, w, w // 2)])
        else:
            self.blocks = nn.ModuleList([TransformerBlock(dim, resolution, cfg.num_heads)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class SynthesisNetwork(nn.Module):
    def __init__(self, cfg: RendererConfig):
        super().__init__()
        dims = cfg.feature_dims[::-1]
        sizes = cfg.spatial_dims[::-1]
        n = len(dims) - 1
        self.upconv_blocks = nn.ModuleList(ConvResBlock(dims[i], dims[i + 1], resample="up") for i in range(n))
        self.resblocks = nn.ModuleList(ConvResBlock(2 * dims[i + 1], dims[i + 1]) for i in range(n))
        self.transformer_blocks = nn.ModuleList(LevelAttention(cfg, dims[i + 1], sizes[i + 1]) for i in range(n))
        # Index 1 holds the weights (official layout: LeakyReLU, Conv2d, PixelShuffle, Sigmoid).
        self.final_conv = nn.Sequential(nn.LeakyReLU(0.2), nn.Conv2d(dims[-1], 12, 3, padding=1),
                                        nn.PixelShuffle(2), nn.Sigmoid())

    def forward(self, aligned: list[torch.Tensor]) -> torch.Tensor:
        x = aligned[0]
        for up, res, attn, skip in zip(self.upconv_blocks, self.resblocks, self.transformer_blocks, aligned[1:]):
            x = attn(res(torch.cat([up(x), skip], dim=1)))
        return self.final_conv(x)
