"""Shared pieces of the training tests: one torch thread, and a stand-in motion encoder for data preparation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors on a shared 2-core machine: one thread avoids OpenMP contention (about 10x faster here).
    Imported by a test module, it applies to each of its tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class StandInMotionEncoder(nn.Module):
    """The renderer's interface for `prepare_clips` (`cfg.image_size`, `cfg.latent_dim`, `encode_motion`):
    a seeded linear map of 4x4-pooled frames, so latents are cheap and deterministic."""

    def __init__(self, size: int = 64):
        super().__init__()
        self.cfg = type("Cfg", (), {"image_size": size, "latent_dim": 32})()
        torch.manual_seed(0)
        self.proj = nn.Linear(3 * 4 * 4, 32)

    def encode_motion(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(F.adaptive_avg_pool2d(images, 4).flatten(1))
