"""Frame timing: the one home of IMTalker's video frame rate, audio sample rate and frame-count rule.

The model runs at 25 video frames per second on 16 kHz audio, so one frame covers 640 samples.
The configuration (`config.GeneratorConfig`), the audio encoder and the media code all read these.
"""
from __future__ import annotations

import math
from fractions import Fraction

from .errors import InputError

#: Video frames per second of the motion the generator produces.
FPS = 25
#: Sample rate (Hz) of the audio wav2vec2 listens to.
SAMPLE_RATE = 16000


def samples_per_frame(fps: int | float = FPS, sample_rate: int = SAMPLE_RATE) -> int:
    """Audio samples per video frame (640 at the official 16 kHz and 25 fps)."""
    return int(sample_rate / fps)


def frame_count(num_samples: int, fps: int | float | Fraction = FPS, sample_rate: int = SAMPLE_RATE) -> int:
    """Number of video frames for `num_samples` audio samples: `ceil(n * fps / sample_rate)`.

    Integer arithmetic (exact rational for fractional fps such as 30000/1001), so e.g. 16000
    samples at 25 fps are exactly 25 frames, never 26 from a rounding error.
    """
    if num_samples < 0:
        raise InputError(f"the number of audio samples cannot be negative, got {num_samples}")
    if not fps > 0 or sample_rate <= 0:
        raise InputError(f"fps and sample_rate must be positive, got fps={fps}, sample_rate={sample_rate}")
    if isinstance(fps, int) or (isinstance(fps, float) and fps.is_integer()):
        return -(-int(num_samples) * int(fps) // int(sample_rate))
    # A float like 29.97 means 2997/100, not its binary approximation (which is slightly less
    # and would lose a frame on exact boundaries).
    rate = fps if isinstance(fps, Fraction) else Fraction(fps).limit_denominator(1_000_000)
    return math.ceil(int(num_samples) * rate / int(sample_rate))
