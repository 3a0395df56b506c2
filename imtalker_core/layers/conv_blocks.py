"""BatchNorm convolution blocks of the identity encoder and the synthesis network.

The official checkpoint wraps every BatchNorm in a `norm` attribute (keys `...norm.norm.weight`),
which `NormLayer` keeps. The activations are `nn.LeakyReLU` with PyTorch's default slope 0.01.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# parity: the reference builds these activations as nn.LeakyReLU() with the default 0.01 slope.
BLOCK_SLOPE = 0.01


class NormLayer(nn.Module):
    """BatchNorm2d under the attribute name `norm` (official key layout)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class ConvBlock(nn.Module):
    """3×3 conv (no bias) → BatchNorm → optional LeakyReLU."""

    def __init__(self, channels: int, activate: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.norm = NormLayer(channels)
        self.activate = activate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.conv(x))
        return F.leaky_relu(x, BLOCK_SLOPE) if self.activate else x


class FeatResBlock(nn.Module):
    """Two ConvBlocks with an identity shortcut, activated after the sum."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = ConvBlock(channels, activate=True)
        self.conv2 = ConvBlock(channels, activate=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.conv2(self.conv1(x)) + x, BLOCK_SLOPE)


class ConvResBlock(nn.Module):
    """conv → BN → LeakyReLU → [resample] → conv → two FeatResBlocks.

    `resample` is applied after the first activation ("down": 2×2 average pooling, as in the
    identity encoder) or before the first conv ("up": nearest ×2, as in the synthesis network).
    """

    def __init__(self, in_channels: int, out_channels: int, resample: str | None = None):
        super().__init__()
        if resample not in (None, "up", "down"):
            raise ValueError(f"resample must be None, 'up' or 'down', not {resample!r}")
        self.resample = resample
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False)
        self.norm = NormLayer(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.feat_res_block1 = FeatResBlock(out_channels)
        self.feat_res_block2 = FeatResBlock(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "up":
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        x = F.leaky_relu(self.norm(self.conv1(x)), BLOCK_SLOPE)
        if self.resample == "down":
            x = F.avg_pool2d(x, 2)
        x = self.conv2(x)
        return self.feat_res_block2(self.feat_res_block1(x))
