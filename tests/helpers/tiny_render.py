"""A tiny renderer with an encoded identity and random motion, for tests of the rendering pipeline."""
from __future__ import annotations

import torch

from imtalker_core import IMTRenderer, encode_identity
from imtalker_core.config import tiny_renderer_config


def tiny_render_case(frames: int):
    """(renderer in eval mode without gradients, its identity of a random portrait, motion `[frames, 32]`), seeded."""
    torch.manual_seed(0)
    model = IMTRenderer(tiny_renderer_config()).eval().requires_grad_(False)
    identity = encode_identity(model, torch.rand(1, 3, model.cfg.image_size, model.cfg.image_size))
    motion = torch.randn(frames, model.cfg.latent_dim, generator=torch.Generator().manual_seed(1))
    return model, identity, motion
