"""imtalker_core: a weight-compatible IMTalker in pure PyTorch (no ComfyUI imports).

Quick start::

    import imtalker_core as imt
    renderer = imt.load_renderer("renderer.ckpt", device="cuda")
    # one read of generator.ckpt; wav2vec2 takes the file's copy of its weights when present
    generator, audio_encoder = imt.load_generator_and_audio_encoder("generator.ckpt", "wav2vec2-base-960h",
                                                                    device="cuda")
    identity = imt.encode_identity(renderer, image)              # [1, 3, 512, 512] in [0, 1]
    features = audio_encoder(waveform_16k)                        # [1, T, 768]
    motion = imt.generate_motion(generator, features, identity.motion, seed=42)
    frames = imt.render_frames(renderer, identity, motion)        # [T, 3, 512, 512]
"""
from __future__ import annotations

from .checkpoints import (convert_to_safetensors, load_audio_encoder, load_generator,
                          load_generator_and_audio_encoder, load_renderer)
from .config import GeneratorConfig, RendererConfig
from .errors import CheckpointError, IMTalkerError, InputError
from .generator import MotionGenerator
from .generator.audio import AudioEncoder
from .pipeline import (Identity, encode_identity, encode_motion, generate_motion, render_batches,
                       render_frames)
from .renderer import IMTRenderer
from .timing import frame_count

__version__ = "0.1.0"

__all__ = [
    "AudioEncoder", "CheckpointError", "GeneratorConfig", "IMTRenderer", "IMTalkerError", "Identity",
    "InputError", "MotionGenerator", "RendererConfig", "convert_to_safetensors", "encode_identity",
    "encode_motion", "frame_count", "generate_motion", "load_audio_encoder", "load_generator",
    "load_generator_and_audio_encoder", "load_renderer", "render_batches", "render_frames",
]
