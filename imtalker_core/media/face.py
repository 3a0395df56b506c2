"""Face detection, square face crops, and pasting generated frames back into the original.

Detection uses OpenCV's frontal-face Haar cascade, which ships inside the
``opencv-python-headless`` 4.x wheel (``cv2.data.haarcascades``) and needs no download or GPU.
It runs on a copy downscaled to at most `DETECT_MAX_SIDE` pixels for speed (tens of milliseconds per
image on a CPU); boxes are mapped back to source pixels. Faces narrower than about 5% of
the image's short side are ignored, which suits portraits, not group photos. When several
faces are found the largest one wins.

Crop geometry follows the reference app: the square side is ``max(w_face, h_face) * scale``
(the reference uses ``2 * int(max(w, h) * 0.8)``, i.e. scale 1.6), centred on the detected box.
Where that square crosses an image edge it is slid back inside the image (``border="shift"``,
the default, as the reference does), so the face sits off-centre in the crop but the encoders
never see black borders, which the model was not trained on. A square larger than the image is
cut to fit as the reference cuts it: clamped to the image, then reduced to the shorter of its
sides from its top-left corner (logged). ``border="pad"`` keeps the full square centred on the
face and pads whatever leaves the image with black. `CropBox` records the square in
source-pixel coordinates so `paste_back` can put generated frames exactly where the crop came
from.
"""
from __future__ import annotations

import functools
import logging
import os
import threading
from dataclasses import dataclass
from typing import Iterable, Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..errors import IMTalkerError, InputError
from .images import to_uint8

logger = logging.getLogger(__name__)

#: Detection runs on a copy whose long side is at most this many pixels.
DETECT_MAX_SIDE = 384
_CASCADE_FILE = "haarcascade_frontalface_default.xml"
# CascadeClassifier.detectMultiScale is not documented as thread safe; ComfyUI may run nodes
# from worker threads, so detection calls are serialised.
_CASCADE_LOCK = threading.Lock()

ArrayLike = np.ndarray | torch.Tensor
#: How a crop square that crosses the image edge is placed (see the module docstring).
Border = Literal["shift", "pad"]
BORDERS: tuple[str, ...] = ("shift", "pad")


@dataclass(frozen=True)
class CropBox:
    """A square crop in source-pixel coordinates; it may extend beyond the image.

    Covers columns ``x0 .. x0 + size - 1`` and rows ``y0 .. y0 + size - 1`` of an image that is
    ``image_h`` x ``image_w`` pixels. Negative ``x0``/``y0`` or ``x0 + size > image_w`` mean
    the crop reaches past the border (face boxes only do so when the square is larger than the
    image, or with ``border="pad"``); those pixels are black in the crop.
    """

    x0: int
    y0: int
    size: int
    image_h: int
    image_w: int

    def __post_init__(self) -> None:
        # Boxes can come from users (node inputs, saved settings), so this is input validation.
        if self.size <= 0 or self.image_h <= 0 or self.image_w <= 0:
            raise InputError(f"a crop box needs a positive side and image size, got size={self.size}, "
                             f"image {self.image_w}x{self.image_h}")

    @property
    def x1(self) -> int:
        """One past the last column (exclusive)."""
        return self.x0 + self.size

    @property
    def y1(self) -> int:
        """One past the last row (exclusive)."""
        return self.y0 + self.size

    def inside(self) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` of the part of the box that lies inside the image (may be empty)."""
        return (max(self.x0, 0), max(self.y0, 0), min(self.x1, self.image_w), min(self.y1, self.image_h))


@functools.lru_cache(maxsize=1)
def _cascade() -> cv2.CascadeClassifier:
    """The frontal-face cascade, loaded once."""
    folder = getattr(getattr(cv2, "data", None), "haarcascades", None)
    path = os.path.join(folder, _CASCADE_FILE) if folder else None
    if not path or not os.path.isfile(path):
        raise IMTalkerError(
            f"OpenCV {cv2.__version__} does not include the Haar face cascade ({_CASCADE_FILE}); "
            "install opencv-python-headless>=4.8,<5 (version 5 no longer ships it).")
    classifier = cv2.CascadeClassifier(path)
    if classifier.empty():
        raise IMTalkerError(f"OpenCV could not load the Haar face cascade from {path}; reinstall opencv-python-headless<5.")
    return classifier


def _as_numpy_image(image: ArrayLike) -> np.ndarray:
    """numpy or CPU torch ``[H, W, 3]`` -> numpy, without copying when possible."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise InputError(f"expected an RGB image shaped [H, W, 3], got shape {image.shape}")
    return image


def detect_faces(image: ArrayLike) -> list[tuple[int, int, int, int]]:
    """Faces in ``[H, W, 3]`` RGB (uint8, or float in ``[0, 1]``) as ``(x, y, w, h)`` source pixels.

    Sorted largest first; empty when none is found.
    """
    image = _as_numpy_image(image)
    height, width = image.shape[:2]
    gray = cv2.cvtColor(to_uint8(image), cv2.COLOR_RGB2GRAY)
    factor = min(1.0, DETECT_MAX_SIDE / max(height, width))
    if factor < 1.0:
        small_size = (max(1, round(width * factor)), max(1, round(height * factor)))
        gray = cv2.resize(gray, small_size, interpolation=cv2.INTER_AREA)
    # Faces under 5% of the short side are too small to animate; skipping them also saves time.
    min_face = max(20, round(0.05 * min(gray.shape)))
    with _CASCADE_LOCK:
        found = _cascade().detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(min_face, min_face))
        if len(found) == 0:
            # Second chance for low-contrast faces (statues, faded paintings): local contrast
            # equalisation. Not the first pass, because a global equalisation dominated by a
            # flat background can wash a face out.
            boosted = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(gray)
            found = _cascade().detectMultiScale(boosted, scaleFactor=1.1, minNeighbors=5,
                                                minSize=(min_face, min_face))
    faces = [(round(x / factor), round(y / factor), round(w / factor), round(h / factor))
             for x, y, w, h in np.asarray(found).reshape(-1, 4).tolist()]
    faces.sort(key=lambda f: f[2] * f[3], reverse=True)
    return faces


def box_around(face: tuple[int, int, int, int], image_h: int, image_w: int, scale: float = 1.6,
               border: Border = "shift") -> CropBox:
    """The square crop for a face box ``(x, y, w, h)`` in an ``image_h`` x ``image_w`` image.

    Side ``max(w, h) * scale`` around the face centre, then placed by ``border``: ``"shift"``
    slides it inside the image (cutting a square larger than the image down to it, as the reference
    does), ``"pad"`` keeps it centred and whole; see the module docstring.
    """
    if not scale > 0:
        raise InputError(f"scale must be positive, got {scale}")
    x, y, w, h = face
    # parity: the reference's integer rounding, half side int(max(w, h) * 0.8) and centre x + w // 2.
    half = max(1, int(max(w, h) * scale / 2))
    cx, cy = x + w // 2, y + h // 2
    return _square(cx - half, cy - half, 2 * half, image_h, image_w, border)


def center_box(image_h: int, image_w: int) -> CropBox:
    """The largest square centred in the image."""
    side = min(image_h, image_w)
    return CropBox((image_w - side) // 2, (image_h - side) // 2, side, image_h, image_w)


def _square(x0: int, y0: int, side: int, image_h: int, image_w: int, border: Border) -> CropBox:
    """A `CropBox` with top-left ``(x0, y0)`` as wanted, placed according to ``border``."""
    _check_border(border)
    if border == "shift":
        # parity: the reference moves each edge that leaves the image back inside (left/top first),
        # clamps the result to the image, then cuts the square to the shorter of its two sides,
        # keeping the top-left corner. A square that fits is thereby only slid, never shrunk.
        x1, y1 = _slide(x0, side, image_w), _slide(y0, side, image_h)
        x2, y2 = min(x1 + side, image_w), min(y1 + side, image_h)
        x1, y1 = max(x1, 0), max(y1, 0)
        fitted = min(x2 - x1, y2 - y1)
        if fitted < side:
            logger.info("the %d px face crop is larger than the %dx%d image; using %d px at (%d, %d) instead, "
                        "as the reference does (a smaller crop scale keeps the face centred)",
                        side, image_w, image_h, fitted, x1, y1)
        x0, y0, side = x1, y1, fitted
    return CropBox(int(x0), int(y0), int(side), int(image_h), int(image_w))


def _check_border(border: str) -> None:
    if border not in BORDERS:
        raise InputError(f"border must be 'shift' (keep the crop inside the image) or 'pad' (keep it centred, "
                         f"black outside the image), got {border!r}")


def _slide(start: int, side: int, length: int) -> int:
    """Where a span ``[start, start + side)`` starts once its ends are moved back inside ``[0, length)``:
    left end first, then the right end (which may push a span longer than the image below 0)."""
    start = max(start, 0)
    return start - max(start + side - length, 0)


def crop_box(image: ArrayLike, box: CropBox, size: int | None = None) -> ArrayLike:
    """Cut ``box`` out of ``[H, W, 3]`` (black where it leaves the image), resized to ``size``.

    Returns the same kind (numpy/torch) and dtype family as the input: float32 for float input,
    uint8 for uint8 input. ``size=None`` keeps ``box.size``. Shrinking uses area averaging,
    enlarging uses bicubic interpolation clipped to the input's value range.
    """
    is_torch = isinstance(image, torch.Tensor)
    array = _as_numpy_image(image)
    if (array.shape[0], array.shape[1]) != (box.image_h, box.image_w):
        raise InputError(f"the crop box was made for a {box.image_w}x{box.image_h} image, "
                         f"but this image is {array.shape[1]}x{array.shape[0]}")
    if array.dtype != np.uint8:
        array = array.astype(np.float32, copy=False)
    crop = np.zeros((box.size, box.size, 3), dtype=array.dtype)
    ix0, iy0, ix1, iy1 = box.inside()
    if ix1 > ix0 and iy1 > iy0:
        crop[iy0 - box.y0:iy1 - box.y0, ix0 - box.x0:ix1 - box.x0] = array[iy0:iy1, ix0:ix1]
    if size is not None and size != box.size:
        interpolation = cv2.INTER_AREA if size < box.size else cv2.INTER_CUBIC
        crop = cv2.resize(crop, (size, size), interpolation=interpolation)
        if crop.dtype != np.uint8:
            # Bicubic overshoots at edges; keep values a valid image.
            np.clip(crop, 0.0, 1.0, out=crop)
    return torch.from_numpy(np.ascontiguousarray(crop)) if is_torch else crop


def crop_face(image_hw3: ArrayLike, scale: float = 1.6, size: int = 512,
              on_no_face: Literal["error", "center"] = "error", name: str = "the image",
              border: Border = "shift") -> tuple[ArrayLike, CropBox]:
    """Find the largest face and return its square crop ``[size, size, 3]`` and the `CropBox`.

    ``image_hw3`` is float in ``[0, 1]`` (or uint8) ``[H, W, 3]``, numpy or CPU torch; the crop
    is float32 in ``[0, 1]`` of the same kind. The square is placed as `box_around` says for
    ``border``. Without a face, ``on_no_face='error'`` raises `InputError` and ``'center'``
    uses the largest centred square. ``name`` appears in messages.
    """
    if on_no_face not in ("error", "center"):
        raise InputError(f"on_no_face must be 'error' or 'center', got {on_no_face!r}")
    if size < 1:
        raise InputError(f"size must be a positive number of pixels, got {size}")
    _check_border(border)
    array = _as_numpy_image(image_hw3)
    height, width = array.shape[:2]
    faces = detect_faces(array)
    if faces:
        box = box_around(faces[0], height, width, scale, border)
        logger.info("face in %s at %s; crop %d px at (%d, %d)", name, faces[0], box.size, box.x0, box.y0)
    elif on_no_face == "center":
        box = center_box(height, width)
        logger.warning("no face found in %s; using the centred %d px square", name, box.size)
    else:
        raise InputError(f"No face found in {name}; use a centre crop (on_no_face='center') "
                         "or crop the image yourself")
    crop = crop_box(array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else array, box, size)
    return (torch.from_numpy(crop) if isinstance(image_hw3, torch.Tensor) else crop), box


def stable_video_box(frames: Iterable[ArrayLike] | ArrayLike, scale: float = 1.6, sample_every: int = 15,
                     border: Border = "shift") -> CropBox:
    """One crop box for a whole video: median face centre and size over sampled frames.

    ``frames`` is any iterable of ``[H, W, 3]`` frames (uint8 or float ``[0, 1]``, numpy or
    torch), e.g. `imtalker_core.media.video.read_video`, or a ``[T, H, W, 3]`` array. Faces are
    detected on every ``sample_every``-th frame (the reference app uses 15); frames without a
    face are ignored. Like the reference, the median centre and median width/height of the
    detected boxes define the square (side ``max(median w, median h) * scale``), placed by
    ``border`` as in `box_around` (the reference also slides its video crop inside the frame).
    If no sampled frame has a face a centred square is returned and a warning logged; this
    never raises for a missing face, so a video with a face turned away still produces output.
    """
    if sample_every < 1:
        raise InputError(f"sample_every must be at least 1, got {sample_every}")
    _check_border(border)
    centres_x: list[float] = []
    centres_y: list[float] = []
    widths: list[int] = []
    heights: list[int] = []
    shape: tuple[int, int] | None = None
    sampled = 0
    for index, frame in enumerate(frames):
        if shape is None:
            array = _as_numpy_image(frame)
            shape = (array.shape[0], array.shape[1])
        if index % sample_every:
            continue
        array = _as_numpy_image(frame)
        if (array.shape[0], array.shape[1]) != shape:
            raise InputError(f"video frames change size: frame {index} is {array.shape[1]}x{array.shape[0]}, "
                             f"the first was {shape[1]}x{shape[0]}")
        sampled += 1
        faces = detect_faces(array)
        if faces:
            x, y, w, h = faces[0]
            centres_x.append(x + w / 2)
            centres_y.append(y + h / 2)
            widths.append(w)
            heights.append(h)
    if shape is None:
        raise InputError("the video has no frames, so there is no face to locate")
    height, width = shape
    if not widths:
        logger.warning("no face found in any of %d sampled video frames; using the centred square", sampled)
        return center_box(height, width)
    cx, cy = float(np.median(centres_x)), float(np.median(centres_y))
    half = max(1, int(max(float(np.median(widths)), float(np.median(heights))) * scale / 2))
    logger.info("face found in %d of %d sampled video frames; crop %d px around (%.0f, %.0f)",
                len(widths), sampled, 2 * half, cx, cy)
    return _square(int(cx) - half, int(cy) - half, 2 * half, height, width, border)


def paste_mask(box: CropBox, original_hw: tuple[int, int], feather: float = 0.1) -> np.ndarray:
    """Blend weights ``[H, W]`` float32 in ``[0, 1]`` for pasting a crop back.

    1 deep inside the box, a smoothstep ramp over ``feather * box.size`` pixels falling towards
    0 at the box edge, and exactly 0 outside the box. Only box edges that lie inside the image
    are feathered: where the box is flush with an image edge (a crop slid inside the image) or
    reaches past it, the mask stays 1 up to that image edge, because there is no seam to hide
    there. The mask only covers the image; the part of the box beyond it is dropped.
    """
    height, width = original_hw
    if (height, width) != (box.image_h, box.image_w):
        raise InputError(f"the crop box was made for a {box.image_w}x{box.image_h} image, "
                         f"but the original is {width}x{height}")
    if not 0.0 <= feather <= 0.5:
        raise InputError(f"feather is a fraction of the crop side between 0 and 0.5, got {feather}")
    ramp_px = feather * box.size

    def axis_weights(start: int, count: int) -> np.ndarray:
        # Distance of each pixel centre from the nearer box edge that lies inside the image, in
        # pixels (negative outside the box); an edge at or beyond the image border is infinitely far.
        centres = np.arange(count, dtype=np.float64) + 0.5
        low = centres - start if start > 0 else np.full(count, np.inf)
        end = start + box.size
        high = end - centres if end < count else np.full(count, np.inf)
        distance = np.minimum(low, high)
        if ramp_px <= 0:
            return (distance > 0).astype(np.float64)
        ramp = np.clip(distance / ramp_px, 0.0, 1.0)
        return ramp * ramp * (3.0 - 2.0 * ramp)

    mask = np.outer(axis_weights(box.y0, height), axis_weights(box.x0, width))
    return mask.astype(np.float32)


def paste_back(frames: ArrayLike, box: CropBox, original: ArrayLike, feather: float = 0.1,
               chunk: int = 16) -> ArrayLike:
    """Composite generated crops into the original image: ``[T, S, S, 3]`` -> ``[T, H, W, 3]``.

    ``frames`` are float in ``[0, 1]`` (numpy or CPU torch; a single ``[S, S, 3]`` frame gives
    ``[H, W, 3]``). Each is resized to ``box.size`` (antialiased bilinear) and blended into
    ``original`` (``[H, W, 3]``, float ``[0, 1]`` or uint8) with `paste_mask`. Pixels where the
    mask is 0 are bit-identical to ``original`` (as float32). Returns float32 of the same kind
    as ``frames``. Frames are resized ``chunk`` at a time to bound temporary memory.
    """
    is_torch = isinstance(frames, torch.Tensor)
    gen = torch.as_tensor(frames).detach().cpu() if is_torch else torch.from_numpy(np.asarray(frames))
    single = gen.ndim == 3
    if single:
        gen = gen.unsqueeze(0)
    if gen.ndim != 4 or gen.shape[-1] != 3 or gen.shape[1] != gen.shape[2]:
        raise InputError(f"expected square generated frames shaped [T, S, S, 3], got {tuple(gen.shape)}")
    base = _as_numpy_image(original)
    base = base.astype(np.float32) / 255.0 if base.dtype == np.uint8 else base.astype(np.float32, copy=False)
    height, width = base.shape[:2]
    mask = paste_mask(box, (height, width), feather)

    out = np.empty((gen.shape[0], height, width, 3), dtype=np.float32)
    out[:] = base
    ix0, iy0, ix1, iy1 = box.inside()
    if ix1 > ix0 and iy1 > iy0:
        weight = mask[iy0:iy1, ix0:ix1, None]
        background = base[iy0:iy1, ix0:ix1]
        inside = weight > 0
        for start in range(0, gen.shape[0], chunk):
            part = gen[start:start + chunk].to(torch.float32).permute(0, 3, 1, 2)
            if part.shape[-1] != box.size:
                part = F.interpolate(part, size=(box.size, box.size), mode="bilinear", antialias=True,
                                     align_corners=False)
            resized = part.permute(0, 2, 3, 1).numpy()
            region = resized[:, iy0 - box.y0:iy1 - box.y0, ix0 - box.x0:ix1 - box.x0]
            blended = background + weight * (region - background)
            # Blend only where the mask is positive so everything else keeps the original bits.
            out[start:start + chunk, iy0:iy1, ix0:ix1] = np.where(inside, blended, background)
    if single:
        out = out[0]
    return torch.from_numpy(out) if is_torch else out
