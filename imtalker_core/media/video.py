"""Reading driving videos and writing results as H.264 MP4 files, both with PyAV (FFmpeg).

`read_video` streams RGB frames one at a time, so long videos never sit in memory whole.
`VideoWriter` encodes frames as they arrive (H.264 via libx264, yuv420p, which every player
accepts) and can mux an AAC sound track into the same file. It writes to
``<name>.partial<ext>`` next to the target and renames it into place only after a successful
close, so a crash, an exception, or Ctrl+C never leaves a half-written file under the real name.
"""
from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Iterable, Iterator

import av
import numpy as np
import torch

from ..errors import IMTalkerError, InputError
from .files import existing_file
from .images import to_uint8

logger = logging.getLogger(__name__)

#: libx264 speed presets, fastest first.
PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow", "placebo")
#: Sample rates the AAC encoder accepts; other rates are converted to 48 kHz by FFmpeg.
_AAC_RATES = frozenset({8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000})


class OutputWriteError(IMTalkerError, OSError):
    """Writing the output video failed (e.g. the disk is full); the message names the file.

    An ``OSError`` too, with the original ``errno`` (``errno.ENOSPC`` for a full disk) and
    ``filename``, so generic I/O handlers still recognise it.
    """

    def __init__(self, message: str, error_number: int | None = None, filename: str | None = None) -> None:
        super().__init__(error_number, message, filename)

    def __str__(self) -> str:
        # OSError would prefix "[Errno N]" and append the filename, which the message already has.
        return str(self.strerror)


@dataclass(frozen=True)
class VideoInfo:
    """What `video_info` reports about a video file.

    ``frame_count_estimate`` comes from the container header (or duration x fps when the
    header has no count) and can be off by a few frames; decode to know the exact number.
    ``width``/``height`` are the size of the frames `read_video` yields, i.e. after applying
    the rotation metadata; ``rotation`` is that metadata (degrees counter-clockwise, a multiple
    of 90, 0 for most files).
    """

    fps: float
    frame_count_estimate: int
    width: int
    height: int
    has_audio: bool
    rotation: int = 0


def _open_input(path: str | os.PathLike) -> tuple[av.container.InputContainer, Path]:
    """Open a media file for reading and check it has a video stream; `InputError` if not."""
    path = existing_file(path, "video")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as exc:
        raise InputError(f"Could not read video '{path.name}': {exc}. Use an MP4, MOV, MKV, WEBM or AVI file.") from exc
    if not container.streams.video:
        container.close()
        raise InputError(f"'{path.name}' has no video stream; a driving video needs moving images of a face.")
    return container, path


def video_info(path: str | os.PathLike) -> VideoInfo:
    """Frame rate, approximate frame count, frame size and whether there is a sound track."""
    container, _ = _open_input(path)
    with container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 25.0
        count = stream.frames
        if not count:
            if stream.duration is not None and stream.time_base is not None:
                seconds = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                seconds = container.duration / av.time_base
            else:
                seconds = 0.0
            count = round(seconds * fps)
        width, height = int(stream.width), int(stream.height)
        # Rotation lives in per-frame side data, so look at the first frame.
        turns = 0
        try:
            first = next(container.decode(stream), None)
        except av.FFmpegError as exc:
            raise InputError(f"Could not decode '{Path(path).name}': {exc}. The file may be damaged; re-export it.") from exc
        if first is not None:
            turns = _quarter_turns(first)
            if turns % 2:
                width, height = height, width
        return VideoInfo(fps=fps, frame_count_estimate=int(count), width=width, height=height,
                         has_audio=bool(container.streams.audio), rotation=90 * turns)


def _quarter_turns(frame: av.VideoFrame) -> int:
    """Counter-clockwise quarter turns (0-3) that display the frame upright (FFmpeg display matrix)."""
    return round(getattr(frame, "rotation", 0) / 90) % 4


def read_video(path: str | os.PathLike, max_frames: int | None = None) -> Iterator[np.ndarray]:
    """Decode frames as uint8 ``[H, W, 3]`` RGB, one at a time, at most ``max_frames`` of them.

    The file is opened and checked immediately (so a bad path raises here, not at the first
    ``next``); decoding happens lazily. Rotation metadata (phone videos) is applied in multiples
    of 90 degrees so frames come out upright (needs PyAV >= 14.2, which exposes it; older
    versions yield frames as stored). Decoding errors mid-file raise `InputError`.
    """
    if max_frames is not None and max_frames < 0:
        raise InputError(f"max_frames cannot be negative, got {max_frames}")
    container, resolved = _open_input(path)
    return _frames(container, resolved, max_frames)


def _frames(container: av.container.InputContainer, path: Path, max_frames: int | None) -> Iterator[np.ndarray]:
    """The generator behind `read_video`; closes the container however iteration ends."""
    try:
        if max_frames == 0:
            return
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        produced = 0
        try:
            for frame in container.decode(stream):
                rgb = frame.to_ndarray(format="rgb24")
                turns = _quarter_turns(frame)
                if turns:
                    # FFmpeg's rotation is counter-clockwise, like np.rot90; phone portrait
                    # videos typically report -90 (stored landscape, shown turned clockwise).
                    rgb = np.ascontiguousarray(np.rot90(rgb, turns))
                yield rgb
                produced += 1
                if max_frames is not None and produced >= max_frames:
                    return
        except av.FFmpegError as exc:
            raise InputError(f"Could not decode '{path.name}' after {produced} frame(s): {exc}. "
                             "The file may be damaged; re-export it.") from exc
    finally:
        container.close()


def _frames_to_uint8(frames: np.ndarray | torch.Tensor) -> np.ndarray:
    """``[B, H, W, 3]`` or ``[H, W, 3]`` uint8 / float ``[0, 1]`` (numpy or CPU torch) -> uint8 ``[B, H, W, 3]``."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    array = np.asarray(frames)
    if array.ndim not in (3, 4) or array.shape[-1] != 3:
        raise InputError(f"expected RGB frames shaped [B, H, W, 3] or [H, W, 3], got shape {array.shape}")
    if array.ndim == 3:
        array = array[None]
    if array.dtype != np.uint8 and not np.issubdtype(array.dtype, np.floating):
        raise InputError(f"frames must be uint8 (0-255) or float (0-1), got dtype {array.dtype}")
    return to_uint8(array)


def _is_disk_full(exc: BaseException) -> bool:
    """True for 'no space left on device', whether raised by Python or by FFmpeg."""
    return isinstance(exc, OSError) and exc.errno == errno.ENOSPC


class VideoWriter:
    """Stream frames into an H.264 (yuv420p) MP4, optionally with an AAC sound track.

    Use as a context manager::

        with VideoWriter("out.mp4", fps=25, audio=(waveform, 16000)) as writer:
            for batch in batches:          # [B, H, W, 3] uint8 or float in [0, 1]
                writer.write(batch)

    The first written frame fixes the size. yuv420p needs even width and height, so an odd
    size is padded by one pixel on the right/bottom edge by repeating the last column/row
    (no content is lost; the output is one pixel larger).

    ``audio`` is ``(waveform float32 [C, S] or [S], sample_rate)``. It is kept by reference
    (never copied whole) and encoded in slices alongside the video; samples beyond the end of
    the video are dropped (like ffmpeg ``-shortest`` when the video is the shorter stream). Mono
    and stereo are kept, more channels are averaged to mono, and rates AAC does not support are
    converted to 48 kHz.

    The file is written as ``<stem>.partial<suffix>`` and renamed to ``path`` on a successful
    `close`. If the ``with`` block raises (including KeyboardInterrupt), the partial file is
    deleted, or kept under its ``.partial`` name when ``keep_partial=True``, and the exception
    propagates. An unwritable output folder raises `InputError` at construction; a full disk
    raises `OutputWriteError` (an ``OSError`` with errno ENOSPC) naming the file.
    """

    def __init__(self, path: str | os.PathLike, fps: float | int | Fraction,
                 audio: tuple[np.ndarray | torch.Tensor, int] | None = None, crf: int = 18,
                 preset: str = "medium", keep_partial: bool = False) -> None:
        self.path = Path(path)
        if not fps or not float(fps) > 0:
            raise InputError(f"fps must be positive, got {fps}")
        if not 0 <= crf <= 51:
            raise InputError(f"crf must be between 0 (lossless) and 51 (worst), got {crf}")
        if preset not in PRESETS:
            raise InputError(f"preset must be one of {', '.join(PRESETS)}; got {preset!r}")
        self.rate = Fraction(fps).limit_denominator(1_000_000)
        self.crf = int(crf)
        self.preset = preset
        self.keep_partial = keep_partial
        self.partial_path = self.path.with_name(f"{self.path.stem}.partial{self.path.suffix or '.mp4'}")
        self.frames_written = 0
        self._audio, self._audio_rate = self._prepare_audio(audio)
        self._audio_pos = 0
        self._video_stream: av.video.stream.VideoStream | None = None
        self._audio_stream: av.audio.stream.AudioStream | None = None
        self._size: tuple[int, int] | None = None
        self._closed = False

        folder = self.path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"Cannot create the output folder '{folder}': {exc}. Choose another folder.") from exc
        # Creating the partial file now is the real writability test (os.access lies for root
        # and on some network shares), and FFmpeg would only open it at the first frame.
        try:
            with open(self.partial_path, "wb"):
                pass
        except OSError as exc:
            raise InputError(f"The output folder '{folder}' is not writable ({exc.strerror}); "
                             "choose another folder or fix its permissions.") from exc
        try:
            self._container = av.open(str(self.partial_path), mode="w", format="mp4")
        except (av.FFmpegError, OSError) as exc:
            self._remove_partial()
            raise InputError(f"Cannot write a video to '{self.partial_path}': {exc}") from exc
        logger.debug("writing %s via %s", self.path, self.partial_path.name)

    @staticmethod
    def _prepare_audio(audio: tuple[np.ndarray | torch.Tensor, int] | None) -> tuple[np.ndarray | None, int]:
        """Validate ``(waveform, rate)`` and return a float32 ``[C, S]`` view (C is 1 or 2)."""
        if audio is None:
            return None, 0
        waveform, rate = audio
        if isinstance(waveform, torch.Tensor):
            waveform = waveform.detach().cpu().numpy()
        array = np.asarray(waveform, dtype=np.float32)
        if array.ndim == 1:
            array = array[None]
        if array.ndim != 2 or array.shape[0] > array.shape[1] > 0:
            raise InputError(f"audio must be a waveform shaped [C, S] or [S], got shape {np.shape(waveform)}")
        if int(rate) <= 0:
            raise InputError(f"audio sample rate must be positive, got {rate}")
        if array.shape[0] > 2:
            logger.info("averaging %d audio channels to mono for AAC", array.shape[0])
            array = array.mean(axis=0, dtype=np.float32, keepdims=True)
        return array, int(rate)

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False

    def _setup_streams(self, height: int, width: int) -> None:
        """Create the streams once the frame size is known (FFmpeg needs it before the header)."""
        stream = self._container.add_stream("libx264", rate=self.rate)
        stream.width, stream.height = width + width % 2, height + height % 2
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(self.crf), "preset": self.preset}
        self._video_stream = stream
        if width % 2 or height % 2:
            logger.info("frame size %dx%d is odd; padding to %dx%d for yuv420p", width, height,
                        stream.width, stream.height)
        if self._audio is not None:
            rate = self._audio_rate if self._audio_rate in _AAC_RATES else 48000
            audio_stream = self._container.add_stream("aac", rate=rate)
            audio_stream.layout = "mono" if self._audio.shape[0] == 1 else "stereo"
            self._audio_stream = audio_stream
        self._size = (height, width)

    def write(self, frames: np.ndarray | torch.Tensor) -> None:
        """Encode ``[B, H, W, 3]`` (or one ``[H, W, 3]``) frames, uint8 or float in ``[0, 1]``."""
        if self._closed:
            raise IMTalkerError(f"the writer for '{self.path}' is already closed")
        batch = _frames_to_uint8(frames)
        height, width = batch.shape[1:3]
        if self._size is None:
            self._setup_streams(height, width)
        elif (height, width) != self._size:
            raise InputError(f"all frames must have one size: got {width}x{height}, "
                             f"but the video is {self._size[1]}x{self._size[0]}")
        assert self._video_stream is not None
        if height % 2 or width % 2:
            batch = np.pad(batch, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")
        try:
            for image in batch:
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                frame.pts = self.frames_written
                frame.time_base = 1 / self.rate
                self._mux(self._video_stream.encode(frame))
                self.frames_written += 1
            self._write_audio_until(self.frames_written / self.rate)
        except OSError as exc:
            self._raise_write_error(exc)

    def _write_audio_until(self, seconds: Fraction) -> None:
        """Encode audio up to ``seconds`` of playback, so the two streams stay interleaved."""
        if self._audio is None or self._audio_stream is None:
            return
        end = min(self._audio.shape[1], int(seconds * self._audio_rate))
        # Slices of about one second keep encoder frames small without per-call overhead.
        step = self._audio_rate
        while self._audio_pos < end:
            stop = min(end, self._audio_pos + step)
            chunk = np.ascontiguousarray(self._audio[:, self._audio_pos:stop])
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=self._audio_stream.layout.name)
            frame.sample_rate = self._audio_rate
            frame.pts = self._audio_pos
            frame.time_base = Fraction(1, self._audio_rate)
            self._mux(self._audio_stream.encode(frame))
            self._audio_pos = stop

    def _mux(self, packets: list[av.Packet]) -> None:
        for packet in packets:
            self._container.mux(packet)

    def close(self) -> None:
        """Flush the encoders, finish the file and move it to its final name.

        Closing a writer that received no frames raises `InputError` (an MP4 needs at least
        one frame) and removes the partial file.
        """
        if self._closed:
            return
        if self._video_stream is None:
            self.abort()
            raise InputError(f"no frames were written to '{self.path}'; nothing to save.")
        try:
            self._write_audio_until(self.frames_written / self.rate)
            self._mux(self._video_stream.encode(None))
            if self._audio_stream is not None:
                self._mux(self._audio_stream.encode(None))
            self._container.close()
            self._closed = True
            os.replace(self.partial_path, self.path)
        except OSError as exc:
            self._raise_write_error(exc)
        except BaseException:
            self.abort()
            raise
        logger.info("wrote %s: %d frames at %s fps%s", self.path, self.frames_written, self.rate,
                    " with audio" if self._audio is not None else "")

    def abort(self) -> None:
        """Stop writing and delete the partial file (or keep it when ``keep_partial``)."""
        if not self._closed:
            self._closed = True
            try:
                self._container.close()
            except (av.FFmpegError, OSError) as exc:
                # Closing flushes buffered data; on a full disk that fails again, which is moot.
                logger.debug("ignoring error while closing the aborted %s: %s", self.partial_path, exc)
        if self.keep_partial and self.partial_path.exists():
            logger.warning("kept the incomplete video as %s", self.partial_path)
        else:
            self._remove_partial()

    def _remove_partial(self) -> None:
        try:
            self.partial_path.unlink(missing_ok=True)
        except OSError as exc:
            logger.warning("could not remove the incomplete file %s: %s", self.partial_path, exc)

    def _raise_write_error(self, exc: OSError) -> None:
        """Abort and re-raise an I/O failure as `OutputWriteError` naming the file."""
        self.abort()
        fate = (f"the incomplete file is kept as '{self.partial_path.name}'" if self.keep_partial
                else "the incomplete file was removed")
        if _is_disk_full(exc):
            message = (f"Could not write '{self.path}': the disk is full. Free some space or choose "
                       f"another output folder; {fate}.")
        else:
            message = f"Could not write '{self.path}': {exc}; {fate}."
        raise OutputWriteError(message, exc.errno, str(self.path)) from exc


def write_video(path: str | os.PathLike, frames: Iterable[np.ndarray | torch.Tensor], fps: float | int | Fraction,
                audio: tuple[np.ndarray | torch.Tensor, int] | None = None, **options: object) -> Path:
    """Write an iterable of frames or frame batches (see `VideoWriter.write`) to ``path``.

    A single ``[T, H, W, 3]`` array counts as one batch. Extra keyword arguments go to
    `VideoWriter` (``crf``, ``preset``, ``keep_partial``). Returns the final path.
    """
    with VideoWriter(path, fps, audio=audio, **options) as writer:  # type: ignore[arg-type]
        if isinstance(frames, (np.ndarray, torch.Tensor)):
            writer.write(frames)
        else:
            for batch in frames:
                writer.write(batch)
    return writer.path
