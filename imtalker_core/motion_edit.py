"""Editing motion-latent sequences: smoothing, intensity, blending, cutting, looping, resampling,
the relative (video-driven) mode, and motion files.

Motion here is a sequence of renderer motion latents `[T, D]` (official D = 32), one per video frame
at a frame rate `fps` (frames per second). Every function takes and returns float32 tensors on the
input's device and never changes its input in place; outputs never share memory with inputs. Where
an edit is the identity (scale 1, weight 0 or 1, sigma 0, the full range) the output is a bit-exact
copy, so a pass-through setting never drifts the motion.

Values of the latents are not bounded (they are whatever the motion encoder or the generator
produced); only NaN/inf are refused.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .errors import InputError
from .validation import _whole, check_sequence

log = logging.getLogger(__name__)

SMOOTH_METHODS = ("gaussian", "moving_average")
#: "anchor": ends extended by point reflection (2·end − mirrored frame), so the first and last frames
#: keep their values and a steady drift is kept up to the ends; "reflect": plain mirror, the ends are
#: smoothed too.
SMOOTH_EDGES = ("anchor", "reflect")
#: What `blend` does with sequences of different lengths.
LENGTH_POLICIES = ("error", "shortest", "hold")
LOOP_MODES = ("loop", "pingpong")
CURVE_SHAPES = ("linear", "smooth")
#: Gaussian kernels reach this many sigmas each side (the weight left out is below 1e-4).
GAUSSIAN_TRUNCATE = 4.0
#: Intensity scales above this give visibly exaggerated, often broken motion.
LARGE_SCALE = 2.0

#: Motion files: one tensor under `MOTION_KEY`, the frame rate and this tag in the metadata.
MOTION_FORMAT = "imtalker-motion"
MOTION_FORMAT_VERSION = "1"
MOTION_KEY = "motion"
MOTION_SUFFIX = ".safetensors"


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------

def check_latents(latents, name: str = "motion", width: int | None = None) -> torch.Tensor:
    """Motion latents `[T, D]` (T ≥ 1; D = `width` when given) as float32, finite; else `InputError`.

    A float32 tensor comes back as the same object (no copy), so callers can return it unchanged.
    """
    if width is None:
        try:
            shape = tuple(torch.as_tensor(latents).shape) if not hasattr(latents, "shape") else tuple(latents.shape)
        except (TypeError, ValueError, RuntimeError) as err:
            raise InputError(f"{name} must be motion latents shaped [frames, dim]: {err}") from err
        if len(shape) != 2:
            raise InputError(f"{name} must be motion latents shaped [frames, dim], got {list(shape)}")
        width = int(shape[1])
        if width == 0:
            raise InputError(f"{name} has latents of width 0; motion latents are [frames, 32]")
    return check_sequence(latents, width, name, noun="sequence of motion latents",
                          empty_hint="give at least one frame")


def check_fps(fps, name: str = "fps") -> float:
    """A frame rate: a finite number > 0 (frames per second)."""
    try:
        value = float(fps)
    except (TypeError, ValueError) as err:
        raise InputError(f"{name} {fps!r} is not a number; give frames per second, e.g. 25") from err
    if not math.isfinite(value) or value <= 0:
        raise InputError(f"{name} {fps!r}: a frame rate must be a finite number of frames per second above 0")
    return value


def _number(value, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError) as err:
        raise InputError(f"{name} {value!r} is not a number") from err
    if not math.isfinite(number):
        raise InputError(f"{name} {value!r} must be finite")
    return number


def _frame_count(value, name: str, minimum: int = 0) -> int:
    number = _whole(value)
    if number is None or number < minimum:
        raise InputError(f"{name} {value!r}: use a whole number of frames, at least {minimum}")
    return number


def _reference_latent(reference, latents: torch.Tensor, name: str) -> torch.Tensor:
    """A single latent `[1, D]` or `[D]` (any device/dtype, e.g. an fp16 identity on the GPU) as
    float32 `[1, D]` on `latents`' device, matching its width."""
    tensor = torch.as_tensor(reference).detach()
    if tensor.dim() == 1:
        tensor = tensor[None]
    if tensor.dim() != 2 or tensor.shape[0] != 1:
        raise InputError(f"{name} must be one motion latent [1, {latents.shape[1]}], got {list(tensor.shape)}")
    tensor = check_latents(tensor.to(device=latents.device, dtype=torch.float32), name, width=latents.shape[1])
    return tensor


def _same_width(first: torch.Tensor, second: torch.Tensor, names: tuple[str, str]) -> None:
    if first.shape[1] != second.shape[1]:
        raise InputError(f"{names[0]} has latents of width {first.shape[1]} but {names[1]} of width "
                         f"{second.shape[1]}; both must come from the same renderer")


# --------------------------------------------------------------------------------------------
# Smoothing and intensity
# --------------------------------------------------------------------------------------------

def _extended_indices(frames: int, radius: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For positions −radius … frames−1+radius of a sequence mirrored about both ends (indefinitely):
    the source frame of each, whether it is a mirrored (flipped) copy, and how many full periods
    2·(frames−1) it lies away (signed). Needs frames ≥ 2."""
    period = 2 * (frames - 1)
    positions = torch.arange(-radius, frames + radius)
    periods = torch.div(positions, period, rounding_mode="floor")
    offset = positions - periods * period
    flipped = offset > frames - 1
    source = torch.where(flipped, period - offset, offset)
    return source, flipped, periods


def _extend(latents: torch.Tensor, radius: int, edge: str) -> torch.Tensor:
    """`latents` `[T, D]` with `radius` frames added at each end (T ≥ 2), for a centred kernel."""
    frames = latents.shape[0]
    source, flipped, periods = _extended_indices(frames, radius)
    source, flipped, periods = (t.to(latents.device) for t in (source, flipped, periods))
    extended = latents[source]
    if edge == "anchor":
        # Point reflection about each end: frame −k is 2·first − frame k, frame T−1+k is 2·last − frame
        # T−1−k. Unrolled, that is the plain mirror with the mirrored copies flipped about the last frame
        # plus a drift of 2·(last − first) per period.
        first, last = latents[:1], latents[-1:]
        extended = torch.where(flipped[:, None], 2 * last - extended, extended)
        extended = extended + (2 * periods[:, None].to(latents.dtype)) * (last - first)
    return extended


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(GAUSSIAN_TRUNCATE * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


def smooth(latents: torch.Tensor, sigma_frames: float = 1.0, method: str = "gaussian",
           window_frames: int = 5, edge: str = "anchor") -> torch.Tensor:
    """Temporal smoothing of motion `[T, D]` → `[T, D]` (float32), each latent channel on its own.

    method "gaussian": a Gaussian of standard deviation `sigma_frames` (frames, ≥ 0; 0 = unchanged,
    bit-exact), truncated at 4 sigma. method "moving_average": the mean of `window_frames` frames
    centred on each frame (an odd whole number ≥ 1; 1 = unchanged). `edge` (see `SMOOTH_EDGES`):
    "anchor" (default) keeps the first and last frames exactly and does not pull the ends towards
    the middle; "reflect" smooths the ends too. The length never changes; computed in float64.
    """
    latents = check_latents(latents)
    if method not in SMOOTH_METHODS:
        raise InputError(f"smoothing method must be one of {', '.join(SMOOTH_METHODS)}, not {method!r}")
    if edge not in SMOOTH_EDGES:
        raise InputError(f"smoothing edge must be one of {', '.join(SMOOTH_EDGES)}, not {edge!r}")
    if method == "gaussian":
        sigma = _number(sigma_frames, "sigma_frames")
        if sigma < 0:
            raise InputError(f"sigma_frames {sigma_frames!r}: use 0 (no smoothing) or more frames")
        if sigma == 0:
            return latents.clone()
        kernel = _gaussian_kernel(sigma)
    else:
        window = _frame_count(window_frames, "window_frames", minimum=1)
        if window % 2 == 0:
            raise InputError(f"window_frames {window}: use an odd number of frames (1, 3, 5, …) so the "
                             "average stays centred on each frame")
        if window == 1:
            return latents.clone()
        kernel = torch.full((window,), 1.0 / window, dtype=torch.float64)
    frames = latents.shape[0]
    if frames == 1:
        return latents.clone()
    radius = kernel.numel() // 2
    extended = _extend(latents.double(), radius, edge)                       # [T + 2r, D]
    channels = extended.shape[1]
    weight = kernel.to(latents.device).expand(channels, 1, -1)                # [D, 1, 2r + 1]
    smoothed = F.conv1d(extended.T[None], weight, groups=channels)[0].T       # [T, D]
    result = smoothed.to(torch.float32).contiguous()
    if edge == "anchor":
        # Equal in exact arithmetic (a symmetric kernel over a point reflection); made bit-exact.
        result[0] = latents[0]
        result[-1] = latents[-1]
    return result


def scale_intensity(latents: torch.Tensor, scale: float, reference=None) -> torch.Tensor:
    """Motion `[T, D]` with its deviation from `reference` multiplied by `scale`:
    `reference + scale · (latents − reference)`, float32 `[T, D]`.

    reference: one latent `[1, D]` or `[D]` (e.g. `Identity.motion`, the source portrait's own
    expression: scaling then exaggerates or calms the motion around the portrait's resting face), or
    None for the sequence's mean over time. scale: a finite number ≥ 0; 1 returns an exact copy,
    0 a still sequence at the reference, above 2 is logged as likely to look exaggerated.
    """
    latents = check_latents(latents)
    factor = _number(scale, "scale")
    if factor < 0:
        raise InputError(f"scale {scale!r}: use 0 (no motion), below 1 to calm, 1 to keep, above 1 to exaggerate")
    center = None if reference is None else _reference_latent(reference, latents, "reference motion")
    if factor == 1:
        return latents.clone()
    if factor > LARGE_SCALE:
        log.info("motion scale %g: above %g motion is often exaggerated beyond what the renderer draws well",
                 factor, LARGE_SCALE)
    if center is None:
        center = latents.double().mean(dim=0, keepdim=True).to(torch.float32)
    return center + factor * (latents - center)


# --------------------------------------------------------------------------------------------
# Blending
# --------------------------------------------------------------------------------------------

def match_lengths(a: torch.Tensor, b: torch.Tensor, length: str = "error",
                  names: tuple[str, str] = ("a", "b")) -> tuple[torch.Tensor, torch.Tensor]:
    """Two motions `[Ta, D]`, `[Tb, D]` brought to one length by `length` (see `LENGTH_POLICIES`):
    "error" refuses different lengths, "shortest" cuts the longer one, "hold" repeats the last frame
    of the shorter one. Returns the pair (the inputs themselves when the lengths already match)."""
    a, b = check_latents(a, names[0]), check_latents(b, names[1])
    _same_width(a, b, names)
    if length not in LENGTH_POLICIES:
        raise InputError(f"length policy must be one of {', '.join(LENGTH_POLICIES)}, not {length!r}")
    frames_a, frames_b = a.shape[0], b.shape[0]
    if frames_a == frames_b:
        return a, b
    if length == "error":
        raise InputError(f"{names[0]} has {frames_a} frames but {names[1]} has {frames_b}; trim or loop one of "
                         "them, or choose the length policy 'shortest' (cut) or 'hold' (hold the last frame)")
    if length == "shortest":
        frames = min(frames_a, frames_b)
        return a[:frames], b[:frames]
    frames = max(frames_a, frames_b)
    return _hold_to(a, frames), _hold_to(b, frames)


def _hold_to(latents: torch.Tensor, frames: int) -> torch.Tensor:
    if latents.shape[0] >= frames:
        return latents
    held = latents[-1:].expand(frames - latents.shape[0], -1)
    return torch.cat([latents, held])


def _check_weight(weight, frames: int) -> float | torch.Tensor:
    """A blend weight: a number, or a `[frames]` curve (float32), every value finite and in [0, 1]."""
    if isinstance(weight, torch.Tensor) and weight.dim() > 0:
        curve = weight.detach().reshape(-1) if weight.dim() == 2 and 1 in weight.shape else weight.detach()
        if curve.dim() != 1:
            raise InputError(f"blend weight curve must be [frames], got {list(weight.shape)}")
        if curve.shape[0] != frames:
            raise InputError(f"blend weight curve has {curve.shape[0]} values for {frames} frames; make it "
                             "with weight_curve for the blended length")
        if not curve.is_floating_point():
            curve = curve.to(torch.float32)
        if not torch.isfinite(curve).all():
            raise InputError("blend weight curve contains NaN or infinite values")
        low, high = curve.min().item(), curve.max().item()
        if low < 0 or high > 1:
            raise InputError(f"blend weight curve reaches {low if low < 0 else high:g}; weights must lie in "
                             "[0, 1] (0 = all a, 1 = all b)")
        return curve.to(torch.float32)
    number = _number(weight.item() if isinstance(weight, torch.Tensor) else weight, "blend weight")
    if not 0 <= number <= 1:
        raise InputError(f"blend weight {weight!r}: use a number from 0 (all a) to 1 (all b)")
    return number


def blend(a: torch.Tensor, b: torch.Tensor, weight, length: str = "error") -> torch.Tensor:
    """Frame-by-frame mix `(1 − w)·a + w·b` of motions `[Ta, D]` and `[Tb, D]` → `[T, D]` float32.

    weight: a number or a `[T]` curve (see `weight_curve`), each in [0, 1]; where it is exactly 0
    the frame is a's, where exactly 1 it is b's, bit for bit. length: `LENGTH_POLICIES` (as
    `match_lengths`); T is the length after it, which a curve must match.
    """
    a, b = match_lengths(a, b, length)
    w = _check_weight(weight, a.shape[0])
    if not isinstance(w, torch.Tensor):
        if w == 0:
            return a.clone()
        if w == 1:
            return b.clone()
        return torch.lerp(a, b, w)
    w = w.to(a.device)[:, None]
    mixed = torch.lerp(a, b, w)
    return torch.where(w == 0, a, torch.where(w == 1, b, mixed))


def weight_curve(frames: int, start: float, end: float, ramp_start: float = 0.0, ramp_end: float = 0.0,
                 shape: str = "linear") -> torch.Tensor:
    """Blend weights `[frames]` (float32): `start` up to frame `ramp_start`, `end` from frame `ramp_end`
    on, and a ramp between them ("linear", or "smooth" = smoothstep 3t² − 2t³, flat at both ends).

    Frame positions are in frames (may be fractional; frame i is at position i) and ≥ 0, with
    `ramp_end ≥ ramp_start`; equal positions make a step at that frame. start/end are in [0, 1];
    the flat parts are exactly `start` and `end`.
    """
    count = _frame_count(frames, "frames", minimum=1)
    low, high = _number(start, "start weight"), _number(end, "end weight")
    for value, name in ((low, "start weight"), (high, "end weight")):
        if not 0 <= value <= 1:
            raise InputError(f"{name} {value:g}: use a number from 0 (all a) to 1 (all b)")
    begin, finish = _number(ramp_start, "ramp start"), _number(ramp_end, "ramp end")
    if begin < 0 or finish < 0:
        raise InputError(f"ramp start {begin:g} / end {finish:g}: positions count from the first frame, use ≥ 0")
    if finish < begin:
        raise InputError(f"ramp end {finish:g} comes before ramp start {begin:g}; swap them, or swap the start "
                         "and end weights to ramp the other way")
    if shape not in CURVE_SHAPES:
        raise InputError(f"curve shape must be one of {', '.join(CURVE_SHAPES)}, not {shape!r}")
    positions = torch.arange(count, dtype=torch.float64)
    if finish > begin:
        t = ((positions - begin) / (finish - begin)).clamp(0.0, 1.0)
    else:
        t = (positions >= begin).to(torch.float64)
    if shape == "smooth":
        t = t * t * (3 - 2 * t)
    ramp = low + (high - low) * t
    curve = torch.where(t <= 0, torch.full_like(ramp, low), torch.where(t >= 1, torch.full_like(ramp, high), ramp))
    return curve.to(torch.float32)


# --------------------------------------------------------------------------------------------
# Cutting, joining, looping, resampling
# --------------------------------------------------------------------------------------------

def concat(seqs: Sequence[torch.Tensor], crossfade_frames: int = 0) -> torch.Tensor:
    """Motions `[T_i, D]` one after another → `[ΣT_i − c·(n−1), D]` float32 (c = `crossfade_frames`).

    With c > 0 the last c frames of what came before and the first c of the next are mixed over a
    linear ramp (weights 1/(c+1) … c/(c+1) towards the next), so each joint shortens the result by c.
    Every sequence needs at least c frames.
    """
    if isinstance(seqs, torch.Tensor) or not isinstance(seqs, Sequence) or not seqs:
        raise InputError("concat needs a list of one or more motion sequences")
    parts = [check_latents(seq, f"motion {index + 1}") for index, seq in enumerate(seqs)]
    for index, part in enumerate(parts[1:], start=2):
        _same_width(parts[0], part, ("motion 1", f"motion {index}"))
    fade = _frame_count(crossfade_frames, "crossfade_frames")
    if fade:
        short = [(index + 1, part.shape[0]) for index, part in enumerate(parts) if part.shape[0] < fade]
        if short:
            index, frames = short[0]
            raise InputError(f"motion {index} has {frames} frames, fewer than the {fade}-frame crossfade; "
                             "shorten the crossfade")
    if len(parts) == 1:
        return parts[0].clone()
    if not fade:
        return torch.cat(parts)
    ramp = torch.arange(1, fade + 1, dtype=torch.float32, device=parts[0].device)[:, None] / (fade + 1)
    pieces, tail = [], parts[0]
    for part in parts[1:]:
        pieces.append(tail[:-fade])
        joint = torch.lerp(tail[-fade:], part[:fade], ramp)
        tail = torch.cat([joint, part[fade:]])
    pieces.append(tail)
    return torch.cat(pieces)


def trim(latents: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
    """Frames `start` (inclusive) to `end` (exclusive) of motion `[T, D]` → `[end − start, D]` float32.

    start: a whole number of frames, 0 ≤ start < T. end: None for "to the end", a frame count
    ≤ T, or negative to count from the end (−1 drops the last frame). The result must keep at
    least one frame.
    """
    latents = check_latents(latents)
    frames = latents.shape[0]
    first = _whole(start)
    if first is None or not 0 <= first < frames:
        raise InputError(f"trim start {start!r}: use a whole frame number from 0 to {frames - 1} "
                         f"(the motion has {frames} frames)")
    if end is None:
        stop = frames
    else:
        stop = _whole(end)
        if stop is None or not -frames < stop <= frames:
            raise InputError(f"trim end {end!r}: use a whole frame number up to {frames}, or a negative number "
                             f"down to {-(frames - 1)} to count back from the end (the motion has {frames} frames)")
        if stop < 0:
            stop += frames
    if stop <= first:
        raise InputError(f"trim from frame {first} to {stop} keeps no frames (the motion has {frames}); "
                         "the end must come after the start")
    return latents[first:stop].clone()


def loop_indices(source_frames: int, frames: int, mode: str = "loop") -> torch.Tensor:
    """Which source frame each of `frames` output frames shows (int64 `[frames]`).

    "loop": 0, 1, …, T−1, 0, 1, …; "pingpong": 0, 1, …, T−1, T−2, …, 1, 0, 1, … (the turning
    frames are not doubled, so the motion never pauses)."""
    if mode not in LOOP_MODES:
        raise InputError(f"loop mode must be one of {', '.join(LOOP_MODES)}, not {mode!r}")
    positions = torch.arange(frames)
    if source_frames == 1:
        return torch.zeros(frames, dtype=torch.long)
    if mode == "loop":
        return positions % source_frames
    period = 2 * (source_frames - 1)
    offset = positions % period
    return torch.where(offset < source_frames, offset, period - offset)


def loop(latents: torch.Tensor, frames: int, mode: str = "loop") -> torch.Tensor:
    """Motion `[T, D]` repeated (mode "loop") or played back and forth ("pingpong") to exactly
    `frames` frames → `[frames, D]` float32; fewer frames than T just cuts it."""
    latents = check_latents(latents)
    count = _frame_count(frames, "loop length (frames)", minimum=1)
    index = loop_indices(latents.shape[0], count, mode).to(latents.device)
    return latents[index]


def resampled_length(frames: int, fps_in: float, fps_out: float) -> int:
    """Frames at `fps_out` covering the duration of `frames` frames at `fps_in` (rounded, ≥ 1)."""
    return max(1, math.floor(frames * fps_out / fps_in + 0.5 + 1e-9))


def resample(latents: torch.Tensor, fps_in: float, fps_out: float) -> torch.Tensor:
    """Motion `[T, D]` at `fps_in` → `[T', D]` at `fps_out` (frames per second, > 0) by linear
    interpolation in time, float32, with T' = `resampled_length(T, fps_in, fps_out)`.

    Output frame j is taken at time j / fps_out; past the last input frame it holds the last one.
    Where an output frame falls on an input frame (within 1e-9 frames) it is that frame, bit-exact;
    equal rates return an exact copy.
    """
    latents = check_latents(latents)
    rate_in, rate_out = check_fps(fps_in, "fps_in"), check_fps(fps_out, "fps_out")
    if rate_in == rate_out:
        return latents.clone()
    frames = latents.shape[0]
    count = resampled_length(frames, rate_in, rate_out)
    positions = torch.arange(count, dtype=torch.float64) * (rate_in / rate_out)
    nearest = positions.round()
    positions = torch.where((positions - nearest).abs() < 1e-9, nearest, positions).clamp(max=frames - 1)
    below = positions.floor().long()
    above = (below + 1).clamp(max=frames - 1)
    fraction = (positions - below).to(torch.float32)[:, None].to(latents.device)
    low, high = latents[below.to(latents.device)], latents[above.to(latents.device)]
    return torch.where(fraction == 0, low, torch.lerp(low, high, fraction))


# --------------------------------------------------------------------------------------------
# Relative (video-driven) motion
# --------------------------------------------------------------------------------------------

def relative_motion(driving: torch.Tensor, source, anchor: int | str = 0) -> torch.Tensor:
    """Video-driven motion made relative: `source + (driving − driving[anchor])` → `[T, D]` float32.

    driving: `[T, D]` latents of another person's video. source: the portrait's own latent `[1, D]`
    or `[D]` (`Identity.motion`; any device or dtype). anchor: a frame number (negative counts from
    the end) whose expression counts as the driver's neutral face, or "mean" for its average. The
    portrait then keeps its own resting expression and only takes the driver's changes from that
    neutral; at the anchor frame (and wherever the driver does not move) the output is the source
    latent exactly.
    """
    driving = check_latents(driving, "driving motion")
    base = _reference_latent(source, driving, "source motion")
    frames = driving.shape[0]
    if isinstance(anchor, str):
        if anchor != "mean":
            raise InputError(f"anchor {anchor!r}: use a frame number or 'mean'")
        neutral = driving.double().mean(dim=0, keepdim=True).to(torch.float32)
    else:
        index = _whole(anchor)
        if index is None or not -frames <= index < frames:
            raise InputError(f"anchor frame {anchor!r}: use a whole frame number from {-frames} to {frames - 1} "
                             f"(the driving motion has {frames} frames), or 'mean'")
        neutral = driving[index][None]
    return base + (driving - neutral)


# --------------------------------------------------------------------------------------------
# Motion files
# --------------------------------------------------------------------------------------------

def save_motion(path: str | os.PathLike, latents: torch.Tensor, fps: float) -> str:
    """Write motion `[T, D]` at `fps` to a `.safetensors` file; returns the path written.

    The file holds one float32 tensor `motion` and the metadata `format` ("imtalker-motion"),
    `format_version`, `fps` (written exactly, as Python's repr of the float), `frames`, `latent_dim`.
    It is written beside the target and renamed when complete, so a failed write never leaves a
    truncated file under the name. An existing file is replaced.
    """
    from .checkpoints import write_safetensors

    latents = check_latents(latents)
    rate = check_fps(fps)
    target = os.fspath(path)
    if not target.lower().endswith(MOTION_SUFFIX):
        raise InputError(f"motion file {target} must end with {MOTION_SUFFIX}")
    folder = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(folder):
        raise InputError(f"cannot write {target}: the folder {folder} does not exist")
    metadata = {"format": MOTION_FORMAT, "format_version": MOTION_FORMAT_VERSION, "fps": repr(rate),
                "frames": str(latents.shape[0]), "latent_dim": str(latents.shape[1])}
    write_safetensors({MOTION_KEY: latents.detach().cpu().contiguous()}, target, metadata, "choose another path")
    log.info("wrote %d motion frames at %g fps to %s", latents.shape[0], rate, target)
    return target


def load_motion(path: str | os.PathLike, latent_dim: int | None = None) -> tuple[torch.Tensor, float]:
    """Read a motion file written by `save_motion`: `(latents [T, D] float32 on the CPU, fps)`.

    Refuses (`InputError`, naming the file) a missing or unreadable file, one without the
    "imtalker-motion" format tag, a missing or non-positive fps, a tensor that is not `[T, D]`
    (D = `latent_dim` when given) with T ≥ 1, and NaN/inf values.
    """
    from safetensors import SafetensorError, safe_open

    source = os.fspath(path)
    name = os.path.basename(source)
    if not os.path.isfile(source):
        raise InputError(f"motion file {source} does not exist (or is not a file)")
    try:
        with safe_open(source, framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            keys = list(handle.keys())
            tensor = handle.get_tensor(MOTION_KEY) if MOTION_KEY in keys else None
    except (OSError, SafetensorError) as err:
        raise InputError(f"motion file {name} is not a readable .safetensors file: "
                         f"{' '.join(str(err).split())}") from err
    if metadata.get("format") != MOTION_FORMAT:
        raise InputError(f"{name} is not an IMTalker motion file (its format tag is "
                         f"{metadata.get('format')!r}, expected {MOTION_FORMAT!r}); save motion with "
                         "IMTalker Save Motion")
    if tensor is None:
        raise InputError(f"motion file {name} has no '{MOTION_KEY}' tensor (it holds {', '.join(keys) or 'none'})")
    try:
        fps = check_fps(metadata.get("fps"), f"fps of {name}")
    except InputError as err:
        raise InputError(f"motion file {name} has no valid frame rate in its metadata: {err}") from err
    if latent_dim is not None and (tensor.dim() != 2 or tensor.shape[1] != latent_dim):
        raise InputError(f"motion file {name} holds latents shaped {list(tensor.shape)}, expected "
                         f"[frames, {latent_dim}]")
    latents = check_latents(tensor, f"motion file {name}")
    return latents, fps
