"""Motion editing nodes: smooth, scale, blend, concatenate, trim, loop, relative (video-driven) motion,
and motion files. Thin wrappers over `imtalker_core.motion_edit`; motion stays float32 on the CPU.

Times are in seconds where a node says so and converted at the motion's own frame rate (a frame
at 25 fps lasts 40 ms); frame counts are whole frames.
"""
from __future__ import annotations

import logging
import math
import os

import torch

from ..imtalker_core import motion_edit as edit
from ..imtalker_core.config import RendererConfig
from ..imtalker_core.errors import InputError
from ..imtalker_core.pipeline import Identity
from ..imtalker_core.timing import frame_count
from . import bridge
from .types import IDENTITY, MOTION, Motion

log = logging.getLogger(__name__)

CATEGORY = "IMTalker/motion"
UNITS = ("seconds", "frames")
ANCHORS = ("frame", "mean")
LATENT_DIM = RendererConfig().latent_dim
#: Annotations of file names in the Load Motion list (as ComfyUI's file widgets write them).
OUTPUT_TAG, INPUT_TAG = " [output]", " [input]"


def motion_input(tooltip: str = "Motion latents from IMTalker Audio To Motion, Video To Motion, Encode Motion "
                                "or another motion node.") -> tuple:
    return (MOTION, {"tooltip": tooltip})


def _output(latents: torch.Tensor, fps: float) -> Motion:
    return Motion(latents.detach().to("cpu", torch.float32).contiguous(), float(fps))


def seconds_to_frames(seconds: float, fps: float) -> int:
    """`seconds` as a whole number of frames at `fps`, rounded half away from zero (sign kept)."""
    frames = math.floor(abs(seconds) * fps + 0.5 + 1e-9)
    return -frames if seconds < 0 else frames


def to_frames(value: float, unit: str, fps: float, name: str) -> int:
    """A node's time value in `unit` ("seconds" or "frames") as whole frames."""
    if unit not in UNITS:
        raise InputError(f"unit must be one of {', '.join(UNITS)}, not {unit!r}")
    number = float(value)
    if not math.isfinite(number):
        raise InputError(f"{name} {value!r} must be finite")
    if unit == "seconds":
        return seconds_to_frames(number, fps)
    if not number.is_integer():
        raise InputError(f"{name} {value!r}: with unit 'frames' use a whole number of frames")
    return int(number)


def _at_fps(motion: Motion, fps: float, what: str, name: str) -> torch.Tensor:
    """`motion`'s latents at `fps`, resampled linearly (with a note on the node) when its rate differs."""
    if motion.fps == fps:
        return motion.latents
    latents = edit.resample(motion.latents, motion.fps, fps)
    bridge.notify(f"{what}: {name} runs at {motion.fps:g} fps; resampled to {fps:g} fps "
                  f"({motion.frames} → {latents.shape[0]} frames)", logging.INFO)
    return latents


class IMTalkerSmoothMotion:
    """Smooths motion over time (less jitter)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "motion": motion_input(),
                "method": (list(edit.SMOOTH_METHODS), {
                    "default": "gaussian",
                    "tooltip": "gaussian: a bell-shaped average of width sigma_frames (smooth, no ringing). "
                               "moving_average: the plain mean of window_frames frames."}),
                "sigma_frames": ("FLOAT", {
                    "default": 1.0, "min": 0.0, "max": 50.0, "step": 0.1,
                    "tooltip": "gaussian: standard deviation in frames (at 25 fps one frame is 40 ms); 0 leaves "
                               "the motion unchanged, 1-2 removes jitter, 5+ also softens lip motion."}),
                "window_frames": ("INT", {
                    "default": 5, "min": 1, "max": 101, "step": 2,
                    "tooltip": "moving_average: frames averaged, centred on each frame (odd; 1 = unchanged)."}),
                "keep_ends": ("BOOLEAN", {
                    "default": True,
                    "tooltip": "On: the first and last frames keep their exact values (the video still starts "
                               "from the same face) and a steady drift is kept up to the ends. Off: the ends are "
                               "smoothed too (mirrored edges)."}),
            },
        }

    RETURN_TYPES = (MOTION,)
    RETURN_NAMES = ("motion",)
    OUTPUT_TOOLTIPS = ("The smoothed motion, same length and frame rate.",)
    FUNCTION = "smooth"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Smooths motion latents along time, each latent channel separately: removes frame-to-frame "
                   "jitter from encoded driving videos or generated motion. The length never changes.")

    def smooth(self, motion: Motion, method: str = "gaussian", sigma_frames: float = 1.0, window_frames: int = 5,
               keep_ends: bool = True):
        latents = edit.smooth(motion.latents, sigma_frames=sigma_frames, method=method, window_frames=window_frames,
                              edge="anchor" if keep_ends else "reflect")
        return (_output(latents, motion.fps),)


class IMTalkerScaleMotion:
    """Makes motion calmer or more expressive."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "motion": motion_input(),
                "scale": ("FLOAT", {
                    "default": 1.0, "min": 0.0, "max": 3.0, "step": 0.05,
                    "tooltip": "Multiplies how far each frame is from the reference (a ratio): 0 = a still "
                               "face at the reference, 0.5 = calmer, 1 = unchanged, 1.5 = more expressive; above "
                               "2 motion tends to break."}),
            },
            "optional": {
                "identity": (IDENTITY, {
                    "tooltip": "Optional, from IMTalker Encode Identity: scale around the portrait's own "
                               "expression (its resting face). Without it, around the motion's average."}),
            },
        }

    RETURN_TYPES = (MOTION,)
    RETURN_NAMES = ("motion",)
    OUTPUT_TOOLTIPS = ("The scaled motion, same length and frame rate.",)
    FUNCTION = "scale"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Scales the motion's intensity: reference + scale × (motion − reference), where the reference "
                   "is the portrait's own latent when an identity is connected, else the motion's mean.")

    def scale(self, motion: Motion, scale: float, identity: Identity | None = None):
        reference = identity.motion if identity is not None else None
        return (_output(edit.scale_intensity(motion.latents, scale, reference), motion.fps),)


class IMTalkerBlendMotion:
    """Mixes two motions, with an optional ramp from one weight to another."""

    @classmethod
    def INPUT_TYPES(cls):
        weight = "(0 = all of motion_a, 1 = all of motion_b, 0.5 = the average)"
        return {
            "required": {
                "motion_a": motion_input("First motion; the result has its frame rate."),
                "motion_b": motion_input("Second motion; resampled to motion_a's frame rate if it differs."),
                "start_weight": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01,
                                           "tooltip": f"Weight of motion_b before the ramp {weight}."}),
                "end_weight": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01,
                                         "tooltip": f"Weight of motion_b after the ramp {weight}."}),
                "ramp_start": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 36000.0, "step": 0.04,
                                         "tooltip": "When the ramp from start_weight to end_weight begins, in "
                                                    "seconds from the first frame."}),
                "ramp_end": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 36000.0, "step": 0.04,
                                       "tooltip": "When the ramp ends, in seconds (≥ ramp_start; equal to it "
                                                  "switches at once)."}),
                "shape": (list(edit.CURVE_SHAPES), {
                    "default": "linear",
                    "tooltip": "linear: constant speed. smooth: eases in and out (smoothstep)."}),
                "length": (list(edit.LENGTH_POLICIES), {
                    "default": "shortest",
                    "tooltip": "When the motions differ in length: shortest = cut to the shorter one, hold = "
                               "hold the shorter one's last frame, error = stop."}),
            },
        }

    RETURN_TYPES = (MOTION,)
    RETURN_NAMES = ("motion",)
    OUTPUT_TOOLTIPS = ("The blended motion, at motion_a's frame rate.",)
    FUNCTION = "blend"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Blends two motions frame by frame: (1 − w)·a + w·b, with w ramping from start_weight to "
                   "end_weight between ramp_start and ramp_end (e.g. audio-driven lips with a video's head "
                   "motion, or a crossfade from one take into another).")

    def blend(self, motion_a: Motion, motion_b: Motion, start_weight: float, end_weight: float,
              ramp_start: float = 0.0, ramp_end: float = 0.0, shape: str = "linear", length: str = "shortest"):
        what = "IMTalker Blend Motion"
        fps = motion_a.fps
        second = _at_fps(motion_b, fps, what, "motion_b")
        a, b = edit.match_lengths(motion_a.latents, second, length, ("motion_a", "motion_b"))
        if a.shape[0] != motion_a.frames or b.shape[0] != second.shape[0]:
            bridge.notify(f"{what}: motion_a has {motion_a.frames} frames and motion_b {second.shape[0]} at "
                          f"{fps:g} fps; the result has {a.shape[0]} (length policy '{length}')", logging.INFO)
        curve = edit.weight_curve(a.shape[0], start_weight, end_weight, float(ramp_start) * fps,
                                  float(ramp_end) * fps, shape)
        return (_output(edit.blend(a, b, curve), fps),)


class IMTalkerConcatMotion:
    """Plays motions one after another."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "motion_a": motion_input("First part; the result has its frame rate."),
                "motion_b": motion_input("Second part (resampled to motion_a's frame rate if it differs)."),
                "crossfade_frames": ("INT", {
                    "default": 0, "min": 0, "max": 1000,
                    "tooltip": "Frames over which each part fades into the next (at 25 fps, 5 frames = 0.2 s); "
                               "each joint shortens the result by this many frames. 0 = a hard cut."}),
            },
            "optional": {
                "motion_c": motion_input("Optional third part."),
                "motion_d": motion_input("Optional fourth part."),
            },
        }

    RETURN_TYPES = (MOTION,)
    RETURN_NAMES = ("motion",)
    OUTPUT_TOOLTIPS = ("The parts joined, at motion_a's frame rate.",)
    FUNCTION = "concat"
    CATEGORY = CATEGORY
    DESCRIPTION = "Joins up to four motions in order, with an optional crossfade at each joint."

    def concat(self, motion_a: Motion, motion_b: Motion, crossfade_frames: int = 0, motion_c: Motion | None = None,
               motion_d: Motion | None = None):
        fps = motion_a.fps
        named = [("motion_a", motion_a), ("motion_b", motion_b), ("motion_c", motion_c), ("motion_d", motion_d)]
        parts = [_at_fps(motion, fps, "IMTalker Concat Motion", name) for name, motion in named if motion is not None]
        return (_output(edit.concat(parts, crossfade_frames), fps),)


class IMTalkerTrimMotion:
    """Keeps a stretch of a motion."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "motion": motion_input(),
                "unit": (list(UNITS), {"default": "seconds",
                                       "tooltip": "Whether start and end are seconds or frame numbers."}),
                "start": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 10_000_000.0, "step": 0.04,
                                    "tooltip": "First kept moment (seconds or frame number, from 0)."}),
                "end": ("FLOAT", {"default": 0.0, "min": -10_000_000.0, "max": 10_000_000.0, "step": 0.04,
                                  "tooltip": "Where the kept stretch stops (excluded), in seconds or frames; 0 = "
                                             "to the end, negative = that much before the end."}),
            },
        }

    RETURN_TYPES = (MOTION,)
    RETURN_NAMES = ("motion",)
    OUTPUT_TOOLTIPS = ("The kept frames, same frame rate.",)
    FUNCTION = "trim"
    CATEGORY = CATEGORY
    DESCRIPTION = "Cuts a motion to the stretch from start to end (seconds rounded to whole frames)."

    def trim(self, motion: Motion, unit: str = "seconds", start: float = 0.0, end: float = 0.0):
        first = to_frames(start, unit, motion.fps, "start")
        stop = to_frames(end, unit, motion.fps, "end")
        return (_output(edit.trim(motion.latents, first, stop or None), motion.fps),)


class IMTalkerLoopMotion:
    """Repeats a motion to a given length."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "motion": motion_input(),
                "mode": (list(edit.LOOP_MODES), {
                    "default": "pingpong",
                    "tooltip": "loop: start over after the last frame (a jump unless the motion ends where it "
                               "starts). pingpong: play backwards, then forwards again (no jump)."}),
                "unit": (list(UNITS), {"default": "seconds", "tooltip": "Whether length is in seconds or frames."}),
                "length": ("FLOAT", {"default": 10.0, "min": 0.0, "max": 10_000_000.0, "step": 0.04,
                                     "tooltip": "Length of the result, in seconds or frames (shorter than the "
                                                "motion just cuts it). Ignored when audio is connected."}),
            },
            "optional": {
                "audio": ("AUDIO", {"tooltip": "Optional: make the motion exactly as long as this audio (one frame "
                                               "per 1/fps s, the last one partly covered)."}),
            },
        }

    RETURN_TYPES = (MOTION,)
    RETURN_NAMES = ("motion",)
    OUTPUT_TOOLTIPS = ("The repeated motion, same frame rate.",)
    FUNCTION = "loop"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loops or ping-pongs a motion (e.g. an idle head motion from a short driving clip) until it "
                   "reaches a length, or the length of an audio clip.")

    def loop(self, motion: Motion, mode: str = "pingpong", unit: str = "seconds", length: float = 10.0,
             audio: dict | None = None):
        what = "IMTalker Loop Motion"
        if audio is not None:
            waveform, rate = bridge.audio_waveform(audio)
            frames = frame_count(waveform.shape[-1], motion.fps, rate)
            if frames < 1:
                raise InputError(f"{what}: the audio has no samples; connect audio with sound in it")
            log.info("%s: %d frames for %.2f s of audio", what, frames, waveform.shape[-1] / rate)
        else:
            frames = to_frames(length, unit, motion.fps, "length")
            if frames < 1:
                raise InputError(f"{what}: a length of {length:g} {unit} is less than one frame at "
                                 f"{motion.fps:g} fps; give a longer length")
        return (_output(edit.loop(motion.latents, frames, mode), motion.fps),)


class IMTalkerRelativeMotion:
    """Makes another person's driving motion fit the portrait."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "driving": motion_input("Motion of a driving video (IMTalker Video To Motion / Encode Motion)."),
                "identity": (IDENTITY, {"tooltip": "From IMTalker Encode Identity: the portrait whose own "
                                                   "resting expression is kept."}),
                "anchor": (list(ANCHORS), {
                    "default": "frame",
                    "tooltip": "The driver's neutral face: 'frame' = the frame anchor_frame (pick one where the "
                               "driver looks neutral, like the portrait), 'mean' = the driver's average."}),
                "anchor_frame": ("INT", {"default": 0, "min": -10_000_000, "max": 10_000_000,
                                         "tooltip": "With anchor 'frame': its frame number (0 = first; negative "
                                                    "counts from the end)."}),
            },
        }

    RETURN_TYPES = (MOTION,)
    RETURN_NAMES = ("motion",)
    OUTPUT_TOOLTIPS = ("Relative motion: the portrait's latent plus the driver's changes, same length and rate.",)
    FUNCTION = "relative"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Relative video-driven mode: portrait + (driver − driver's neutral frame). The portrait keeps "
                   "its own resting expression and face shape and only takes the driver's movements, which helps "
                   "when the driver is another person.")

    def relative(self, driving: Motion, identity: Identity, anchor: str = "frame", anchor_frame: int = 0):
        if anchor not in ANCHORS:
            raise InputError(f"anchor must be one of {', '.join(ANCHORS)}, not {anchor!r}")
        latents = edit.relative_motion(driving.latents, identity.motion, "mean" if anchor == "mean" else anchor_frame)
        return (_output(latents, driving.fps),)


class IMTalkerSaveMotion:
    """Writes motion to a file in the output folder."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "motion": motion_input(),
                "filename_prefix": ("STRING", {
                    "default": "IMTalker/motion",
                    "tooltip": "Name of the .safetensors file in ComfyUI's output folder (may include "
                               "sub-folders); a counter is appended. The frame rate is stored in it."}),
            },
        }

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("motion_path",)
    OUTPUT_TOOLTIPS = ("Full path of the written motion file.",)
    OUTPUT_NODE = True
    FUNCTION = "save"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Saves motion latents and their frame rate as a .safetensors file, to reuse them later with "
                   "IMTalker Load Motion without generating or encoding again.")

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix):
        return bridge.filename_prefix_problem(filename_prefix)

    def save(self, motion: Motion, filename_prefix: str):
        path, filename, subfolder = bridge.next_output_path(filename_prefix, "safetensors")
        edit.save_motion(path, motion.latents, motion.fps)
        shown = f"{subfolder}/{filename}" if subfolder else filename
        bridge.notify(f"IMTalker Save Motion: {motion.frames} frames at {motion.fps:g} fps saved as {shown} "
                      "(output folder)", logging.INFO)
        return {"ui": {"text": [shown]}, "result": (os.path.abspath(path),)}


def _motion_files(root: str | None) -> list[str]:
    """`.safetensors` files in `root` and in its sub-folders one level down ('sub/name'), sorted."""
    return bridge.list_files(root or None, lambda name: name.lower().endswith(edit.MOTION_SUFFIX))


def list_motion_files() -> list[str]:
    """Motion files to offer: the input folder's, then the output folder's marked ' [output]'."""
    return (_motion_files(bridge.video_input_folder())
            + [name + OUTPUT_TAG for name in _motion_files(bridge.output_directory())])


def resolve_motion_file(motion_file: str, motion_path: str = "") -> str:
    """The motion file to read: `motion_path` when given (absolute, or relative to the input folder),
    else `motion_file` from the list (input folder, or output folder with ' [output]'). `InputError`
    when there is none."""
    path = bridge.given_path(motion_path, "motion_path")
    if path is not None:
        return path
    if not motion_file:
        raise InputError("choose a motion file (saved by IMTalker Save Motion) or give motion_path")
    name, root, where = motion_file, bridge.video_input_folder(), "input"
    if name.endswith(OUTPUT_TAG):
        name, root, where = name[:-len(OUTPUT_TAG)], bridge.output_directory(), "output"
    elif name.endswith(INPUT_TAG):
        name = name[:-len(INPUT_TAG)]
    if not root:
        raise InputError(f"no input folder to find '{motion_file}' in: set ${bridge.INPUT_ENV} outside ComfyUI, "
                         "or give motion_path")
    path = bridge.inside_folder(root, name)
    if path is None or not os.path.isfile(path):
        raise InputError(f"the motion file '{motion_file}' is not a file in the {where} folder {root}; choose "
                         "another one (press R to refresh the list)")
    return path


class IMTalkerLoadMotion:
    """Reads motion saved by IMTalker Save Motion."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "motion_file": (list_motion_files() or [""], {
                    "tooltip": "A .safetensors motion file from ComfyUI's input folder (and its sub-folders), or "
                               "one saved to the output folder (marked [output])."}),
                "motion_path": ("STRING", {
                    "default": "",
                    "tooltip": "Optional: a motion file on the server (full path, or relative to the input "
                               "folder). When set it is used instead of motion_file."}),
            },
        }

    RETURN_TYPES = (MOTION, "FLOAT", "INT")
    RETURN_NAMES = ("motion", "fps", "frames")
    OUTPUT_TOOLTIPS = ("The saved motion latents, at the saved frame rate.",
                       "Its frame rate (frames per second).", "Its number of frames.")
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads motion latents and their frame rate from a file written by IMTalker Save Motion."

    @classmethod
    def VALIDATE_INPUTS(cls, motion_file: str = "", motion_path: str = ""):
        try:
            resolve_motion_file(motion_file, motion_path)
        except InputError as err:
            return str(err)
        return True

    @classmethod
    def IS_CHANGED(cls, motion_file: str = "", motion_path: str = "", **_):
        return bridge.file_state(lambda: resolve_motion_file(motion_file, motion_path))

    def load(self, motion_file: str = "", motion_path: str = ""):
        latents, fps = edit.load_motion(resolve_motion_file(motion_file, motion_path), latent_dim=LATENT_DIM)
        return (_output(latents, fps), fps, int(latents.shape[0]))


MOTION_EDIT_NODES = {
    "IMTalkerSmoothMotion": IMTalkerSmoothMotion,
    "IMTalkerScaleMotion": IMTalkerScaleMotion,
    "IMTalkerBlendMotion": IMTalkerBlendMotion,
    "IMTalkerConcatMotion": IMTalkerConcatMotion,
    "IMTalkerTrimMotion": IMTalkerTrimMotion,
    "IMTalkerLoopMotion": IMTalkerLoopMotion,
    "IMTalkerRelativeMotion": IMTalkerRelativeMotion,
    "IMTalkerSaveMotion": IMTalkerSaveMotion,
    "IMTalkerLoadMotion": IMTalkerLoadMotion,
}

MOTION_EDIT_DISPLAY_NAMES = {
    "IMTalkerSmoothMotion": "IMTalker Smooth Motion",
    "IMTalkerScaleMotion": "IMTalker Scale Motion",
    "IMTalkerBlendMotion": "IMTalker Blend Motion",
    "IMTalkerConcatMotion": "IMTalker Concat Motion",
    "IMTalkerTrimMotion": "IMTalker Trim Motion",
    "IMTalkerLoopMotion": "IMTalker Loop Motion",
    "IMTalkerRelativeMotion": "IMTalker Relative Motion",
    "IMTalkerSaveMotion": "IMTalker Save Motion",
    "IMTalkerLoadMotion": "IMTalker Load Motion",
}
