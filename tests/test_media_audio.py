"""Tests for imtalker_core.media.audio: decoding, mono/16 kHz conversion, frame counts, checks."""
from __future__ import annotations

import logging
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile
import torch

from imtalker_core.errors import InputError
from imtalker_core.media.audio import check_audio, load_audio, to_mono_16k
from imtalker_core.timing import frame_count

DATA = Path(__file__).parent / "data" / "media"


def _tone(seconds: float, rate: int, freq: float = 440.0, channels: int = 1) -> np.ndarray:
    """float32 [C, S] sine, each channel at a different amplitude so mixing is observable."""
    t = np.arange(round(seconds * rate)) / rate
    wave = np.sin(2 * np.pi * freq * t).astype(np.float32)
    return np.stack([wave * (0.5 / (c + 1)) for c in range(channels)])


def _encode_with_pyav(path: Path, codec: str, waveform: np.ndarray, rate: int) -> None:
    """Write [C, S] float audio with PyAV (MP3/M4A test inputs) in the container implied by path."""
    layout = "mono" if waveform.shape[0] == 1 else "stereo"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.layout = layout
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(waveform), format="fltp", layout=layout)
        frame.sample_rate = rate
        frame.pts = 0
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def test_vendored_wavs() -> None:
    mono, rate = load_audio(DATA / "speech_16k_mono.wav")
    assert rate == 16000 and mono.dtype == np.float32 and mono.shape[0] == 1
    assert mono.shape[1] == soundfile.info(str(DATA / "speech_16k_mono.wav")).frames
    stereo, rate = load_audio(DATA / "speech_44k_stereo.wav")
    assert rate == 44100 and stereo.shape[0] == 2
    assert np.abs(stereo).max() <= 1.0 and np.abs(stereo).max() > 0.05


@pytest.mark.parametrize("fmt", [("flac", "PCM_24"), ("ogg", "VORBIS"), ("wav", "FLOAT")])
def test_soundfile_formats(tmp_path: Path, fmt: tuple[str, str]) -> None:
    ext, subtype = fmt
    wave = _tone(0.5, 22050, channels=2)
    soundfile.write(tmp_path / f"a.{ext}", wave.T, 22050, subtype=subtype)
    loaded, rate = load_audio(tmp_path / f"a.{ext}")
    assert rate == 22050 and loaded.shape == wave.shape
    tolerance = 0.05 if ext == "ogg" else 1e-4
    np.testing.assert_allclose(loaded, wave, atol=tolerance)


@pytest.mark.parametrize("ext, codec", [("mp3", "libmp3lame"), ("m4a", "aac")])
def test_compressed_formats_via_pyav(tmp_path: Path, ext: str, codec: str) -> None:
    wave = _tone(1.0, 44100, channels=2)
    _encode_with_pyav(tmp_path / f"a.{ext}", codec, wave, 44100)
    loaded, rate = load_audio(tmp_path / f"a.{ext}")
    assert rate == 44100 and loaded.shape[0] == 2 and loaded.dtype == np.float32
    # Encoders add priming/padding samples; the length is right to within a few codec frames.
    assert abs(loaded.shape[1] - 44100) < 3000
    # Lossy, but each channel keeps its own level (RMS of a sine is amplitude / sqrt 2);
    # the middle avoids encoder transients at the abrupt start and end.
    rms = np.sqrt(np.mean(loaded[:, 10000:30000] ** 2, axis=1))
    np.testing.assert_allclose(rms, np.array([0.5, 0.25]) / np.sqrt(2), rtol=0.05)


def test_audio_track_of_a_video() -> None:
    waveform, rate = load_audio(DATA / "driving_short.mp4")
    assert rate == 44100 and waveform.shape[0] == 2
    assert abs(waveform.shape[1] / rate - 4.0) < 0.1  # the clip is 100 frames at 25 fps


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"not found: .*nothing\.wav"):
        load_audio(tmp_path / "nothing.wav")
    (tmp_path / "noise.mp3").write_bytes(b"\x00\x01garbage" * 50)
    with pytest.raises(InputError, match=r"noise\.mp3"):
        load_audio(tmp_path / "noise.mp3")
    with pytest.raises(InputError, match="is not a file"):
        load_audio(tmp_path)


def test_file_without_audio_stream(tmp_path: Path) -> None:
    path = tmp_path / "silent_movie.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for i in range(3):
            frame = av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    with pytest.raises(InputError, match=r"silent_movie\.mp4' has no audio stream"):
        load_audio(path)


def test_zero_length_audio(tmp_path: Path) -> None:
    soundfile.write(tmp_path / "empty.wav", np.zeros((0, 1), np.float32), 16000)
    with pytest.raises(InputError, match=r"empty\.wav' contains no audio samples \(zero length\)"):
        load_audio(tmp_path / "empty.wav")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_and_inf_samples(tmp_path: Path, bad: float) -> None:
    wave = _tone(0.1, 16000)[0]
    wave[100] = bad
    soundfile.write(tmp_path / "broken.wav", wave, 16000, subtype="FLOAT")
    with pytest.raises(InputError, match=r"broken\.wav' contains NaN or infinite samples"):
        load_audio(tmp_path / "broken.wav")


def test_to_mono_16k_mixes_and_resamples(caplog: pytest.LogCaptureFixture) -> None:
    stereo = _tone(1.0, 44100, freq=300.0, channels=2)  # amplitudes 0.5 and 0.25
    with caplog.at_level(logging.INFO, logger="imtalker_core.media.audio"):
        mono = to_mono_16k(stereo, 44100)
    assert mono.dtype == np.float32 and mono.ndim == 1 and mono.shape[0] == 16000
    assert "mixing 2 audio channels" in caplog.text and "44100 Hz to 16000 Hz" in caplog.text
    # Average of the channels: a 300 Hz sine at amplitude 0.375, faithfully resampled.
    expected = 0.375 * np.sin(2 * np.pi * 300.0 * np.arange(16000) / 16000)
    np.testing.assert_allclose(mono[200:-200], expected[200:-200], atol=2e-3)


def test_to_mono_16k_removes_content_above_nyquist() -> None:
    wave = _tone(1.0, 48000, freq=12000.0)  # above the 8 kHz Nyquist limit of 16 kHz audio
    mono = to_mono_16k(wave, 48000)
    assert np.abs(mono[500:-500]).max() < 0.01  # filtered out, not aliased to 4 kHz


def test_to_mono_16k_passthrough_and_inputs(caplog: pytest.LogCaptureFixture) -> None:
    wave = _tone(0.25, 16000)
    with caplog.at_level(logging.INFO, logger="imtalker_core.media.audio"):
        mono = to_mono_16k(wave[0], 16000)
    np.testing.assert_array_equal(mono, wave[0])
    assert "resampling" not in caplog.text and "mixing" not in caplog.text
    np.testing.assert_array_equal(to_mono_16k(torch.from_numpy(wave), 16000), wave[0])
    np.testing.assert_array_equal(to_mono_16k(torch.from_numpy(wave)[None], 16000), wave[0])
    assert to_mono_16k(np.zeros((2, 0), np.float32), 44100).shape == (0,)
    with pytest.raises(InputError, match=r"looks like \[samples, channels\]"):
        to_mono_16k(np.zeros((4000, 2), np.float32), 16000)
    with pytest.raises(InputError, match="sample rates must be positive"):
        to_mono_16k(wave, 0)


@pytest.mark.parametrize("samples, fps, rate, expected", [
    (0, 25, 16000, 0), (1, 25, 16000, 1), (640, 25, 16000, 1), (641, 25, 16000, 2),
    (16000, 25, 16000, 25), (16001, 25, 16000, 26), (159_376, 25, 16000, 250),
    (10**12, 25, 16000, 1_562_500_000), (16000, 25.0, 16000, 25),
    (1001, Fraction(30000, 1001), 30000, 1), (30000, Fraction(30000, 1001), 30000, 30),
    (30001, 29.97, 30000, 30), (160_000, 24.1, 16000, 241),
])
def test_frame_count(samples: int, fps: int | float | Fraction, rate: int, expected: int) -> None:
    assert frame_count(samples, fps, rate) == expected


def test_frame_count_is_exact_where_floats_are_not() -> None:
    for n in range(0, 20000, 37):
        assert frame_count(n) == int(np.ceil(Fraction(n * 25, 16000)))
    # One sample past a whole number of frames: the quotient's fraction (1/640) is below float64
    # resolution at this size, so float ceil(n * 25 / 16000) would miss the extra frame.
    n = 640 * 2**50 + 1
    assert frame_count(n) == 2**50 + 1
    with pytest.raises(InputError, match="negative"):
        frame_count(-1)
    with pytest.raises(InputError, match="must be positive"):
        frame_count(10, fps=0)


def test_check_audio(caplog: pytest.LogCaptureFixture) -> None:
    check_audio(_tone(0.1, 16000)[0])  # normal speech-level audio passes quietly
    with pytest.raises(InputError, match="speech.wav is empty"):
        check_audio(np.zeros(0, np.float32), name="speech.wav")
    with pytest.raises(InputError, match="NaN or infinite"):
        check_audio(np.array([0.1, np.nan], np.float32))
    with caplog.at_level(logging.WARNING, logger="imtalker_core.media.audio"):
        check_audio(np.zeros(16000, np.float32), name="quiet.wav")
    assert "quiet.wav is silent" in caplog.text
