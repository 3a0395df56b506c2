"""Frozen model configurations, with the official IMTalker values as defaults.

`RendererConfig()` and `GeneratorConfig()` are the official presets: they build models whose
state dicts match the official `renderer.ckpt` / `generator.ckpt` exactly. Smaller configs (see
`tiny_renderer_config`) exist for fast unit tests; they exercise the same code paths.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import timing


@dataclass(frozen=True)
class RendererConfig:
    """Dimensions of the IMTalker renderer (paper §3.2).

    `feature_dims` are the channel counts of the identity encoder's dense features, finest
    first; feature level i has spatial size `image_size / 2**(i+1)`. Levels coarser than
    `swin_res_threshold` use full cross-attention and transformer blocks; the others use the
    guided sparse resampler and shifted-window blocks.
    """

    image_size: int = 512
    feature_dims: tuple[int, ...] = (32, 64, 128, 256, 512, 512)
    identity_initial_channels: int = 32
    identity_dim: int = 512
    motion_initial_channels: int = 64
    motion_encoder_dims: tuple[int, ...] = (128, 256, 512, 512, 512)
    latent_dim: int = 32
    decoder_const_dim: int = 32
    num_heads: int = 8
    swin_res_threshold: int = 128
    window_size: int = 8
    adapter_depth: int = 4

    def __post_init__(self) -> None:
        if self.image_size % (2 ** len(self.feature_dims)):
            raise ValueError(f"image_size {self.image_size} must be divisible by 2**{len(self.feature_dims)}")
        coarse = [s for s in self.spatial_dims if s < self.swin_res_threshold]
        if len(coarse) != 4:
            raise ValueError(
                f"the motion decoder produces 4 motion maps; spatial sizes {self.spatial_dims} have "
                f"{len(coarse)} levels below swin_res_threshold={self.swin_res_threshold}")

    @property
    def spatial_dims(self) -> tuple[int, ...]:
        """Spatial size of each feature level, finest first (official: 256, 128, 64, 32, 16, 8)."""
        return tuple(self.image_size // 2 ** (i + 1) for i in range(len(self.feature_dims)))

    @property
    def anchor_resolution(self) -> int:
        """Resolution of the last full-attention level, whose attention map guides the finer ones."""
        return self.swin_res_threshold // 2


@dataclass(frozen=True)
class GeneratorConfig:
    """Dimensions and timing of the flow-matching motion generator (paper §3.3)."""

    audio_dim: int = 768
    motion_dim: int = 32
    cond_dim: int = 32
    pose_dim: int = 3
    cam_dim: int = 3
    gaze_dim: int = 2
    hidden_size: int = 512
    depth: int = 8
    num_heads: int = 8
    mlp_ratio: float = 4.0
    fps: float = float(timing.FPS)
    sample_rate: int = timing.SAMPLE_RATE
    window_frames: int = 50
    context_frames: int = 10
    rope_base: float = 10000.0
    rope_max_positions: int = 4096
    time_embedding_dim: int = 256

    @property
    def samples_per_frame(self) -> int:
        """Audio samples per video frame (official: 16000 / 25 = 640)."""
        return timing.samples_per_frame(self.fps, self.sample_rate)


def tiny_renderer_config() -> RendererConfig:
    """A renderer with the official structure at 128² and a few channels, for unit tests."""
    return RendererConfig(
        image_size=128,
        feature_dims=(8, 8, 16, 16, 32, 32),
        identity_initial_channels=8,
        identity_dim=32,
        motion_initial_channels=8,
        motion_encoder_dims=(8, 16, 16, 32, 32),
        latent_dim=32,
        decoder_const_dim=8,
        num_heads=2,
        swin_res_threshold=32,
        window_size=8,
        adapter_depth=2,
    )


def tiny_generator_config() -> GeneratorConfig:
    """A generator with the official structure and a few channels, for unit tests."""
    return GeneratorConfig(audio_dim=16, hidden_size=32, depth=2, num_heads=2)
