"""Reading driving videos and writing results as H.264 MP4 files, both with PyAV (FFmpeg).

`read_video` streams RGB frames one at a time, so long videos never sit in memory whole;
variable-frame-rate clips (phones, screen recordings) are resampled to a constant rate by
timestamp so their timing survives. `VideoWriter` encodes frames as they arrive (H.264 via
libx264, yuv420p, which every player accepts) and can mux an AAC sound track into the same
file. It writes to ``<name>.partial<ext>`` next to the target, created only when the first
frame arrives, and renames it into place only after a successful close; an exception or
Ctrl+C (and SIGTERM/SIGHUP under the command line, which turns them into KeyboardInterrupt)
deletes it, so no half-written file is ever left under either name.
`check_output_path` runs every check on an output name up front, before any model loads.

For live use, `VideoWriter(fragmented=True)` writes a fragmented MP4 (a header without sample
tables, then self-contained fragments starting at keyframes), which players can read while it
grows; it can also go to an open binary stream (a pipe, standard output). `RawVideoWriter` writes
bare RGB24 frames to a stream, and `BackgroundWriter` runs any writer on a thread of its own so
that encoding overlaps the caller's work.
"""
from __future__ import annotations

import errno
import logging
import os
import queue
import tempfile
import threading
import weakref
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, BinaryIO, Protocol

import av
import numpy as np
import torch

from ..errors import IMTalkerError, InputError
from .files import existing_file
from .images import to_uint8

if TYPE_CHECKING:
    from typing_extensions import Self

logger = logging.getLogger(__name__)

#: libx264 speed presets, fastest first.
PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow", "placebo")
#: Sample rates the AAC encoder accepts; other rates are converted to 48 kHz by FFmpeg.
_AAC_RATES = frozenset({8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000})
#: Output extensions (lower case) -> the FFmpeg muxer `VideoWriter` uses; all hold H.264 + AAC.
OUTPUT_FORMATS = {".mp4": "mp4", ".m4v": "ipod", ".mov": "mov"}
#: A clip is variable-rate when some frame is this many frame intervals off an even spacing.
_VFR_TOLERANCE = 0.5
#: MP4 muxer flags of a fragmented file: an empty `moov` header first, a fragment from each keyframe,
#: fragments addressed from their own start (what browsers' Media Source Extensions want).
FRAGMENTED_MOVFLAGS = "frag_keyframe+empty_moov+default_base_moof"
#: Highest rate a variable-rate clip is resampled to.
_MAX_RESAMPLE_FPS = 120
#: A header rate this close (relative) to a variable-rate clip's typical rate is used instead.
_RATE_SNAP = Fraction(5, 100)


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


def check_output_path(path: str | os.PathLike,
                      inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Check an output video name before any work starts; returns ``Path(path)`` unchanged.

    Every problem raises `InputError` naming the bad value and the fix:

    * it is one of ``inputs`` (``None`` entries are skipped): compared by resolved path, so
      ``a/../photo.png`` and symlinks are caught, and, when both exist, by device and inode
      (`os.path.samefile`), so hard links are caught too;
    * ``path`` is an existing folder;
    * its extension is not one the writer produces: ``.mp4``, ``.m4v`` or ``.mov`` (any case;
      all hold H.264 + AAC), e.g. ``.avi``, ``.png`` or none;
    * its folder does not exist, is not a folder, or is not writable (tested by creating a
      nameless temporary file there, which leaves nothing behind, because ``os.access`` is
      wrong for root and on some network shares).

    Nothing is left behind. An existing file under the output name is fine: `VideoWriter` replaces
    it only once the new video is complete.
    """
    output = Path(path)
    for item in inputs:  # first: "-o photo.png" is foremost about the photo, not the extension
        if item is not None and _same_file(output, Path(item)):
            raise InputError(f"The output '{output}' would overwrite the input '{Path(item).name}'; "
                             "choose another output name.")
    _check_output_name(output)
    folder = output.parent
    if not folder.exists():
        raise InputError(f"The output folder '{folder}' does not exist; create it first or choose another folder.")
    if not folder.is_dir():
        raise InputError(f"The output folder '{folder}' is a file, not a folder; choose another output path.")
    _check_writable(folder)
    return output


def _check_output_name(path: Path) -> str:
    """`InputError` unless ``path`` names a file with a writable extension; returns the muxer name."""
    if path.is_dir():
        raise InputError(f"The output '{path}' is a folder; name the video file, e.g. '{path / 'result.mp4'}'.")
    suffix = path.suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        accepted = ", ".join(OUTPUT_FORMATS)
        found = f"extension '{path.suffix}'" if path.suffix else "no extension"
        raise InputError(f"The output '{path.name}' has {found}; the video is H.264 + AAC, which needs one of "
                         f"{accepted}: name the output .mp4.")
    return OUTPUT_FORMATS[suffix]


def _check_writable(folder: Path) -> None:
    """`InputError` unless a file can be created in ``folder`` (an anonymous temporary file is tried)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise InputError(f"The output folder '{folder}' is not writable ({exc.strerror or exc}); "
                         "choose another folder or fix its permissions.") from exc


def _same_file(output: Path, other: Path) -> bool:
    """True when ``output`` and ``other`` name one file: same resolved path, or same inode and device."""
    try:
        if output.resolve() == other.resolve():
            return True
    except (OSError, RuntimeError):  # a symlink loop: fall through to the inode check
        pass
    try:
        return output.exists() and other.exists() and os.path.samefile(output, other)
    except OSError:
        return False


@dataclass(frozen=True)
class VideoInfo:
    """What `video_info` reports about a video file.

    ``fps`` and ``frame_count_estimate`` describe the frames `read_video` yields. For a
    constant-rate file they come from the container header (the count, or duration x fps when
    the header has none, can be off by a few frames; decode to know the exact number). For a
    variable-rate file (``variable_frame_rate``) ``fps`` is the constant rate `read_video`
    resamples to and the count is the exact number of resampled frames.
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
    variable_frame_rate: bool = False


@dataclass(frozen=True)
class _Timing:
    """Frame timing of a variable-rate video stream, from its packets' timestamps.

    ``rate`` (frames/s) and ``start`` (s, the first frame's timestamp) place output frame ``i``
    at ``start + i / rate``; ``count`` output frames run to the end of playback.
    ``shortest``/``longest`` are the extreme source frame intervals (s), for the log.
    """

    rate: Fraction
    start: Fraction
    count: int
    shortest: float
    longest: float


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


def _header_rate(stream: av.video.stream.VideoStream) -> Fraction:
    """The stream's nominal rate: average, else guessed, else base rate, else 25 fps."""
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return Fraction(rate) if rate else Fraction(25)


def _variable_timing(path: Path) -> _Timing | None:
    """Scan the video packets' timestamps (no decoding); `_Timing` if the rate varies, else None.

    A stream counts as variable-rate when some frame's timestamp is more than half a frame
    interval away from an even spacing between the first and last timestamps, i.e. when
    showing the frames one per period would put some frame on screen at the wrong instant.
    Timestamp jitter from coarse time bases (29.97 fps in milliseconds) stays far below that.
    Only timestamps are kept (8 bytes per frame). Unknown timestamps or an unreadable stream
    give None, so the file is decoded as a constant-rate one (and damage is reported there).
    """
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as exc:
        logger.debug("cannot scan the timestamps of %s: %s", path, exc)
        return None
    with container:
        stream = container.streams.video[0]
        stamps = array("q")
        try:
            for packet in container.demux(stream):
                if packet.size == 0 or packet.is_discard:  # the end-of-stream marker / edit-list leftovers
                    continue
                stamp = packet.pts if packet.pts is not None else packet.dts
                if stamp is None:
                    logger.debug("%s has frames without timestamps; assuming a constant frame rate", path.name)
                    return None
                stamps.append(stamp)
        except av.FFmpegError as exc:
            logger.debug("stopped scanning the timestamps of %s: %s", path, exc)
            return None
        if len(stamps) < 3 or stream.time_base is None:
            return None
        ticks = np.sort(np.frombuffer(stamps, dtype=np.int64))
        time_base = Fraction(stream.time_base)
        span = int(ticks[-1] - ticks[0])
        if span <= 0:
            return None
        mean_interval = span / (len(ticks) - 1)
        even = ticks[0] + np.arange(len(ticks)) * mean_interval
        if np.abs(ticks - even).max() <= _VFR_TOLERANCE * mean_interval:
            return None
        intervals = np.diff(ticks)
        rate = _resample_rate(stream, Fraction(int(np.median(intervals[intervals > 0]))) * time_base)
        start = int(ticks[0]) * time_base
        # The end of playback: the later of the video stream's and the container's (the longest
        # stream, usually the sound) end, so no sound is cut off; a player shows the last frame
        # until then too. Without either, the last frame lasts one median interval.
        last = int(ticks[-1]) * time_base
        end = last + int(np.median(intervals)) * time_base
        known_ends = []
        if stream.duration:
            stream_start = stream.start_time if stream.start_time is not None else int(ticks[0])
            known_ends.append((stream_start + stream.duration) * time_base)
        if container.duration:
            known_ends.append(Fraction((container.start_time or 0) + container.duration, av.time_base))
        if known_ends and max(known_ends) > last:
            end = max(known_ends)
        count = max(1, round((end - start) * rate))
        return _Timing(rate=rate, start=start, count=count, shortest=float(intervals.min() * time_base),
                       longest=float(intervals.max() * time_base))


def _resample_rate(stream: av.video.stream.VideoStream, typical_interval: Fraction) -> Fraction:
    """The constant rate for a variable-rate stream: the rate most of its frames were taken at.

    That is one over the median frame interval (30 for a 30 fps phone clip that dropped frames,
    25 for a 25 fps clip with a 50 fps burst), replaced by FFmpeg's guessed or average rate
    when one is within `_RATE_SNAP` of it, so 29.97 stays exactly 30000/1001 even with
    millisecond timestamps; at most `_MAX_RESAMPLE_FPS`.
    """
    typical = 1 / typical_interval
    for candidate in (stream.guessed_rate, stream.average_rate):
        if candidate and abs(Fraction(candidate) / typical - 1) <= _RATE_SNAP:
            typical = Fraction(candidate)
            break
    return min(typical, Fraction(_MAX_RESAMPLE_FPS)).limit_denominator(1_000_000)


def video_info(path: str | os.PathLike) -> VideoInfo:
    """Frame rate, frame count, frame size and whether there is a sound track.

    A variable-rate file is reported as `read_video` yields it: the constant rate it is
    resampled to and the resampled frame count (``variable_frame_rate=True``).
    """
    container, resolved = _open_input(path)
    with container:
        stream = container.streams.video[0]
        fps = float(_header_rate(stream))
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
            raise InputError(f"Could not decode '{Path(path).name}': {exc}. The file may be damaged; "
                             "re-export it.") from exc
        if first is not None:
            turns = _quarter_turns(first)
            if turns % 2:
                width, height = height, width
        has_audio = bool(container.streams.audio)
    timing = _variable_timing(resolved)
    if timing is not None:
        logger.debug("%s: variable frame rate, read as %d frames at %s fps", resolved.name, timing.count,
                     _rate_text(timing.rate))
        fps, count = float(timing.rate), timing.count
    return VideoInfo(fps=fps, frame_count_estimate=int(count), width=width, height=height,
                     has_audio=has_audio, rotation=90 * turns, variable_frame_rate=timing is not None)


def _rate_text(rate: Fraction) -> str:
    """``25`` -> '25', ``30000/1001`` -> '29.97'."""
    return f"{float(rate):.3f}".rstrip("0").rstrip(".")


def _quarter_turns(frame: av.VideoFrame) -> int:
    """Counter-clockwise quarter turns (0-3) that display the frame upright (FFmpeg display matrix)."""
    return round(getattr(frame, "rotation", 0) / 90) % 4


def read_video(path: str | os.PathLike, max_frames: int | None = None) -> Iterator[np.ndarray]:
    """Decode frames as uint8 ``[H, W, 3]`` RGB, one at a time, at most ``max_frames`` of them.

    The file is opened and checked immediately (so a bad path raises here, not at the first
    ``next``); decoding happens lazily. Rotation metadata (phone videos) is applied in multiples
    of 90 degrees so frames come out upright (needs PyAV >= 14.2, which exposes it; older
    versions yield frames as stored). Decoding errors mid-file raise `InputError`.

    Constant-rate files yield their frames as stored. A variable-frame-rate file (frames spaced
    unevenly, see `video_info`) is resampled to a constant rate by timestamp, with a WARNING:
    output frame ``i`` is shown at ``t_i = start + i / fps`` and is the frame on screen at that
    instant, i.e. the last decoded frame whose timestamp is <= ``t_i`` (the first frame for
    instants before it). So frames in a gap repeat, and frames closer together than ``1 / fps``
    are skipped. ``fps`` is the rate most frames were taken at (one over the median frame
    interval, or the stream's guessed or average rate when one is within 5% of that, see
    `_resample_rate`); ``start`` is the first frame's timestamp, and the output runs to the end
    of the file's playback (the later of the video stream's and the container's end, so a sound
    track that outlasts the last frame is kept whole while that frame stays on screen, as in a
    player): ``round(duration x fps)`` frames. Decoding still streams: one frame is held at a time.
    """
    if max_frames is not None and max_frames < 0:
        raise InputError(f"max_frames cannot be negative, got {max_frames}")
    container, resolved = _open_input(path)
    try:
        timing = _variable_timing(resolved)
    except BaseException:
        container.close()
        raise
    if timing is not None:
        logger.warning("'%s' has a variable frame rate (frames %.0f to %.0f ms apart); resampled to a constant "
                       "%s fps by timestamp: %d frames over %.3f s, each the frame on screen at its instant",
                       resolved.name, 1000 * timing.shortest, 1000 * timing.longest, _rate_text(timing.rate),
                       timing.count, timing.count / timing.rate)
    return _frames(container, resolved, max_frames, timing)


def _on_screen(decoded: Iterator[av.VideoFrame], time_base: Fraction, timing: _Timing) -> Iterator[av.VideoFrame]:
    """For each instant ``start + i / rate`` (``i < count``) yield the last frame stamped at or before it.

    The same frame object is yielded again while it stays on screen; instants before the first
    frame get the first frame. A frame without a timestamp is placed one period after the previous.
    """
    period = 1 / timing.rate
    index = 0
    shown: av.VideoFrame | None = None
    shown_at = timing.start
    for frame in decoded:
        at = frame.pts * time_base if frame.pts is not None else shown_at + period
        if shown is not None:
            while index < timing.count and timing.start + index * period < at:
                yield shown
                index += 1
            if index >= timing.count:
                return
        shown, shown_at = frame, at
    while shown is not None and index < timing.count:
        yield shown
        index += 1


def _frames(container: av.container.InputContainer, path: Path, max_frames: int | None,
            timing: _Timing | None = None) -> Iterator[np.ndarray]:
    """The generator behind `read_video`; closes the container however iteration ends.

    With ``timing`` (a variable-rate file) frames are resampled by `_on_screen`; a repeated
    frame is converted once and yielded as a fresh copy each time.
    """
    try:
        if max_frames == 0:
            return
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        produced = 0
        try:
            frames: Iterator[av.VideoFrame] = container.decode(stream)
            if timing is not None:
                frames = _on_screen(frames, Fraction(stream.time_base), timing)
            last: av.VideoFrame | None = None
            last_rgb: np.ndarray | None = None
            for frame in frames:
                if frame is last and last_rgb is not None:
                    yield last_rgb.copy()
                else:
                    rgb = frame.to_ndarray(format="rgb24")
                    turns = _quarter_turns(frame)
                    if turns:
                        # FFmpeg's rotation is counter-clockwise, like np.rot90; phone portrait
                        # videos typically report -90 (stored landscape, shown turned clockwise).
                        rgb = np.ascontiguousarray(np.rot90(rgb, turns))
                    if timing is not None:
                        last, last_rgb = frame, rgb.copy()
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


class _ClosedOnExit:
    """A writer as a context manager: `close` when the block ends normally, `abort` when it raises."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


class VideoWriter(_ClosedOnExit):
    """Stream frames into an H.264 (yuv420p) video, optionally with an AAC sound track.

    Use as a context manager::

        with VideoWriter("out.mp4", fps=25, audio=(waveform, 16000)) as writer:
            for batch in batches:          # [B, H, W, 3] uint8 or float in [0, 1]
                writer.write(batch)

    ``path`` must end in ``.mp4``, ``.m4v`` or ``.mov`` (the container follows the name; see
    `check_output_path`), else `InputError`. The first written frame fixes the size. yuv420p
    needs even width and height, so an odd size is padded by one pixel on the right/bottom edge
    by repeating the last column/row (no content is lost; the output is one pixel larger).

    ``audio`` is ``(waveform float32 [C, S] or [S], sample_rate)``. It is kept by reference
    (never copied whole) and encoded in slices alongside the video; samples beyond the end of
    the video are dropped (like ffmpeg ``-shortest`` when the video is the shorter stream). Mono
    and stereo are kept, more channels are averaged to mono, and rates AAC does not support are
    converted to 48 kHz.

    ``fragmented=True`` writes a fragmented MP4 (`FRAGMENTED_MOVFLAGS`), readable while it grows: a
    fragment per keyframe, so ``keyframe_interval`` (frames; default the encoder's, 250) sets how
    often the readable part grows. ``tune`` is passed to libx264 (``"zerolatency"``: no frame
    look-ahead and no B-frames, so each frame is encoded as soon as it arrives).

    ``path`` may also be an open binary stream (anything with ``write``: a pipe, ``sys.stdout.buffer``,
    a socket file): the video is then written to it as a fragmented MP4 (MP4 needs seeking
    otherwise), there is no partial file, and the stream is flushed, not closed, by `close`;
    ``abort`` stops writing and leaves what was already written.

    The file is written as ``<stem>.partial<suffix>``, created only when the first frame is
    written, and renamed to ``path`` on a successful `close`. On every other way out the
    partial file is deleted (or kept under its ``.partial`` name when ``keep_partial=True``):
    an exception or KeyboardInterrupt in the ``with`` block (which then propagates), `abort`,
    or a writer that is dropped or left open when the interpreter exits. SIGTERM/SIGHUP kill
    the process without any cleanup unless a handler turns them into an exception, as
    ``python -m imtalker_core`` does. A writer that received no frame leaves no file at all,
    and closing it without an exception raises `InputError` (an empty video is not a result).
    The output folder is created if missing; an unwritable one raises `InputError` at
    construction; a full disk raises `OutputWriteError` (an ``OSError`` with errno ENOSPC)
    naming the file.
    """

    def __init__(self, path: str | os.PathLike | BinaryIO, fps: float | Fraction,
                 audio: tuple[np.ndarray | torch.Tensor, int] | None = None, crf: int = 18,
                 preset: str = "medium", keep_partial: bool = False, fragmented: bool = False,
                 keyframe_interval: int | None = None, tune: str | None = None) -> None:
        self._target: BinaryIO | None = path if hasattr(path, "write") else None  # type: ignore[assignment]
        self.path = Path(getattr(path, "name", "<stream>")) if self._target is not None else Path(path)
        if not fps or not float(fps) > 0:
            raise InputError(f"fps must be positive, got {fps}")
        if not 0 <= crf <= 51:
            raise InputError(f"crf must be between 0 (lossless) and 51 (worst), got {crf}")
        if preset not in PRESETS:
            raise InputError(f"preset must be one of {', '.join(PRESETS)}; got {preset!r}")
        if keyframe_interval is not None and not keyframe_interval >= 1:
            raise InputError(f"keyframe_interval must be at least 1 frame, got {keyframe_interval}")
        self._format = "mp4" if self._target is not None else _check_output_name(self.path)
        # A stream cannot be rewound to write the sample tables at the end, so it is always fragmented.
        self.fragmented = fragmented or self._target is not None
        self.keyframe_interval = keyframe_interval
        self.tune = tune
        self.rate = Fraction(fps).limit_denominator(1_000_000)
        self.crf = int(crf)
        self.preset = preset
        self.keep_partial = keep_partial
        self.partial_path = self.path.with_name(f"{self.path.stem}.partial{self.path.suffix}")
        self.frames_written = 0
        self._audio, self._audio_rate = self._prepare_audio(audio)
        self._audio_pos = 0
        self._container: av.container.OutputContainer | None = None
        self._video_stream: av.video.stream.VideoStream | None = None
        self._audio_stream: av.audio.stream.AudioStream | None = None
        self._size: tuple[int, int] | None = None
        self._closed = False
        self._created = False  # True while the partial file may exist on disk
        self._finalizer: weakref.finalize | None = None
        if self._target is not None:
            logger.debug("writing a fragmented MP4 to %s", self.path)
            return

        folder = self.path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"Cannot create the output folder '{folder}': {exc}. Choose another folder.") from exc
        # Fail now rather than after minutes of rendering; the partial file itself only appears
        # with the first frame, so an early stop leaves nothing behind.
        _check_writable(folder)
        logger.debug("writing %s via %s (created at the first frame)", self.path, self.partial_path.name)

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

    def _open(self, height: int, width: int) -> None:
        """Create the partial file and the streams at the first frame (FFmpeg needs the size first)."""
        if self._target is None and not self.keep_partial:
            # Dropped without close/abort (no `with`, or the interpreter exits): delete the partial.
            self._finalizer = weakref.finalize(self, _discard_partial, self.partial_path)
        self._created = self._target is None
        options = {"movflags": FRAGMENTED_MOVFLAGS} if self.fragmented else {}
        try:
            container = av.open(self._target if self._target is not None else str(self.partial_path), mode="w",
                                format=self._format, options=options)
        except av.FFmpegError as exc:
            if isinstance(exc, OSError):
                raise
            self.abort()
            raise InputError(f"Cannot write a video to '{self.partial_path}': {exc}") from exc
        self._container = container
        stream = container.add_stream("libx264", rate=self.rate)
        stream.width, stream.height = width + width % 2, height + height % 2
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(self.crf), "preset": self.preset,
                          **({"g": str(self.keyframe_interval)} if self.keyframe_interval else {}),
                          **({"tune": self.tune} if self.tune else {})}
        self._video_stream = stream
        if width % 2 or height % 2:
            logger.info("frame size %dx%d is odd; padding to %dx%d for yuv420p", width, height,
                        stream.width, stream.height)
        if self._audio is not None:
            rate = self._audio_rate if self._audio_rate in _AAC_RATES else 48000
            audio_stream = container.add_stream("aac", rate=rate)
            audio_stream.layout = "mono" if self._audio.shape[0] == 1 else "stereo"
            self._audio_stream = audio_stream
        self._size = (height, width)

    def write(self, frames: np.ndarray | torch.Tensor) -> None:
        """Encode ``[B, H, W, 3]`` (or one ``[H, W, 3]``) frames, uint8 or float in ``[0, 1]``.

        The first call with at least one frame creates the partial file.
        """
        if self._closed:
            raise IMTalkerError(f"the writer for '{self.path}' is already closed")
        batch = _frames_to_uint8(frames)
        if not len(batch):
            return
        height, width = batch.shape[1:3]
        if self._size is not None and (height, width) != self._size:
            raise InputError(f"all frames must have one size: got {width}x{height}, "
                             f"but the video is {self._size[1]}x{self._size[0]}")
        if height % 2 or width % 2:
            batch = np.pad(batch, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")
        try:
            if self._size is None:
                self._open(height, width)
            assert self._video_stream is not None
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
        assert self._container is not None
        for packet in packets:
            self._container.mux(packet)

    def close(self) -> None:
        """Flush the encoders, finish the file and move it to its final name.

        Closing a writer that received no frames raises `InputError` (a video needs at least
        one frame, and an empty one must not pass for a result); no file is left behind.
        """
        if self._closed:
            return
        if self._container is None or self._video_stream is None or self.frames_written == 0:
            self.abort()
            raise InputError(f"no frames were written to '{self.path}'; nothing was saved "
                             "(a video needs at least one frame).")
        try:
            self._write_audio_until(self.frames_written / self.rate)
            self._mux(self._video_stream.encode(None))
            if self._audio_stream is not None:
                self._mux(self._audio_stream.encode(None))
            self._container.close()
            self._closed = True
            if self._target is not None:
                self._target.flush()
                logger.info("wrote a fragmented MP4 to %s: %d frames at %s fps", self.path, self.frames_written,
                            self.rate)
                return
            os.replace(self.partial_path, self.path)
            self._created = False
            if self._finalizer is not None:
                self._finalizer.detach()
        except OSError as exc:
            self._raise_write_error(exc)
        except BaseException:
            self.abort()
            raise
        logger.info("wrote %s: %d frames at %s fps%s", self.path, self.frames_written, self.rate,
                    " with audio" if self._audio is not None else "")

    def abort(self) -> None:
        """Stop writing and delete the partial file (or keep it when ``keep_partial``).

        Safe to call at any time and more than once; a writer that never received a frame has
        no file to delete (and never deletes another writer's file of the same name).
        """
        try:
            if not self._closed:
                self._closed = True
                if self._container is not None:
                    try:
                        self._container.close()
                    except (av.FFmpegError, OSError) as exc:
                        # Closing flushes buffered data; on a full disk that fails again, which is moot.
                        logger.debug("ignoring error while closing the aborted %s: %s", self.partial_path, exc)
        finally:
            # In `finally` so a second Ctrl+C during the close above still removes the file.
            if self._created:
                if self.keep_partial and self.partial_path.exists():
                    logger.warning("kept the incomplete video as %s", self.partial_path)
                else:
                    self._remove_partial()
                self._created = False
            if self._finalizer is not None:
                self._finalizer.detach()

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
        if self._target is not None:
            reason = ("the program reading it closed the stream" if exc.errno == errno.EPIPE
                      else str(exc))
            raise OutputWriteError(f"Could not write the video to {self.path}: {reason}; stopped.", exc.errno,
                                   str(self.path)) from exc
        if _is_disk_full(exc):
            message = (f"Could not write '{self.path}': the disk is full. Free some space or choose "
                       f"another output folder; {fate}.")
        else:
            message = f"Could not write '{self.path}': {exc}; {fate}."
        raise OutputWriteError(message, exc.errno, str(self.path)) from exc


def _discard_partial(path: Path) -> None:
    """Finalizer of a writer dropped while writing: delete its partial file."""
    try:
        if path.exists():
            path.unlink()
            logger.debug("removed %s: its writer was never closed", path)
    except OSError as exc:
        logger.warning("could not remove the incomplete file %s: %s", path, exc)


def write_video(path: str | os.PathLike, frames: Iterable[np.ndarray | torch.Tensor], fps: float | Fraction,
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


class FrameSink(Protocol):
    """What `BackgroundWriter` drives: `VideoWriter`, `RawVideoWriter` or any object like them."""

    def write(self, frames: np.ndarray | torch.Tensor) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


class RawVideoWriter(_ClosedOnExit):
    """Bare RGB24 frames (``H × W × 3`` bytes each, rows top to bottom, no header) to a binary stream.

    What ``ffplay -f rawvideo -pixel_format rgb24 -video_size WxH -framerate 25 -`` or a program
    reading fixed-size records expects. ``write`` takes what `VideoWriter.write` takes; the first
    frame fixes the size (an odd size is kept: nothing here needs even sizes). ``close`` flushes the
    stream without closing it; ``abort`` stops writing. A failing stream (e.g. its reader quit)
    raises `OutputWriteError`.
    """

    def __init__(self, stream: BinaryIO, name: str | None = None) -> None:
        if not hasattr(stream, "write"):
            raise InputError(f"RawVideoWriter writes to an open binary stream, got {type(stream).__name__}")
        self.stream = stream
        self.name = name or str(getattr(stream, "name", "<stream>"))
        self.frames_written = 0
        self.size: tuple[int, int] | None = None  # (height, width) of every frame
        self._closed = False

    def write(self, frames: np.ndarray | torch.Tensor) -> None:
        if self._closed:
            raise IMTalkerError(f"the raw frame writer for {self.name} is already closed")
        batch = _frames_to_uint8(frames)
        if not len(batch):
            return
        size = tuple(batch.shape[1:3])
        if self.size is None:
            self.size = size  # type: ignore[assignment]
            logger.info("raw RGB24 frames to %s: %dx%d each", self.name, size[1], size[0])
        elif size != self.size:
            raise InputError(f"all frames must have one size: got {size[1]}x{size[0]}, "
                             f"but the stream is {self.size[1]}x{self.size[0]}")
        try:
            self.stream.write(np.ascontiguousarray(batch).tobytes())
        except OSError as exc:
            self._closed = True
            reason = "the program reading it closed the stream" if exc.errno == errno.EPIPE else str(exc)
            raise OutputWriteError(f"Could not write frames to {self.name}: {reason}; stopped.", exc.errno,
                                   self.name) from exc
        self.frames_written += len(batch)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.frames_written == 0:
            raise InputError(f"no frames were written to {self.name} (a video needs at least one frame).")
        try:
            self.stream.flush()
        except OSError as exc:
            raise OutputWriteError(f"Could not write frames to {self.name}: {exc}", exc.errno, self.name) from exc

    def abort(self) -> None:
        self._closed = True


class BackgroundWriter(_ClosedOnExit):
    """Runs a writer's ``write`` calls on a thread of its own, so encoding overlaps the caller's work.

    ``writer`` is a `FrameSink` (`VideoWriter`, `RawVideoWriter`, …); its ``write`` is called on the
    thread, in order, and its ``close``/``abort`` on the caller's thread once the thread has finished.
    At most ``max_pending`` batches wait in the queue: ``write`` blocks beyond that, so memory stays
    bounded when the writer is slower than the producer. The batches are handed over as they are,
    not copied: the caller must not modify a batch after passing it (the renderer makes new tensors
    for every batch).

    An exception raised by the writer on the thread stops it (the batches still queued are dropped)
    and is re-raised, the same object, in the caller's thread by the next ``write`` or by ``close``;
    the writer is then aborted. Use as a context manager, like `VideoWriter`: an exception in the
    ``with`` block aborts the writer after stopping the thread.
    """

    _POLL_S = 0.1  # how often a blocked `write` looks whether the thread has died

    def __init__(self, writer: FrameSink, max_pending: int = 2, name: str = "imtalker-writer") -> None:
        if max_pending < 1:
            raise InputError(f"max_pending must be at least 1, got {max_pending}")
        self.writer = writer
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: Exception | None = None
        self._stop = threading.Event()  # set by abort: drop what is queued
        self._finished = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            if self._error is not None or self._stop.is_set():
                continue  # drain: the producer may still be blocked on a full queue
            try:
                self.writer.write(batch)
            except Exception as exc:  # noqa: BLE001 - handed to the caller's thread, re-raised there
                self._error = exc

    def _raise_error(self) -> None:
        if self._error is not None:
            error = self._error
            self._finish(abort=True)
            raise error

    def write(self, frames: np.ndarray | torch.Tensor) -> None:
        """Queue a batch for the writer (blocks while `max_pending` batches wait)."""
        if self._finished:
            raise IMTalkerError("the background writer is already closed")
        self._raise_error()
        while True:
            try:
                self._queue.put(frames, timeout=self._POLL_S)
                return
            except queue.Full:
                self._raise_error()
                if not self._thread.is_alive():
                    self._finish(abort=True)
                    raise IMTalkerError("the writer thread stopped unexpectedly; nothing more can be written")

    def _finish(self, abort: bool) -> None:
        """Stop the thread (after the queued batches unless `abort`), then close or abort the writer."""
        if self._finished:
            return
        self._finished = True
        if abort:
            self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.put(None, timeout=self._POLL_S)
                break
            except queue.Full:
                continue
        self._thread.join()
        if abort or self._error is not None:
            self.writer.abort()
        else:
            self.writer.close()

    def close(self) -> None:
        """Write what is queued, stop the thread and close the writer; re-raises a writer error."""
        if self._finished:
            return
        self._finish(abort=False)
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        """Drop what is queued, stop the thread and abort the writer."""
        self._finish(abort=True)
