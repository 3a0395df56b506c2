"""Video-driven motion streamed from a file, and the bad-frame checks shared with Encode Motion.

`IMTalkerVideoToMotion` decodes the driving video one frame at a time (`read_video`), crops each
frame at once and keeps only one batch of crops, so memory does not grow with the video's length
or resolution (a 10-minute 1080p driver costs what a 10-second one does). With crop "face" the file
is decoded twice: a first pass finds the steady face box (`stable_video_box`, every 15th frame),
the second crops and encodes.

Bad frames: a driving frame is *bad* when it is black or nearly so (mean below `DARK_MEAN`), or a
single flat colour (standard deviation below `FLAT_STD`); and, where a face box is used, when no
face is found inside the crop. Faces are looked for on every 15th frame (a shorter face-less stretch
between two of them goes unseen) and, after a miss, on every frame for the next 15 frames, then on
every 15th again; a video in which no sampled frame shows a face (a face the frontal-face detector
cannot see) is only checked for black/flat frames. `on_bad_frame` decides what happens: "hold"
(replace a bad frame's motion by the last good frame's; leading bad frames take the first good
frame's), "error" (stop, naming the frames) or "keep" (encode them as they are). Bad frames are
always counted and reported as frame ranges in a warning shown on the node (`bridge.notify`).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from ..imtalker_core import render_memory
from ..imtalker_core.errors import InputError
from ..imtalker_core.media.audio import load_audio
from ..imtalker_core.media.face import CropBox, center_box, crop_box, detect_faces, stable_video_box
from ..imtalker_core.media.images import to_model_input
from ..imtalker_core.media.video import read_video, video_info
from ..imtalker_core.pipeline import encode_motion
from . import bridge
from .face import VIDEO_SAMPLE_EVERY
from .generate import fit_to_frames
from .types import MOTION, RENDERER, ManagedModel, Motion

log = logging.getLogger(__name__)

CROP_MODES = ("face", "center_square")
BAD_FRAME_POLICIES = ("hold", "error", "keep")
#: A frame whose values vary less than this (standard deviation, values in [0, 1]) is one flat colour.
FLAT_STD = 1.0 / 255.0
#: A frame darker than this on average (values in [0, 1]) is black, even with compression noise.
DARK_MEAN = 4.0 / 255.0
#: The checks look at about this many pixels per side (a strided view), so they cost little per frame.
_CHECK_SIDE = 128
#: A warning lists at most this many stretches of bad frames.
_RANGES_SHOWN = 8
#: Sample rate of the silent sound track given for a video without one.
SILENT_RATE = 16000

BLANK = "blank"
NO_FACE = "no_face"
_REASON_TEXT = {BLANK: "black or one flat colour", NO_FACE: "no face inside the crop"}


def bad_frame_tooltip(faces: bool) -> str:
    """The `on_bad_frame` tooltip; `faces`: whether the node also checks for a face."""
    what = ("black or one flat colour; with crop 'face' also frames without a face, checked every 15th frame "
            "and on each of the 15 frames after a miss") if faces else "black or one flat colour"
    return (f"What to do with bad driving frames ({what}): 'hold' gives them the motion of the last good frame "
            "(the first good frame for leading ones), 'error' stops and names them, 'keep' encodes them as they "
            "are. They are always counted and reported on the node.")


# --------------------------------------------------------------------------------------------
# Bad frames
# --------------------------------------------------------------------------------------------

def check_policy(on_bad_frame: str) -> None:
    if on_bad_frame not in BAD_FRAME_POLICIES:
        raise InputError(f"on_bad_frame must be one of {', '.join(BAD_FRAME_POLICIES)}, not {on_bad_frame!r}")


def blank_frame(frame: np.ndarray | torch.Tensor) -> bool:
    """True when an RGB frame `[H, W, 3]` (float in [0, 1] or uint8) is black or one flat colour.

    Looks at a strided view of about `_CHECK_SIDE` pixels per side.
    """
    step = max(1, min(frame.shape[0], frame.shape[1]) // _CHECK_SIDE)
    sample = torch.as_tensor(frame[::step, ::step]) if isinstance(frame, np.ndarray) else frame[::step, ::step]
    values = sample.to(torch.float32)
    if sample.dtype == torch.uint8:
        values = values / 255.0
    return bool(values.mean() < DARK_MEAN or values.std(unbiased=False) < FLAT_STD)


class FrameChecker:
    """Tells, frame by frame in order, why a driving frame is bad (`BLANK`, `NO_FACE`) or None.

    With `faces`, faces are looked for on every `sample_every`-th frame. After a miss, every frame is
    looked at for the next `sample_every` frames, so a short face-less stretch is found to the frame;
    a longer one is followed on every `sample_every`-th frame again (its frames in between count as
    face-less too), which bounds the cost of a long stretch.
    """

    def __init__(self, faces: bool, sample_every: int = VIDEO_SAMPLE_EVERY):
        self.faces = faces
        self.sample_every = sample_every
        self._miss_since: int | None = None  # first frame of the face-less stretch we are in

    def __call__(self, index: int, frame: np.ndarray | torch.Tensor) -> str | None:
        if blank_frame(frame):
            return BLANK
        if not self.faces:
            return None
        sampled = index % self.sample_every == 0
        if self._miss_since is None:
            if not sampled or detect_faces(frame):
                return None
            self._miss_since = index
            return NO_FACE
        if (sampled or index - self._miss_since <= self.sample_every) and detect_faces(frame):
            self._miss_since = None
            return None
        return NO_FACE


def _ranges(indices: Iterable[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for i in sorted(indices):
        if runs and i == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


class BadFrames:
    """The bad frames found so far (frame index → reason) and how to describe them."""

    def __init__(self, fps: float):
        self.fps = float(fps)
        self.reasons: dict[int, str] = {}

    def add(self, index: int, reason: str) -> None:
        self.reasons[index] = reason

    def __len__(self) -> int:
        return len(self.reasons)

    def __contains__(self, index: int) -> bool:
        return index in self.reasons

    def _stretch(self, first: int, last: int) -> str:
        if first == last:
            return f"{first} ({first / self.fps:.2f} s)"
        return f"{first}-{last} ({first / self.fps:.2f}-{last / self.fps:.2f} s)"

    def describe(self) -> str:
        """E.g. "3 black or one flat colour: frames 0-2 (0.00-0.08 s); 15 no face inside the crop: ..."."""
        parts = []
        for reason, text in _REASON_TEXT.items():
            indices = [i for i, r in self.reasons.items() if r == reason]
            if not indices:
                continue
            runs = _ranges(indices)
            shown = ", ".join(self._stretch(a, b) for a, b in runs[:_RANGES_SHOWN])
            more = f" and {len(runs) - _RANGES_SHOWN} more stretches" if len(runs) > _RANGES_SHOWN else ""
            parts.append(f"{len(indices)} {text}: frame{'s' if len(indices) > 1 else ''} {shown}{more}")
        return "; ".join(parts) + " (frames numbered from 0)"


def bad_frames_error(bad: BadFrames, what: str, note: str = "") -> InputError:
    """The error that on_bad_frame 'error' raises, naming the bad frames (`note` is added after them)."""
    return InputError(f"{what}: bad driving frames: {bad.describe()}{note}. Fix or trim the driving video, or set "
                      "on_bad_frame to 'hold' (reuse the last good frame's motion) or 'keep'.")


def settle_bad_frames(latents: torch.Tensor, bad: BadFrames, policy: str, what: str) -> torch.Tensor:
    """Apply `policy` to the latents `[T, D]` of a clip with `bad` frames; warns (log and node).

    "error" raises `InputError` naming the frames; "hold" returns a copy in which each bad frame has
    the last good frame's latent (leading bad frames the first good frame's), and raises when every
    frame is bad; "keep" returns `latents` unchanged.
    """
    check_policy(policy)
    if not len(bad):
        return latents
    total = latents.shape[0]
    summary = bad.describe()
    if policy == "error":
        raise bad_frames_error(bad, what)
    if policy == "hold":
        good = [i for i in range(total) if i not in bad]
        if not good:
            raise InputError(f"{what}: all {total} driving frames are bad ({summary}), so there is no good frame "
                             "to hold. Check the video; with crop 'face', try 'center_square' or set on_bad_frame "
                             "to 'keep'.")
        source = torch.empty(total, dtype=torch.long)
        last = good[0]
        for i in range(total):
            if i not in bad:
                last = i
            source[i] = last
        latents = latents[source]
        action = "each given the motion of the last good frame before it (the first good frame for leading ones)"
    else:
        action = "encoded as they are (on_bad_frame 'keep')"
    bridge.notify(f"{what}: {len(bad)} of {total} driving frames are bad, {action}: {summary}.", logging.WARNING)
    return latents


# --------------------------------------------------------------------------------------------
# Encoding a batch at a time
# --------------------------------------------------------------------------------------------

MAX_AUTO_MOTION_BATCH = 32
MOTION_BATCH_INPUT = ("INT", {
    "default": 0, "min": 0, "max": 256,
    "tooltip": "Frames encoded at once. 0 = auto: 1 on the CPU (the bar and Cancel then act on every frame), on a "
               "GPU as many as its free memory holds (up to 32). Memory does not depend on the video's length."})


def motion_batch_size(batch_size: int) -> int:
    """The batch size to encode driving frames with: `batch_size`, or for 0 what `bridge.auto_batch_size`
    picks (1 on the CPU)."""
    if batch_size < 0:
        raise InputError(f"batch_size must be 0 (auto) or more, got {batch_size}")
    if batch_size == 0:
        batch_size = bridge.auto_batch_size(render_memory.MOTION_ENCODER_BYTES_PER_FRAME, MAX_AUTO_MOTION_BATCH)
        log.info("IMTalker: encoding %d driving frame(s) at a time (batch_size 0 = auto)", batch_size)
    return batch_size


class MotionBatches:
    """Driving frames → motion latents, `batch_size` frames at a time, in two fixed buffers.

    `add` copies each model-ready frame into one reused `[batch_size, 3, S, S]` buffer and encodes it
    when full; the latents go into one preallocated `[expected_frames, D]` tensor (grown if more
    frames come). Nothing is allocated per batch that outlives it: small tensors kept between the
    large per-frame temporaries make the C heap grow with every batch (about 2 MB a frame at
    1080p, measured), even though the frames themselves are freed.
    """

    def __init__(self, module: torch.nn.Module, batch_size: int, expected_frames: int):
        self.module = module
        self.size = module.cfg.image_size
        self.buffer = torch.empty(batch_size, 3, self.size, self.size, dtype=torch.float32)
        self.pending = 0
        self.expected = max(int(expected_frames), 1)
        self.latents: torch.Tensor | None = None
        self.done = 0

    def add(self, frame: np.ndarray | torch.Tensor) -> None:
        """One RGB frame `[H, W, 3]`, float in [0, 1] (or uint8); resized like `to_model_input` if needed."""
        image = torch.from_numpy(frame) if isinstance(frame, np.ndarray) else frame.cpu()
        if image.dtype == torch.float32 and tuple(image.shape[:2]) == (self.size, self.size):
            # What to_model_input gives for a frame of the model's size, without a temporary copy.
            torch.clamp(image.permute(2, 0, 1), 0.0, 1.0, out=self.buffer[self.pending])
        else:
            self.buffer[self.pending].copy_(to_model_input(image, self.size)[0])
        self.pending += 1
        if self.pending == self.buffer.shape[0]:
            self.flush()

    def flush(self) -> None:
        """Encode the frames waiting in the buffer."""
        if not self.pending:
            return
        count, self.pending = self.pending, 0
        # The buffer's size as the batch size: a short last flush is then padded to it when the renderer is
        # compiled (one graph), and runs as it is otherwise.
        out = encode_motion(self.module, self.buffer[:count], batch_size=self.buffer.shape[0],
                            check_interrupt=bridge.check_interrupt)
        if self.latents is None:
            self.latents = torch.empty(max(self.expected, count), out.shape[1], dtype=torch.float32)
        elif self.done + count > self.latents.shape[0]:
            grown = torch.empty(max(self.done + count, self.latents.shape[0] * 3 // 2), out.shape[1])
            grown[:self.done] = self.latents[:self.done]
            self.latents = grown
        self.latents[self.done:self.done + count] = out
        self.done += count

    def result(self) -> torch.Tensor:
        """The latents `[frames, D]` (float32, CPU) of every frame added; call after the last `add`."""
        self.flush()
        if self.latents is None:
            return torch.empty(0, 0)
        return self.latents if self.done == self.latents.shape[0] else self.latents[:self.done].clone()


# --------------------------------------------------------------------------------------------
# The node
# --------------------------------------------------------------------------------------------

def resolve_video(video: str, video_path: str) -> str:
    """The file to read: `video_path` when given (absolute, or relative to the input folder), else
    input-folder file `video`. FileNotFoundError / InputError when there is none."""
    path = bridge.given_path(video_path, "video_path", FileNotFoundError)
    if path is not None:
        return path
    if not video:
        raise InputError("choose a driving video from the input folder (or upload one), or give video_path")
    return bridge.input_path(video)


def _model_crop(frame: np.ndarray, box: CropBox, size: int) -> np.ndarray:
    """A decoded uint8 frame's crop as float32 `[size, size, 3]` in [0, 1].

    The same values Crop Face gives for the frame as a ComfyUI IMAGE (uint8 / 255): only the box's
    pixels are converted, then resized as `crop_box` resizes float crops.
    """
    crop = crop_box(frame, box)  # uint8, box.size², black where the box leaves the frame
    crop = np.divide(crop, np.float32(255.0), dtype=np.float32)
    whole = CropBox(0, 0, box.size, box.size, box.size)
    return crop_box(crop, whole, size)


def _counted(frames: Iterator[np.ndarray], progress: bridge.Progress, offset: int, total: int,
             counter: list[int]) -> Iterator[np.ndarray]:
    """`frames` with a cancel check before and a progress step (`offset + n` of `total`) after each
    frame; counts them into `counter[0]`."""
    for frame in frames:
        bridge.check_interrupt()
        yield frame
        counter[0] += 1
        progress(offset + counter[0], max(total, offset + counter[0]))


def _probe_faces(frames: Iterator[np.ndarray], found: list[bool]) -> Iterator[np.ndarray]:
    """`frames` unchanged; sets `found[0]` once a sampled frame (every 15th) shows a face, then stops
    looking (one detection for most videos)."""
    for index, frame in enumerate(frames):
        if not found[0] and index % VIDEO_SAMPLE_EVERY == 0 and not blank_frame(frame) and detect_faces(frame):
            found[0] = True
        yield frame


def _soundtrack(path: str, has_audio: bool, frames: int, fps: float) -> dict:
    """The video's own sound (its rate and channels) cut or zero-padded to `frames / fps` seconds
    (the sample count Save Video keeps); silence when the file has none (noted)."""
    name = os.path.basename(path)
    waveform, rate = None, SILENT_RATE
    if has_audio:
        try:
            waveform, rate = load_audio(path)
        except InputError as err:
            bridge.notify(f"IMTalker Video To Motion: the sound of '{name}' could not be read ({err}); the audio "
                          "output is silence", logging.WARNING)
    else:
        bridge.notify(f"IMTalker Video To Motion: '{name}' has no sound track; the audio output is silence",
                      logging.INFO)
    silence = torch.zeros(1, 0) if waveform is None else torch.from_numpy(waveform)
    return bridge.make_audio(fit_to_frames(silence, rate, frames, fps), rate)


class IMTalkerVideoToMotion:
    """Streams a driving video file into motion latents, a batch of frames at a time."""

    @classmethod
    def INPUT_TYPES(cls):
        # All required, so ComfyUI's frontend gives 'video' its upload button (it looks in "required" only)
        # and that button's widget value is the last in widgets_values, as on core Load Video. An empty
        # input folder lists one empty name, so the prompt still holds 'video' when video_path is used.
        return {
            "required": {
                "renderer": (RENDERER, {"tooltip": "From IMTalker Load Renderer."}),
                "video": (bridge.list_input_videos() or [""], {
                    "video_upload": True,
                    "tooltip": "The driving video, from ComfyUI's input folder (and its sub-folders); upload one "
                               "with the button. It is read frame by frame, never whole."}),
                "video_path": ("STRING", {
                    "default": "",
                    "tooltip": "Optional: a video file on the server (full path, or relative to the input "
                               "folder). When set it is used instead of 'video'."}),
                "crop": (list(CROP_MODES), {
                    "default": "face",
                    "tooltip": "How each frame becomes the square the motion encoder sees (frames are never "
                               "stretched). 'face' (default): one steady box around the face, as Crop Face gives "
                               "for a batch (median face over every 15th frame, side = face size × scale): the "
                               "framing the portrait gets, so any video works, a close-up or a wide shot; it "
                               "decodes the file twice and checks that each frame shows a face. 'center_square': "
                               "the largest centred square, i.e. the whole frame of a square video, as the "
                               "reference app takes it; for driving videos that are already face crops."}),
                "scale": ("FLOAT", {
                    "default": 1.6, "min": 1.0, "max": 4.0, "step": 0.05,
                    "tooltip": "With crop 'face': the crop side as a multiple of the face size (1.6 as in the "
                               "reference; use the value given to Crop Face for the portrait)."}),
                "batch_size": MOTION_BATCH_INPUT,
                "on_bad_frame": (list(BAD_FRAME_POLICIES), {"default": "hold", "tooltip": bad_frame_tooltip(True)}),
                "max_frames": ("INT", {
                    "default": 0, "min": 0, "max": 10_000_000,
                    "tooltip": "Use only the first this many frames (0 = the whole video), e.g. for a quick try."}),
            },
        }

    RETURN_TYPES = (MOTION, "AUDIO", "FLOAT")
    RETURN_NAMES = ("motion", "audio", "fps")
    OUTPUT_TOOLTIPS = (
        "One motion latent per video frame, at the video's frame rate.",
        ("The video's own sound track (its sample rate and channels), cut to the frames used; silence if it "
         "has none."),
        "The video's frame rate (variable-rate videos are resampled to a constant rate).",
    )
    FUNCTION = "encode"
    CATEGORY = "IMTalker"
    DESCRIPTION = ("Turns a driving video file into motion latents while decoding it frame by frame, so long or "
                   "high-resolution videos need no more memory than short ones. Replaces Load Video → Get Video "
                   "Components → Crop Face → Encode Motion, which hold every frame in memory.")

    @classmethod
    def VALIDATE_INPUTS(cls, video: str = "", video_path: str = ""):
        try:
            resolve_video(video, video_path)
        except (InputError, FileNotFoundError) as err:
            return str(err)
        return True

    @classmethod
    def IS_CHANGED(cls, video: str = "", video_path: str = "", **_):
        return bridge.file_state(lambda: resolve_video(video, video_path))

    def encode(self, renderer: ManagedModel, video: str = "", video_path: str = "", crop: str = "face",
               scale: float = 1.6, batch_size: int = 0, on_bad_frame: str = "hold", max_frames: int = 0):
        what = "IMTalker Video To Motion"
        if crop not in CROP_MODES:
            raise InputError(f"crop must be one of {', '.join(CROP_MODES)}, not {crop!r}")
        check_policy(on_bad_frame)
        batch_size = motion_batch_size(batch_size)
        path = resolve_video(video, video_path)
        info = video_info(path)
        fps = float(info.fps)
        limit = int(max_frames) if max_frames else None
        estimate = min(info.frame_count_estimate, limit) if limit else info.frame_count_estimate
        # One step per frame and pass (crop 'face' reads the file twice); the header's frame count
        # is an estimate, made exact by the first pass.
        passes = 2 if crop == "face" else 1
        total = passes * max(estimate, 1)
        progress = bridge.Progress(total, "reading the driving video")

        offset = 0
        check_faces = crop == "face"
        if crop == "face":
            counter, found = [0], [False]
            frames = _probe_faces(_counted(read_video(path, limit), progress, 0, total, counter), found)
            box = stable_video_box(frames, scale=scale, sample_every=VIDEO_SAMPLE_EVERY)
            offset, total = counter[0], 2 * counter[0]
            if not found[0]:
                # A face the detector cannot see (drawn, masked, in profile): every frame would count as
                # bad, so only black/flat frames are checked.
                check_faces = False
                bridge.notify(f"{what}: no face found in any sampled frame of '{os.path.basename(path)}' (the "
                              "detector sees frontal faces; a drawn, masked or profile face can be missed); using "
                              f"the centred {box.size} px square, and frames are not checked for a face.",
                              logging.WARNING)
        else:
            box = center_box(info.height, info.width)
            if info.width != info.height:
                log.info("%s: using the centred %d px square of the %dx%d frames", what, box.size,
                         info.width, info.height)

        module = bridge.ensure_loaded(renderer)
        size = module.cfg.image_size
        checker = FrameChecker(faces=check_faces)
        bad = BadFrames(fps)
        encoder = MotionBatches(module, batch_size, total - offset)
        counter = [0]
        for index, frame in enumerate(_counted(read_video(path, limit), progress, offset, total, counter)):
            model_frame = _model_crop(frame, box, size)
            del frame  # a full-size frame never outlives its crop
            reason = checker(index, model_frame)
            if reason is not None:
                bad.add(index, reason)
            if on_bad_frame == "error" and len(bad):
                if reason is None:
                    break  # the first bad stretch is over: report it without reading further
                continue  # no encoding: the node stops with an error
            encoder.add(model_frame)
        if on_bad_frame == "error" and len(bad):
            raise bad_frames_error(bad, what, f"; '{os.path.basename(path)}' was read up to the end of this first "
                                              "bad stretch")
        latents = encoder.result()
        if not latents.shape[0]:
            raise InputError(f"{what}: '{os.path.basename(path)}' has no video frames")
        motion = settle_bad_frames(latents, bad, on_bad_frame, what)
        audio = _soundtrack(path, info.has_audio, motion.shape[0], fps)
        log.info("%s: %d frames of '%s' at %.3f fps encoded (crop %s)", what, motion.shape[0],
                 os.path.basename(path), fps, crop)
        return (Motion(motion, fps), audio, fps)
