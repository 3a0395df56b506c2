"""Synthesis network: aligned features (coarsest first) → RGB frame `[B, 3, S, S]` in [0, 1].

Inference layout (`set_inference_layout`; the defaults and measurements are noted at
`conv_blocks.CHANNELS_LAST_BY_DEVICE`): with channels-last on, the network converts its inputs to
channels-last once and every stage keeps that layout (convs with cached channels-last weights,
BatchNorm, nearest upsampling, the concatenation, the attention blocks, whose token views of an
NHWC map need no copy, and the pixel shuffle); only the frame is made NCHW again. With the fold on,
every conv → BatchNorm pair runs as one conv; with the up-sampling phases on, every "nearest ×2 → 3×3
conv" runs as four 2×2 convs on the small map. Only in eval mode with autograd off.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import RendererConfig
from ..layers.attention import SwinBlock, TransformerBlock
from ..layers.conv_blocks import (CHANNELS_LAST_BY_DEVICE, ConvResBlock, InferenceConvs, configure_inference,
                                  layout_enabled)


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


class SynthesisNetwork(InferenceConvs):
    """Aligned features, coarsest first (`[B, feature_dims[-1], S/64, S/64]` … `[B, feature_dims[0],
    S/2, S/2]`), → frames `[B, 3, S, S]` in [0, 1], NCHW-contiguous in every layout."""

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
        # Per frame, so the device defaults apply here (the identity encoder's blocks stay plain).
        configure_inference(self, channels_last=None, fold_batchnorm=None, upsample_phases=None)

    def uses_channels_last(self, x: torch.Tensor) -> bool:
        """Whether a forward pass on input `x` runs channels-last (inference only)."""
        return self.inferring() and layout_enabled(self.channels_last, CHANNELS_LAST_BY_DEVICE, x.device)

    def forward(self, aligned: list[torch.Tensor]) -> torch.Tensor:
        channels_last = self.uses_channels_last(aligned[0])
        x = as_channels_last(aligned[0]) if channels_last else aligned[0]
        for up, res, attn, skip in zip(self.upconv_blocks, self.resblocks, self.transformer_blocks, aligned[1:]):
            x = up(as_channels_last(x) if channels_last else x)
            if channels_last and not torch.compiler.is_compiling():  # (a compiled graph picks its own layouts)
                # Written straight into a channels-last buffer: the resampled skips come NCHW, and
                # torch.cat of mixed layouts would return NCHW.
                joined = torch.empty((x.shape[0], x.shape[1] + skip.shape[1], *x.shape[2:]), dtype=x.dtype,
                                     device=x.device, memory_format=torch.channels_last)
                x = torch.cat([x, skip], dim=1, out=joined)
            else:
                x = torch.cat([x, skip], dim=1)
            x = attn(res(x))
        activate, conv, shuffle, squash = self.final_conv
        frames = squash(shuffle(self._conv(activate(x), "final_conv", conv)))
        return frames.contiguous()


def as_channels_last(x: torch.Tensor) -> torch.Tensor:
    """`x` `[B, C, H, W]` channels-last with the canonical strides `(C·H·W, 1, W·C, C)`.

    The attention blocks' `transpose(1, 2).reshape(...)` of a batch-1 token sequence is channels-last
    but carries an arbitrary stride on the batch axis; `contiguous()` accepts it, yet
    `F.interpolate` then returns NCHW (a silent copy back, torch 2.x). Restriding a size-1 axis
    addresses the same elements, so that is a free view.
    """
    x = x.contiguous(memory_format=torch.channels_last)
    b, c, h, w = x.shape
    canonical = (c * h * w, 1, w * c, c)
    if x.stride() != canonical and b == 1:
        x = x.as_strided(x.shape, canonical)
    return x


def set_inference_layout(module: nn.Module, channels_last: bool | None = None,
                         fold_batchnorm: bool | None = None, upsample_phases: bool | None = None) -> None:
    """Choose the inference layout of every synthesis network in `module` (a renderer or any part of
    it) and of its conv blocks: True or False, or None for the per-device defaults
    (`conv_blocks.CHANNELS_LAST_BY_DEVICE`, `conv_blocks.FOLD_BATCHNORM_BY_DEVICE`,
    `conv_blocks.UPSAMPLE_PHASES_BY_DEVICE`: channels-last and the fold on a CPU and on CUDA, the
    phases on a CPU only, all off elsewhere). The identity encoder,
    which runs once per video, keeps its plain layout.

    The cached weights cost one more copy of the synthesis network's conv weights (41.6 M values,
    167 MB in float32; 44.7 M values with `upsample_phases`, whose 2×2 phase kernels of the five
    up-sampling convs hold 16 instead of 9 values per channel pair) while any is on.

    All three change float32 results by rounding only (the anchor picks are made before the synthesis
    network); training and autograd always use the plain layout, the unfolded BatchNorm and the
    up-sampled map.
    """
    for m in module.modules():
        if isinstance(m, SynthesisNetwork):
            configure_inference(m, channels_last, fold_batchnorm, upsample_phases)
