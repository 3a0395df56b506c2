"""The IMTalker pipeline as small composable steps: encode → generate → render.

Order of work (as in diffusers' pipelines): check inputs → encode the source once → generate or
encode motion → render in batches with progress and cancellation callbacks. No file I/O here.

Images are `[B, 3, S, S]` float RGB in [0, 1] with S the renderer's size (512); motion is
`[T, latent_dim]` latents (32), one per frame at 25 fps for audio-driven motion.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from .errors import InputError
from .generator import MotionGenerator
from .renderer import IMTRenderer
from .sampling import NOISE_MODES

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
Interrupt = Callable[[], None]


@dataclass
class Identity:
    """Everything the renderer needs from one source image, computed once per video.

    features: dense features, coarsest first (official `[1,512,8,8]` … `[1,32,256,256]`);
    vector: identity vector `[1, 512]`; motion: the source's motion latent `[1, 32]` (the
    generator's reference motion); motion_maps: decoded adapted source motion, coarsest first.
    All on the renderer's device and dtype.
    """

    features: list[torch.Tensor]
    vector: torch.Tensor
    motion: torch.Tensor
    motion_maps: list[torch.Tensor]

    def to(self, device=None, dtype=None) -> "Identity":
        move = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
        return Identity([move(f) for f in self.features], move(self.vector), move(self.motion),
                        [move(m) for m in self.motion_maps])


def _model_place(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def check_images(images: torch.Tensor, size: int, name: str = "images") -> torch.Tensor:
    """Validate `[B, 3, size, size]` images in [0, 1]; a 3-D tensor is taken as one image."""
    if images.dim() == 3:
        images = images[None]
    if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != (size, size):
        raise InputError(f"{name} must be RGB of shape [B, 3, {size}, {size}], got {list(images.shape)}; "
                         "crop/resize the image to the renderer's size first")
    if images.shape[0] == 0:
        raise InputError(f"{name} is an empty batch")
    if not torch.isfinite(images).all():
        raise InputError(f"{name} contains NaN or infinite values")
    # One memory layout for every caller: a channels-last view (e.g. a permuted HWC image) makes the
    # convolutions pick other kernels, whose different summation order can flip near-tied anchor
    # argmax picks and so change whole 8x8 blocks of the frame.
    return images.contiguous()


@torch.no_grad()
def encode_identity(renderer: IMTRenderer, image: torch.Tensor) -> Identity:
    """Encode one source image `[1, 3, S, S]` (or `[3, S, S]`) in [0, 1]."""
    image = check_images(image, renderer.cfg.image_size, "source image")
    if image.shape[0] != 1:
        raise InputError(f"encode one source image at a time, got a batch of {image.shape[0]}")
    device, dtype = _model_place(renderer)
    image = image.to(device=device, dtype=dtype)
    features, vector = renderer.encode_identity(image)
    motion = renderer.encode_motion(image)
    maps = renderer.decode_motion(renderer.adapt(motion, vector))
    return Identity(features, vector, motion, maps)


@torch.no_grad()
def encode_motion(renderer: IMTRenderer, images: torch.Tensor, batch_size: int = 8,
                  callback: Progress | None = None, check_interrupt: Interrupt | None = None) -> torch.Tensor:
    """Motion latents `[T, latent_dim]` (float32, on the renderer's device) of driving frames
    `[T, 3, S, S]` in [0, 1]; frames may live on the CPU and are moved batch by batch."""
    images = check_images(images, renderer.cfg.image_size, "driving frames")
    device, dtype = _model_place(renderer)
    out = []
    for start in range(0, images.shape[0], batch_size):
        if check_interrupt is not None:
            check_interrupt()
        batch = images[start:start + batch_size].to(device=device, dtype=dtype)
        out.append(renderer.encode_motion(batch).float())
        if callback is not None:
            callback(min(start + batch_size, images.shape[0]), images.shape[0])
    return torch.cat(out)


def _check_control(seq: torch.Tensor | None, width: int, name: str) -> torch.Tensor | None:
    if seq is None:
        return None
    seq = torch.as_tensor(seq, dtype=torch.float32)
    if seq.dim() != 2 or seq.shape[1] != width:
        raise InputError(f"{name} must be a [frames, {width}] sequence, got {list(seq.shape)}")
    if not torch.isfinite(seq).all():
        raise InputError(f"{name} contains NaN or infinite values")
    return seq


@torch.no_grad()
def generate_motion(generator: MotionGenerator, audio_features: torch.Tensor, reference_motion: torch.Tensor,
                    pose: torch.Tensor | None = None, cam: torch.Tensor | None = None,
                    gaze: torch.Tensor | None = None, cfg_scale: float = 3.0, steps: int = 10, seed: int = 42,
                    noise: str = "reference", noise_device: torch.device | str = "cpu", callback: Progress | None = None,
                    check_interrupt: Interrupt | None = None) -> torch.Tensor:
    """Motion latents `[T, 32]` (float32) from wav2vec2 features `[T, 768]` or `[1, T, 768]`.

    reference_motion: the source's motion latent `[1, 32]` (`Identity.motion`). pose `[T', 3]`,
    cam `[T', 3]` and gaze `[T', 2]` are optional per-frame controls (cropped or zero-padded to T).
    noise: "reference" (seed once, fresh noise for every 50-frame window: the reference's default)
    or "fixed_per_window" (every window starts from the same noise: its `--fix_noise_seed`); see
    `imtalker_core.sampling`. Noise is drawn on `noise_device` (CPU: the same motion on every device).
    """
    cfg = generator.cfg
    if audio_features.dim() == 2:
        audio_features = audio_features[None]
    if audio_features.dim() != 3 or audio_features.shape[0] != 1 or audio_features.shape[2] != cfg.audio_dim:
        raise InputError(f"audio features must be [T, {cfg.audio_dim}], got {list(audio_features.shape)}")
    if not torch.isfinite(audio_features).all():
        raise InputError("audio features contain NaN or infinite values; check the audio clip")
    if steps < 2:
        raise InputError(f"steps={steps}: use at least 2 (the time grid includes both ends)")
    if noise not in NOISE_MODES:
        raise InputError(f"noise={noise!r}: use one of {', '.join(NOISE_MODES)}")
    reference_motion = torch.as_tensor(reference_motion).reshape(1, -1)
    if reference_motion.shape[1] != cfg.motion_dim:
        raise InputError(f"reference motion must have {cfg.motion_dim} values, got {reference_motion.shape[1]}")
    sample = generator.sample(
        audio_features, reference_motion,
        pose=_check_control(pose, cfg.pose_dim, "pose"), cam=_check_control(cam, cfg.cam_dim, "cam"),
        gaze=_check_control(gaze, cfg.gaze_dim, "gaze"), cfg_scale=float(cfg_scale), steps=int(steps),
        seed=int(seed), noise=noise, noise_device=noise_device, callback=callback, check_interrupt=check_interrupt)
    return sample[0].float()


@torch.no_grad()
def render_batches(renderer: IMTRenderer, identity: Identity, motion: torch.Tensor, batch_size: int = 4,
                   output_device: torch.device | str | None = "cpu", callback: Progress | None = None,
                   check_interrupt: Interrupt | None = None) -> Iterator[torch.Tensor]:
    """Yield frames `[b, 3, S, S]` in [0, 1] (float32 on `output_device`) for motion `[T, 32]`.

    Work is done `batch_size` frames at a time on the renderer's device and each batch leaves it
    as soon as it is done, so device memory does not grow with T.
    """
    if motion.dim() != 2 or motion.shape[1] != renderer.cfg.latent_dim:
        raise InputError(f"motion must be [frames, {renderer.cfg.latent_dim}] latents, got {list(motion.shape)}")
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    device, dtype = _model_place(renderer)
    identity = identity.to(device=device, dtype=dtype)
    total = motion.shape[0]
    for start in range(0, total, batch_size):
        if check_interrupt is not None:
            check_interrupt()
        latents = motion[start:start + batch_size].to(device=device, dtype=dtype)
        vector = identity.vector.expand(latents.shape[0], -1)
        maps = renderer.decode_motion(renderer.adapt(latents, vector))
        frames = renderer.render(maps, identity.motion_maps, identity.features).float()
        yield frames.to(output_device) if output_device is not None else frames
        if callback is not None:
            callback(min(start + batch_size, total), total)


def render_frames(renderer: IMTRenderer, identity: Identity, motion: torch.Tensor, batch_size: int = 4,
                  output_device: torch.device | str | None = "cpu", callback: Progress | None = None,
                  check_interrupt: Interrupt | None = None) -> torch.Tensor:
    """All frames `[T, 3, S, S]` in [0, 1]; see `render_batches`."""
    return torch.cat(list(render_batches(renderer, identity, motion, batch_size, output_device,
                                         callback, check_interrupt)))
