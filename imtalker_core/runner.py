"""Whole jobs from files to a finished MP4: used by the command line, reusable from scripts.

A job checks its inputs first (files readable, output folder writable, a face present), then
encodes, generates and renders in batches, streaming each batch into the video writer, so memory
stays bounded for any length and a failure or Ctrl+C never leaves a half-written file behind
under the final name (the writer removes its `.partial` file).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import compiled, model_files
from .checkpoints import load_generator_and_audio_encoder, load_renderer
from .controls.sequence import PART_WIDTHS, ControlSequence
from .controls.sequence import load_controls as read_control_file
from .errors import InputError
from .sampling import NOISE_MODES
from .validation import check_batch_size, check_cfg, check_fraction, check_seed, check_steps
from .generator import MotionGenerator
from .generator.audio import AudioEncoder
from .media.audio import check_audio, load_audio, probe_audio, to_mono_16k
from .media.face import CropBox, crop_box, crop_face, iter_paste_back, stable_video_box
from .media.images import load_image, to_model_input
from .media.video import BackgroundWriter, VideoWriter, check_output_path, read_video, video_info
from .motion_edit import relative_motion
from .timing import frame_count
from .pipeline import encode_identity, encode_motion, generate_motion, render_batches
from .precision import set_allow_tf32
from .renderer import IMTRenderer

log = logging.getLogger(__name__)

#: progress(stage, done, total): stages are "audio", "motion" and "render".
Progress = Callable[[str, int, int], None]


@dataclass
class Models:
    renderer: IMTRenderer
    generator: MotionGenerator | None = None
    audio_encoder: AudioEncoder | None = None


def load_models(models_dir: str | os.PathLike | None = None, device: str = "cpu",
                dtype: torch.dtype = torch.float32, audio: bool = True, download: bool = True,
                compile_mode: str = "off", allow_tf32: bool = False) -> Models:
    """Load the renderer and, for audio-driven work, the generator and wav2vec2 from a models folder.

    The generator file is read once; wav2vec2 uses its copy of the wav2vec2 weights when it carries
    one, as the reference does (see `checkpoints.load_generator_and_audio_encoder`). `compile_mode`
    (`compiled.COMPILE_MODES`) compiles the renderer's frames and the generator's steps at first use.
    `allow_tf32` lets float32 models use TF32 on CUDA (`precision.set_allow_tf32`); otherwise fp32 is fp32."""
    compile_mode = compiled.check_compile_mode(compile_mode)
    root = model_files.ensure_models(models_dir, download=download)
    renderer = load_renderer(model_files.model_path(root, model_files.RENDERER_FILE), device, dtype)
    compiled.set_compile(renderer, compile_mode)
    set_allow_tf32(renderer, allow_tf32)
    if not audio:
        return Models(renderer)
    generator, encoder = load_generator_and_audio_encoder(model_files.model_path(root, model_files.GENERATOR_FILE),
                                                          root / model_files.WAV2VEC2_DIR, device, dtype)
    compiled.set_compile(generator, compile_mode)
    for model in (generator, encoder):
        set_allow_tf32(model, allow_tf32)
    return Models(renderer, generator, encoder)


@dataclass(frozen=True)
class CropSettings:
    """crop: find the face and crop around it (scale × the detected box); otherwise the whole image
    is resized to 512². crop_driving: also find the face in a driving video and crop one steady
    square around it; off by default, as in the reference app, so the whole frame is resized.
    paste_back: composite the frames into the full original image/video frame. no_face_hint: what
    the no-face error tells the user to do (the command line names its own flag)."""

    crop: bool = True
    scale: float = 1.6
    on_no_face: str = "error"
    paste_back: bool = False
    feather: float = 0.1
    crop_driving: bool = False
    no_face_hint: str | None = None


def _no_face_hint(crop: CropSettings) -> dict:
    return {} if crop.no_face_hint is None else {"no_face_hint": crop.no_face_hint}


def load_controls(path: str | os.PathLike | None, width: int, name: str) -> torch.Tensor | None:
    """A per-frame control sequence `[T, width]` (`name`: pose, cam or gaze) from a file, read by
    `controls.sequence.load_controls`: `.npy`, `.txt`/`.csv`, `.json`, `.npz` or `.pt` (a tensor, or
    a dict with `pose_params`/`cam` as written by SMIRK, which the reference reads)."""
    if path is None:
        return None
    if PART_WIDTHS.get(name) != width:
        raise InputError(f"{name} controls are not {width} numbers per frame; use pose (3), cam (3) or gaze (2)")
    return read_control_file(path, parts=(name,)).get(name)


def fit_controls(pose: torch.Tensor | None, cam: torch.Tensor | None, gaze: torch.Tensor | None, frames: int,
                 mode: str = "hold") -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The controls (25 fps) cut or extended to the clip's `frames`: "hold" repeats the last value (the head
    stays where the file leaves it), "trim_or_zero" pads with zeros as the reference does. Logged when the
    lengths differ. Parts may have different lengths; each is fitted."""
    fitted = []
    for name, value in (("pose", pose), ("cam", cam), ("gaze", gaze)):
        if value is None:
            fitted.append(None)
            continue
        sequence = ControlSequence(**{name: value}).fit(frames, mode)
        fitted.append(getattr(sequence, name))
    return tuple(fitted)


def check_crop(crop: CropSettings) -> None:
    """Crop settings that can be wrong before any work: scale, feather, the no-face policy, and
    paste-back without a crop (nothing to paste back into)."""
    check_fraction(crop.scale, "crop scale", 0.5, 10.0)
    check_fraction(crop.feather, "feather", 0.0, 0.5)
    if crop.on_no_face not in ("error", "center"):
        raise InputError(f"on_no_face must be 'error' or 'center', got {crop.on_no_face!r}")
    if crop.paste_back and not crop.crop:
        raise InputError("paste-back puts the face crop back into the photo, but cropping is off; "
                         "drop --no-crop (or --paste-back)")


def _check_source(image_path, crop: CropSettings) -> None:
    """The portrait decodes and, when cropping, has a face (or a centre crop was asked for)."""
    image = load_image(image_path)
    if crop.crop:
        crop_face(image, crop.scale, 64, on_no_face=crop.on_no_face, name=Path(image_path).name,
                  **_no_face_hint(crop))


def _check_generation(seed: int, steps: int, cfg_scale: float, noise: str) -> None:
    check_seed(seed), check_steps(steps), check_cfg(cfg_scale)
    if noise not in NOISE_MODES:
        raise InputError(f"noise {noise!r}: use one of {', '.join(NOISE_MODES)}")


def _check_output(output_path, inputs: list, crop: CropSettings, batch_size: int) -> Path:
    """The settings every job shares, and the output path (a writable file path that is none of `inputs`)."""
    check_batch_size(batch_size)
    check_crop(crop)
    return check_output_path(output_path, inputs=inputs)


def check_audio_job(image_path, audio_path, output_path, crop: CropSettings = CropSettings(), *, seed: int = 42,
                    steps: int = 10, cfg_scale: float = 3.0, batch_size: int = 4, noise: str = "reference",
                    control_paths: tuple = ()) -> Path:
    """Everything about an audio-driven job that can be checked without a model, in a second or so:
    the numbers, the crop settings, the output path (a writable file path that is none of the
    inputs), the audio header, the portrait and its face. Returns the output path to write."""
    _check_generation(seed, steps, cfg_scale, noise)
    output = _check_output(output_path, [image_path, audio_path, *(p for p in control_paths if p is not None)],
                           crop, batch_size)
    probe_audio(audio_path)
    _check_source(image_path, crop)
    return output


def check_video_job(image_path, video_path, output_path, crop: CropSettings = CropSettings(), *,
                    batch_size: int = 4) -> Path:
    """As `check_audio_job`, for a video-driven job (the driving video's header instead of audio)."""
    output = _check_output(output_path, [image_path, video_path], crop, batch_size)
    video_info(video_path)
    _check_source(image_path, crop)
    return output


def _read_speech(audio_path, fps: int) -> tuple[np.ndarray, int, np.ndarray, int]:
    """The clip as recorded `(waveform, rate)` (what the MP4 carries), its 16 kHz mono copy (what wav2vec2
    hears; checked) and its number of video frames."""
    waveform, rate = load_audio(audio_path)
    wave16 = to_mono_16k(waveform, rate)
    check_audio(wave16, name=Path(audio_path).name)
    return waveform, rate, wave16, frame_count(len(wave16), fps)


def _prepare_source(image_path, crop: CropSettings, size: int) -> tuple[torch.Tensor, np.ndarray, CropBox | None]:
    image = load_image(image_path)
    if not crop.crop:
        return to_model_input(image, size), image, None
    face, box = crop_face(image, crop.scale, size, on_no_face=crop.on_no_face, name=Path(image_path).name,
                          **_no_face_hint(crop))
    return to_model_input(face, size), image, box


def audio_to_video(models: Models, image_path: str | os.PathLike, audio_path: str | os.PathLike,
                   output_path: str | os.PathLike, crop: CropSettings = CropSettings(), seed: int = 42,
                   steps: int = 10, cfg_scale: float = 3.0, pose: torch.Tensor | None = None,
                   cam: torch.Tensor | None = None, gaze: torch.Tensor | None = None, batch_size: int = 4,
                   noise: str = "reference", noise_device: str = "cpu", audio_window_frames: int | None = 1500,
                   progress: Progress | None = None, controls_fit: str = "hold") -> Path:
    """Portrait + speech → talking-face MP4 (25 fps, the audio muxed in). Returns the output path.

    The video has `ceil(seconds × 25)` frames; the audio track is the input audio unchanged. Controls of
    another length are fitted to it (`fit_controls`, `controls_fit`).
    The settings and the output path are checked first; reading the audio and the portrait (with its
    face) comes next, before any model runs (`check_audio_job` does all of it without models).
    """
    if models.generator is None or models.audio_encoder is None:
        raise InputError("audio-driven generation needs the generator and wav2vec2; load them with audio=True")
    _check_generation(seed, steps, cfg_scale, noise)
    output_path = _check_output(output_path, [image_path, audio_path], crop, batch_size)
    fps = int(models.generator.cfg.fps)
    size = models.renderer.cfg.image_size
    waveform, rate, wave16, frames = _read_speech(audio_path, fps)
    pose, cam, gaze = fit_controls(pose, cam, gaze, frames, controls_fit)
    source, original, box = _prepare_source(image_path, crop, size)
    with _open_video(output_path, fps, (waveform, rate), crop, box) as writer:
        device = next(models.audio_encoder.parameters()).device
        features = models.audio_encoder(torch.from_numpy(wave16).to(device), window_frames=audio_window_frames,
                                        callback=_stage(progress, "audio"))
        identity = encode_identity(models.renderer, source)
        motion = generate_motion(models.generator, features, identity.motion, pose=pose, cam=cam, gaze=gaze,
                                 cfg_scale=cfg_scale, steps=steps, seed=seed, noise=noise,
                                 noise_device=noise_device,
                                 callback=_stage(progress, "motion"))
        log.info("%s: %d samples at 16 kHz → %d frames", Path(audio_path).name, len(wave16), motion.shape[0])
        _render_into(writer, models.renderer, identity, motion, batch_size, crop, box, original, progress)
    return Path(output_path)


#: Video-driven motion: the driver's latents as they are (the reference), or relative to its first frame.
MOTION_MODES = ("absolute", "relative")


def video_to_video(models: Models, image_path: str | os.PathLike, video_path: str | os.PathLike,
                   output_path: str | os.PathLike, crop: CropSettings = CropSettings(), batch_size: int = 4,
                   keep_audio: bool = True, max_frames: int | None = None,
                   progress: Progress | None = None, motion_mode: str = "absolute") -> Path:
    """Source portrait + driving video → reenacted MP4 at the driving video's frame rate.

    motion_mode: "absolute" (the reference: the driver's latents as they are) or "relative" (the portrait's
    own latent plus the driver's change from its first frame, `motion_edit.relative_motion`: the portrait
    keeps its resting expression when the driver is another person).

    Driving frames are resized whole to the model size, as the reference does; with
    `crop.crop_driving` they are cropped with one stable box for the whole clip (median face box)
    instead, so the face's own motion is kept and frames where the face is lost still count.
    The settings and the output path are checked first, then the video's header and the portrait,
    before any model runs (`check_video_job` does all of it without models).
    """
    if motion_mode not in MOTION_MODES:
        raise InputError(f"motion mode {motion_mode!r}: use one of {', '.join(MOTION_MODES)}")
    output_path = _check_output(output_path, [image_path, video_path], crop, batch_size)
    size = models.renderer.cfg.image_size
    info = video_info(video_path)
    source, original, box = _prepare_source(image_path, crop, size)
    driving_box = stable_video_box(read_video(video_path, max_frames), crop.scale) if crop.crop_driving else None
    audio = None
    if keep_audio and info.has_audio:
        audio = load_audio(video_path)
    # Pass 1: driving motion, streamed in batches (latents are tiny; frames are never all held).
    motion_parts = []
    batch: list[torch.Tensor] = []
    total = info.frame_count_estimate
    motion_progress = _stage(progress, "motion")

    def flush():
        images = torch.cat(batch)
        motion_parts.append(encode_motion(models.renderer, images, batch_size))
        batch.clear()
        if motion_progress is not None:
            done = sum(len(m) for m in motion_parts)
            motion_progress(done, max(done, total))

    for frame in read_video(video_path, max_frames):
        if driving_box is not None:
            frame = crop_box(frame, driving_box, size)
        batch.append(to_model_input(frame, size))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if not motion_parts:
        raise InputError(f"'{Path(video_path).name}' has no decodable video frames")
    motion = torch.cat(motion_parts)
    identity = encode_identity(models.renderer, source)
    if motion_mode == "relative":
        motion = relative_motion(motion.float().cpu(), identity.motion).to(motion.device)
    with _open_video(output_path, info.fps, audio, crop, box) as writer:
        _render_into(writer, models.renderer, identity, motion, batch_size, crop, box, original, progress)
    return Path(output_path)


def _open_video(output_path, fps: float, audio, crop: CropSettings, box: CropBox | None):
    """The MP4 writer of a job. Without paste-back it encodes on a thread of its own (`BackgroundWriter`, two
    batches queued at most), so the next batch renders while one is encoded; pasting back reuses one
    full-size buffer per frame, which the writer must have finished with before the next, so it writes in
    the caller's thread (the paste itself is then the slow part)."""
    writer = VideoWriter(output_path, fps, audio=audio)
    return writer if _pastes_back(crop, box) else BackgroundWriter(writer)


def _pastes_back(crop: CropSettings, box: CropBox | None) -> bool:
    return crop.paste_back and box is not None


def _render_into(writer: VideoWriter | BackgroundWriter, renderer: IMTRenderer, identity, motion: torch.Tensor,
                 batch_size: int, crop: CropSettings, box: CropBox | None, original: np.ndarray,
                 progress: Progress | None) -> None:
    """Render batch by batch into `writer` (through `_FrameAdapter`: with paste-back, frame by frame into one
    reused full-size buffer, so memory does not grow with the batch or the photo's size beyond one frame)."""
    adapter = _FrameAdapter(writer, crop, box, original)
    # Straight into the video, frames leave the device as bytes (a quarter of the copy); pasting back blends
    # in float.
    for frames in render_batches(renderer, identity, motion, batch_size, callback=_stage(progress, "render"),
                                 output_dtype=torch.float32 if _pastes_back(crop, box) else torch.uint8):
        adapter.write(frames)


def _stage(progress: Progress | None, stage: str):
    if progress is None:
        return None
    return lambda done, total: progress(stage, done, total)


# --------------------------------------------------------------------------- streaming (live output)

#: Keyframe interval of a streamed MP4 (frames): a fragment per second at 25 fps, so a reader lags by at most ~1 s.
STREAM_KEYFRAME_INTERVAL = 25


def _is_stream(output) -> bool:
    return hasattr(output, "write")


def check_stream_job(image_path, audio_path, output, crop: CropSettings = CropSettings(), *, raw: bool = False,
                     seed: int = 42, steps: int = 10, cfg_scale: float = 3.0, batch_size: int = 4,
                     first_batch_size: int | None = None, noise: str = "reference", audio_mode: str = "whole",
                     control_paths: tuple = ()) -> None:
    """`check_audio_job` for `audio_to_stream`: `output` is a file path (a fragmented MP4, checked as any
    output path) or an open binary stream; raw frames need a stream."""
    _check_stream_settings(image_path, audio_path, output, crop, raw, seed, steps, cfg_scale, batch_size,
                           first_batch_size, noise, audio_mode, control_paths)
    probe_audio(audio_path)
    _check_source(image_path, crop)


def _check_stream_settings(image_path, audio_path, output, crop, raw, seed, steps, cfg_scale, batch_size,
                           first_batch_size, noise, audio_mode, control_paths) -> None:
    """The settings and the output of a streamed job: what `audio_to_stream` checks itself, since reading the
    audio and the portrait comes next anyway."""
    from .stream import AUDIO_MODES

    _check_generation(seed, steps, cfg_scale, noise)
    if first_batch_size is not None:
        check_batch_size(first_batch_size, "first batch size")
    if audio_mode not in AUDIO_MODES:
        raise InputError(f"stream audio mode {audio_mode!r}: use one of {', '.join(AUDIO_MODES)}")
    if _is_stream(output):
        check_batch_size(batch_size)
        check_crop(crop)
    elif raw:
        raise InputError(f"raw frames are written to a stream (standard output: -o -), not to '{output}'; "
                         "drop the raw option to stream a fragmented MP4 into a file")
    else:
        _check_output(output, [image_path, audio_path, *(p for p in control_paths if p is not None)], crop,
                      batch_size)


class _FrameAdapter:
    """Renderer batches `[b, 3, S, S]` → what the video writers take (`[b, S, S, 3]`), pasted back into the
    full photo when asked; runs wherever `write` is called (the writer thread)."""

    def __init__(self, sink, crop: CropSettings, box: CropBox | None, original: np.ndarray):
        self.sink, self.crop, self.box, self.original = sink, crop, box, original
        self.buffer: np.ndarray | None = None

    def write(self, frames: torch.Tensor) -> None:
        frames = frames.permute(0, 2, 3, 1)
        if not _pastes_back(self.crop, self.box):
            self.sink.write(frames)
            return
        if self.buffer is None:
            self.buffer = np.empty((*self.original.shape[:2], 3), dtype=np.float32)
        for full in iter_paste_back(frames, self.box, self.original, self.crop.feather, out=self.buffer):
            self.sink.write(full)

    def close(self) -> None:
        self.sink.close()

    def abort(self) -> None:
        self.sink.abort()


def audio_to_stream(models: Models, image_path: str | os.PathLike, audio_path: str | os.PathLike, output,
                    crop: CropSettings = CropSettings(), *, raw: bool = False, seed: int = 42, steps: int = 10,
                    cfg_scale: float = 3.0, pose: torch.Tensor | None = None, cam: torch.Tensor | None = None,
                    gaze: torch.Tensor | None = None, batch_size: int = 4, first_batch_size: int | None = None,
                    noise: str = "reference", noise_device: str = "cpu", audio_mode: str = "whole",
                    audio_window_frames: int | None = 1500, keyframe_interval: int = STREAM_KEYFRAME_INTERVAL,
                    background: bool = True, max_pending: int = 2, progress: Progress | None = None,
                    controls_fit: str = "hold"):
    """Portrait + speech → video written while it is generated (`imtalker_core.stream.stream_frames`).

    output: a file path (a fragmented MP4 with the audio, under `<name>.partial.mp4` while it grows and
    renamed when done, as `audio_to_video` does) or an open binary stream (a fragmented MP4 with the audio,
    or with `raw` bare RGB24 frames without audio: `media.video.RawVideoWriter`). The MP4 is encoded with
    libx264 `veryfast`/`zerolatency` and a keyframe every `keyframe_interval` frames, so a reader can play
    it from the first fragment. With `background` the encoding runs on a writer thread
    (`media.video.BackgroundWriter`, at most `max_pending` batches queued) while the next frames render;
    the output is the same either way. With the defaults (`audio_mode="whole"`, `first_batch_size=None`)
    the frames are those of `audio_to_video`. Returns the run's `stream.StreamTimings`.
    """
    from .media.video import RawVideoWriter
    from .stream import StreamTimings, stream_frames

    if models.generator is None or models.audio_encoder is None:
        raise InputError("audio-driven generation needs the generator and wav2vec2; load them with audio=True")
    _check_stream_settings(image_path, audio_path, output, crop, raw, seed, steps, cfg_scale, batch_size,
                           first_batch_size, noise, audio_mode, ())
    fps = int(models.generator.cfg.fps)
    size = models.renderer.cfg.image_size
    waveform, rate, wave16, frames = _read_speech(audio_path, fps)
    pose, cam, gaze = fit_controls(pose, cam, gaze, frames, controls_fit)
    source, original, box = _prepare_source(image_path, crop, size)
    identity = encode_identity(models.renderer, source)
    if raw:
        sink = RawVideoWriter(output)
        height, width = original.shape[:2] if _pastes_back(crop, box) else (size, size)
        log.info("streaming raw RGB24 frames, %dx%d at %d fps, no audio", width, height, fps)
    else:
        sink = VideoWriter(output, fps, audio=(waveform, rate), preset="veryfast", fragmented=True,
                           keyframe_interval=keyframe_interval, tune="zerolatency")
    writer = _FrameAdapter(sink, crop, box, original)
    if background:
        writer = BackgroundWriter(writer, max_pending=max_pending)
    timings = StreamTimings()
    frames_out = stream_frames(models.renderer, models.generator, models.audio_encoder, identity, wave16, pose=pose,
                               cam=cam, gaze=gaze, cfg_scale=cfg_scale, steps=steps, seed=seed, noise=noise,
                               noise_device=noise_device, batch_size=batch_size, first_batch_size=first_batch_size,
                               audio_mode=audio_mode, audio_window_frames=audio_window_frames,
                               callback=_stage(progress, "render"), timings=timings)
    try:
        for frames in frames_out:
            writer.write(frames)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    log.info("streamed %d frames: first after %.0f ms%s", timings.frames, 1000 * (timings.first_frame_s or 0.0),
             f", then {timings.steady_fps:.2f} frames/s" if timings.steady_fps else "")
    return timings
