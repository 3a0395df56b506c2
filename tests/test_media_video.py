"""Tests for imtalker_core.media.video: reading frames, and writing H.264/AAC MP4 files safely."""
from __future__ import annotations

import errno
import gc
import logging
import os
import stat
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import soundfile
import torch

import imtalker_core.media.video as video_module
from imtalker_core.errors import InputError
from imtalker_core.media.video import (OutputWriteError, VideoWriter, check_output_path, read_video, video_info,
                                        write_video)

DATA = Path(__file__).parent / "data" / "media"
DRIVING = DATA / "driving_short.mp4"


def _frames(count: int, height: int = 64, width: int = 80, seed: int = 0) -> np.ndarray:
    """Smooth moving float frames [T, H, W, 3] in [0, 1] (compress well, decode recognisably)."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    t = np.arange(count)[:, None, None] / 10 + seed
    base = 0.5 + 0.4 * np.sin(2 * np.pi * (x[None] + y[None] + t))
    return np.stack([base, np.roll(base, 5, axis=2), 1 - base], axis=-1).astype(np.float32)


def _probe(path: Path) -> dict[str, Any]:
    """Decode a written file back with PyAV and summarise its streams."""
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        result: dict[str, Any] = {
            "codec": video.codec_context.name, "pix_fmt": video.codec_context.pix_fmt,
            "fps": video.average_rate, "size": (video.height, video.width),
            "duration": float(video.duration * video.time_base),
            "audio": None,
        }
        if container.streams.audio:
            audio = container.streams.audio[0]
            result["audio"] = {"codec": audio.codec_context.name, "rate": audio.rate,
                               "channels": audio.codec_context.channels,
                               "duration": float(audio.duration * audio.time_base)}
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    result["frames"] = np.stack(frames)
    return result


def test_read_driving_video() -> None:
    frames = list(read_video(DRIVING))
    assert len(frames) == 100
    assert all(f.shape == (512, 512, 3) and f.dtype == np.uint8 for f in frames[:3])
    assert not np.array_equal(frames[0], frames[50])  # the head moves
    assert len(list(read_video(DRIVING, max_frames=7))) == 7
    assert list(read_video(DRIVING, max_frames=0)) == []


def test_video_info() -> None:
    info = video_info(DRIVING)
    assert info.fps == 25.0 and (info.width, info.height) == (512, 512)
    assert abs(info.frame_count_estimate - 100) <= 1 and info.has_audio and info.rotation == 0


def test_read_video_errors_are_raised_at_the_call(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"not found: .*missing\.mp4"):
        read_video(tmp_path / "missing.mp4")  # no next(): the check is eager
    (tmp_path / "junk.mp4").write_bytes(b"not a video" * 100)
    with pytest.raises(InputError, match=r"Could not read video 'junk\.mp4'"):
        read_video(tmp_path / "junk.mp4")
    soundfile.write(tmp_path / "voice.wav", np.zeros(1600, np.float32), 16000)
    with pytest.raises(InputError, match=r"voice\.wav' has no video stream"):
        video_info(tmp_path / "voice.wav")
    with pytest.raises(InputError, match=r"voice\.wav' has no video stream"):
        read_video(tmp_path / "voice.wav")


def test_rotation_metadata_is_applied(tmp_path: Path) -> None:
    # Stored landscape with a white stripe on the left, flagged like a phone portrait video.
    if not hasattr(av.video.stream.VideoStream, "set_display_rotation"):
        pytest.skip(f"PyAV {av.__version__} cannot write rotation metadata (needs a newer PyAV)")
    stored = np.zeros((32, 64, 3), np.uint8)
    stored[:, :8] = 255
    path = tmp_path / "portrait.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        stream.set_display_rotation(-90)
        for i in range(2):
            frame = av.VideoFrame.from_ndarray(stored, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    frame = next(read_video(path))
    assert frame.shape == (64, 32, 3)  # upright portrait
    assert frame[:6].mean() > 200 and frame[10:].mean() < 30  # left stripe turned clockwise to the top
    info = video_info(path)
    assert (info.width, info.height, info.rotation) == (32, 64, -90 % 360)


def test_write_video_with_audio_round_trip(tmp_path: Path) -> None:
    frames = _frames(30)
    rate = 16000
    waveform = (0.3 * np.sin(2 * np.pi * 440 * np.arange(int(1.2 * rate)) / rate)).astype(np.float32)[None]
    out = tmp_path / "result.mp4"
    with VideoWriter(out, fps=25, audio=(waveform, rate)) as writer:
        for start in range(0, 30, 8):  # batches as they come from the renderer
            writer.write(frames[start:start + 8])
    assert out.exists() and not (tmp_path / "result.partial.mp4").exists()
    probe = _probe(out)
    assert probe["codec"] == "h264" and probe["pix_fmt"] == "yuv420p"
    assert probe["fps"] == 25 and probe["size"] == (64, 80)
    assert len(probe["frames"]) == 30
    assert abs(probe["duration"] - 30 / 25) <= 1 / 25
    audio = probe["audio"]
    assert audio["codec"] == "aac" and audio["rate"] == 16000 and audio["channels"] == 1
    assert abs(audio["duration"] - 30 / 25) <= 1 / 25  # 1.2 s of sound for 1.2 s of video
    # H.264 at crf 18 is lossy but close.
    decoded = probe["frames"].astype(np.float32) / 255
    assert np.abs(decoded - frames).mean() < 0.02


def test_audio_longer_than_video_is_trimmed_and_stereo_kept(tmp_path: Path) -> None:
    waveform, rate = soundfile.read(DATA / "speech_44k_stereo.wav", dtype="float32", always_2d=True)
    out = write_video(tmp_path / "a.mp4", _frames(25), fps=25, audio=(torch.from_numpy(waveform.T.copy()), rate))
    audio = _probe(out)["audio"]
    assert audio["rate"] == 44100 and audio["channels"] == 2
    assert abs(audio["duration"] - 1.0) <= 1 / 25  # the 7.7 s file is cut to the 1 s video


def test_unusual_sample_rate_and_many_channels(tmp_path: Path) -> None:
    waveform = np.random.default_rng(0).uniform(-0.1, 0.1, (3, 22000)).astype(np.float32)
    out = write_video(tmp_path / "odd.mp4", _frames(25), fps=25, audio=(waveform, 22000))
    audio = _probe(out)["audio"]
    assert audio["rate"] == 48000 and audio["channels"] == 1
    assert abs(audio["duration"] - 1.0) <= 1 / 25


def test_odd_frame_size_is_padded(tmp_path: Path) -> None:
    frames = (_frames(3, 33, 47) * 255).round().astype(np.uint8)
    out = write_video(tmp_path / "odd.mp4", frames, fps=25)
    probe = _probe(out)
    assert probe["size"] == (34, 48) and len(probe["frames"]) == 3
    # The padded row/column repeats the edge, so the border does not turn black or green.
    np.testing.assert_allclose(probe["frames"][:, -1].astype(float), probe["frames"][:, -2].astype(float), atol=12)
    assert probe["audio"] is None


def test_inputs_uint8_float_torch_single_frames_and_fractional_fps(tmp_path: Path) -> None:
    frames = _frames(4)
    out = tmp_path / "mixed.mp4"
    with VideoWriter(out, fps=Fraction(30000, 1001)) as writer:
        writer.write(frames[0])  # a single [H, W, 3] frame
        writer.write(torch.from_numpy(frames[1:2]))
        writer.write((frames[2:] * 255).round().astype(np.uint8))
        with pytest.raises(InputError, match="all frames must have one size: got 40x64, but the video is 80x64"):
            writer.write(np.zeros((1, 64, 40, 3), np.uint8))
        with pytest.raises(InputError, match=r"\[B, H, W, 3\].*\(1, 64, 80\)"):
            writer.write(np.zeros((1, 64, 80), np.uint8))
    probe = _probe(out)
    assert len(probe["frames"]) == 4 and probe["fps"] == Fraction(30000, 1001)


def test_crf_is_passed_to_the_encoder(tmp_path: Path) -> None:
    frames = _frames(10)
    fine = write_video(tmp_path / "fine.mp4", frames, fps=25, crf=5, preset="ultrafast")
    coarse = write_video(tmp_path / "coarse.mp4", frames, fps=25, crf=45, preset="ultrafast")
    assert fine.stat().st_size > 2 * coarse.stat().st_size
    with pytest.raises(InputError, match="crf must be between 0.*got 60"):
        VideoWriter(tmp_path / "x.mp4", 25, crf=60)
    with pytest.raises(InputError, match="preset must be one of ultrafast.*got 'quick'"):
        VideoWriter(tmp_path / "x.mp4", 25, preset="quick")
    with pytest.raises(InputError, match="fps must be positive, got 0"):
        VideoWriter(tmp_path / "x.mp4", 0)
    assert sorted(os.listdir(tmp_path)) == ["coarse.mp4", "fine.mp4"]  # refused before creating files


def _write_until_on_disk(writer: VideoWriter, limit: int = 40) -> None:
    """Write batches until FFmpeg has created the partial file (libx264 holds the first frames back)."""
    for seed in range(limit):
        writer.write(_frames(5, seed=seed))
        if writer.partial_path.exists():
            return
    raise AssertionError(f"{writer.partial_path} was never created")


@pytest.mark.parametrize("exc_type", [RuntimeError, KeyboardInterrupt])
def test_exception_inside_writer_removes_partial(tmp_path: Path, exc_type: type[BaseException]) -> None:
    out = tmp_path / "broken.mp4"
    with pytest.raises(exc_type):
        with VideoWriter(out, fps=25) as writer:
            _write_until_on_disk(writer)
            assert writer.partial_path.name == "broken.partial.mp4"
            raise exc_type("stop")
    assert sorted(os.listdir(tmp_path)) == []


def test_keep_partial(tmp_path: Path) -> None:
    out = tmp_path / "kept.mp4"
    with pytest.raises(RuntimeError):
        with VideoWriter(out, fps=25, keep_partial=True) as writer:
            _write_until_on_disk(writer)
            raise RuntimeError("stop")
    assert sorted(os.listdir(tmp_path)) == ["kept.partial.mp4"]


def test_existing_file_is_replaced_only_on_success(tmp_path: Path) -> None:
    out = tmp_path / "result.mp4"
    write_video(out, _frames(5), fps=25)
    before = out.read_bytes()
    with pytest.raises(RuntimeError):
        with VideoWriter(out, fps=25) as writer:
            writer.write(_frames(8, seed=3))
            raise RuntimeError("stop")
    assert out.read_bytes() == before  # the old result survives a failed run
    write_video(out, _frames(8, seed=3), fps=25)
    assert len(_probe(out)["frames"]) == 8


def test_no_frames_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"no frames were written to .*empty\.mp4"):
        write_video(tmp_path / "empty.mp4", [], fps=25)
    assert os.listdir(tmp_path) == []


def test_unwritable_folder(tmp_path: Path) -> None:
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as root (or on a filesystem without permissions): the folder stays writable")
        with pytest.raises(InputError, match=r"output folder '.*locked' is not writable"):
            VideoWriter(folder / "out.mp4", fps=25)
    finally:
        folder.chmod(stat.S_IRWXU)


def test_unwritable_folder_simulated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Same check without relying on permissions, so it also runs as root.
    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(video_module.tempfile, "TemporaryFile", refuse)
    with pytest.raises(InputError, match=r"output folder '.*' is not writable \(Permission denied\)"):
        VideoWriter(tmp_path / "out.mp4", fps=25)


def test_output_folder_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match=r"Cannot create the output folder '.*file'"):
        VideoWriter(tmp_path / "file" / "out.mp4", fps=25)


def test_missing_output_folder_is_created(tmp_path: Path) -> None:
    out = write_video(tmp_path / "new" / "deeper" / "out.mp4", _frames(2), fps=25)
    assert out.exists()


class _FullDisk:
    """Stands in for the PyAV container: every write fails with ENOSPC, close still works."""

    def __init__(self, container: Any, fail_on: str) -> None:
        self._container = container
        self._fail_on = fail_on

    def __getattr__(self, name: str) -> Any:
        return getattr(self._container, name)

    def mux(self, packet: Any) -> None:
        if self._fail_on == "mux":
            raise OSError(errno.ENOSPC, "No space left on device")
        self._container.mux(packet)

    def close(self) -> None:
        self._container.close()
        if self._fail_on == "close":
            raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("fail_on", ["mux", "close"])
def test_disk_full(tmp_path: Path, fail_on: str) -> None:
    out = tmp_path / "big.mp4"
    with pytest.raises(OutputWriteError, match=r"Could not write '.*big\.mp4': the disk is full") as caught:
        with VideoWriter(out, fps=25, audio=(np.zeros((1, 16000), np.float32), 16000)) as writer:
            writer.write(_frames(1))  # the container is opened at the first frame
            writer._container = _FullDisk(writer._container, fail_on)
            for _ in range(4):
                writer.write(_frames(10))  # libx264 buffers frames, so packets appear after a few
    assert caught.value.errno == errno.ENOSPC and isinstance(caught.value, OSError)
    assert os.listdir(tmp_path) == []


def test_write_video_streams_its_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Memory stays bounded only if each batch is encoded before the next one is produced.
    events: list[str] = []
    original_write = VideoWriter.write

    def recording_write(self: VideoWriter, frames: Any) -> None:
        events.append("write")
        original_write(self, frames)

    def generate() -> Any:
        for i in range(4):
            events.append("produce")
            yield _frames(3, seed=i)

    monkeypatch.setattr(VideoWriter, "write", recording_write)
    out = write_video(tmp_path / "stream.mp4", generate(), fps=25)
    assert events == ["produce", "write"] * 4
    assert len(_probe(out)["frames"]) == 12


def test_writer_rejects_bad_audio(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"audio must be a waveform shaped \[C, S\] or \[S\], got shape \(16000, 2\)"):
        VideoWriter(tmp_path / "x.mp4", 25, audio=(np.zeros((16000, 2), np.float32), 16000))
    with pytest.raises(InputError, match="audio sample rate must be positive, got 0"):
        VideoWriter(tmp_path / "x.mp4", 25, audio=(np.zeros(16000, np.float32), 0))
    assert os.listdir(tmp_path) == []


# --- the partial file appears only with the first frame ---------------------------------------


def test_no_file_before_the_first_frame(tmp_path: Path) -> None:
    writer = VideoWriter(tmp_path / "late.mp4", fps=25)
    assert os.listdir(tmp_path) == []  # constructing (and the writability test) leaves nothing
    writer.abort()
    assert os.listdir(tmp_path) == []
    writer.abort()  # twice is harmless


def test_closing_without_frames_leaves_nothing_and_raises(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"no frames were written to '.*nothing\.mp4'; nothing was saved"):
        with VideoWriter(tmp_path / "nothing.mp4", fps=25) as writer:
            writer.write(np.zeros((0, 8, 8, 3), np.uint8))  # an empty batch is no frame either
    with pytest.raises(KeyboardInterrupt):  # an exception already on its way is not replaced
        with VideoWriter(tmp_path / "nothing.mp4", fps=25):
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_unfinished_writer_never_deletes_another_writers_file(tmp_path: Path) -> None:
    # Two jobs with one output name: the one that wrote nothing must not remove the other's partial.
    with VideoWriter(tmp_path / "same.mp4", fps=25, preset="ultrafast") as busy:
        _write_until_on_disk(busy)
        idle = VideoWriter(tmp_path / "same.mp4", fps=25)
        idle.abort()
        assert busy.partial_path.exists()
    assert sorted(os.listdir(tmp_path)) == ["same.mp4"]


def test_writer_dropped_without_close_removes_its_partial(tmp_path: Path) -> None:
    writer = VideoWriter(tmp_path / "dropped.mp4", fps=25, preset="ultrafast")
    _write_until_on_disk(writer)
    del writer
    gc.collect()
    assert os.listdir(tmp_path) == []


# --- the container follows the output name -----------------------------------------------------


@pytest.mark.parametrize(("name", "brand"), [("clip.mp4", b"isom"), ("clip.M4V", b"M4V "), ("clip.mov", b"qt  ")])
def test_output_container_follows_the_extension(tmp_path: Path, name: str, brand: bytes) -> None:
    out = write_video(tmp_path / name, _frames(3), fps=25, audio=(np.zeros(8000, np.float32), 16000))
    assert out.read_bytes()[8:12] == brand  # the ftyp major brand of the muxer used
    probe = _probe(out)
    assert probe["codec"] == "h264" and probe["audio"]["codec"] == "aac" and len(probe["frames"]) == 3
    assert os.listdir(tmp_path) == [name]


@pytest.mark.parametrize("name", ["result.avi", "result.png", "result", "result.mkv"])
def test_writer_refuses_other_extensions(tmp_path: Path, name: str) -> None:
    with pytest.raises(InputError, match=r"needs one of \.mp4, \.m4v, \.mov: name the output \.mp4"):
        VideoWriter(tmp_path / name, fps=25)
    with pytest.raises(InputError, match="is a folder; name the video file"):
        VideoWriter(tmp_path, fps=25)
    assert os.listdir(tmp_path) == []


# --- check_output_path --------------------------------------------------------------------------


def test_check_output_path_accepts_good_names(tmp_path: Path) -> None:
    assert check_output_path(tmp_path / "out.mp4") == tmp_path / "out.mp4"
    assert check_output_path(str(tmp_path / "out.MOV"), [None, DRIVING]) == tmp_path / "out.MOV"
    (tmp_path / "old.m4v").write_bytes(b"previous result")
    assert check_output_path(tmp_path / "old.m4v") == tmp_path / "old.m4v"  # replaced later, on success
    assert os.listdir(tmp_path) == ["old.m4v"]


@pytest.mark.parametrize(("name", "found"), [("talk.avi", "extension '.avi'"), ("talk.png", "extension '.png'"),
                                             ("talk", "no extension")])
def test_check_output_path_extension(tmp_path: Path, name: str, found: str) -> None:
    with pytest.raises(InputError, match=rf"'{name}' has {found}; .*\.mp4, \.m4v, \.mov: name the output \.mp4"):
        check_output_path(tmp_path / name)


def test_check_output_path_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InputError, match=r"The output '.*' is a folder; name the video file, e.g. '.*result\.mp4'"):
        check_output_path(tmp_path)
    with pytest.raises(InputError, match=r"output folder '.*missing' does not exist; create it first"):
        check_output_path(tmp_path / "missing" / "out.mp4")
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match=r"output folder '.*file' is a file, not a folder"):
        check_output_path(tmp_path / "file" / "out.mp4")

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(video_module.tempfile, "TemporaryFile", refuse)
    with pytest.raises(InputError, match=r"output folder '.*' is not writable \(Permission denied\); choose another"):
        check_output_path(tmp_path / "out.mp4")


def test_check_output_path_refuses_an_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    drive = tmp_path / "drive.mp4"
    drive.write_bytes(DRIVING.read_bytes())
    photo = tmp_path / "photo.png"
    photo.write_bytes(b"png")
    (tmp_path / "a").mkdir()
    os.link(drive, tmp_path / "hard.mp4")
    os.symlink(drive, tmp_path / "soft.mp4")
    refused = r"would overwrite the input '{}'; choose another output name"
    cases = [
        (drive, [photo, drive], "drive.mp4"),                   # the very same name
        (tmp_path / "a" / ".." / "drive.mp4", [drive], "drive.mp4"),
        (tmp_path / "hard.mp4", [drive], "drive.mp4"),          # a hard link: same inode
        (tmp_path / "soft.mp4", [drive], "drive.mp4"),          # a symlink to the input
        (drive, [tmp_path / "soft.mp4"], "soft.mp4"),           # the input given through a symlink
        (photo, [photo], "photo.png"),                          # said before the extension complaint
    ]
    for output, inputs, name in cases:
        with pytest.raises(InputError, match=refused.format(name.replace(".", r"\."))):
            check_output_path(output, inputs)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=refused.format(r"drive\.mp4")):
        check_output_path("./a/../drive.mp4", [drive])  # relative against absolute
    assert check_output_path(tmp_path / "result.mp4", [drive, photo, None]) == tmp_path / "result.mp4"


# --- variable frame rate ------------------------------------------------------------------------

#: Frame times (ms) of the variable-rate clip: 25 fps runs with gaps of 120 and 280 ms.
VFR_TIMES_MS = [0, 40, 80, 200, 240, 280, 320, 600, 640, 680, 720, 760, 800, 840, 880, 920]
#: Grey level of frame k, far enough apart to identify each frame after H.264 (up to 32 frames).
_GREY_STEP = 8


def _encode_vfr(path: Path, times_ms: list[int], audio_seconds: float = 1.0) -> Path:
    """Like a phone clip: solid grey frame k (level k x 8) at ``times_ms[k]`` plus silence."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = stream.time_base = Fraction(1, 1000)
        sound = container.add_stream("aac", rate=16000)
        sound.layout = "mono"
        for k, ms in enumerate(times_ms):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), k * _GREY_STEP, np.uint8), format="rgb24")
            frame.pts, frame.time_base = ms, Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
        samples = av.AudioFrame.from_ndarray(np.zeros((1, int(16000 * audio_seconds)), np.float32),
                                             format="fltp", layout="mono")
        samples.sample_rate, samples.pts, samples.time_base = 16000, 0, Fraction(1, 16000)
        for packet in [*sound.encode(samples), *sound.encode(None)]:
            container.mux(packet)
    return path


def _frame_ids(frames: list[np.ndarray]) -> list[int]:
    return [round(float(frame.mean()) / _GREY_STEP) for frame in frames]


def test_variable_frame_rate_is_resampled_by_timestamp(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _encode_vfr(tmp_path / "phone.mp4", VFR_TIMES_MS)
    with av.open(str(path)) as container:  # the file really is variable-rate, as PyAV wrote it
        stream = container.streams.video[0]
        stamps = sorted(p.pts * stream.time_base * 1000 for p in container.demux(stream) if p.size)
        assert stamps == VFR_TIMES_MS and stream.guessed_rate == 25 and stream.average_rate < 17
        assert float(stream.duration * stream.time_base) == pytest.approx(0.96)  # 0.96 s of frames,
        duration = container.duration / av.time_base  # 1.0 s of sound: the output keeps all of it
    assert duration == pytest.approx(1.0)

    info = video_info(path)
    assert info.variable_frame_rate and info.fps == 25
    assert info.frame_count_estimate == round(duration * 25) == 25

    with caplog.at_level(logging.WARNING, logger="imtalker_core.media.video"):
        frames = list(read_video(path))
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1 and "'phone.mp4' has a variable frame rate" in warning[0]
    assert "resampled to a constant 25 fps" in warning[0] and "25 frames over 1.000 s" in warning[0]
    assert len(frames) == 25 and all(f.shape == (32, 32, 3) and f.dtype == np.uint8 for f in frames)
    # Output frame i (at i x 40 ms) is the last source frame stamped at or before that instant.
    expected = [max(k for k, ms in enumerate(VFR_TIMES_MS) if ms <= 40 * i) for i in range(25)]
    assert expected[2:8] == [2, 2, 2, 3, 4, 5]  # the 120 ms gap repeats frame 2
    assert expected[-2:] == [15, 15]  # the last frame stays on screen while the sound goes on
    assert _frame_ids(frames) == expected
    assert frames[3] is not frames[4]  # repeats are separate arrays
    frames[3][:] = 0
    assert frames[4].mean() > 0
    assert _frame_ids(list(read_video(path, max_frames=5))) == expected[:5]


def test_vfr_frames_closer_than_the_rate_are_skipped(tmp_path: Path) -> None:
    # A 50 fps burst in a 25 fps clip: at 25 fps only the frame on screen at each 40 ms tick shows.
    times = [0, 40, 80, 100, 120, 140, 160, 200, 240, 280, 320, 360, 400, 440, 480]
    path = _encode_vfr(tmp_path / "burst.mp4", times, audio_seconds=0.52)
    info = video_info(path)
    assert info.variable_frame_rate and info.fps == 25
    ids = _frame_ids(list(read_video(path)))
    assert ids == [max(k for k, ms in enumerate(times) if ms <= 40 * i) for i in range(info.frame_count_estimate)]
    assert 3 not in ids and 5 not in ids  # the 100 and 140 ms frames are never on screen at a tick


def test_constant_rate_with_millisecond_jitter_is_not_resampled(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    # 29.97 fps stored with millisecond timestamps: intervals of 33 and 34 ms, still constant-rate.
    times = [round(i * 1001 / 30) for i in range(30)]
    path = _encode_vfr(tmp_path / "ntsc.mp4", times)
    with caplog.at_level(logging.WARNING, logger="imtalker_core.media.video"):
        frames = list(read_video(path))
    assert not video_info(path).variable_frame_rate and not caplog.records
    assert _frame_ids(frames) == list(range(30))  # every frame once, as stored


def test_constant_rate_decodes_exactly_as_stored(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="imtalker_core.media.video"):
        count = 0
        with av.open(str(DRIVING)) as container:
            for ours, raw in zip(read_video(DRIVING), container.decode(video=0), strict=True):
                assert np.array_equal(ours, raw.to_ndarray(format="rgb24"))
                count += 1
    assert count == 100 and not caplog.records
    assert not video_info(DRIVING).variable_frame_rate
