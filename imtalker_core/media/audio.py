"""Loading driving audio and preparing it for wav2vec2 (16 kHz mono float32).

`load_audio` reads WAV/FLAC/OGG (and whatever else libsndfile knows) with soundfile and falls
back to PyAV (FFmpeg) for MP3, M4A/AAC, OPUS, and the audio track of video files. Waveforms are
float32 ``[C, S]`` with samples nominally in ``[-1, 1]``. `to_mono_16k` mixes channels by
averaging and resamples with soxr (high quality). `frame_count` (from `imtalker_core.timing`) is
the reference's video length rule, ``ceil(samples * fps / sample_rate)``, in exact integer arithmetic.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import av
import numpy as np
import soundfile
import soxr
import torch

from ..errors import InputError
from .files import existing_file

logger = logging.getLogger(__name__)

#: Peak amplitude below which audio counts as silent (-80 dBFS).
SILENCE_PEAK = 1e-4
#: More channels than this on axis 0 means the array is probably ``[S, C]``.
_MAX_CHANNELS = 64


def load_audio(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Read an audio file (or the first audio track of a video) as ``(float32 [C, S], sample_rate)``.

    Raises `InputError`, naming the file and the problem, for a missing file, a file neither
    soundfile nor FFmpeg can decode, a file without an audio stream, zero-length audio, or
    NaN/Inf samples.
    """
    path = existing_file(path, "audio")
    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
        waveform = np.ascontiguousarray(data.T)
        logger.debug("read %s with soundfile", path)
    except RuntimeError as sf_exc:  # soundfile.LibsndfileError and its relatives
        # libsndfile does not know the container (mp3 on old builds, m4a, video files): use FFmpeg.
        logger.debug("soundfile cannot read %s (%s); trying PyAV", path, sf_exc)
        waveform, rate = _load_with_pyav(path)
    if waveform.shape[1] == 0:
        raise InputError(f"'{path.name}' contains no audio samples (zero length); use a file with speech in it.")
    if not np.isfinite(waveform).all():
        raise InputError(f"'{path.name}' contains NaN or infinite samples; the file is corrupt. "
                         "Re-export it (e.g. as 16-bit WAV).")
    logger.info("loaded %s: %d channel(s), %d Hz, %.2f s", path.name, waveform.shape[0], rate,
                waveform.shape[1] / rate)
    return waveform, int(rate)


def probe_audio(path: str | os.PathLike) -> tuple[int, int]:
    """``(sample_rate, channels)`` of an audio file (or a video's sound track) from its header only.

    A cheap check before any model loads: raises `InputError` like `load_audio` for a missing file,
    one neither soundfile nor FFmpeg can open, or one without an audio stream.
    """
    path = existing_file(path, "audio")
    try:
        info = soundfile.info(str(path))
        return int(info.samplerate), int(info.channels)
    except RuntimeError:  # not a libsndfile format: ask FFmpeg
        pass
    container, stream = _open_audio_stream(path)
    with container:
        return int(stream.rate or 0), int(stream.channels or 0)


def _open_audio_stream(path: Path):
    """`(container, first audio stream)` opened with FFmpeg; `InputError` when there is none."""
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as exc:
        raise InputError(f"Could not read audio from '{path.name}': {exc}. Use WAV, FLAC, OGG, MP3, M4A/AAC, "
                         "or a video file with a sound track.") from exc
    if not container.streams.audio:
        container.close()
        raise InputError(f"'{path.name}' has no audio stream; give a file with sound "
                         "(a video without a sound track cannot drive the face).")
    return container, container.streams.audio[0]


def _load_with_pyav(path: Path) -> tuple[np.ndarray, int]:
    """Decode the first audio stream with FFmpeg into float32 ``[C, S]``."""
    container, stream = _open_audio_stream(path)
    with container:
        # Planar float output gives [C, S] per frame; layout and rate stay as decoded.
        resampler = av.AudioResampler(format="fltp")
        chunks: list[np.ndarray] = []
        rate = 0
        try:
            for frame in container.decode(stream):
                for converted in resampler.resample(frame):
                    rate = converted.sample_rate
                    chunks.append(converted.to_ndarray())
            for converted in resampler.resample(None):
                chunks.append(converted.to_ndarray())
        except av.FFmpegError as exc:
            raise InputError(f"Could not decode the audio of '{path.name}': {exc}. The file may be damaged; "
                             "re-export it.") from exc
        if not chunks:
            return np.zeros((max(1, stream.channels or 1), 0), dtype=np.float32), stream.rate or 16000
    return np.ascontiguousarray(np.concatenate(chunks, axis=1), dtype=np.float32), int(rate)


def _as_channels_first(waveform: np.ndarray | torch.Tensor) -> np.ndarray:
    """``[S]``, ``[C, S]`` or ``[1, C, S]`` (numpy or torch) -> float32 numpy ``[C, S]``."""
    if isinstance(waveform, torch.Tensor):
        waveform = waveform.detach().cpu().numpy()
    array = np.asarray(waveform, dtype=np.float32)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2:
        raise InputError(f"expected a waveform shaped [S] or [C, S], got shape {array.shape}")
    if array.shape[0] > _MAX_CHANNELS and array.shape[1] <= _MAX_CHANNELS:
        raise InputError(f"the waveform is shaped {array.shape}, which looks like [samples, channels]; "
                         "pass it as [channels, samples] (transpose it).")
    return array


def to_mono_16k(waveform: np.ndarray | torch.Tensor, sample_rate: int, target: int = 16000) -> np.ndarray:
    """Average channels and resample to ``target`` Hz: ``[C, S]`` or ``[S]`` -> float32 ``[S_target]``.

    Resampling uses soxr at high quality ('HQ'); output length is ``round(S * target / rate)``.
    Mixing and resampling are logged at INFO level.
    """
    if sample_rate <= 0 or target <= 0:
        raise InputError(f"sample rates must be positive, got {sample_rate} -> {target}")
    array = _as_channels_first(waveform)
    if array.shape[0] > 1:
        logger.info("mixing %d audio channels to mono by averaging", array.shape[0])
        mono = array.mean(axis=0, dtype=np.float32)
    else:
        mono = array[0]
    if sample_rate != target:
        logger.info("resampling audio from %d Hz to %d Hz (soxr HQ)", sample_rate, target)
        if mono.size:
            mono = soxr.resample(mono, sample_rate, target, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def check_audio(waveform_16k: np.ndarray | torch.Tensor, name: str = "the audio") -> None:
    """Validate driving audio before inference; ``name`` appears in messages.

    Empty audio or NaN/Inf samples raise `InputError`. Silence (peak below `SILENCE_PEAK`) is
    valid input (the face stays closed-mouthed), so it only logs a warning.
    """
    array = _as_channels_first(waveform_16k)
    if array.size == 0:
        raise InputError(f"{name} is empty (zero samples); give audio with speech in it.")
    if not np.isfinite(array).all():
        raise InputError(f"{name} contains NaN or infinite samples; re-export or regenerate it.")
    peak = float(np.abs(array).max())
    if peak < SILENCE_PEAK:
        logger.warning("%s is silent (peak amplitude %.2g); the face will barely move", name, peak)
