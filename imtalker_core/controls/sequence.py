"""Per-frame control sequences for IMTalker's motion generator: head pose, camera and eye gaze.

Besides the speech, the generator follows three optional per-frame signals at its 25 video frames per
second (`timing.FPS`). They are the raw values of the tools that labelled its training data (the
reference feeds them to the model unnormalised):

| part   | shape    | what                                                    | units   | typical | refused |
|--------|----------|---------------------------------------------------------|---------|---------|---------|
| `pose` | `[T, 3]` | head rotation from SMIRK (`pose_params`), axis-angle    | radians | ≤ 1     | > 2π    |
| `cam`  | `[T, 3]` | SMIRK's orthographic camera (`cam`): scale, tx, ty      | below   | ≤ 20    | > 1000  |
| `gaze` | `[T, 2]` | eye gaze from L2CS-Net, in the order it returns angles  | radians | ≤ 1     | > π     |

"typical" and "refused" bound the largest absolute value (`validation.CONTROL_LIMITS`): beyond typical
a warning is logged (expect exaggerated motion), beyond refused it is an `InputError` (a unit mistake:
degrees for radians, pixels, garbage). 0.5 rad (29°) is already a marked turn of the head.

Which column is which (files and keyframes name them `pose_0 … gaze_1`):

- **pose** is an axis-angle vector in FLAME's head frame: x towards the subject's left (the image's
  right), y up, z out of the face towards the camera. For a talking head's small angles its components
  are the rotations about those axes: `pose_0` = pitch (positive: chin down, a nod), `pose_1` = yaw
  (positive: the face turns towards the image's right, the subject's left), `pose_2` = roll (positive:
  the top of the head tilts towards the image's left). How sure: the order follows from FLAME's axes
  (sure); the signs follow from that right-handed frame and SMIRK's orthographic projection, which
  flips only y for the image (fairly sure; not checked on rendered video). `(0, 0, 0)` faces the camera.
- **cam** is SMIRK's weak-perspective camera: a FLAME point p lands at `scale · (p_xy + (tx, ty))`,
  y then flipped for the image, so positive tx moves the head right and positive ty up (fairly sure,
  from SMIRK's projection). SMIRK's pose encoder starts training from scale 7 and tx = ty = 0; what
  real frames give depends on SMIRK's own face crop, so measure a clip with SMIRK when the camera
  matters. Give all three numbers: a scale of 0 is no camera SMIRK produces.
- **gaze** is two angles per frame from L2CS-Net, which returns (pitch, yaw) in that order; the
  reference reads a `[T, 2]` array per clip and feeds it unchanged (its extraction script is not
  published, so L2CS-Net's order is assumed). L2CS-Net's own drawing code (and the GazeHub label
  convention of its training data) treats the *first* angle as horizontal and the second as vertical:
  positive `gaze_0` looks towards the image's left, positive `gaze_1` looks up. How sure: the width is
  the reference's (sure); the order is L2CS-Net's (likely); the horizontal/vertical reading and the
  signs are inferred from L2CS-Net's visualisation (moderately sure). `(0, 0)` looks into the camera.
  Gaze is in camera coordinates, not relative to the head: eyes that stay on the camera while the head
  turns keep `(0, 0)` (as L2CS-Net measures it, from the whole face).

An absent part is a zero *embedding* in the generator (what the reference does without a file); the
training data always had all three. A part full of zeros is a real value (a frontal head, eyes on the
camera) and is projected like any other, so `pose = 0` is not the same as no pose.

Time: frame i is at `i / fps` seconds, so T frames last `T / fps` seconds.

`ControlSequence` holds any of the three parts (float32 on the CPU, one frame count) and their frame
rate. `resample(fps)` interpolates linearly in time; `fit(frames, mode)` cuts or extends to an exact
length ("hold" repeats the last frame; "trim_or_zero" pads with zeros like the reference);
`merge(other)` overrides and fills parts. Builders: `constant`, `keyframes` (a small text syntax, below)
and `idle_motion` (seeded sway and glances). Files: `load_controls` / `save_controls` (.json, .csv,
.txt, .npy, .npz, .pt; see `save_controls`).

Keyframe syntax (`keyframes(text, fps=25, interpolation="linear")`)::

    # A keyframe is  TIME: SETTINGS.  '#' starts a comment.
    0s:    pose=0,0,0   gaze=0,0        # face and look into the camera
    1.5s:  yaw=0.3      gaze=-0.25,0    # turn the head (0.3 rad ≈ 17°) and look the same way
    2.5s:  yaw=0.3      gaze=0,0        # look back at the camera; yaw=0.3 again holds the turn
    100f:  yaw=0                        # frame 100 (4 s at 25 fps): face the camera again
    5s:                                 # nothing set: only makes the sequence last until 5 s

(With the signs above, positive yaw turns the face towards the image's right and negative `gaze_0`
looks that way.)

- TIME: seconds `1.5s`, milliseconds `1500ms`, or frames `30f` or a bare whole number `30`. A bare
  number with a decimal point is refused as ambiguous. Times need not be in order.
- SETTINGS: `name=value` items separated by spaces or `;`. A line without a time continues the previous
  keyframe, and several keyframes may share a line (`0s: yaw=0; 2s: yaw=0.3`).
- names: a whole part, `pose=pitch,yaw,roll`, `cam=scale,tx,ty`, `gaze=gaze_0,gaze_1` (numbers separated
  by commas or spaces, optionally in brackets: `pose=(0, 0.3, 0)`), or one component: `pitch`, `yaw`,
  `roll` (pose), `scale`, `tx`, `ty` (cam), `gaze_pitch`, `gaze_yaw` (gaze, L2CS-Net's names; see
  above for their directions) or the column names `pose_0 … gaze_1`. Names are case-insensitive.
- values are radians; angles may be given in degrees with `deg` (or `°`) right after the number: `yaw=15deg`.
- Every component is its own track: it is interpolated between the keyframes that set it, and holds
  its first value before its first keyframe and its last after its last. To hold a value for a while,
  set it again at the end of the pause. A part appears in the result
  when any of its components is set; its never-set components are 0 (logged).
- interpolation "linear" moves at constant speed between keyframes; "smooth" eases in and out of
  every keyframe (smoothstep, 3w² − 2w³ of the linear fraction w: same values at the keyframes and
  half-way, no jump in speed, the head comes to rest at each keyframe).
- The sequence lasts from 0 to the last time written (`frames=` overrides). Errors name the line.

`idle_motion` makes a seeded, bounded head sway (three slow sinusoids per rotation axis) and gaze that
rests on a point for 0.6–2.5 s, then jumps to the next (a saccade over about 60 ms), back into the
camera about half of the time. It has no blinks: gaze is two angles with no eyelid dimension (SMIRK's
eyelid parameters are not among the generator's inputs), and a quick dip of the gaze would read as a
downward glance, not a blink. Blinks come from the generated motion itself.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import operator
import os
import pickle
import re
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..timing import FPS
from ..validation import (
    CONTROL_LIMITS,
    check_control,
    check_fraction,
    check_seed,
    check_sequence,
)

log = logging.getLogger(__name__)

#: The parts in column order, and their widths.
PART_WIDTHS = {"pose": 3, "cam": 3, "gaze": 2}
PARTS = tuple(PART_WIDTHS)
#: Column names, as CSV headers and keyframes write them.
COLUMNS = {part: tuple(f"{part}_{i}" for i in range(width)) for part, width in PART_WIDTHS.items()}
#: Friendly names of single components → (part, column).
ALIASES = {"pitch": ("pose", 0), "yaw": ("pose", 1), "roll": ("pose", 2),
           "scale": ("cam", 0), "tx": ("cam", 1), "ty": ("cam", 2),
           "gaze_pitch": ("gaze", 0), "gaze_yaw": ("gaze", 1)}
COMPONENT_NAMES = {"pose": ("pitch", "yaw", "roll"), "cam": ("scale", "tx", "ty"),
                   "gaze": ("gaze_pitch", "gaze_yaw")}
#: Key of the head pose in SMIRK's files (and in the reference's loader).
SMIRK_POSE_KEY = "pose_params"
FIT_MODES = ("hold", "trim_or_zero")
INTERPOLATIONS = ("linear", "smooth")
FILE_SUFFIXES = (".json", ".csv", ".txt", ".npy", ".npz", ".pt", ".pth")
#: Frame rates accepted for a sequence.
MIN_FPS, MAX_FPS = 0.1, 1000.0
#: Longest sequence (11 hours at 25 fps): anything longer is a unit mistake.
MAX_FRAMES = 1_000_000
#: Columns → parts of a file that does not name them, where the width alone tells.
_PARTS_BY_WIDTH = {2: ("gaze",), 6: ("pose", "cam"), 8: ("pose", "cam", "gaze")}

# Idle motion: head sway per rotation axis relative to `amplitude` (people turn more than they nod,
# and nod more than they tilt), its frequencies, and the gaze's fixations and saccades.
_SWAY_SHARE = (0.6, 1.0, 0.4)
_SWAY_HZ = (0.05, 0.35)
_SINES_PER_AXIS = 3
_FIXATION_SECONDS = (0.6, 2.5)
_SACCADE_SECONDS = 0.06
_CAMERA_GLANCE_SHARE = 0.5
_VERTICAL_GAZE_SHARE = 0.5


def check_fps(fps) -> float:
    """A frame rate from `MIN_FPS` to `MAX_FPS` as a float."""
    if isinstance(fps, bool):
        raise InputError(f"fps {fps!r} is not a number; use e.g. 25")
    return check_fraction(fps, "fps", MIN_FPS, MAX_FPS)


def check_frames(frames, name: str = "frames") -> int:
    """A whole number of frames from 1 to `MAX_FRAMES`."""
    try:
        number = None if isinstance(frames, bool) else operator.index(frames)
    except TypeError:
        number = None
    if number is None or not 1 <= number <= MAX_FRAMES:
        raise InputError(f"{name} {frames!r}: use a whole number of frames from 1 to {MAX_FRAMES:,}")
    return number


def _parts_text(parts: Iterable[str]) -> str:
    return "+".join(parts) or "no parts"


def _check_part_names(parts: Iterable[str]) -> tuple[str, ...]:
    names = tuple(parts)
    unknown = [p for p in names if p not in PART_WIDTHS]
    if unknown or not names or len(set(names)) != len(names):
        raise InputError(f"parts {list(names)!r}: use one or more of {', '.join(PARTS)}, each once")
    return names


def describe_fit(old_frames: int, new_frames: int, mode: str, fps: float) -> str:
    """One sentence saying what `fit` does to `old_frames` frames to make `new_frames`."""
    difference = abs(new_frames - old_frames)
    span = f"{difference} frame{'s' if difference != 1 else ''} ({difference / fps:.2f} s)"
    head = f"controls of {old_frames} frames ({old_frames / fps:.2f} s) fitted to {new_frames} frames: "
    if new_frames < old_frames:
        return head + f"cutting off the last {span}"
    if mode == "hold":
        return head + f"holding the last frame for {span} more"
    return head + f"adding {span} of zeros (as the reference pads)"


def _interpolate(values: torch.Tensor, positions: np.ndarray) -> torch.Tensor:
    """`values` `[T, D]` sampled at fractional frame `positions` `[N]` (clamped to the ends), linearly.

    `(1 - w) * a + w * b` in float64, so a position on a frame gives that frame's float32 value exactly.
    """
    data = values.to(torch.float64).numpy()
    last = data.shape[0] - 1
    clamped = np.clip(positions, 0.0, float(last))
    left = np.minimum(np.floor(clamped).astype(np.int64), max(last - 1, 0))
    right = np.minimum(left + 1, last)
    weight = (clamped - left)[:, None]
    mixed = (1.0 - weight) * data[left] + weight * data[right]
    return torch.from_numpy(mixed.astype(np.float32))


def _fit_part(values: torch.Tensor, frames: int, mode: str) -> torch.Tensor:
    if values.shape[0] >= frames:
        return values[:frames].clone()
    missing = frames - values.shape[0]
    fill = values[-1:].expand(missing, -1) if mode == "hold" else values.new_zeros(missing, values.shape[1])
    return torch.cat([values, fill])


@dataclass(frozen=True, eq=False, repr=False)
class ControlSequence:
    """Per-frame generator controls and their frame rate.

    pose: `[T, 3]`, cam: `[T, 3]`, gaze: `[T, 2]` (units and columns in the module docstring), each
    None when not given; tensors, arrays or nested lists are accepted and stored as float32 CPU copies,
    checked with `validation.check_control` (refused when not finite or beyond plausible, a warning
    beyond typical). All given parts have the same frame count T. fps: their frame rate (25, the
    generator's, by default). A sequence with no parts is valid and means "no controls".
    """

    pose: torch.Tensor | None = None
    cam: torch.Tensor | None = None
    gaze: torch.Tensor | None = None
    fps: float = float(FPS)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fps", check_fps(self.fps))
        for part in PARTS:
            value = getattr(self, part)
            if value is None:
                continue
            if isinstance(value, torch.Tensor):
                value = value.detach().cpu()
            # A copy of its own, so the caller's later edits cannot change a frozen sequence.
            object.__setattr__(self, part, check_control(value, PART_WIDTHS[part], part).clone())
        lengths = {part: getattr(self, part).shape[0] for part in self.parts}
        if len(set(lengths.values())) > 1:
            listed = ", ".join(f"{part} {count}" for part, count in lengths.items())
            raise InputError(f"the control parts have different frame counts ({listed}); make one sequence per "
                             "part and merge them (merge holds the shorter ones), or cut them to one length")
        if lengths and next(iter(lengths.values())) > MAX_FRAMES:
            raise InputError(f"controls of {self.frames:,} frames are longer than {MAX_FRAMES:,}")

    @classmethod
    def _derived(cls, parts: Mapping[str, torch.Tensor], fps: float) -> ControlSequence:
        """A sequence made from checked values (resampled, cut, held, zero-padded or merged).

        Their values are convex combinations of checked ones or zeros, so checking them again would only
        repeat the warnings; the checks are skipped.
        """
        sequence = object.__new__(cls)
        for part in PARTS:
            object.__setattr__(sequence, part, parts.get(part))
        object.__setattr__(sequence, "fps", float(fps))
        assert len({parts[p].shape[0] for p in parts}) <= 1, "derived parts must share one frame count"
        return sequence

    # ----------------------------------------------------------------------------------------
    # What it holds
    # ----------------------------------------------------------------------------------------

    @property
    def parts(self) -> tuple[str, ...]:
        """The parts given, in column order (pose, cam, gaze)."""
        return tuple(part for part in PARTS if getattr(self, part) is not None)

    @property
    def frames(self) -> int:
        """Frame count T (0 when no part is given)."""
        parts = self.parts
        return int(getattr(self, parts[0]).shape[0]) if parts else 0

    @property
    def seconds(self) -> float:
        """Duration `frames / fps` in seconds."""
        return self.frames / self.fps

    def get(self, part: str) -> torch.Tensor | None:
        """Part `part` ("pose", "cam" or "gaze") `[T, width]`, or None when not given."""
        _check_part_names([part])
        return getattr(self, part)

    def columns(self) -> tuple[np.ndarray, tuple[str, ...]]:
        """All given parts side by side: float32 `[T, K]` and the K column names (`pose_0`, …)."""
        parts = self.parts
        if not parts:
            return np.zeros((0, 0), np.float32), ()
        names = tuple(name for part in parts for name in COLUMNS[part])
        return torch.cat([getattr(self, part) for part in parts], dim=1).numpy(), names

    def equals(self, other: ControlSequence) -> bool:
        """Same parts, same values bit for bit, same fps."""
        return (isinstance(other, ControlSequence) and self.fps == other.fps and self.parts == other.parts
                and all(torch.equal(getattr(self, p), getattr(other, p)) for p in self.parts))

    def __repr__(self) -> str:
        return (f"ControlSequence({self.frames} frames at {self.fps:g} fps: "
                f"{', '.join(self.parts) or 'no parts'})")

    # ----------------------------------------------------------------------------------------
    # Changing it (each returns a new sequence)
    # ----------------------------------------------------------------------------------------

    def select(self, parts: Iterable[str]) -> ControlSequence:
        """Only `parts` (each must be given)."""
        names = _check_part_names(parts)
        missing = [p for p in names if getattr(self, p) is None]
        if missing:
            raise InputError(f"the controls hold no {', '.join(missing)} (they hold {_parts_text(self.parts)})")
        return self._derived({p: getattr(self, p) for p in names}, self.fps)

    def resample(self, fps: float) -> ControlSequence:
        """The same motion at frame rate `fps`, by linear interpolation in time.

        The result has `round(T · fps / self.fps)` frames (at least 1), so its duration stays T / fps.
        New frame j lies at time j / fps, i.e. at fractional old frame `j · self.fps / fps`, and takes the
        straight-line blend of the two old frames around it; times past the last old frame take the last
        frame. Up-sampling by a whole factor keeps every old frame exactly (25 → 50 → 25 gives the
        original back bit for bit); down-sampling skips frames rather than averaging them.
        """
        fps = check_fps(fps)
        if fps == self.fps:
            return self
        if not self.parts:
            return ControlSequence(fps=fps)
        frames = max(1, math.floor(self.frames * fps / self.fps + 0.5))
        positions = np.arange(frames, dtype=np.float64) * (self.fps / fps)
        log.debug("controls resampled from %g to %g fps: %d → %d frames", self.fps, fps, self.frames, frames)
        return self._derived({p: _interpolate(getattr(self, p), positions) for p in self.parts}, fps)

    def fit(self, frames: int, mode: str = "hold") -> ControlSequence:
        """Exactly `frames` frames: longer sequences are cut at the end; shorter ones are extended.

        mode "hold" (default) repeats the last frame, so the head stays where the controls leave it;
        "trim_or_zero" pads with zeros, as the reference (and the generator, given raw tensors) does,
        which means a frontal head and eyes on the camera, not "no control". What was done is logged.
        A sequence with no parts is returned as it is.
        """
        frames = check_frames(frames)
        if mode not in FIT_MODES:
            raise InputError(f"fit mode {mode!r}: use one of {', '.join(FIT_MODES)}")
        if not self.parts or frames == self.frames:
            return self
        log.info("%s", describe_fit(self.frames, frames, mode, self.fps))
        return self._derived({p: _fit_part(getattr(self, p), frames, mode) for p in self.parts}, self.fps)

    def merge(self, other: ControlSequence) -> ControlSequence:
        """These controls with `other`'s parts on top: a part `other` gives replaces this one's, the
        others are kept (so `other` also fills parts missing here).

        `other` is resampled to this sequence's fps; the result lasts as long as the longer of the two,
        the shorter parts holding their last frame. When this sequence has no parts the result is `other`.
        """
        if not isinstance(other, ControlSequence):
            raise InputError(f"can only merge controls with controls, not {type(other).__name__}")
        if not other.parts:
            return self
        if not self.parts:
            return other
        other = other.resample(self.fps)
        frames = max(self.frames, other.frames)
        merged = {p: getattr(self, p) for p in self.parts}
        merged.update({p: getattr(other, p) for p in other.parts})
        kept = [p for p in self.parts if p not in other.parts]
        log.info("controls merged: %s from the override%s, %d frames", _parts_text(other.parts),
                 f", {_parts_text(kept)} kept" if kept else "", frames)
        return self._derived({p: _fit_part(v, frames, "hold") for p, v in merged.items()}, self.fps)

    # ----------------------------------------------------------------------------------------
    # Plain values
    # ----------------------------------------------------------------------------------------

    def to_dict(self, tensors: bool = False) -> dict:
        """`{"fps": 25.0, "pose": [[...], ...], ...}` with the given parts only: nested lists of Python
        floats (exactly the float32 values), or float32 tensors with `tensors=True`."""
        data: dict = {"fps": self.fps}
        for part in self.parts:
            value = getattr(self, part)
            data[part] = value.clone() if tensors else value.tolist()
        return data

    @classmethod
    def from_dict(cls, data: Mapping, fps: float | None = None, strict: bool = True) -> ControlSequence:
        """The inverse of `to_dict`: keys "pose" (or SMIRK's "pose_params"), "cam", "gaze" and "fps"
        (default `fps`, else 25). Values may be lists, arrays or tensors. With `strict`, any other key is
        an error (a typo would otherwise drop a part); without it, other keys are ignored (SMIRK's files
        also hold shape, expression, jaw and eyelid parameters)."""
        if not isinstance(data, Mapping):
            raise InputError(f"controls must be a mapping of parts, not {type(data).__name__}")
        keys = {str(k): k for k in data}
        if "pose" in keys and SMIRK_POSE_KEY in keys:
            raise InputError(f"controls hold both 'pose' and '{SMIRK_POSE_KEY}'; keep one")
        known = {"fps", SMIRK_POSE_KEY, *PARTS}
        unknown = sorted(k for k in keys if k not in known)
        if unknown and strict:
            raise InputError(f"unknown control entries {unknown}; use fps, pose (or {SMIRK_POSE_KEY}), cam, gaze")
        if unknown:
            log.debug("ignoring entries %s", unknown)
        parts = {}
        for part in PARTS:
            key = SMIRK_POSE_KEY if part == "pose" and SMIRK_POSE_KEY in keys else part
            if key in keys:
                parts[part] = data[keys[key]]
        if not parts:
            raise InputError(f"no controls found: none of pose ({SMIRK_POSE_KEY}), cam, gaze among {sorted(keys)}")
        rate = data[keys["fps"]] if "fps" in keys else (fps if fps is not None else FPS)
        if isinstance(rate, torch.Tensor):
            rate = rate.item() if rate.numel() == 1 else rate.tolist()
        elif isinstance(rate, np.ndarray):
            rate = rate.item() if rate.size == 1 else rate.tolist()
        return cls(**parts, fps=rate)


# --------------------------------------------------------------------------------------------
# Times and durations
# --------------------------------------------------------------------------------------------

_TIME = re.compile(r"^(?P<number>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>s|sec|ms|f)?$", re.IGNORECASE)


def parse_time(text: str, fps: float) -> float:
    """A time written `1.5s`, `1500ms`, `30f` or `30` (frames) as a (fractional) frame position at `fps`.

    InputError for anything else (negative, a bare decimal number, an unknown unit, beyond `MAX_FRAMES`).
    """
    token = text.strip()
    match = _TIME.match(token)
    if match is None:
        if token.startswith("-"):
            raise InputError(f"time '{token}' is negative; times start at 0s")
        raise InputError(f"'{token}' is not a time; write seconds as 1.5s, milliseconds as 1500ms or frames "
                         "as 30f (or 30)")
    number, unit = match["number"], (match["unit"] or "").lower()
    if not unit and not number.isdigit():
        raise InputError(f"time '{token}' has no unit; write {number}s for seconds or a whole number of "
                         "frames (30 or 30f)")
    if unit == "f" and not number.isdigit():
        raise InputError(f"time '{token}': frames are whole numbers; use seconds (e.g. 1.5s) for times between "
                         "frames")
    value = float(number)
    position = value * fps if unit in ("s", "sec") else value * fps / 1000.0 if unit == "ms" else value
    if position > MAX_FRAMES:
        raise InputError(f"time '{token}' is {position:,.0f} frames at {fps:g} fps, beyond {MAX_FRAMES:,}; "
                         "check its unit (s for seconds, f for frames)")
    return position


def _is_time(token: str) -> bool:
    return _TIME.match(token.strip()) is not None


def duration_frames(duration, fps: float = float(FPS)) -> int:
    """A length as a frame count: an int is frames, a float is seconds, a string is `2s`, `2000ms`, `50f`
    or `50` (rounded to the nearest frame, at least 1)."""
    fps = check_fps(fps)
    if isinstance(duration, bool):
        raise InputError(f"duration {duration!r} is not a length; give frames (50), seconds (2.0) or '2s'")
    if isinstance(duration, str):
        position = parse_time(duration, fps)
    else:
        try:
            return check_frames(operator.index(duration), "duration")
        except TypeError:
            pass
        try:
            seconds = float(duration)
        except (TypeError, ValueError) as err:
            raise InputError(f"duration {duration!r} is not a length; give frames (50), seconds (2.0) or "
                             "'2s'") from err
        if not math.isfinite(seconds) or seconds < 0:
            raise InputError(f"duration {duration!r}: give a positive number of seconds")
        position = seconds * fps
    return check_frames(max(1, math.floor(position + 0.5)), "duration")


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------

def constant(duration, pose=None, cam=None, gaze=None, fps: float = float(FPS)) -> ControlSequence:
    """The same values on every frame for `duration` (frames as an int, seconds as a float, or '2s'/'50f').

    pose: 3 numbers (pitch, yaw, roll), cam: 3 (scale, tx, ty), gaze: 2, each None to leave the part out;
    at least one is needed. E.g. `constant("4s", pose=(0, 0, 0), gaze=(0, 0))`: a frontal head looking
    into the camera for 4 s.
    """
    frames = duration_frames(duration, fps)
    given = {part: value for part, value in (("pose", pose), ("cam", cam), ("gaze", gaze)) if value is not None}
    if not given:
        raise InputError("constant controls need at least one of pose, cam, gaze")
    parts = {}
    for part, value in given.items():
        needs = f"constant {part} needs {PART_WIDTHS[part]} numbers ({', '.join(COMPONENT_NAMES[part])})"
        try:
            row = torch.as_tensor(value.detach().cpu() if isinstance(value, torch.Tensor) else value,
                                  dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as err:
            raise InputError(f"{needs}, got {value!r}") from err
        if row.dim() != 1 or row.shape[0] != PART_WIDTHS[part]:
            raise InputError(f"{needs}, got {value!r}")
        # Checked (finite, plausible) once, by the sequence.
        parts[part] = row[None].expand(frames, -1)
    return ControlSequence(**parts, fps=fps)


_SETTING_NAME = re.compile(r"([A-Za-z_]\w*)\s*=")
_KEYFRAME_START = re.compile(r"^(?P<time>[^:=]*?)\s*:(?P<rest>.*)$", re.DOTALL)
_NUMBER = re.compile(r"^(?P<number>[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)(?P<unit>deg|°|rad)?$",
                     re.IGNORECASE)


def _resolve_name(name: str) -> tuple[str, int | None]:
    """(part, column) of a keyframe name; column None for a whole part."""
    lower = name.lower()
    if lower in PART_WIDTHS:
        return lower, None
    if lower in ALIASES:
        return ALIASES[lower]
    for part, names in COLUMNS.items():
        if lower in names:
            return part, names.index(lower)
    raise InputError(f"unknown setting '{name}'; use pose, cam, gaze, one of {', '.join(ALIASES)}, or a column "
                     "name pose_0 … gaze_1")


def _parse_values(text: str, part: str, count: int, setting: str) -> list[float]:
    """`count` finite numbers (radians; `deg` allowed on angles) from the value text of one setting."""
    body = text.strip()
    if len(body) >= 2 and (body[0], body[-1]) in (("(", ")"), ("[", "]")):
        body = body[1:-1]
    tokens = [t for t in re.split(r"[,\s]+", body.strip()) if t]
    if len(tokens) != count:
        what = "one number" if count == 1 else f"{count} numbers ({', '.join(COMPONENT_NAMES[part])})"
        raise InputError(f"{setting} needs {what}, got {len(tokens)}")
    values = []
    limit = CONTROL_LIMITS[part]["absurd"]
    for token in tokens:
        match = _NUMBER.match(token)
        if match is None:
            raise InputError(f"'{token}' in {setting} is not a number; write numbers like 0.3, -0.1 or 15deg")
        value = float(match["number"])
        unit = (match["unit"] or "").lower()
        if unit in ("deg", "°"):
            if part == "cam":
                raise InputError(f"{setting}: the camera's numbers are not angles; drop '{unit}'")
            value = math.radians(value)
        if not math.isfinite(value):
            raise InputError(f"'{token}' in {setting} is not a finite number")
        if abs(value) > limit:
            hint = f"; angles are radians: write {token}deg for degrees" if part != "cam" and not unit else ""
            raise InputError(f"{setting}: {token} is beyond any plausible {part} value (|{part}| ≤ {limit:.3g})"
                             f"{hint}")
        values.append(value)
    return values


def _curve(positions: np.ndarray, values: np.ndarray, frames: int, smooth: bool) -> np.ndarray:
    """A component's keyframes (sorted `positions` in frames, `values`) sampled at frames 0 … frames-1."""
    t = np.arange(frames, dtype=np.float64)
    if positions.shape[0] == 1:
        return np.full(frames, values[0])
    segment = np.clip(np.searchsorted(positions, t, side="right") - 1, 0, positions.shape[0] - 2)
    start, end = positions[segment], positions[segment + 1]
    weight = np.clip((t - start) / (end - start), 0.0, 1.0)
    if smooth:
        weight = weight * weight * (3.0 - 2.0 * weight)
    first, second = values[segment], values[segment + 1]
    # A flat stretch gives its value exactly (the blend could be one float64 rounding off).
    return np.where(first == second, first, (1.0 - weight) * first + weight * second)


def keyframes(text: str, fps: float = float(FPS), interpolation: str = "linear",
              frames: int | None = None) -> ControlSequence:
    """Controls from keyframe text (syntax in the module docstring), sampled at `fps`.

    interpolation: "linear" or "smooth". frames: the length (default: up to the last time written).
    InputError names the line and what is wrong.
    """
    fps = check_fps(fps)
    if interpolation not in INTERPOLATIONS:
        raise InputError(f"interpolation {interpolation!r}: use one of {', '.join(INTERPOLATIONS)}")
    if not isinstance(text, str):
        raise InputError(f"keyframes must be text, not {type(text).__name__}")
    # (part, column) → {position: (value, line)}
    tracks: dict[tuple[str, int], dict[float, tuple[float, int]]] = {}
    last_position = None
    current = None  # position of the keyframe that settings on this line belong to
    for line_number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0]
        for chunk in line.split(";"):
            chunk = chunk.strip()
            if not chunk:
                continue
            try:
                start = _KEYFRAME_START.match(chunk)
                if start is not None:
                    current = parse_time(start["time"], fps)
                    last_position = current if last_position is None else max(last_position, current)
                    chunk = start["rest"].strip()
                    if not chunk:
                        continue
                if current is None:
                    first = chunk.split()[0]
                    if _is_time(first):
                        raise InputError(f"the time '{first}' needs a ':' after it, e.g. '0s: yaw=0'")
                    raise InputError("settings before any time; start the keyframe with a time such as '0s:'")
                _parse_settings(chunk, current, line_number, tracks)
            except InputError as err:
                raise InputError(f"keyframes line {line_number} ('{raw.strip()}'): {err}") from None
    if not tracks:
        raise InputError("keyframes: nothing is set; write lines such as '0s: yaw=0' and '2s: yaw=0.3'")
    count = check_frames(frames) if frames is not None else check_frames(math.ceil(last_position) + 1,
                                                                          "keyframes length")
    smooth = interpolation == "smooth"
    parts = {}
    for part, width in PART_WIDTHS.items():
        if not any((part, column) in tracks for column in range(width)):
            continue
        columns = []
        for column in range(width):
            track = tracks.get((part, column))
            if track is None:
                log.info("keyframes: %s (%s) is never set; it stays 0", COLUMNS[part][column],
                         COMPONENT_NAMES[part][column])
                columns.append(np.zeros(count))
                continue
            ordered = sorted(track)
            positions = np.array(ordered, dtype=np.float64)
            values = np.array([track[p][0] for p in ordered], dtype=np.float64)
            columns.append(_curve(positions, values, count, smooth))
        parts[part] = np.stack(columns, axis=1).astype(np.float32)
    return ControlSequence(**parts, fps=fps)


def _parse_settings(text: str, position: float, line_number: int,
                    tracks: dict[tuple[str, int], dict[float, tuple[float, int]]]) -> None:
    matches = list(_SETTING_NAME.finditer(text))
    if not matches or text[:matches[0].start()].strip():
        stray = text[:matches[0].start()].strip() if matches else text
        if stray.split() and _is_time(stray.split()[0]):
            raise InputError(f"the time '{stray.split()[0]}' needs a ':' after it, e.g. '{stray.split()[0]}: yaw=0'")
        raise InputError(f"'{stray}' is not a setting; write name=value, e.g. yaw=0.3 (and a time ends with ':')")
    for i, match in enumerate(matches):
        name = match[1]
        value_text = text[match.end(): matches[i + 1].start() if i + 1 < len(matches) else len(text)]
        setting = f"{name}={value_text.strip()}"
        if not value_text.strip():
            raise InputError(f"'{name}=' has no value")
        part, column = _resolve_name(name)
        columns = range(PART_WIDTHS[part]) if column is None else [column]
        values = _parse_values(value_text, part, len(columns), setting)
        for col, value in zip(columns, values):
            track = tracks.setdefault((part, col), {})
            if position in track:
                other = track[position][1]
                where = "earlier on this line" if other == line_number else f"on line {other}"
                raise InputError(f"{COLUMNS[part][col]} ({COMPONENT_NAMES[part][col]}) is set twice at frame "
                                 f"{position:g} (also {where})")
            track[position] = (value, line_number)


def idle_motion(duration, seed: int = 0, amplitude: float = 0.1, speed: float = 1.0, gaze: bool = True,
                gaze_amplitude: float = 0.1, fps: float = float(FPS)) -> ControlSequence:
    """Seeded idle head motion (pose) and glances (gaze) for `duration` (frames, seconds or '10s').

    pose: per axis a sum of three sinusoids of 0.05–0.35 Hz (times `speed`) with seeded frequencies,
    phases and weights that sum to 1, scaled by `amplitude` radians times 0.6 (pitch), 1.0 (yaw) and
    0.4 (roll): |yaw| ≤ amplitude, |pitch| ≤ 0.6·amplitude, |roll| ≤ 0.4·amplitude on every frame.
    Default 0.1 rad (≈ 6°) is a calm speaker; 0.3 is lively.
    gaze (when `gaze`): fixations of 0.6–2.5 s (divided by `speed`), about half back into the camera
    `(0, 0)`, the others on a random point with |gaze_0| ≤ gaze_amplitude and |gaze_1| ≤ gaze_amplitude / 2
    (the first angle is probably the horizontal one, see the module docstring); each jump is a
    smoothstep over about 60 ms (2 frames at 25 fps). No blinks (see the module docstring).
    The same seed gives the same values on every machine (numpy's PCG64).
    """
    fps = check_fps(fps)
    frames = duration_frames(duration, fps)
    seed = check_seed(seed)
    amplitude = check_fraction(amplitude, "amplitude", 0.0, CONTROL_LIMITS["pose"]["absurd"])
    speed = check_fraction(speed, "speed", 0.01, 100.0)
    gaze_amplitude = check_fraction(gaze_amplitude, "gaze amplitude", 0.0, CONTROL_LIMITS["gaze"]["absurd"])
    rng = np.random.default_rng(seed)
    seconds = np.arange(frames, dtype=np.float64) / fps
    pose = np.zeros((frames, 3))
    for axis, share in enumerate(_SWAY_SHARE):
        hertz = rng.uniform(*_SWAY_HZ, size=_SINES_PER_AXIS) * speed
        phases = rng.uniform(0.0, 2.0 * math.pi, size=_SINES_PER_AXIS)
        weights = rng.uniform(0.5, 1.0, size=_SINES_PER_AXIS)
        weights /= weights.sum()
        waves = np.sin(2.0 * math.pi * hertz[None] * seconds[:, None] + phases[None])
        pose[:, axis] = amplitude * share * (waves * weights[None]).sum(axis=1)
    parts = {"pose": pose.astype(np.float32)}
    if gaze:
        parts["gaze"] = _glances(rng, frames, fps, speed, gaze_amplitude).astype(np.float32)
    return ControlSequence(**parts, fps=fps)


def _glances(rng: np.random.Generator, frames: int, fps: float, speed: float, amplitude: float) -> np.ndarray:
    """Gaze `[frames, 2]`: fixations joined by quick smoothstep saccades, starting on the camera."""
    gaze = np.zeros((frames, 2))
    ramp = max(1, round(_SACCADE_SECONDS * fps))
    previous = np.zeros(2)
    start = 0
    while start < frames:
        length = max(1, round(rng.uniform(*_FIXATION_SECONDS) / speed * fps))
        if start == 0 or rng.random() < _CAMERA_GLANCE_SHARE:
            target = np.zeros(2)
        else:
            target = rng.uniform(-1.0, 1.0, size=2) * amplitude * np.array([1.0, _VERTICAL_GAZE_SHARE])
        end = min(frames, start + length)
        gaze[start:end] = target
        steps = min(ramp, end - start)
        if start > 0 and steps:
            w = np.arange(1, steps + 1, dtype=np.float64) / (ramp + 1)
            w = w * w * (3.0 - 2.0 * w)
            gaze[start:start + steps] = (1.0 - w)[:, None] * previous + w[:, None] * target
        previous, start = target, end
    return gaze


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------

def _short(value: float) -> str:
    """The shortest decimal that reads back as the same float32 (via float64, as the loaders read)."""
    single = np.float32(value)
    text = np.format_float_positional(single, unique=True, trim="0")
    if np.float32(float(text)) != single:  # a double rounding near a float32 midpoint: 9 digits always work
        text = f"{float(single):.9g}"
    return text


def _row(values: Iterable[float]) -> list[str]:
    return [_short(v) for v in values]


def _named_parts(parts: Iterable[str] | str | None) -> tuple[str, ...] | None:
    if parts is None:
        return None
    if isinstance(parts, str):
        parts = [p for p in re.split(r"[+,\s]+", parts) if p]
    return _check_part_names(parts)


def _from_columns(array, parts: tuple[str, ...] | None, fps: float, source: str) -> ControlSequence:
    """A sequence from a `[T, K]` array whose columns are `parts` in order (inferred from K when None)."""
    table = np.asarray(array)
    if table.dtype.kind not in "fiu":
        table = table.astype(np.float32)  # text or objects: raises ValueError, reported by the caller
    if parts is None:
        width = table.shape[1] if table.ndim == 2 else None
        parts = _PARTS_BY_WIDTH.get(width)
        if parts is None:
            raise InputError(f"{source} holds numbers shaped {list(table.shape)} but does not name its columns; say "
                             "which parts they are (parts=('pose',), 'pose+gaze', …; 2 columns are read as gaze, "
                             "6 as pose+cam, 8 as pose+cam+gaze)")
    total = sum(PART_WIDTHS[p] for p in parts)
    table = check_sequence(table, total, _parts_text(parts))
    offsets = np.cumsum([0] + [PART_WIDTHS[p] for p in parts])
    return ControlSequence(**{p: table[:, offsets[i]:offsets[i + 1]] for i, p in enumerate(parts)}, fps=fps)


def _read_csv(text: str, parts, fps: float, source: str) -> ControlSequence:
    """CSV: optional `# fps=25` line, optional header row of column names (or an `fps` column), numbers."""
    rows, file_fps = [], None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            found = re.match(r"#\s*fps\s*[=:]\s*(\S+)", stripped, re.IGNORECASE)
            if found:
                file_fps = float(found[1])
            continue
        if stripped:
            rows.append(stripped)
    if not rows:
        raise InputError(f"{source} holds no rows of numbers")
    table = [[cell.strip() for cell in row] for row in csv.reader(rows)]
    header = None
    if any(re.fullmatch(r"[A-Za-z_]\w*", cell) and cell.lower() not in ("nan", "inf", "infinity")
           for cell in table[0]):
        header, table = [cell.lower() for cell in table[0]], table[1:]
    if not table:
        raise InputError(f"{source} holds no rows of numbers")
    width = len(header) if header is not None else len(table[0])
    for index, row in enumerate(table):
        if len(row) != width:
            raise InputError(f"{source}: row {index + 1} has {len(row)} values, "
                             f"{'the header' if header is not None else 'the first row'} {width}")
    numbers = np.array([[float(cell) for cell in row] for row in table], dtype=np.float64)
    rate = file_fps if file_fps is not None else fps
    if header is None:
        return _from_columns(numbers.astype(np.float32), parts, rate, source)
    if "fps" in header:
        index = header.index("fps")
        if np.unique(numbers[:, index]).size != 1:
            raise InputError(f"{source}: the fps column must hold one value")
        rate = float(numbers[0, index])
        numbers = np.delete(numbers, index, axis=1)
        header = header[:index] + header[index + 1:]
    if len(set(header)) != len(header):
        raise InputError(f"{source}: the header names a column twice: {header}")
    placed: dict[str, dict[int, int]] = {}
    for index, name in enumerate(header):
        try:
            part, column = _resolve_name(name)
        except InputError as err:
            raise InputError(f"{source} header: {err}") from None
        if column is None:
            raise InputError(f"{source} header: name each column (pose_0, pose_1, …), not the whole part '{name}'")
        if column in placed.setdefault(part, {}):
            raise InputError(f"{source} header: {COLUMNS[part][column]} appears twice (as '{name}')")
        placed[part][column] = index
    data = {}
    for part, found in placed.items():
        missing = [COLUMNS[part][c] for c in range(PART_WIDTHS[part]) if c not in found]
        if missing:
            raise InputError(f"{source} header has part of {part} but not {', '.join(missing)}")
        data[part] = numbers[:, [found[c] for c in range(PART_WIDTHS[part])]].astype(np.float32)
    return _select(ControlSequence.from_dict({**data, "fps": rate}), parts, source)


def _select(sequence: ControlSequence, parts: tuple[str, ...] | None, source: str) -> ControlSequence:
    if parts is None:
        return sequence
    missing = [p for p in parts if sequence.get(p) is None]
    if missing:
        raise InputError(f"{source} holds no {', '.join(missing)} (it holds {_parts_text(sequence.parts)})")
    return sequence.select(parts)


def load_controls(path: str | os.PathLike, parts: Iterable[str] | str | None = None,
                  fps: float | None = None) -> ControlSequence:
    """Controls from a file; the format follows the suffix (what `save_controls` writes, and more):

    - `.json` `{"fps": 25, "pose": [[p, y, r], ...], "cam": ..., "gaze": ...}` (any of the parts);
    - `.csv` a header row naming the columns (`pose_0,pose_1,pose_2,cam_0,…,gaze_1`, or the component
      names `pitch,yaw,…`; any order and subset of whole parts) and an optional `# fps=25` line or `fps`
      column; or rows of bare numbers;
    - `.txt` rows of numbers separated by spaces (`numpy.savetxt`);
    - `.npz` arrays named pose (or pose_params) / cam / gaze and an optional fps;
    - `.npy` one `[T, K]` array;
    - `.pt`/`.pth` a dict of tensors (SMIRK's files: `pose_params`, `cam`, and entries that are ignored,
      plus gaze and fps when written by `save_controls`) or one `[T, K]` tensor, read with
      `torch.load(weights_only=True)` (a file that holds code is refused without running it).

    parts: the parts to read (a list or 'pose+gaze'). For files that do not name their columns (.npy,
    .txt, bare CSV numbers, a bare tensor) they are also the columns' meaning, in order; without it,
    2 columns are gaze, 6 pose+cam, 8 pose+cam+gaze, other widths are an error. From a file that names
    its parts, only these are kept (each must be there). fps: the frame rate of a file that stores none
    (default 25). InputError names the file and the problem.
    """
    wanted = _named_parts(parts)
    rate = check_fps(fps) if fps is not None else float(FPS)
    what = _parts_text(wanted) if wanted else "controls"
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} file not found: '{path}'")
    suffix, name = path.suffix.lower(), path.name
    source = f"{what} file '{name}'"
    try:
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            return _select(ControlSequence.from_dict(data, fps=rate), wanted, source)
        if suffix == ".csv":
            return _read_csv(path.read_text(encoding="utf-8-sig"), wanted, rate, source)
        if suffix == ".txt":
            return _from_columns(np.loadtxt(path, ndmin=2), wanted, rate, source)
        if suffix == ".npy":
            return _from_columns(np.load(path, allow_pickle=False), wanted, rate, source)
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                data = {key: archive[key] for key in archive.files}
            return _select(ControlSequence.from_dict(data, fps=rate), wanted, source)
        if suffix in (".pt", ".pth"):
            data = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(data, Mapping):
                return _select(ControlSequence.from_dict(data, fps=rate, strict=False), wanted, source)
            return _from_columns(data.numpy() if isinstance(data, torch.Tensor) else data, wanted, rate, source)
    except pickle.UnpicklingError as err:
        raise InputError(f"{what} file '{name}' holds Python objects or code we refuse to load; "
                         "save the values as a tensor or array (.npy, .csv)") from err
    except InputError as err:
        message = str(err)
        raise InputError(message if name in message else f"{source}: {message}") from err
    except (OSError, ValueError, TypeError, RuntimeError, EOFError, KeyError, zipfile.BadZipFile) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InputError(f"cannot read {what} file '{name}' as numbers: {reason}") from err
    raise InputError(f"{what} file '{name}' must be {', '.join(FILE_SUFFIXES[:-1])} or {FILE_SUFFIXES[-1]}")


def save_controls(sequence: ControlSequence, path: str | os.PathLike) -> Path:
    """Write `sequence` in the format of `path`'s suffix; every format reads back bit for bit (float32).

    `.json`, `.csv` (a `# fps=…` line, a header row `pose_0,…`, one row per frame), `.npz` and `.pt`
    (a dict with SMIRK's key `pose_params` for the pose, so the reference's loader reads pose and cam
    from it, plus `cam`, `gaze`, `fps`) keep the parts' names and the fps. `.npy` and `.txt` hold only
    the `[T, K]` numbers (parts in the order pose, cam, gaze): read them back with `parts=`. Numbers in
    the text formats are the shortest decimals that read back as the same float32. The file appears
    whole or not at all (written beside it, then renamed). Returns the path.
    """
    if not isinstance(sequence, ControlSequence) or not sequence.parts:
        raise InputError("there are no controls to save (no pose, cam or gaze)")
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise InputError(f"cannot save controls as '{path.name}': use {', '.join(FILE_SUFFIXES)}")
    table, names = sequence.columns()
    buffer = io.BytesIO()
    if suffix == ".json":
        lines = ["{", f'  "fps": {json.dumps(sequence.fps)},']
        for i, part in enumerate(sequence.parts):
            rows = ",\n".join(f"    [{', '.join(_row(row))}]" for row in getattr(sequence, part).tolist())
            end = "," if i + 1 < len(sequence.parts) else ""
            lines.append(f'  "{part}": [\n{rows}\n  ]{end}')
        lines.append("}")
        buffer.write(("\n".join(lines) + "\n").encode("utf-8"))
    elif suffix in (".csv", ".txt"):
        separator = "," if suffix == ".csv" else " "
        text = [f"# fps={sequence.fps!r}", ",".join(names)] if suffix == ".csv" else []
        text += [separator.join(_row(row)) for row in table.tolist()]
        buffer.write(("\n".join(text) + "\n").encode("utf-8"))
        if suffix == ".txt":
            log.info("%s keeps neither the part names (%s) nor the fps (%g); read it back with parts=%r",
                     path.name, _parts_text(sequence.parts), sequence.fps, _parts_text(sequence.parts))
    elif suffix == ".npy":
        np.save(buffer, table)
        log.info("%s keeps neither the part names (%s) nor the fps (%g); read it back with parts=%r",
                 path.name, _parts_text(sequence.parts), sequence.fps, _parts_text(sequence.parts))
    elif suffix == ".npz":
        arrays = {part: getattr(sequence, part).numpy() for part in sequence.parts}
        np.savez(buffer, fps=np.float64(sequence.fps), **arrays)
    else:
        data = {(SMIRK_POSE_KEY if part == "pose" else part): getattr(sequence, part).clone()
                for part in sequence.parts}
        torch.save({**data, "fps": sequence.fps}, buffer)
    partial = path.with_name(path.name + ".partial")
    try:
        partial.write_bytes(buffer.getvalue())
        os.replace(partial, path)
    except OSError as err:
        partial.unlink(missing_ok=True)
        raise InputError(f"cannot write controls to '{path}': {err.strerror or err}") from err
    log.info("saved %s (%d frames at %g fps) to %s", _parts_text(sequence.parts), sequence.frames, sequence.fps,
             path)
    return path
