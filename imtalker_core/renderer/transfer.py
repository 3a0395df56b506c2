"""Implicit motion transfer: cross-attention from driving to source motion maps at the coarse
levels, the guided sparse resampler at the fine ones."""
from __future__ import annotations

import torch
from torch import nn

from ..config import RendererConfig
from ..layers.attention import FullAttention, guided_resample, pool_for_resample, resample_pooled


class CoarseTransfer(nn.Module):
    """One full-attention level: queries from the driving motion map, keys from the source motion
    map, values from the source's dense features (attribute `block_efc`, official name).

    `prepare(source, features)` projects the source side once (keys and values `[Bs, heads, N, d]`);
    `forward(driving, kv=...)` then needs only the driving map.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.block_efc = FullAttention(dim, num_heads)

    @staticmethod
    def _seq(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)  # [B, C, H, W] → [B, H·W, C]

    def prepare(self, source: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Source motion map and features `[Bs, C, H, W]` → projected (keys, values) `[Bs, heads, H·W, C/heads]`."""
        return self.block_efc.project_kv(self._seq(source), self._seq(features))

    def forward(self, driving: torch.Tensor, source: torch.Tensor | None = None,
                features: torch.Tensor | None = None, return_argmax: bool = False,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None):
        """driving `[B, C, H, W]` and either source/features `[B, C, H, W]` or `kv` from `prepare`
        → aligned features `[B, C, H, W]` (and the anchor argmax `[B, H·W]` with `return_argmax`)."""
        b, _, h, w = driving.shape
        if kv is None:
            result = self.block_efc(self._seq(driving), self._seq(source), self._seq(features),
                                    return_argmax=return_argmax)
        else:
            result = self.block_efc(self._seq(driving), return_argmax=return_argmax, kv=kv)
        out, argmax = result if return_argmax else (result, None)
        out = out.transpose(1, 2).reshape(b, -1, h, w)
        return (out, argmax) if return_argmax else out


class FineTransfer(nn.Module):
    """One guided-resampler level (no parameters): warps the source features with the anchor argmax.

    `prepare(features)` computes the block means once per source; `forward(..., pooled=...)` uses them.
    """

    def __init__(self, anchor_size: int):
        super().__init__()
        self.anchor_size = anchor_size

    def prepare(self, features: torch.Tensor) -> torch.Tensor:
        """Source features `[Bs, C, H, W]` → block means `[Bs, C, anchor²]`."""
        return pool_for_resample(features, self.anchor_size)

    def forward(self, features: torch.Tensor | None, anchor_argmax: torch.Tensor,
                pooled: torch.Tensor | None = None, size: int | None = None) -> torch.Tensor:
        """Warped features `[B, C, S, S]` from features `[B, C, S, S]`, or from `pooled` and `size`."""
        if pooled is None:
            return guided_resample(features, anchor_argmax, self.anchor_size)
        return resample_pooled(pooled, anchor_argmax, self.anchor_size, size)


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
