"""Wire types of the IMTalker nodes and the small values that travel on them.

| type name            | value                                                                  |
|----------------------|------------------------------------------------------------------------|
| `IMTALKER_RENDERER`  | `ManagedModel` holding an `imtalker_core.IMTRenderer`                  |
| `IMTALKER_GENERATOR` | `GeneratorModels`: the motion generator and its wav2vec2 audio encoder |
| `IMTALKER_IDENTITY`  | `imtalker_core.Identity` (on the compute device, the renderer's dtype) |
| `IMTALKER_MOTION`    | `Motion`: latents `[T, 32]` float32 on the CPU and their frame rate    |
| `IMTALKER_CROP`      | `imtalker_core.media.CropBox`: where a face crop lies in its original  |
| `IMTALKER_CONTROLS`  | `ControlSequence` (alias `Controls`): optional pose/cam/gaze and fps   |

Core types (IMAGE, MASK, AUDIO, FLOAT, STRING) keep ComfyUI's conventions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..imtalker_core.controls.sequence import ControlSequence

RENDERER = "IMTALKER_RENDERER"
GENERATOR = "IMTALKER_GENERATOR"
IDENTITY = "IMTALKER_IDENTITY"
MOTION = "IMTALKER_MOTION"
CROP = "IMTALKER_CROP"
CONTROLS = "IMTALKER_CONTROLS"

CUSTOM_TYPES = (RENDERER, GENERATOR, IDENTITY, MOTION, CROP, CONTROLS)


@dataclass
class ManagedModel:
    """A model as passed between nodes: the module plus ComfyUI's `ModelPatcher` for it.

    module: the `nn.Module`, on the offload device until `bridge.ensure_loaded` moves it.
    patcher: the `comfy.model_patcher.ModelPatcher` wrapping it inside ComfyUI, None standalone.
    name: the file it came from, for logs and messages. dtype: the weight dtype.
    """

    module: torch.nn.Module
    patcher: Any | None
    name: str
    dtype: torch.dtype

    @property
    def load_device(self) -> torch.device:
        """The device the module computes on once loaded."""
        return self.patcher.load_device if self.patcher is not None else torch.device("cpu")


@dataclass
class GeneratorModels:
    """The motion generator and the wav2vec2 encoder whose features it consumes."""

    generator: ManagedModel
    audio_encoder: ManagedModel


@dataclass(frozen=True)
class Motion:
    """Motion latents, one per video frame.

    latents: `[T, 32]` float32 on the CPU (small, so it never holds device memory between
    nodes). fps: frames per second they were made for (25 for audio-driven motion, the driving
    video's rate for encoded motion).
    """

    latents: torch.Tensor
    fps: float

    def __post_init__(self) -> None:
        if self.latents.dim() != 2 or self.latents.shape[0] == 0:
            raise ValueError(f"motion latents must be [frames, dim] with at least one frame, "
                             f"got {list(self.latents.shape)}")
        if not self.fps > 0:
            raise ValueError(f"motion fps must be positive, got {self.fps}")

    @property
    def frames(self) -> int:
        return int(self.latents.shape[0])


#: `IMTALKER_CONTROLS` values: optional pose / cam / gaze sequences with their frame rate. Audio To
#: Motion resamples them to the generator's 25 fps and holds their last frame to the audio's length.
Controls = ControlSequence
