"""Implicit motion transfer: cross-attention from driving to source motion maps at the coarse
levels, the guided sparse resampler at the fine ones."""
from __future__ import annotations

import torch
from torch import nn

from ..config import RendererConfig
from ..layers.attention import FullAttention, guided_resample


class CoarseTransfer(nn.Module):
    """One full-attention level: queries from the driving motion map, keys from the source motion
    map, values from the source's dense features (attribute `block_efc`, official name)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.block_efc = FullAttention(dim, num_heads)

    def forward(self, driving: torch.Tensor, source: torch.Tensor, features: torch.Tensor,
                return_argmax: bool = False):
        b, c, h, w = features.shape
        seqs = [t.flatten(2).transpose(1, 2) for t in (driving, source, features)]
        result = self.block_efc(*seqs, return_argmax=return_argmax)
        out, argmax = result if return_argmax else (result, None)
        out = out.transpose(1, 2).reshape(b, c, h, w)
        return (out, argmax) if return_argmax else out


class FineTransfer(nn.Module):
    """One guided-resampler level (no parameters): warps the source features with the anchor argmax."""

    def __init__(self, anchor_size: int):
        super().__init__()
        self.anchor_size = anchor_size

    def forward(self, features: torch.Tensor, anchor_argmax: torch.Tensor) -> torch.Tensor:
        return guided_resample(features, anchor_argmax, self.anchor_size)


def build_transfer_levels(cfg: RendererConfig) -> nn.ModuleList:
    """One transfer module per feature level, coarsest first (the official `imt` list)."""
    levels = nn.ModuleList()
    for dim, size in zip(cfg.feature_dims[::-1], cfg.spatial_dims[::-1]):
        if size < cfg.swin_res_threshold:
            levels.append(CoarseTransfer(dim, cfg.num_heads))
        else:
            if size % cfg.anchor_resolution:
                raise ValueError(f"level {size}² is not a multiple of the anchor level {cfg.anchor_resolution}²")
            levels.append(FineTransfer(cfg.anchor_resolution))
    return levels
