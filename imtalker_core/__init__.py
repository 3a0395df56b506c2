"""imtalker_core: a weight-compatible IMTalker in pure PyTorch (no ComfyUI imports).

Quick start::

    import imtalker_core as imt
    renderer = imt.load_renderer("renderer.ckpt", device="cuda")
    generator = imt.load_generator("generator.ckpt", device="cuda")
    audio_encoder = imt.load_audio_encoder("wav2vec2-base-960h", device="cuda")
    identity = imt.encode_identity(renderer, image)              # [1, 3, 512, 512] in [0, 1]
    features = audio_encoder(waveform_16k)                        # [1, T, 768]
    motion = imt.generate_motion(generator, features, identity.motion, seed=42)
    frames = imt.render_frames(renderer, identity, motion)        # [T, 3, 512, 512]
"""
from __future__ import annotations

import os

import torch

from .checkpoints import convert_to_safetensors, load_generator, load_renderer
from .config import GeneratorConfig, RendererConfig
from .errors import CheckpointError, IMTalkerError, InputError
from .generator import MotionGenerator
from .generator.audio import AudioEncoder
from .media.audio import frame_count
from .pipeline import (Identity, encode_identity, encode_motion, generate_motion, render_batches,
                       render_frames)
from .renderer import IMTRenderer

__version__ = "0.1.0"


def load_audio_encoder(folder: str | os.PathLike, device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32) -> AudioEncoder:
    """wav2vec2 from a local folder (`wav2vec2-base-960h/`), in eval mode on `device`."""
    return AudioEncoder.from_folder(folder).to(device=device, dtype=dtype).eval().requires_grad_(False)


__all__ = [
    "AudioEncoder", "CheckpointError", "GeneratorConfig", "IMTRenderer", "IMTalkerError", "Identity",
    "InputError", "MotionGenerator", "RendererConfig", "convert_to_safetensors", "encode_identity",
    "encode_motion", "frame_count", "generate_motion", "load_audio_encoder", "load_generator",
    "load_renderer", "render_batches", "render_frames",
]
