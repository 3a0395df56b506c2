"""Nodes that make, combine, load and save generator controls (`IMTALKER_CONTROLS`).

All of them produce an `imtalker_core.controls.sequence.ControlSequence`: optional head pose `[T, 3]`
(SMIRK axis-angle, radians: pitch, yaw, roll), camera `[T, 3]` (SMIRK's scale, tx, ty) and eye gaze
`[T, 2]` (L2CS-Net's two angles, radians) at 25 frames per second. IMTalker Audio To Motion takes them,
resampled to 25 fps and fitted to the speech (the last value held). The units, the meaning of each
column and how sure we are of the directions are in the module docstring of
`imtalker_core/controls/sequence.py`.
"""
from __future__ import annotations

import logging
import os

from ..imtalker_core.controls import sequence
from ..imtalker_core.controls.sequence import ControlSequence
from ..imtalker_core.errors import InputError
from ..imtalker_core.timing import FPS
from . import bridge
from .types import CONTROLS

log = logging.getLogger(__name__)

#: Part combinations offered where a node asks which parts to take.
PART_CHOICES = ("pose", "cam", "gaze", "pose+cam", "pose+gaze", "cam+gaze", "pose+cam+gaze")
SAVE_FORMATS = ("json", "csv", "npz", "pt", "npy")
MAX_SECONDS = sequence.MAX_FRAMES / FPS
OUTPUT_TOOLTIP = ("Head pose / camera / gaze sequences at 25 fps, for IMTalker Audio To Motion or Talking Head "
                  "(or IMTalker Combine Controls).")

DEFAULT_KEYFRAMES = """\
# One keyframe per line:  TIME: SETTINGS      ('#' starts a comment)
# TIME: seconds (1.5s) or frames at 25 fps (30f).  Angles in radians, or degrees with deg (15deg).
# pose=pitch,yaw,roll (or pitch= yaw= roll=)   gaze=gaze_pitch,gaze_yaw   cam=scale,tx,ty
0s:    pose=0,0,0    gaze=0,0       # face the camera and look into it
1s:    yaw=0.3       gaze=-0.3,0    # turn the head (0.3 rad = 17 degrees) and look the same way
2s:    yaw=0.3       gaze=0,0       # look back into the camera; repeating yaw holds the turn
3.5s:  yaw=0                        # face the camera again
"""


def _angle(default: float, tooltip: str) -> tuple:
    return ("FLOAT", {"default": default, "min": -3.14, "max": 3.14, "step": 0.01, "tooltip": tooltip})


def _seconds_input(default: float, tooltip: str, minimum: float = 0.04) -> tuple:
    return ("FLOAT", {"default": default, "min": minimum, "max": MAX_SECONDS, "step": 0.04, "tooltip": tooltip})


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------

class IMTalkerControlsConstant:
    """The same pose / camera / gaze on every frame."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "seconds": _seconds_input(1.0, "Length in seconds (25 frames a second). Audio To Motion holds the "
                                               "last value when the speech is longer, so a short one covers any "
                                               "clip."),
                "use_pose": ("BOOLEAN", {"default": True, "tooltip": "Include the head pose (pitch, yaw, roll)."}),
                "pitch": _angle(0.0, "Head pitch in radians (SMIRK pose_0; positive: chin down). "
                                     "0.1 rad = 5.7 degrees; beyond 1 rad is unusual."),
                "yaw": _angle(0.0, "Head yaw in radians (SMIRK pose_1; positive: the face turns towards the "
                                   "image's right)."),
                "roll": _angle(0.0, "Head roll in radians (SMIRK pose_2; positive: the head tilts towards the "
                                    "image's left)."),
                "use_cam": ("BOOLEAN", {"default": False,
                                        "tooltip": "Include SMIRK's camera (scale, tx, ty). Off: the generator "
                                                   "gets no camera (as in the reference without a pose file)."}),
                "cam_scale": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 100.0, "step": 0.1,
                                        "tooltip": "SMIRK camera scale (cam_0; its encoder starts from 7). Larger "
                                                   "is a bigger head; beyond 20 is unusual."}),
                "cam_tx": ("FLOAT", {"default": 0.0, "min": -20.0, "max": 20.0, "step": 0.01,
                                     "tooltip": "SMIRK camera shift x (cam_1, in FLAME units before scaling; "
                                                "positive: right)."}),
                "cam_ty": ("FLOAT", {"default": 0.0, "min": -20.0, "max": 20.0, "step": 0.01,
                                     "tooltip": "SMIRK camera shift y (cam_2, in FLAME units before scaling; "
                                                "positive: up)."}),
                "use_gaze": ("BOOLEAN", {"default": True, "tooltip": "Include the eye gaze."}),
                "gaze_pitch": _angle(0.0, "Gaze angle 1 in radians (L2CS-Net's 'pitch', gaze_0; probably "
                                          "horizontal, positive towards the image's left). 0, 0 looks into "
                                          "the camera."),
                "gaze_yaw": _angle(0.0, "Gaze angle 2 in radians (L2CS-Net's 'yaw', gaze_1; probably vertical, "
                                        "positive up)."),
            },
        }

    RETURN_TYPES = (CONTROLS,)
    RETURN_NAMES = ("controls",)
    OUTPUT_TOOLTIPS = (OUTPUT_TOOLTIP,)
    FUNCTION = "build"
    CATEGORY = "IMTalker"
    DESCRIPTION = ("A fixed head pose, camera and eye gaze for the whole clip, e.g. a frontal head looking into "
                   "the camera (the defaults). Angles in radians.")

    def build(self, seconds: float, use_pose: bool = True, pitch: float = 0.0, yaw: float = 0.0, roll: float = 0.0,
              use_cam: bool = False, cam_scale: float = 7.0, cam_tx: float = 0.0, cam_ty: float = 0.0,
              use_gaze: bool = True, gaze_pitch: float = 0.0, gaze_yaw: float = 0.0):
        if not (use_pose or use_cam or use_gaze):
            raise InputError("IMTalker Controls (constant): turn on at least one of use_pose, use_cam, use_gaze")
        controls = sequence.constant(float(seconds), fps=FPS,
                                     pose=(pitch, yaw, roll) if use_pose else None,
                                     cam=(cam_scale, cam_tx, cam_ty) if use_cam else None,
                                     gaze=(gaze_pitch, gaze_yaw) if use_gaze else None)
        return (controls,)


class IMTalkerControlsKeyframes:
    """Pose / camera / gaze written as keyframes in text, interpolated frame by frame."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "keyframes": ("STRING", {
                    "multiline": True, "default": DEFAULT_KEYFRAMES,
                    "tooltip": "One keyframe per line, 'TIME: name=value ...'. TIME: 1.5s or 30f (frames). Names: "
                               "pose=pitch,yaw,roll, cam=scale,tx,ty, gaze=a,b, or one component (pitch, yaw, roll, "
                               "scale, tx, ty, gaze_pitch, gaze_yaw). Radians, or degrees with deg. Each component "
                               "moves between the keyframes that set it (set it again to hold it) and keeps its "
                               "value before the first and after the last; a never-set component of a used part "
                               "stays 0."}),
                "interpolation": (list(sequence.INTERPOLATIONS), {
                    "default": "smooth",
                    "tooltip": "smooth: eases in and out of every keyframe (the head comes to rest at each one). "
                               "linear: constant speed between keyframes, sudden starts and stops."}),
                "seconds": _seconds_input(0.0, "Length in seconds; 0: up to the last time written.", minimum=0.0),
            },
        }

    RETURN_TYPES = (CONTROLS,)
    RETURN_NAMES = ("controls",)
    OUTPUT_TOOLTIPS = (OUTPUT_TOOLTIP,)
    FUNCTION = "build"
    CATEGORY = "IMTalker"
    DESCRIPTION = ("Head turns, nods and glances written as timed keyframes ('1.5s: yaw=0.3 gaze=-0.3,0'), "
                   "interpolated at 25 fps. Syntax errors name the line.")

    @classmethod
    def VALIDATE_INPUTS(cls, keyframes=None, interpolation=None, seconds=None):
        if not isinstance(keyframes, str) or interpolation not in sequence.INTERPOLATIONS:
            return True  # linked, or checked by ComfyUI's own list validation
        try:
            cls._build(keyframes, interpolation, seconds or 0.0)
        except InputError as err:
            return str(err)
        return True

    @staticmethod
    def _build(keyframes: str, interpolation: str, seconds: float) -> ControlSequence:
        frames = sequence.duration_frames(float(seconds), FPS) if seconds and seconds > 0 else None
        return sequence.keyframes(keyframes, fps=FPS, interpolation=interpolation, frames=frames)

    def build(self, keyframes: str, interpolation: str = "smooth", seconds: float = 0.0):
        return (self._build(keyframes, interpolation, seconds),)


class IMTalkerIdleMotion:
    """Seeded idle head sway and glances."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "seconds": _seconds_input(10.0, "Length in seconds. Audio To Motion holds the last value when the "
                                                "speech is longer: make it at least as long as the speech."),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFF_FFFF_FFFF_FFFF, "control_after_generate": True,
                                 "tooltip": "The same seed gives the same motion on every machine."}),
                "amplitude": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 1.0, "step": 0.01,
                                        "tooltip": "Largest head turn (yaw) in radians; nods reach 0.6× and tilts "
                                                   "0.4× of it. 0.1 rad = 5.7 degrees (calm); 0.3 is lively."}),
                "speed": ("FLOAT", {"default": 1.0, "min": 0.1, "max": 5.0, "step": 0.05,
                                    "tooltip": "Tempo: 1 sways at 0.05–0.35 Hz and moves the eyes every 0.6–2.5 s; "
                                               "2 is twice as fast."}),
                "gaze": ("BOOLEAN", {"default": True,
                                     "tooltip": "Also move the eyes: rests of 0.6–2.5 s, about half of them into "
                                                "the camera, joined by quick jumps. Off: pose only."}),
                "gaze_amplitude": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 1.0, "step": 0.01,
                                             "tooltip": "Largest glance away from the camera in radians (the "
                                                        "second gaze angle, probably vertical, gets half)."}),
            },
        }

    RETURN_TYPES = (CONTROLS,)
    RETURN_NAMES = ("controls",)
    OUTPUT_TOOLTIPS = (OUTPUT_TOOLTIP,)
    FUNCTION = "build"
    CATEGORY = "IMTalker"
    DESCRIPTION = ("Gentle procedural head sway (slow sinusoids, bounded by the amplitude) and eye glances, the "
                   "same for the same seed. No blinks: gaze has no eyelid dimension; blinks come from the "
                   "generated motion itself.")

    def build(self, seconds: float, seed: int = 0, amplitude: float = 0.1, speed: float = 1.0, gaze: bool = True,
              gaze_amplitude: float = 0.1):
        return (sequence.idle_motion(float(seconds), seed=seed, amplitude=amplitude, speed=speed, gaze=gaze,
                                     gaze_amplitude=gaze_amplitude, fps=FPS),)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------

def _is_control_file(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in sequence.FILE_SUFFIXES


def list_control_files() -> list[str]:
    """Control files (by suffix) in the input folder and one level of its sub-folders ('sub/name.csv')."""
    return bridge.list_files(bridge.video_input_folder(), _is_control_file)


def resolve_control_file(file: str, path: str) -> str:
    """The file to read: `path` when given (absolute, or relative to the input folder), else input-folder
    file `file`. InputError when there is none."""
    given = bridge.given_path(path, "controls path")
    if given is not None:
        return given
    folder = bridge.video_input_folder()
    if not file:
        raise InputError("choose a controls file from the input folder, or give its path")
    if not folder:
        raise InputError(f"no input folder to find '{file}' in: give the file's full path as 'path'")
    root = os.path.abspath(folder)
    full = bridge.inside_folder(root, file)
    if full is None or not os.path.isfile(full):
        raise InputError(f"the controls file '{file}' is not in the input folder {root}; put it there (press R to "
                         "refresh the list) or give its path")
    return full


class IMTalkerLoadControls:
    """Reads controls from a .json, .csv, .txt, .npy, .npz or .pt file (SMIRK's .pt files included)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "file": (list_control_files() or [""], {
                    "tooltip": "A controls file in ComfyUI's input folder (or a sub-folder): .json, .csv, .txt, "
                               ".npy, .npz, or .pt (SMIRK's pose_params / cam, or what Save Controls wrote)."}),
                "path": ("STRING", {"default": "",
                                    "tooltip": "Optional: a file on the server (full path, or relative to the input "
                                               "folder). When set it is used instead of 'file'."}),
                "columns": (["auto", *PART_CHOICES], {
                    "default": "auto",
                    "tooltip": "Which parts to take. For files that do not name their columns (.npy, .txt, a CSV "
                               "without header, a bare tensor) also what the columns are, in order; auto: 2 "
                               "columns = gaze, 6 = pose+cam, 8 = pose+cam+gaze. For files that name their parts, "
                               "auto takes all of them."}),
                "fps": ("FLOAT", {"default": float(FPS), "min": sequence.MIN_FPS, "max": sequence.MAX_FPS,
                                  "step": 0.01,
                                  "tooltip": "Frame rate of a file that stores none (.npy, .txt, SMIRK .pt, CSV "
                                             "without an fps line); 25 is IMTalker's. Files that store one use "
                                             "theirs."}),
            },
        }

    RETURN_TYPES = (CONTROLS,)
    RETURN_NAMES = ("controls",)
    OUTPUT_TOOLTIPS = (OUTPUT_TOOLTIP + " At the file's frame rate; Audio To Motion resamples to 25 fps.",)
    FUNCTION = "load"
    CATEGORY = "IMTalker"
    DESCRIPTION = ("Loads head pose / camera / gaze sequences from a file: what IMTalker Save Controls writes, "
                   "SMIRK's .pt output (pose_params, cam), an L2CS-Net gaze array (.npy, 2 columns), or a CSV "
                   "with a header row (pose_0,pose_1,pose_2,…,gaze_1).")

    @classmethod
    def VALIDATE_INPUTS(cls, file: str = "", path: str = ""):
        try:
            resolve_control_file(file, path)
        except InputError as err:
            return str(err)
        return True

    @classmethod
    def IS_CHANGED(cls, file: str = "", path: str = "", **_):
        return bridge.file_state(lambda: resolve_control_file(file, path))

    def load(self, file: str = "", path: str = "", columns: str = "auto", fps: float = float(FPS)):
        if columns != "auto" and columns not in PART_CHOICES:
            raise InputError(f"columns must be auto or one of {', '.join(PART_CHOICES)}, not {columns!r}")
        full = resolve_control_file(file, path)
        controls = sequence.load_controls(full, parts=None if columns == "auto" else columns, fps=fps)
        log.info("IMTalker Load Controls: %r from %s", controls, full)
        return (controls,)


class IMTalkerSaveControls:
    """Writes controls to the output folder."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "controls": (CONTROLS, {"tooltip": "The controls to save."}),
                "filename_prefix": ("STRING", {
                    "default": "IMTalker/controls",
                    "tooltip": "Name in ComfyUI's output folder (may include sub-folders); a counter is appended."}),
                "format": (list(SAVE_FORMATS), {
                    "default": "json",
                    "tooltip": "json / csv: readable text (CSV: a '# fps' line, a header pose_0,…,gaze_1, one row "
                               "per frame). npz / pt: arrays (pt uses SMIRK's key pose_params, so the reference's "
                               "loader reads pose and cam from it). npy: the bare [frames, columns] numbers, "
                               "without part names or fps. Every format reads back exactly."}),
            },
        }

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_TOOLTIPS = ("Full path of the written file.",)
    OUTPUT_NODE = True
    FUNCTION = "save"
    CATEGORY = "IMTalker"
    DESCRIPTION = "Saves head pose / camera / gaze sequences to a file in the output folder, to reuse or edit."

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix):
        return bridge.filename_prefix_problem(filename_prefix)

    def save(self, controls: ControlSequence, filename_prefix: str = "IMTalker/controls", format: str = "json"):
        if format not in SAVE_FORMATS:
            raise InputError(f"format must be one of {', '.join(SAVE_FORMATS)}, not {format!r}")
        if not isinstance(controls, ControlSequence) or not controls.parts:
            raise InputError("IMTalker Save Controls got no controls (no pose, cam or gaze) to save")
        full, filename, subfolder = bridge.next_output_path(filename_prefix, format)
        sequence.save_controls(controls, full)
        bridge.notify(f"saved {controls.frames} frames of {'+'.join(controls.parts)} to "
                      f"{os.path.join(subfolder, filename)}", logging.INFO)
        return {"ui": {"text": [full]}, "result": (full,)}


# --------------------------------------------------------------------------------------------
# Combining
# --------------------------------------------------------------------------------------------

class IMTalkerCombineControls:
    """Parts of one controls value over another's."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "base": (CONTROLS, {"tooltip": "Controls whose parts are kept unless the override gives them."}),
                "override": (CONTROLS, {"tooltip": "Controls whose parts replace the base's (and fill parts the "
                                                   "base lacks)."}),
                "override_parts": (["all", *PART_CHOICES], {
                    "default": "all",
                    "tooltip": "Which of the override's parts to use (each must be in it); all: every part it "
                               "has."}),
            },
        }

    RETURN_TYPES = (CONTROLS,)
    RETURN_NAMES = ("controls",)
    OUTPUT_TOOLTIPS = (OUTPUT_TOOLTIP + " As long as the longer input; a shorter part holds its last value.",)
    FUNCTION = "combine"
    CATEGORY = "IMTalker"
    DESCRIPTION = ("Combines two controls values part by part, e.g. the head pose of Idle Motion with the gaze of "
                   "a Constant or Keyframes node. The override is resampled to the base's frame rate.")

    def combine(self, base: ControlSequence, override: ControlSequence, override_parts: str = "all"):
        if override_parts != "all" and override_parts not in PART_CHOICES:
            raise InputError(f"override_parts must be all or one of {', '.join(PART_CHOICES)}, "
                             f"not {override_parts!r}")
        if override_parts != "all":
            override = override.select(override_parts.split("+"))
        return (base.merge(override),)
