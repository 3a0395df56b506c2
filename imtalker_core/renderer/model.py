"""The renderer under the official attribute names, so `gen.*` checkpoint entries load unchanged."""
from __future__ import annotations

import torch
from torch import nn

from ..config import RendererConfig
from .encoders import IdentityEncoder, MotionEncoder
from .motion import IdentityAdaptive, MotionDecoder
from .synthesis import SynthesisNetwork
from .transfer import CoarseTransfer, build_transfer_levels


class IMTRenderer(nn.Module):
    """IMTalker renderer (124,137,625 parameters in the official configuration).

    Images are `[B, 3, S, S]` RGB in [0, 1] (official S = 512). The source-only work
    (`encode_identity`, `encode_motion` of the source, `adapt`, `decode_motion`) is done once per
    video; `render` then turns driving motion maps into frames.
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

    def render(self, driving_maps: list[torch.Tensor], source_maps: list[torch.Tensor],
               features: list[torch.Tensor]) -> torch.Tensor:
        """Frames `[B, 3, S, S]` in [0, 1].

        `driving_maps` have batch B; `source_maps` and `features` belong to one source (batch 1,
        broadcast over B) or have batch B too.
        """
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
