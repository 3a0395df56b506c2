"""Identity-adaptive module Φ and the style-modulated motion decoder."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import RendererConfig
from ..layers.stylegan import EqualLinear, StyledConv


class IdentityAdaptive(nn.Module):
    """Φ: (motion latent `[B, latent_dim]`, identity vector `[B, identity_dim]`) → adapted latent `[B, latent_dim]`."""

    def __init__(self, cfg: RendererConfig):
        super().__init__()
        width = cfg.identity_dim
        self.in_layer = EqualLinear(width + cfg.latent_dim, width)
        self.linear_layers = nn.ModuleList(EqualLinear(width, width) for _ in range(cfg.adapter_depth))
        self.final_linear = EqualLinear(width, cfg.latent_dim)

    def forward(self, motion: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
        x = self.in_layer(torch.cat((motion, identity), dim=-1))
        for layer in self.linear_layers:
            x = F.leaky_relu(layer(x), 0.2)
        return self.final_linear(x)


class MotionDecoder(nn.Module):
    """Adapted latent `[B, latent_dim]` → 4 motion maps, coarsest first.

    Official shapes: `[B,512,8,8]`, `[B,512,16,16]`, `[B,256,32,32]`, `[B,128,64,64]`: the channel
    counts of the dense features at the four full-attention levels. Each level is one upsampling
    StyledConv and two plain ones, after a first StyledConv on a learned constant.
    """

    def __init__(self, cfg: RendererConfig):
        super().__init__()
        levels = [d for d, s in zip(cfg.feature_dims[::-1], cfg.spatial_dims[::-1]) if s < cfg.swin_res_threshold]
        const_size = min(cfg.spatial_dims) // 2
        self.const = nn.Parameter(torch.randn(1, cfg.decoder_const_dim, const_size, const_size))
        layers = [StyledConv(cfg.decoder_const_dim, levels[0], 3, cfg.latent_dim)]
        prev = levels[0]
        for ch in levels:
            layers += [StyledConv(prev, ch, 3, cfg.latent_dim, upsample=True),
                       StyledConv(ch, ch, 3, cfg.latent_dim),
                       StyledConv(ch, ch, 3, cfg.latent_dim)]
            prev = ch
        self.style_conv_layers = nn.ModuleList(layers)

    def forward(self, latent: torch.Tensor) -> list[torch.Tensor]:
        x = self.const.expand(latent.shape[0], -1, -1, -1)
        maps = []
        for i, layer in enumerate(self.style_conv_layers):
            x = layer(x, latent)
            if i % 3 == 0 and i > 0:
                maps.append(x)
        return maps
