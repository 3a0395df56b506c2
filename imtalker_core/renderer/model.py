"""The renderer under the official attribute names, so `gen.*` checkpoint entries load unchanged."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import RendererConfig
from ..layers.attention import fast_paths_enabled
from .encoders import IdentityEncoder, MotionEncoder
from .motion import IdentityAdaptive, MotionDecoder
from .synthesis import SynthesisNetwork
from .transfer import CoarseTransfer, build_transfer_levels


@dataclass(frozen=True)
class SourceCache:
    """What `IMTRenderer.render` computes from the source alone, once per identity
    (`IMTRenderer.prepare_source`). Tensors are on the renderer's device and in its dtype, with the
    source's batch `Bs` (1: one source shared by every frame).

    kv: per transfer level (coarsest first), the projected keys and values `[Bs, heads, N, d]` of a
    full-attention level, None at guided-resampler levels; pooled: per level, the block means
    `[Bs, C, anchor²]` the guided resampler gathers from, None at full-attention levels; sizes: the
    levels' spatial sizes. source_maps and features are the inputs, kept for the plain path.
    """

    source_maps: tuple[torch.Tensor, ...]
    features: tuple[torch.Tensor, ...]
    kv: tuple[tuple[torch.Tensor, torch.Tensor] | None, ...]
    pooled: tuple[torch.Tensor | None, ...]
    sizes: tuple[int, ...]

    @property
    def batch(self) -> int:
        return self.features[0].shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.features[0].dtype

    @property
    def device(self) -> torch.device:
        return self.features[0].device


class IMTRenderer(nn.Module):
    """IMTalker renderer (124,137,625 parameters in the official configuration).

    Images are `[B, 3, S, S]` RGB in [0, 1] (official S = 512). The source-only work
    (`encode_identity`, `encode_motion` of the source, `adapt`, `decode_motion`, then
    `prepare_source`) is done once per video; `render` then turns driving motion maps into frames.
    """

    def __init__(self, cfg: RendererConfig | None = None):
        super().__init__()
        self.cfg = cfg or RendererConfig()
        self.dense_feature_encoder = IdentityEncoder(self.cfg)
        self.latent_token_encoder = MotionEncoder(self.cfg)
        self.latent_token_decoder = MotionDecoder(self.cfg)
        self.frame_decoder = SynthesisNetwork(self.cfg)
        self.adapt = IdentityAdaptive(self.cfg)
        self.imt = build_transfer_levels(self.cfg)

    def encode_identity(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Dense features (coarsest first) and identity vector `[B, identity_dim]`."""
        return self.dense_feature_encoder(images)

    def encode_motion(self, images: torch.Tensor) -> torch.Tensor:
        """Motion latents `[B, latent_dim]` (unadapted)."""
        return self.latent_token_encoder(images)

    def decode_motion(self, adapted: torch.Tensor) -> list[torch.Tensor]:
        """Motion maps, coarsest first, from adapted latents `[B, latent_dim]`."""
        return self.latent_token_decoder(adapted)

    def prepare_source(self, source_maps: list[torch.Tensor], features: list[torch.Tensor]) -> SourceCache:
        """The source-only work of `render`, done once per identity: the full-attention levels' key
        and value projections and the guided resampler's block means.

        `source_maps` (coarsest first, as from `decode_motion`) and `features` (as from
        `encode_identity`) have batch 1 (one source) or B; they must already be on the renderer's
        device and dtype. Pass the result as `render(driving_maps, source=...)`; prepare it again
        after moving or casting the renderer.
        """
        kv, pooled, sizes = [], [], []
        for i, level in enumerate(self.imt):
            sizes.append(features[i].shape[-1])
            if isinstance(level, CoarseTransfer):
                kv.append(level.prepare(source_maps[i], features[i]))
                pooled.append(None)
            else:
                kv.append(None)
                pooled.append(level.prepare(features[i]))
        return SourceCache(tuple(source_maps), tuple(features), tuple(kv), tuple(pooled), tuple(sizes))

    def render(self, driving_maps: list[torch.Tensor], source_maps: list[torch.Tensor] | None = None,
               features: list[torch.Tensor] | None = None, *, source: SourceCache | None = None) -> torch.Tensor:
        """Frames `[B, 3, S, S]` in [0, 1].

        `driving_maps` have batch B; the source comes either as `source_maps` and `features` (one
        source, batch 1, broadcast over B; or batch B), or as `source=prepare_source(...)`, which
        skips the source-only work; both give the same frames.
        """
        if source is None:
            if source_maps is None or features is None:
                raise TypeError("render needs source_maps and features, or source=prepare_source(...)")
            if not fast_paths_enabled():
                return self._render_plain(driving_maps, source_maps, features)
            source = self.prepare_source(source_maps, features)
        elif not fast_paths_enabled():
            return self._render_plain(driving_maps, list(source.source_maps), list(source.features))
        b = driving_maps[0].shape[0]
        if source.batch not in (1, b):
            raise ValueError(f"the source has batch {source.batch}; use 1 or the driving batch {b}")
        if source.dtype != driving_maps[0].dtype or source.device != driving_maps[0].device:
            raise ValueError(f"the source cache is {source.dtype} on {source.device} but the driving maps are "
                             f"{driving_maps[0].dtype} on {driving_maps[0].device}; prepare it again")
        aligned = []
        anchor_argmax = None
        n_coarse = sum(isinstance(level, CoarseTransfer) for level in self.imt)
        for i, level in enumerate(self.imt):
            if isinstance(level, CoarseTransfer):
                if i == n_coarse - 1:
                    out, anchor_argmax = level(driving_maps[i], return_argmax=True, kv=source.kv[i])
                else:
                    out = level(driving_maps[i], kv=source.kv[i])
            else:
                out = level(None, anchor_argmax, pooled=source.pooled[i], size=source.sizes[i])
            aligned.append(out)
        return self.frame_decoder(aligned)

    def _render_plain(self, driving_maps, source_maps, features):
        """`render` as it was before the fast paths (every source-only step repeated per call)."""
        b = driving_maps[0].shape[0]
        aligned = []
        anchor_argmax = None
        n_coarse = sum(isinstance(level, CoarseTransfer) for level in self.imt)
        for i, level in enumerate(self.imt):
            feat = features[i].expand(b, -1, -1, -1)
            if isinstance(level, CoarseTransfer):
                src = source_maps[i].expand(b, -1, -1, -1)
                if i == n_coarse - 1:
                    out, anchor_argmax = level(driving_maps[i], src, feat, return_argmax=True)
                else:
                    out = level(driving_maps[i], src, feat)
            else:
                out = level(feat, anchor_argmax)
            aligned.append(out)
        return self.frame_decoder(aligned)

    def forward(self, driving: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """Reenact: driving images `[B, 3, S, S]` and one source image `[1, 3, S, S]` → frames."""
        features, identity = self.encode_identity(source)
        source_maps = self.decode_motion(self.adapt(self.encode_motion(source), identity))
        driving_latent = self.adapt(self.encode_motion(driving), identity.expand(driving.shape[0], -1))
        return self.render(self.decode_motion(driving_latent), source_maps, features)
