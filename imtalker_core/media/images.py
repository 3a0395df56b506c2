"""Loading portraits from disk and converting them to model input.

Every image leaves this module as a float32 array ``[H, W, 3]``, RGB, values in ``[0, 1]``.
Conversions from the many Pillow modes follow one rule each:

* Transparency (RGBA, LA, PA, palette images with a transparent colour) is composited over
  **black**: ``rgb * alpha``. The reference app drops the alpha channel instead (OpenCV
  ``RGBA2RGB``), which keeps whatever colour is stored under transparent pixels; the two agree
  for opaque pixels and for the common case of transparent pixels stored as black, and
  compositing gives a defined result when an editor left arbitrary colours there.
* Grayscale (1, L, I;16, I, F) is repeated over three channels. 16-bit data is scaled by
  1/65535 so a 16-bit grayscale PNG keeps its full precision. Mode ``I`` (32-bit integers) is
  what Pillow produces for 16-bit grayscale in some formats, so it is also scaled by 1/65535.
* 16-bit RGB PNG/TIFF files are reduced to 8 bits per channel by Pillow itself (it has no
  16-bit RGB mode); the model works at 8-bit precision, so nothing is lost that matters.
* CMYK, YCbCr, LAB, HSV go through Pillow's ``convert("RGB")`` (no colour management).
* The EXIF orientation tag is applied, so phone photos come out upright.
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import InputError
from .files import existing_file

logger = logging.getLogger(__name__)

#: Below this many pixels on the short side there is no usable face to animate.
MIN_SIDE = 32
#: Above this many pixels on the long side we refuse to decode (memory) and ask to downscale.
MAX_SIDE = 8192
#: File extensions Pillow reads that make sense for a portrait.
IMAGE_EXTENSIONS = frozenset({
    ".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp", ".dib", ".tif", ".tiff", ".gif",
    ".tga", ".ppm", ".pgm", ".pbm", ".pnm",
})

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as float32 ``[H, W, 3]`` RGB in ``[0, 1]`` (see the module docstring).

    Raises `InputError`, naming the file and the problem, when the file is missing, has an
    extension that is not an image type, is not decodable, is damaged, has a side shorter than
    `MIN_SIDE` pixels, or a side longer than `MAX_SIDE` pixels (or trips Pillow's
    decompression-bomb guard).
    """
    path = existing_file(path, "image")
    suffix = path.suffix.lower()
    if suffix not in IMAGE_EXTENSIONS:
        raise InputError(
            f"'{path.name}' has the extension '{path.suffix or '(none)'}', which is not an image type; "
            f"use one of {', '.join(sorted(IMAGE_EXTENSIONS))}.")

    try:
        # Promote the bomb *warning* (between 1x and 2x MAX_IMAGE_PIXELS) to an error as well:
        # such an image would still take gigabytes to decode.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
                _check_size(path, width, height)
                im.load()
                image = _to_rgb_float(ImageOps.exif_transpose(im))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(
            f"'{path.name}' is too large to load safely ({exc}); downscale it to at most "
            f"{MAX_SIDE} px on the long side (a portrait needs about 512-2048 px).") from exc
    except UnidentifiedImageError as exc:
        raise InputError(
            f"'{path.name}' is not an image Pillow can read: its content is not a recognised image "
            f"format (is it really a {suffix} file?). Re-export it as PNG or JPEG.") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        # Pillow reports truncated or corrupt data as OSError/SyntaxError/ValueError.
        raise InputError(f"'{path.name}' could not be decoded; the file looks damaged or truncated ({exc}). "
                         f"Re-export it as PNG or JPEG.") from exc
    logger.debug("loaded %s: %dx%d", path, image.shape[1], image.shape[0])
    return image


def _check_size(path: Path, width: int, height: int) -> None:
    """Reject images too small to hold a face or too large to decode, before decoding them."""
    if min(width, height) < MIN_SIDE:
        raise InputError(
            f"'{path.name}' is only {width}x{height} px; the face is too small to animate. Use an image "
            f"at least {MIN_SIDE} px on each side (ideally 512 px or more around the face).")
    if max(width, height) > MAX_SIDE:
        raise InputError(
            f"'{path.name}' is {width}x{height} px, larger than the {MAX_SIDE} px limit; downscale it "
            f"(a portrait needs about 512-2048 px).")


def _to_rgb_float(im: Image.Image) -> np.ndarray:
    """Any Pillow image -> float32 ``[H, W, 3]`` in ``[0, 1]``; rules in the module docstring."""
    mode = im.mode
    if mode == "P":
        # Palette images keep transparency in `info`; converting to RGBA exposes it as alpha.
        mode_to = "RGBA" if "transparency" in im.info else "RGB"
        return _to_rgb_float(im.convert(mode_to))
    if mode == "PA":
        return _to_rgb_float(im.convert("RGBA"))
    if mode in ("RGBa", "La"):
        # Already premultiplied, i.e. composited over black.
        return _to_rgb_float(im.convert("RGB" if mode == "RGBa" else "L"))
    if mode in ("RGBA", "LA"):
        data = np.asarray(im, dtype=np.float32) / 255.0
        color, alpha = data[..., :-1], data[..., -1:]
        composited = color * alpha
        if composited.shape[-1] == 1:
            composited = np.repeat(composited, 3, axis=-1)
        return np.ascontiguousarray(composited, dtype=np.float32)
    if mode == "RGB":
        return np.asarray(im, dtype=np.float32) / 255.0
    if mode in ("1", "L"):
        gray = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
        return _gray_to_rgb(gray)
    if mode in _SIXTEEN_BIT_MODES:
        gray = np.asarray(im).astype(np.float32) / 65535.0
        return _gray_to_rgb(np.clip(gray, 0.0, 1.0))
    if mode == "F":
        # Float images have no standard range; [0, 1] is the only sensible reading for a photo.
        return _gray_to_rgb(np.clip(np.asarray(im, dtype=np.float32), 0.0, 1.0))
    # CMYK, YCbCr, LAB, HSV and anything else Pillow can convert.
    return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    """``[H, W]`` -> ``[H, W, 3]`` float32 (a real copy, so callers may write to it)."""
    return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=-1), dtype=np.float32)


def to_float(image: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """uint8 ``[..., 3]`` in 0..255 -> float32 in ``[0, 1]``; float input is cast to float32 as is."""
    if isinstance(image, torch.Tensor):
        if image.dtype == torch.uint8:
            return image.to(torch.float32) / 255.0
        return image.to(torch.float32)
    image = np.asarray(image)
    if image.dtype == np.uint8:
        # The same float32 division as `astype(np.float32) / 255.0`, without the intermediate copy.
        return np.divide(image, np.float32(255.0), dtype=np.float32)
    return image.astype(np.float32, copy=False)


def to_uint8(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """Float ``[..., 3]`` in ``[0, 1]`` (numpy or CPU torch) -> uint8 numpy, clipped and rounded.

    uint8 input is returned unchanged (as numpy).
    """
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.float64:
        image = image.astype(np.float32)
    # Round rather than truncate, so 0.5/255 steps survive a float round trip.
    scaled = np.clip(image, 0.0, 1.0) * 255.0
    return np.rint(scaled, out=scaled).astype(np.uint8)


def to_model_input(image_hw3: np.ndarray | torch.Tensor, size: int = 512) -> torch.Tensor:
    """``[H, W, 3]`` RGB (float in ``[0, 1]`` or uint8) -> float32 ``[1, 3, size, size]`` in ``[0, 1]``.

    Resizes with antialiased bilinear interpolation (close to Pillow's resize, which the
    reference uses). Non-square inputs are stretched, like the reference; crop first with
    `imtalker_core.media.face.crop_face` to keep proportions. The result is on the CPU unless a
    torch tensor on another device was passed.
    """
    if size < 1:
        raise InputError(f"size must be a positive number of pixels, got {size}")
    tensor = image_hw3 if isinstance(image_hw3, torch.Tensor) else torch.from_numpy(np.asarray(image_hw3))
    if tensor.ndim == 4 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.ndim != 3 or tensor.shape[-1] != 3:
        raise InputError(f"expected an RGB image shaped [H, W, 3], got shape {tuple(tensor.shape)}")
    tensor = to_float(tensor)
    nchw = tensor.permute(2, 0, 1).unsqueeze(0)
    if nchw.shape[-2:] != (size, size):
        nchw = F.interpolate(nchw, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return nchw.clamp(0.0, 1.0).contiguous()
