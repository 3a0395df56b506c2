"""Face detection, square face crops, and pasting generated frames back into the original.

Detection uses OpenCV's frontal-face Haar cascade, which ships inside the
``opencv-python-headless`` 4.x wheel (``cv2.data.haarcascades``) and needs no download or GPU.
It runs on a copy downscaled to at most `DETECT_MAX_SIDE` pixels for speed (tens of milliseconds per
image on a CPU); boxes are mapped back to source pixels. Faces narrower than about 5% of
the image's short side are ignored, which suits portraits, not group photos. When several
faces are found the largest one wins, and a warning says how many there were and which was used.

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

Paste-back memory: the result frames are float32 at the original's full size, ``H * W * 3 * 4``
bytes each (768 MB for an 8000x8000 photo), by contract. Everything else is bounded by the crop,
not the photo: the blend runs on the box's part inside the image only, a band of rows at a time,
and a uint8 original is converted to float only where it is read. `iter_paste_back` yields one
full frame at a time; given an ``out`` buffer it writes every frame into it, so a caller that
streams frames to a video holds exactly one full frame.
"""
from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..errors import IMTalkerError, InputError
from .images import to_float, to_uint8

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
#: What the no-face error of `crop_face` tells the user to do, unless the caller passes its own.
DEFAULT_NO_FACE_HINT = "pass on_no_face='center' to use the centred square, or crop the image around the face yourself"
#: At most this many bytes of generated frames are resized to the crop side at once: the crop of
#: a large photo can be thousands of pixels wide, where 16 resized frames would take gigabytes.
RESIZE_BUDGET_BYTES = 256 * 2**20
#: Rows of the pasted region are blended in bands of about this many values (16 MB per float32
#: temporary), so the blend's temporaries stay small however large the crop is.
_BAND_VALUES = 2**22


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
        raise IMTalkerError(f"OpenCV could not load the Haar face cascade from {path}; "
                            "reinstall opencv-python-headless<5.")
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
    # Only the box's pixels are converted (the assignment casts), never the whole photo.
    crop = np.zeros((box.size, box.size, 3), dtype=np.uint8 if array.dtype == np.uint8 else np.float32)
    ix0, iy0, ix1, iy1 = box.inside()
    if ix1 > ix0 and iy1 > iy0:
        crop[iy0 - box.y0:iy1 - box.y0, ix0 - box.x0:ix1 - box.x0] = array[iy0:iy1, ix0:ix1]
    crop = _resize_crop(crop, size)
    return torch.from_numpy(np.ascontiguousarray(crop)) if is_torch else crop


def _resize_crop(crop: np.ndarray, size: int | None) -> np.ndarray:
    """A square ``[S, S, 3]`` crop (uint8 or float32) resized to ``size`` (``None``: unchanged)."""
    if size is not None and size != crop.shape[0]:
        interpolation = cv2.INTER_AREA if size < crop.shape[0] else cv2.INTER_CUBIC
        crop = cv2.resize(crop, (size, size), interpolation=interpolation)
        if crop.dtype != np.uint8:
            # Bicubic overshoots at edges; keep values a valid image.
            np.clip(crop, 0.0, 1.0, out=crop)
    return crop


def crop_face(image_hw3: ArrayLike, scale: float = 1.6, size: int = 512,
              on_no_face: Literal["error", "center"] = "error", name: str = "the image",
              border: Border = "shift", no_face_hint: str = DEFAULT_NO_FACE_HINT) -> tuple[ArrayLike, CropBox]:
    """Find the largest face and return its square crop ``[size, size, 3]`` and the `CropBox`.

    ``image_hw3`` is float in ``[0, 1]`` (or uint8) ``[H, W, 3]``, numpy or CPU torch; the crop
    is float32 in ``[0, 1]`` of the same kind. The square is placed as `box_around` says for
    ``border``. Without a face, ``on_no_face='error'`` raises `InputError` and ``'center'``
    uses the largest centred square. ``name`` appears in messages. ``no_face_hint`` is what the
    error tells the user to do, in the caller's own terms (a node option, a CLI flag); the error
    reads "No face found in <name>; <no_face_hint>".
    With several faces the largest is used and a warning names how many were found.
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
        if len(faces) > 1:
            x, y, w, h = faces[0]
            logger.warning("%d faces found in %s; using the largest, %dx%d px at (%d, %d); crop the image "
                           "yourself to animate another one", len(faces), name, w, h, x, y)
        logger.info("face in %s at %s; crop %d px at (%d, %d)", name, faces[0], box.size, box.x0, box.y0)
    elif on_no_face == "center":
        box = center_box(height, width)
        logger.warning("no face found in %s; using the centred %d px square", name, box.size)
    else:
        raise InputError(f"No face found in {name}; {no_face_hint}")
    if array.dtype == np.uint8:
        # Cut first, then convert: converting a whole large photo to float would cost 4 bytes a value.
        # The values equal converting first (zeros stay zero, the rest is the same division).
        crop = _resize_crop(to_float(crop_box(array, box)), size)
    else:
        crop = crop_box(array, box, size)
    return (torch.from_numpy(crop) if isinstance(image_hw3, torch.Tensor) else crop), box


def stable_video_box(frames: Iterable[ArrayLike] | ArrayLike, scale: float = 1.6, sample_every: int = 15,
                     border: Border = "shift", on_no_face: Literal["error", "center"] = "center",
                     no_face_hint: str = "use a centred crop, or crop the frames yourself") -> CropBox:
    """One crop box for a whole video: median face centre and size over sampled frames.

    ``frames`` is any iterable of ``[H, W, 3]`` frames (uint8 or float ``[0, 1]``, numpy or
    torch), e.g. `imtalker_core.media.video.read_video`, or a ``[T, H, W, 3]`` array. Faces are
    detected on every ``sample_every``-th frame (the reference app uses 15); frames without a
    face are ignored. Like the reference, the median centre and median width/height of the
    detected boxes define the square (side ``max(median w, median h) * scale``), placed by
    ``border`` as in `box_around` (the reference also slides its video crop inside the frame).
    If no sampled frame has a face, ``on_no_face='center'`` (the default, so a video with the face
    turned away still produces output) returns the centred square with a warning, and ``'error'``
    raises `InputError` ending with ``no_face_hint``.
    """
    if on_no_face not in ("error", "center"):
        raise InputError(f"on_no_face must be 'error' or 'center', got {on_no_face!r}")
    if sample_every < 1:
        raise InputError(f"sample_every must be at least 1, got {sample_every}")
    _check_border(border)
    centres_x: list[float] = []
    centres_y: list[float] = []
    widths: list[int] = []
    heights: list[int] = []
    shape: tuple[int, int] | None = None
    sampled = 0
    several = 0  # sampled frames with more than one face
    most = 0
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
        if len(faces) > 1:
            several += 1
            most = max(most, len(faces))
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
        if on_no_face == "error":
            raise InputError(f"No face found in any of the {sampled} sampled frames (every {sample_every}th); "
                             f"{no_face_hint}")
        logger.warning("no face found in any of %d sampled video frames; using the centred square", sampled)
        return center_box(height, width)
    cx, cy = float(np.median(centres_x)), float(np.median(centres_y))
    half = max(1, int(max(float(np.median(widths)), float(np.median(heights))) * scale / 2))
    logger.info("face found in %d of %d sampled video frames; crop %d px around (%.0f, %.0f)",
                len(widths), sampled, 2 * half, cx, cy)
    box = _square(int(cx) - half, int(cy) - half, 2 * half, height, width, border)
    if several:
        # One summary for the whole video rather than one warning per sampled frame.
        logger.warning("%d of %d sampled video frames show more than one face (up to %d); the largest face "
                       "of each frame was used, giving a %d px crop at (%d, %d)",
                       several, sampled, most, box.size, box.x0, box.y0)
    return box


def _check_original_size(box: CropBox, original_hw: tuple[int, int]) -> None:
    height, width = original_hw
    if (height, width) != (box.image_h, box.image_w):
        raise InputError(f"the crop box was made for a {box.image_w}x{box.image_h} image, "
                         f"but the original is {width}x{height}")


def paste_mask(box: CropBox, original_hw: tuple[int, int], feather: float = 0.1) -> np.ndarray:
    """Blend weights ``[H, W]`` float32 in ``[0, 1]`` for pasting a crop back.

    1 deep inside the box, a smoothstep ramp over ``feather * box.size`` pixels falling towards
    0 at the box edge, and exactly 0 outside the box. Only box edges that lie inside the image
    are feathered: where the box is flush with an image edge (a crop slid inside the image) or
    reaches past it, the mask stays 1 up to that image edge, because there is no seam to hide
    there. The mask only covers the image; the part of the box beyond it is dropped.
    Costs ``H * W * 4`` bytes; `paste_mask_inside` gives just the box's part.
    """
    _check_original_size(box, original_hw)
    mask = np.zeros(original_hw, dtype=np.float32)
    ix0, iy0, ix1, iy1 = box.inside()
    inside = paste_mask_inside(box, feather)
    if inside.size:
        mask[iy0:iy1, ix0:ix1] = inside
    return mask


def paste_mask_inside(box: CropBox, feather: float = 0.1) -> np.ndarray:
    """The `paste_mask` of ``box`` cut to ``box.inside()``: float32 ``[y1 - y0, x1 - x0]`` in ``[0, 1]``.

    Equal, value for value, to ``paste_mask(box, (box.image_h, box.image_w), feather)[y0:y1, x0:x1]``
    with ``(x0, y0, x1, y1) = box.inside()``, without allocating the full-image mask (empty when the
    box misses the image). Built a band of rows at a time, so no float64 array of the box's size exists.
    """
    rows, cols = _mask_axes(box, feather)
    mask = np.empty((rows.size, cols.size), dtype=np.float32)
    step = max(1, _BAND_VALUES // max(1, cols.size))
    for r0 in range(0, rows.size, step):
        # The weight is the product of a row and a column weight, computed in float64 and rounded
        # once to float32, exactly as the full-image outer product always did.
        mask[r0:r0 + step] = np.outer(rows[r0:r0 + step], cols)
    return mask


def _mask_axes(box: CropBox, feather: float) -> tuple[np.ndarray, np.ndarray]:
    """Float64 row and column weights of the mask over ``box.inside()``; the mask is their outer product."""
    if not 0.0 <= feather <= 0.5:
        raise InputError(f"feather is a fraction of the crop side between 0 and 0.5, got {feather}")
    ramp_px = feather * box.size
    ix0, iy0, ix1, iy1 = box.inside()

    def axis_weights(start: int, count: int, lo: int, hi: int) -> np.ndarray:
        # Distance of each pixel centre in [lo, hi) from the nearer box edge that lies inside the
        # image (`count` pixels long), in pixels; an edge at or beyond the image border is
        # infinitely far.
        n = max(hi - lo, 0)
        centres = np.arange(lo, lo + n, dtype=np.float64) + 0.5
        low = centres - start if start > 0 else np.full(n, np.inf)
        end = start + box.size
        high = end - centres if end < count else np.full(n, np.inf)
        distance = np.minimum(low, high)
        if ramp_px <= 0:
            return (distance > 0).astype(np.float64)
        ramp = np.clip(distance / ramp_px, 0.0, 1.0)
        return ramp * ramp * (3.0 - 2.0 * ramp)

    return axis_weights(box.y0, box.image_h, iy0, iy1), axis_weights(box.x0, box.image_w, ix0, ix1)


def _fill_float32(dst: np.ndarray, base: np.ndarray) -> None:
    """Write the original ``base`` ``[H, W, 3]`` into the float32 frame ``dst`` as `to_float` would."""
    if base.dtype == np.uint8:
        np.divide(base, np.float32(255.0), out=dst, dtype=np.float32)
    else:
        dst[...] = base  # casts without a temporary copy


def _generated_frames(frames: ArrayLike) -> tuple[torch.Tensor, bool]:
    """Generated crops as a CPU tensor ``[T, S, S, 3]`` and whether one ``[S, S, 3]`` frame was given."""
    gen = frames.detach().cpu() if isinstance(frames, torch.Tensor) else torch.from_numpy(np.asarray(frames))
    single = gen.ndim == 3
    if single:
        gen = gen.unsqueeze(0)
    if gen.ndim != 4 or gen.shape[-1] != 3 or gen.shape[1] != gen.shape[2]:
        raise InputError(f"expected square generated frames shaped [T, S, S, 3], got {tuple(gen.shape)}")
    return gen, single


def _output_buffer(out: ArrayLike, shape: tuple[int, ...], base: np.ndarray) -> np.ndarray:
    """``out`` (numpy or CPU torch, float32, ``shape``) as a writable numpy view, checked."""
    if isinstance(out, torch.Tensor):
        if out.device.type != "cpu" or out.dtype != torch.float32:
            raise InputError(f"out must be a float32 CPU tensor, got {out.dtype} on {out.device}")
        view = out.detach().numpy()
    else:
        view = out
    if not isinstance(view, np.ndarray) or view.dtype != np.float32 or not view.flags.writeable:
        raise InputError(f"out must be a writable float32 array, got {type(out).__name__} "
                         f"{getattr(out, 'dtype', '')}")
    if view.shape != shape:
        raise InputError(f"out must be shaped {list(shape)} for these frames, got {list(view.shape)}")
    if np.may_share_memory(view, base):
        # The original is read for every frame; overwriting it would blend later frames into earlier ones.
        raise InputError("out must not share memory with the original image; pass a separate buffer")
    return view


def _resized(gen: torch.Tensor, box: CropBox, chunk: int) -> Iterator[np.ndarray]:
    """Each generated frame as float32 ``[box.size, box.size, 3]`` (antialiased bilinear), in order.

    Frames are resized ``chunk`` at a time, fewer when that would take more than
    `RESIZE_BUDGET_BYTES`. The arrays yielded may be views of the input.
    """
    step = max(1, min(chunk, RESIZE_BUDGET_BYTES // (box.size * box.size * 3 * 4)))
    for start in range(0, gen.shape[0], step):
        part = gen[start:start + step].to(torch.float32).permute(0, 3, 1, 2)
        if part.shape[-1] != box.size:
            part = F.interpolate(part, size=(box.size, box.size), mode="bilinear", antialias=True,
                                 align_corners=False)
        resized = part.permute(0, 2, 3, 1).numpy()
        del part
        for k in range(resized.shape[0]):
            yield resized[k]
        # Drop this chunk before resizing the next: at a large crop's size each frame is hundreds of MB.
        # (No loop variable may keep a view of it either; consumers `del` theirs for the same reason.)
        del resized


def _blend_into(dst: np.ndarray, resized: np.ndarray, box: CropBox, base: np.ndarray,
                axes: tuple[np.ndarray, np.ndarray]) -> None:
    """Write one pasted frame's ``box.inside()`` region into ``dst`` ``[H, W, 3]`` float32, in place.

    ``resized`` is the generated frame at ``box.size`` and ``axes`` the mask's row and column
    weights (`_mask_axes`). Pixels outside the box are not touched; inside it, where the mask is 0
    the original's float32 value is written bit for bit. Works a band of rows at a time, the mask
    included, so temporaries stay near `_BAND_VALUES` values however large the crop is.
    """
    ix0, iy0, ix1, iy1 = box.inside()
    if ix1 <= ix0 or iy1 <= iy0:
        return
    rows, cols = axes
    step = max(1, _BAND_VALUES // (3 * (ix1 - ix0)))
    for r0 in range(iy0, iy1, step):
        r1 = min(r0 + step, iy1)
        # The band's part of `paste_mask_inside`, the same float64 product rounded once to float32.
        weight = np.outer(rows[r0 - iy0:r1 - iy0], cols).astype(np.float32)[:, :, None]
        background = to_float(base[r0:r1, ix0:ix1])
        region = resized[r0 - box.y0:r1 - box.y0, ix0 - box.x0:ix1 - box.x0]
        blended = background + weight * (region - background)
        # Blend only where the mask is positive so everything else keeps the original bits.
        dst[r0:r1, ix0:ix1] = np.where(weight > 0, blended, background)


def _check_chunk(chunk: int) -> None:
    if chunk < 1:
        raise InputError(f"chunk must be at least 1 frame, got {chunk}")


def _original_image(original: ArrayLike, box: CropBox) -> np.ndarray:
    """The original as numpy ``[H, W, 3]`` in its own dtype (not converted), checked against ``box``."""
    base = _as_numpy_image(original)
    _check_original_size(box, base.shape[:2])
    return base


def paste_back(frames: ArrayLike, box: CropBox, original: ArrayLike, feather: float = 0.1,
               chunk: int = 16, out: ArrayLike | None = None) -> ArrayLike:
    """Composite generated crops into the original image: ``[T, S, S, 3]`` -> ``[T, H, W, 3]``.

    ``frames`` are float in ``[0, 1]`` (numpy or CPU torch; a single ``[S, S, 3]`` frame gives
    ``[H, W, 3]``). Each is resized to ``box.size`` (antialiased bilinear) and blended into
    ``original`` (``[H, W, 3]``, float ``[0, 1]`` or uint8) with `paste_mask`. Pixels where the
    mask is 0 are bit-identical to ``original`` (as float32; uint8 divided by 255). Returns float32
    of the same kind as ``frames``, ``T * H * W * 3 * 4`` bytes. Frames are resized up to
    ``chunk`` at a time (fewer for large crops, see `RESIZE_BUDGET_BYTES`); beyond the result,
    memory is bounded by the crop's size, not the photo's.

    ``out``: a float32 numpy array or CPU tensor of the result's shape to write into instead of
    allocating (e.g. one frame of a larger batch); it is returned. It must not overlap ``original``.
    To stream frames one at a time, use `iter_paste_back`.
    """
    is_torch = isinstance(frames, torch.Tensor)
    gen, single = _generated_frames(frames)
    base = _original_image(original, box)
    axes = _mask_axes(box, feather)
    _check_chunk(chunk)
    height, width = base.shape[:2]
    shape = (height, width, 3) if single else (gen.shape[0], height, width, 3)
    result = np.empty(shape, dtype=np.float32) if out is None else _output_buffer(out, shape, base)
    targets = result[None] if single else result
    # Not zip/enumerate: their reused result tuple would keep the previous frame alive during the next resize.
    index = 0
    for resized in _resized(gen, box, chunk):
        _fill_float32(targets[index], base)
        _blend_into(targets[index], resized, box, base, axes)
        index += 1  # noqa: SIM113 - see above
        del resized
    if out is not None:
        return out
    return torch.from_numpy(result) if is_torch else result


def iter_paste_back(frames: ArrayLike, box: CropBox, original: ArrayLike, feather: float = 0.1,
                    chunk: int = 16, out: ArrayLike | None = None) -> Iterator[ArrayLike]:
    """`paste_back` one frame at a time: yields each pasted frame, float32 ``[H, W, 3]``, in order.

    Same arguments and values as `paste_back` (a single ``[S, S, 3]`` frame yields once). Use it to
    write a video frame by frame without holding ``T`` full frames (``H * W * 3 * 4`` bytes each).
    Without ``out`` every frame is a new array (numpy, or a tensor if ``frames`` is one); a loop
    ``for frame in ...`` still holds the previous frame while the next is made, so two frames are
    alive at a time. With ``out``
    (a float32 ``[H, W, 3]`` numpy array or CPU tensor, not overlapping ``original``) every frame is
    written into that buffer and ``out`` itself is yielded: it holds a frame only until the next one
    is requested, and must not be modified meanwhile (only the crop's region is rewritten per frame).
    Arguments are checked when this is called, not at the first frame.
    """
    is_torch = isinstance(frames, torch.Tensor)
    gen, _ = _generated_frames(frames)
    base = _original_image(original, box)
    axes = _mask_axes(box, feather)
    frame_shape = (base.shape[0], base.shape[1], 3)
    buffer = None if out is None else _output_buffer(out, frame_shape, base)
    _check_chunk(chunk)

    def frames_out() -> Iterator[ArrayLike]:
        filled = False
        for resized in _resized(gen, box, chunk):
            if buffer is None:
                target = np.empty(frame_shape, dtype=np.float32)
                _fill_float32(target, base)
                _blend_into(target, resized, box, base, axes)
                yield torch.from_numpy(target) if is_torch else target
                del target  # the caller decides how long a fresh frame lives
            else:
                # Outside the crop's region the buffer keeps the original from the first fill.
                if not filled:
                    _fill_float32(buffer, base)
                    filled = True
                _blend_into(buffer, resized, box, base, axes)
                yield out
            del resized

    return frames_out()
