"""Checks of user-supplied settings, shared by the API, the command line, the runner and the nodes.

Each check returns the value in canonical form or raises `InputError` naming the bad value and what
to do. They are cheap and need no model, so callers run them all before anything heavy loads.
"""
from __future__ import annotations

import logging
import math
import operator

import torch

from .errors import InputError

log = logging.getLogger(__name__)

#: Flow-matching time points: 2 is one Euler step; above 50 costs time for no visible gain.
MIN_STEPS, MAX_STEPS, SLOW_STEPS = 2, 100, 50
#: Guidance scales above this only exaggerate motion until it breaks.
MAX_CFG = 20.0
#: Seeds as torch takes them: negative seeds are the same streams as `seed + 2**64`.
MIN_SEED, MAX_SEED = -(2 ** 63), 2 ** 64 - 1

#: Per-frame control values (units in the README): beyond `typical` a warning, beyond `absurd` an
#: error. Pose and gaze are angles in radians (SMIRK axis-angle, L2CS pitch/yaw); the camera is
#: SMIRK's (scale, tx, ty). The limits only catch garbage (1e30, degrees for radians, pixels).
CONTROL_LIMITS = {
    "pose": {"typical": 1.0, "absurd": 2 * math.pi},
    "gaze": {"typical": 1.0, "absurd": math.pi},
    "cam": {"typical": 20.0, "absurd": 1000.0},
}


def _whole(value) -> int | None:
    """`value` as an int if it is a whole number type (int, numpy integer; not bool), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_steps(steps: int) -> int:
    """Time points of the flow-matching grid, 2–100 (a note above 50)."""
    number = _whole(steps)
    if number is None or not MIN_STEPS <= number <= MAX_STEPS:
        raise InputError(f"steps={steps!r}: use a whole number from {MIN_STEPS} to {MAX_STEPS} "
                         "(10, the reference's default, is usually best)")
    if number > SLOW_STEPS:
        log.info("steps=%d: each step costs one pass of the generator; above %d the motion rarely changes visibly",
                 number, SLOW_STEPS)
    return number


def check_cfg(cfg_scale: float) -> float:
    """Audio guidance scale: finite, 0–20 (1 = no guidance)."""
    try:
        value = float(cfg_scale)
    except (TypeError, ValueError) as err:
        raise InputError(f"cfg scale {cfg_scale!r} is not a number; use e.g. 3 (the reference's default)") from err
    if not math.isfinite(value) or not 0.0 <= value <= MAX_CFG:
        raise InputError(f"cfg scale {cfg_scale!r}: use a finite number from 0 to {MAX_CFG:g} "
                         "(3 is the reference's default, 1 disables guidance)")
    return value


def check_seed(seed: int) -> int:
    """A seed in 0 … 2**64-1; negative seeds down to -2**63 map to `seed + 2**64`, as torch does."""
    number = _whole(seed)
    if number is None or not MIN_SEED <= number <= MAX_SEED:
        raise InputError(f"seed {seed!r}: use a whole number from 0 to 2**64-1 ({MAX_SEED})")
    return number % 2 ** 64


def check_batch_size(batch_size: int, name: str = "batch size") -> int:
    """Frames processed at once: a whole number ≥ 1."""
    number = _whole(batch_size)
    if number is None or number < 1:
        raise InputError(f"{name} {batch_size!r}: use a whole number of frames, at least 1")
    return number


def check_fraction(value: float, name: str, low: float, high: float) -> float:
    """A finite number in [low, high]."""
    try:
        number = float(value)
    except (TypeError, ValueError) as err:
        raise InputError(f"{name} {value!r} is not a number") from err
    if not math.isfinite(number) or not low <= number <= high:
        raise InputError(f"{name} {value!r}: use a number from {low:g} to {high:g}")
    return number


def check_device(name: str) -> torch.device:
    """A device this machine has: 'cpu', 'cuda', 'cuda:N' or 'mps'."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise InputError(f"device {name!r} is not a device name; use auto, cpu, cuda, cuda:N or mps") from err
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {name!r}: this machine or torch build ({torch.__version__}) has no CUDA; "
                             "use --device cpu (or auto)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise InputError(f"device {name!r}: there are {count} CUDA device(s), numbered 0 to {count - 1}")
        return device
    if device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise InputError(f"device {name!r}: Apple's MPS is not available on this machine; use cpu (or auto)")
        return device
    raise InputError(f"device {name!r} is not supported; use auto, cpu, cuda, cuda:N or mps")


def check_sequence(values, width: int, name: str, noun: str = "sequence",
                   empty_hint: str = "leave it out instead") -> torch.Tensor:
    """Per-frame numbers `[T, width]` (torch tensors, numpy arrays or nested lists) as float32:
    numeric, not empty and finite, else `InputError` naming `name`."""
    try:
        tensor = torch.as_tensor(values)
    except (TypeError, ValueError, RuntimeError) as err:
        raise InputError(f"{name} must be numbers shaped [frames, {width}]: {err}") from err
    if not (tensor.is_floating_point() or tensor.dtype in (torch.int16, torch.int32, torch.int64, torch.uint8)):
        raise InputError(f"{name} must hold numbers, got {tensor.dtype}")
    tensor = tensor.to(torch.float32)
    if tensor.dim() != 2 or tensor.shape[1] != width:
        raise InputError(f"{name} must be a [frames, {width}] {noun}, got {list(tensor.shape)}")
    if tensor.shape[0] == 0:
        raise InputError(f"{name} has no frames; {empty_hint}")
    if not torch.isfinite(tensor).all():
        raise InputError(f"{name} contains NaN or infinite values")
    return tensor


def check_control(seq, width: int, name: str) -> torch.Tensor | None:
    """A per-frame control `[T, width]` as float32 (`check_sequence`), within `CONTROL_LIMITS`;
    None passes through."""
    if seq is None:
        return None
    tensor = check_sequence(seq, width, name)
    limits = CONTROL_LIMITS.get(name)
    if limits is not None:
        peak = tensor.abs().max().item()
        if peak > limits["absurd"]:
            raise InputError(f"{name} reaches {peak:.3g}, beyond any plausible value "
                             f"(|{name}| ≤ {limits['absurd']:.3g}); "
                             "check its units (radians for angles) and the file's columns")
        if peak > limits["typical"]:
            log.warning("%s reaches %.3g, beyond its typical range (|%s| ≤ %g): expect exaggerated motion",
                        name, peak, name, limits["typical"])
    return tensor
