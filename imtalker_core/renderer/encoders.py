"""Identity encoder (dense multi-scale features + identity vector) and motion encoder (image → latent)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import RendererConfig
from ..layers.conv_blocks import ConvResBlock, inferring, layout_enabled
from ..layers.stylegan import ConvLayer, EqualConv2d, EqualLinear


def _mapping_head(width: int, out_dim: int, depth: int = 4) -> tuple[nn.ModuleList, EqualLinear]:
    return nn.ModuleList(EqualLinear(width, width) for _ in range(depth)), EqualLinear(width, out_dim)


class IdentityEncoder(nn.Module):
    """Image `[B, 3, S, S]` in [0, 1] → (features finest-last, identity vector `[B, identity_dim]`).

    `features` has one map per level, coarsest first: `[B, feature_dims[-1], S/64, S/64]` …
    `[B, feature_dims[0], S/2, S/2]` (official: 512@8² … 32@256²).
    """

    def __init__(self, cfg: RendererConfig):
        super().__init__()
        dims = cfg.feature_dims
        first = cfg.identity_initial_channels
        self.initial_conv = nn.Sequential(nn.Conv2d(3, first, 7, 1, 3), nn.BatchNorm2d(first), nn.ReLU())
        self.down_block_0 = ConvResBlock(first, dims[0], resample="down")
        self.down_blocks = nn.ModuleList(
            ConvResBlock(dims[i], dims[i + 1], resample="down") for i in range(len(dims) - 1))
        # parity: the official model owns this conv but never applies it; kept so its key loads.
        self.equalconv = EqualConv2d(dims[-1], dims[-1], 3, padding=1)
        self.linear_layers, self.final_linear = _mapping_head(dims[-1], cfg.identity_dim)

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        x = self.down_block_0(self.initial_conv(x))
        features = [x]
        for block in self.down_blocks:
            x = block(x)
            features.append(x)
        v = x.flatten(2).mean(dim=2)
        for layer in self.linear_layers:
            v = F.leaky_relu(layer(v), 0.2)
        return features[::-1], self.final_linear(v)


class MotionResBlock(nn.Module):
    """Downsampling residual block of the motion encoder (no 1/√2 output scaling, as in the official model)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = ConvLayer(in_channels, in_channels, 3)
        self.conv2 = ConvLayer(in_channels, out_channels, 3, downsample=True)
        self.skip = ConvLayer(in_channels, out_channels, 3, downsample=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x)) + self.skip(x)


# The motion encoder's own default (its convs are not the synthesis network's: see MotionEncoder).
MOTION_CHANNELS_LAST_BY_DEVICE = {"cpu": True}


class MotionEncoder(nn.Module):
    """Image `[B, 3, S, S]` in [0, 1] → motion latent `[B, latent_dim]` (official: 32).

    `channels_last` (None: the device default, `MOTION_CHANNELS_LAST_BY_DEVICE`; True; False): in
    inference (eval mode, autograd off) the image is made channels-last, and every conv, blur and sum
    after it keeps that layout (the parameters stay as they are). On a CPU (fp32, 2 threads, batch 4)
    that takes a driving frame's encoding from 1.7 to 1.27 s (156 GFLOP a frame, more than rendering
    it); results change by rounding only (~1e-6). On an H200 (fp16) it is 2.9× slower (6.3 vs 2.2 ms a
    frame at batch 32, `benchmarks/motion_speed.py --device cuda --dtype fp16`), so off there.
    """

    channels_last: bool | None = None

    def __init__(self, cfg: RendererConfig):
        super().__init__()
        first = cfg.motion_initial_channels
        self.conv1 = nn.Conv2d(3, first, 3, 1, 1)
        chans = (first, *cfg.motion_encoder_dims)
        self.res_blocks = nn.ModuleList(MotionResBlock(chans[i], chans[i + 1]) for i in range(len(chans) - 1))
        self.equalconv = EqualConv2d(chans[-1], chans[-1], 3, padding=1)
        self.linear_layers, self.final_linear = _mapping_head(chans[-1], cfg.latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if inferring(self) and layout_enabled(self.channels_last, MOTION_CHANNELS_LAST_BY_DEVICE, x.device):
            x = x.contiguous(memory_format=torch.channels_last)
        x = F.leaky_relu(self.conv1(x), 0.2)
        for block in self.res_blocks:
            x = block(x)
        v = self.equalconv(x).flatten(2).mean(dim=2)
        for layer in self.linear_layers:
            v = F.leaky_relu(layer(v), 0.2)
        return self.final_linear(v)
