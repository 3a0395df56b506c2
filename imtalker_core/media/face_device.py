"""Face crop and paste-back on the tensor's own device (CUDA, MPS, CPU), agreeing with `face`.

`face.crop_box` / `face.paste_back` work in numpy/OpenCV on the CPU, so a graph whose frames live
on a GPU would copy every frame to the host and back. The functions here do the same two
operations with torch on whatever device the tensor is on, and reproduce the CPU path's numbers:

* Crop: the box has integer coordinates, so cutting it is exact slicing (zeros where it leaves
  the image, as `face.crop_box`). Resizing the square to ``size`` follows OpenCV's choice in
  `face.crop_box`: shrinking uses OpenCV's ``INTER_AREA`` weights (each output pixel the
  area-weighted mean of the source pixels it covers), applied as two small matrix products, one
  per axis; enlarging uses bicubic interpolation (``a = -0.75``, half-pixel centres, edge pixels
  repeated, as ``INTER_CUBIC`` and torch's ``bicubic`` both do), clipped to ``[0, 1]``.
  Both agree with OpenCV to float rounding (at most 4e-7 on the test portraits, 3e-6 on noise).
  Gaussian-prefiltered or bilinear resamplers (kornia's ``resize(antialias=True)`` and
  ``crop_and_resize``, torch's antialiased bilinear) differ from ``INTER_AREA`` by 1e-2 to 4e-1 on
  the test portraits, more than one 8-bit step, so they are not used. Where CUDA matrix products
  run in TF32 (``torch.backends.cuda.matmul.allow_tf32``, off by default) the area shrink loses up
  to about 1e-3 (9e-4 measured with TF32 rounding emulated on the test portraits), still under one
  8-bit step.
* Paste-back: the same antialiased bilinear resize to ``box.size`` that `face.paste_back` uses
  (torch's, on the frames' device), and the same blend ``original + mask * (frame - original)``
  with the mask of `face.paste_mask_inside`, copied to the device once per call, so the mask is
  bit-identical and on the CPU the result is too.

`crop` and `paste` pick the path: the device path for tensors on a non-CPU device, the CPU path
otherwise, or whichever ``device_path`` asks for.

Layouts: crops and generated frames may be channels-first ``[N, 3, S, S]`` or channels-last
``[N, S, S, 3]`` (ComfyUI's IMAGE); results keep the layout they came in. Originals for
paste-back are channels-last ``[H, W, 3]`` or ``[T, H, W, 3]``. Memory: frames are processed
a chunk at a time (at most `face.RESIZE_BUDGET_BYTES` of resized crops), so beyond the result
itself the device holds about one chunk of crops and one frame's blend temporaries.
"""
from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from .face import RESIZE_BUDGET_BYTES, CropBox, crop_box, paste_back, paste_mask_inside
from .images import to_float

logger = logging.getLogger(__name__)

ArrayLike = np.ndarray | torch.Tensor
#: The IMAGE-style channels-last layout, or channels-first; see `_layout`.
_CHANNELS_LAST, _CHANNELS_FIRST = "channels_last", "channels_first"


# --- layouts -------------------------------------------------------------------------------------

def _layout(batch: torch.Tensor, height: int | None, width: int | None, what: str, expected: str) -> str:
    """Which layout a 4-D ``batch`` is in: channels-last ``[N, H, W, 3]`` or channels-first ``[N, 3, H, W]``.

    ``height``/``width`` are the expected spatial size (``None``: any square). When both layouts fit
    (a 3x3 image) channels-first is assumed. ``expected`` words the shapes for the error message.
    """
    shape = tuple(batch.shape)

    def fits(spatial: tuple[int, int]) -> bool:
        if height is None:
            return spatial[0] == spatial[1] and spatial[0] > 0
        return spatial == (height, width)

    if batch.ndim == 4 and shape[1] == 3 and fits(shape[2:4]):
        return _CHANNELS_FIRST
    if batch.ndim == 4 and shape[3] == 3 and fits(shape[1:3]):
        return _CHANNELS_LAST
    raise InputError(f"{what} must be shaped {expected}, got {list(shape)}")


def _nchw(batch: torch.Tensor, layout: str) -> torch.Tensor:
    """A channels-first view of ``batch`` (no copy)."""
    return batch if layout == _CHANNELS_FIRST else batch.permute(0, 3, 1, 2)


def _check_tensor(value: object, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise InputError(f"{what} must be a torch tensor for the device path, got {type(value).__name__}; "
                         "numpy input goes through the CPU path (device_path=False)")
    if value.dtype != torch.uint8 and not value.is_floating_point():
        raise InputError(f"{what} must be float in [0, 1] or uint8, got {value.dtype}")
    return value


def _wants_device_path(value: ArrayLike, device_path: bool | None) -> bool:
    if device_path is None:
        return isinstance(value, torch.Tensor) and value.device.type != "cpu"
    return bool(device_path)


def _chunk_frames(chunk: int, side: int) -> int:
    """Frames per chunk: at most ``chunk`` and at most `RESIZE_BUDGET_BYTES` of float32 ``[3, side, side]``."""
    if chunk < 1:
        raise InputError(f"chunk must be at least 1 frame, got {chunk}")
    return max(1, min(chunk, RESIZE_BUDGET_BYTES // (side * side * 3 * 4)))


# --- crop ----------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def area_weights(source: int, target: int) -> np.ndarray:
    """OpenCV's ``INTER_AREA`` weights for shrinking ``source`` pixels to ``target``: float32 ``[target, source]``.

    Row ``i`` holds the share of each source pixel in output pixel ``i``, whose footprint is
    ``[i * s, (i + 1) * s)`` with ``s = source / target``; rows sum to 1. Built the way OpenCV 4
    builds its table (``computeResizeAreaTab``), slivers under 1e-3 px dropped included, so
    ``W @ crop @ W.T`` equals ``cv2.resize(crop, ..., interpolation=cv2.INTER_AREA)`` to float rounding.
    Read-only (cached).
    """
    if not 0 < target <= source:
        raise InputError(f"area weights shrink, so 0 < target <= source is needed, got {target} and {source}")
    scale = source / target
    weights = np.zeros((target, source), dtype=np.float64)
    for out in range(target):
        start = out * scale
        end = start + scale
        # The last footprint may end past the image by float rounding; OpenCV divides by what is left.
        cell = min(scale, source - start)
        first_whole = math.ceil(start)
        last_whole = min(math.floor(end), source - 1)
        first_whole = min(first_whole, last_whole)
        if first_whole - start > 1e-3:
            weights[out, first_whole - 1] += (first_whole - start) / cell
        weights[out, first_whole:last_whole] += 1.0 / cell
        if end - last_whole > 1e-3:
            weights[out, last_whole] += min(end - last_whole, 1.0, cell) / cell
    weights = weights.astype(np.float32)
    weights.setflags(write=False)
    return weights


def crop_on_device(images: torch.Tensor, box: CropBox, size: int = 512) -> torch.Tensor:
    """Cut ``box`` out of each image and resize it to ``size``: ``[N, 3, size, size]`` float32, same device.

    ``images``: ``[N, 3, H, W]`` or ``[N, H, W, 3]`` float in ``[0, 1]`` (uint8 is divided by 255), on
    any device, ``H x W`` the box's image size. Where the box leaves the image the crop is black.
    Values agree with ``face.crop_box(image, box, size)`` (numpy/OpenCV) to float rounding (under 1e-5); see the
    module docstring for how each direction of resizing is matched. Images are processed a chunk
    at a time, so temporaries stay near `face.RESIZE_BUDGET_BYTES` however large the box is.
    """
    images = _check_tensor(images, "images")
    if size < 1:
        raise InputError(f"size must be a positive number of pixels, got {size}")
    layout = _layout(images, box.image_h, box.image_w, "images",
                     f"[N, 3, {box.image_h}, {box.image_w}] or [N, {box.image_h}, {box.image_w}, 3] "
                     f"(the size the crop box was made for)")
    source = _nchw(images, layout)
    count = source.shape[0]
    result = torch.zeros((count, 3, size, size), dtype=torch.float32, device=images.device)
    ix0, iy0, ix1, iy1 = box.inside()
    if ix1 <= ix0 or iy1 <= iy0:
        return result  # the box misses the image: all black, as on the CPU
    # Images per chunk: the float copy of the region (or the padded square) within the budget.
    side = max(box.size, size)
    step = max(1, RESIZE_BUDGET_BYTES // (side * side * 3 * 4))
    if size < box.size:
        # Area weights restricted to the pixels inside the image: the black border adds nothing to a
        # weighted sum, so it never has to exist.
        full = area_weights(box.size, size)
        rows = torch.tensor(full[:, iy0 - box.y0:iy1 - box.y0], device=images.device)
        cols_t = torch.tensor(full[:, ix0 - box.x0:ix1 - box.x0].T, device=images.device)
        for start in range(0, count, step):
            region = to_float(source[start:start + step, :, iy0:iy1, ix0:ix1])
            result[start:start + step] = rows @ region @ cols_t
        return result
    for start in range(0, count, step):
        part = source[start:start + step]
        square = torch.zeros((part.shape[0], 3, box.size, box.size), dtype=torch.float32, device=images.device)
        square[:, :, iy0 - box.y0:iy1 - box.y0, ix0 - box.x0:ix1 - box.x0] = to_float(part[:, :, iy0:iy1, ix0:ix1])
        if size > box.size:
            # Bicubic overshoots at edges; clipped as the CPU path clips.
            square = F.interpolate(square, size=(size, size), mode="bicubic", align_corners=False).clamp_(0.0, 1.0)
        result[start:start + step] = square
    return result


def crop(images: ArrayLike, box: CropBox, size: int = 512, device_path: bool | None = None) -> ArrayLike:
    """The crop of every image, resized to ``size``, on the images' device: float32 in ``[0, 1]``.

    ``images``: ``[N, H, W, 3]`` (IMAGE) or ``[N, 3, H, W]``, float in ``[0, 1]`` or uint8, numpy or torch on
    any device. Returns ``[N, size, size, 3]`` or ``[N, 3, size, size]`` (the input's layout), of the
    input's kind, on its device. ``device_path``: ``None`` uses `crop_on_device` for tensors on a non-CPU
    device and ``face.crop_box`` (OpenCV) otherwise; ``True``/``False`` force one (the CPU path moves
    the images to the CPU and the result back). The two agree to float rounding (under 1e-5).
    """
    if _wants_device_path(images, device_path):
        logger.debug("crop of %s on %s: device path", list(images.shape), getattr(images, "device", "numpy"))
        tensor = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images))
        layout = _layout(_check_tensor(tensor, "images"), box.image_h, box.image_w, "images",
                         f"[N, {box.image_h}, {box.image_w}, 3] or [N, 3, {box.image_h}, {box.image_w}]")
        crops = crop_on_device(tensor, box, size)
        if layout == _CHANNELS_LAST:
            crops = crops.permute(0, 2, 3, 1).contiguous()
        return crops if isinstance(images, torch.Tensor) else crops.numpy()
    if size < 1:
        raise InputError(f"size must be a positive number of pixels, got {size}")
    is_torch = isinstance(images, torch.Tensor)
    host = images.detach().cpu() if is_torch else torch.from_numpy(np.asarray(images))
    if host.dtype != torch.uint8 and not host.is_floating_point():
        raise InputError(f"images must be float in [0, 1] or uint8, got {host.dtype}")
    layout = _layout(host, box.image_h, box.image_w, "images",
                     f"[N, {box.image_h}, {box.image_w}, 3] or [N, 3, {box.image_h}, {box.image_w}]")
    frames_hw3 = host if layout == _CHANNELS_LAST else host.permute(0, 2, 3, 1)
    crops = torch.stack([torch.from_numpy(_crop_one_on_cpu(frame.numpy(), box, size)) for frame in frames_hw3])
    if layout == _CHANNELS_FIRST:
        crops = crops.permute(0, 3, 1, 2).contiguous()
    if not is_torch:
        return crops.numpy()
    return crops.to(images.device)


def _crop_one_on_cpu(image: np.ndarray, box: CropBox, size: int) -> np.ndarray:
    """``face.crop_box`` as `face.crop_face` uses it: float32 ``[size, size, 3]`` also for uint8 input."""
    if image.dtype != np.uint8:
        return crop_box(image, box, size)
    # Cut first, then convert and resize (as crop_face does): the resize runs on float values.
    cut = to_float(crop_box(image, box))
    return crop_box(cut, CropBox(0, 0, box.size, box.size, box.size), size)


# --- paste-back ----------------------------------------------------------------------------------

def paste_mask_on_device(box: CropBox, original_hw: tuple[int, int], feather: float = 0.1,
                         device: torch.device | str = "cpu") -> torch.Tensor:
    """``face.paste_mask`` as a float32 ``[H, W]`` tensor on ``device``, bit for bit.

    Only the box's part is computed (on the CPU, crop-sized) and copied to the device.
    """
    height, width = original_hw
    if (height, width) != (box.image_h, box.image_w):
        raise InputError(f"the crop box was made for a {box.image_w}x{box.image_h} image, "
                         f"but the original is {width}x{height}")
    mask = torch.zeros((height, width), dtype=torch.float32, device=device)
    ix0, iy0, ix1, iy1 = box.inside()
    inside = paste_mask_inside(box, feather)
    if inside.size:
        mask[iy0:iy1, ix0:ix1] = torch.from_numpy(inside).to(device)
    return mask


class _PastePlan:
    """Checked inputs of one device paste: frames as channels-first, originals, mask, chunking."""

    def __init__(self, frames: torch.Tensor, box: CropBox, original: torch.Tensor, feather: float, chunk: int):
        frames = _check_tensor(frames, "frames")
        original = _check_tensor(original, "original")
        self.layout = _layout(frames, None, None, "frames", "[T, 3, S, S] or [T, S, S, 3] (square crops)")
        self.frames = _nchw(frames, self.layout)
        self.device = frames.device
        self.box = box
        count = self.frames.shape[0]
        if original.ndim not in (3, 4) or original.shape[-1] != 3:
            raise InputError(f"original must be shaped [H, W, 3] or [T, H, W, 3], got {list(original.shape)}")
        if original.ndim == 3:
            original = original[None]
        if tuple(original.shape[1:3]) != (box.image_h, box.image_w):
            raise InputError(f"the crop box was made for a {box.image_w}x{box.image_h} image, "
                             f"but the original is {original.shape[2]}x{original.shape[1]}")
        if original.shape[0] not in (1, count):
            raise InputError(f"{original.shape[0]} original images for {count} frames; give one original, "
                             "or exactly one per frame")
        # Channels-first views; an original on another device moves over a frame at a time.
        self.originals = original.permute(0, 3, 1, 2)
        self.step = _chunk_frames(chunk, box.size)
        ix0, iy0, ix1, iy1 = box.inside()
        self.inside = (ix0, iy0, ix1, iy1)
        inside_mask = paste_mask_inside(box, feather)
        self.weight = torch.from_numpy(inside_mask).to(self.device) if inside_mask.size else None
        self.blend_where = None if self.weight is None else self.weight > 0

    @property
    def count(self) -> int:
        return self.frames.shape[0]

    def result_shape(self, frames: int | None) -> tuple[int, ...]:
        """The result's shape in the frames' layout (``frames=None``: one frame, no batch axis)."""
        height, width = self.box.image_h, self.box.image_w
        frame = (3, height, width) if self.layout == _CHANNELS_FIRST else (height, width, 3)
        return frame if frames is None else (frames, *frame)

    def resized(self) -> Iterator[tuple[int, torch.Tensor]]:
        """``(index, frame)`` for every generated frame resized to ``box.size``: float32 ``[3, size, size]``."""
        side = self.box.size
        for start in range(0, self.count, self.step):
            part = self.frames[start:start + self.step].to(torch.float32)
            if part.shape[-1] != side:
                # The resize of face.paste_back, so both paths see the same pixels.
                part = F.interpolate(part, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
            for k in range(part.shape[0]):
                yield start + k, part[k]
            del part  # free this chunk before the next is resized

    def write(self, dst: torch.Tensor, index: int, resized: torch.Tensor) -> None:
        """Write pasted frame ``index`` into ``dst`` ``[3, H, W]`` (a channels-first view), in place."""
        base = self.originals[index if self.originals.shape[0] > 1 else 0].to(self.device)
        # The float32 value face.paste_back writes (to_float): uint8 / 255, float cast as is.
        dst.copy_(base)
        if base.dtype == torch.uint8:
            dst.div_(255.0)
        if self.weight is None:
            return
        ix0, iy0, ix1, iy1 = self.inside
        box = self.box
        background = dst[:, iy0:iy1, ix0:ix1]
        region = resized[:, iy0 - box.y0:iy1 - box.y0, ix0 - box.x0:ix1 - box.x0]
        # The CPU path's arithmetic, operation for operation, so the float32 results are the same.
        blended = region - background
        blended.mul_(self.weight)
        blended.add_(background)
        background.copy_(torch.where(self.blend_where, blended, background))


def paste_back_on_device(frames: torch.Tensor, box: CropBox, original: torch.Tensor, feather: float = 0.1,
                         chunk: int = 16, out: torch.Tensor | None = None) -> torch.Tensor:
    """Composite generated crops into the original on the frames' device: ``[T, ...S, S...]`` -> full frames.

    ``frames``: ``[T, 3, S, S]`` or ``[T, S, S, 3]`` float in ``[0, 1]``, any square size, on any device.
    ``original``: ``[H, W, 3]`` (one photo for all frames) or ``[T, H, W, 3]`` (one per frame), float in
    ``[0, 1]`` or uint8, on any device (moved over one frame at a time). Returns float32
    ``[T, 3, H, W]`` or ``[T, H, W, 3]`` (the frames' layout) on the frames' device: each frame resized
    to ``box.size`` (antialiased bilinear), blended in with the mask of ``face.paste_mask``; where the
    mask is 0 the original's float32 value is kept bit for bit. Equals ``face.paste_back`` (bit for bit
    on the CPU, to float rounding of the resize elsewhere). Frames are resized ``chunk`` at a time (fewer
    for large crops), so beyond the result the device holds one chunk of crop-sized frames.
    ``out``: a float32 tensor of the result's shape on the frames' device to write into (a view of a
    larger canvas is fine); it is returned. It must not overlap ``original``.
    """
    plan = _PastePlan(frames, box, original, feather, chunk)
    shape = plan.result_shape(plan.count)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=plan.device)
    else:
        _check_out(out, shape, plan)
    targets = _nchw(out, plan.layout)
    for index, resized in plan.resized():
        plan.write(targets[index], index, resized)
        del resized
    return out


def _check_out(out: torch.Tensor, shape: tuple[int, ...], plan: _PastePlan) -> None:
    if not isinstance(out, torch.Tensor) or out.dtype != torch.float32 or out.device != plan.device:
        raise InputError(f"out must be a float32 tensor on {plan.device}, got "
                         f"{getattr(out, 'dtype', type(out).__name__)} on {getattr(out, 'device', '-')}")
    if tuple(out.shape) != shape:
        raise InputError(f"out must be shaped {list(shape)} for these frames, got {list(out.shape)}")
    if out.device == plan.originals.device and _overlaps(out, plan.originals):
        # The original is read for every frame; overwriting it would blend later frames into earlier ones.
        raise InputError("out must not share memory with the original image; pass a separate buffer")


def _overlaps(first: torch.Tensor, second: torch.Tensor) -> bool:
    """Whether the storage ranges the two tensors' elements span intersect (conservative)."""
    if first.untyped_storage().data_ptr() != second.untyped_storage().data_ptr():
        return False

    def span(tensor: torch.Tensor) -> tuple[int, int]:
        start = tensor.data_ptr()
        extent = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True))
        return start, start + (extent + 1) * tensor.element_size()

    (a0, a1), (b0, b1) = span(first), span(second)
    return a0 < b1 and b0 < a1


def iter_paste_back_on_device(frames: torch.Tensor, box: CropBox, original: torch.Tensor, feather: float = 0.1,
                              chunk: int = 16) -> Iterator[torch.Tensor]:
    """`paste_back_on_device` one frame at a time: yields each pasted frame in order, a new tensor each.

    Each is float32 ``[3, H, W]`` or ``[H, W, 3]`` (the frames' layout) on the frames' device, equal to
    the matching frame of `paste_back_on_device`. Use it to hand frames on (to a video writer, to the
    CPU) without holding ``T`` full frames on the device. Arguments are checked when this is called.
    """
    plan = _PastePlan(frames, box, original, feather, chunk)

    def frames_out() -> Iterator[torch.Tensor]:
        for index, resized in plan.resized():
            frame = torch.empty(plan.result_shape(None), dtype=torch.float32, device=plan.device)
            plan.write(frame if plan.layout == _CHANNELS_FIRST else frame.permute(2, 0, 1), index, resized)
            del resized
            yield frame
            del frame  # the caller decides how long a frame lives

    return frames_out()


def paste(frames: ArrayLike, box: CropBox, original: ArrayLike, feather: float = 0.1, chunk: int = 16,
          device_path: bool | None = None, out: torch.Tensor | None = None) -> ArrayLike:
    """Paste crops back into the original(s) with the device or the CPU path; same values either way.

    ``frames``: ``[T, S, S, 3]`` (IMAGE) or ``[T, 3, S, S]``, numpy or torch on any device; ``original``:
    ``[H, W, 3]`` or ``[T, H, W, 3]``. Returns float32 full frames in the frames' layout and kind, on the
    frames' device. ``device_path``: ``None`` uses `paste_back_on_device` for frames on a non-CPU device
    and ``face.paste_back`` otherwise; ``True``/``False`` force one. ``out`` as in `paste_back_on_device`
    (for the CPU path a float32 CPU tensor).
    """
    if _wants_device_path(frames, device_path):
        logger.debug("paste-back of %s on %s: device path", list(frames.shape), getattr(frames, "device", "numpy"))
        as_tensor = frames if isinstance(frames, torch.Tensor) else torch.from_numpy(np.asarray(frames))
        base = original if isinstance(original, torch.Tensor) else torch.from_numpy(np.asarray(original))
        result = paste_back_on_device(as_tensor, box, base, feather, chunk, out)
        return result if isinstance(frames, torch.Tensor) else result.numpy()
    is_torch = isinstance(frames, torch.Tensor)
    host = frames.detach().cpu() if is_torch else torch.from_numpy(np.asarray(frames))
    layout = _layout(host, None, None, "frames", "[T, S, S, 3] or [T, 3, S, S] (square crops)")
    frames_hw3 = host if layout == _CHANNELS_LAST else host.permute(0, 2, 3, 1)
    base = original.detach().cpu() if isinstance(original, torch.Tensor) else torch.from_numpy(np.asarray(original))
    if base.ndim == 4 and base.shape[0] not in (1, frames_hw3.shape[0]):
        raise InputError(f"{base.shape[0]} original images for {frames_hw3.shape[0]} frames; give one original, "
                         "or exactly one per frame")
    if base.ndim == 4 and base.shape[0] == 1:
        base = base[0]
    height, width = box.image_h, box.image_w
    shape = (frames_hw3.shape[0], 3, height, width) if layout == _CHANNELS_FIRST else \
        (frames_hw3.shape[0], height, width, 3)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32)
    targets = out if layout == _CHANNELS_LAST else out.permute(0, 2, 3, 1)
    if base.ndim == 3:
        paste_back(frames_hw3, box, base, feather, chunk, out=targets)
    else:
        for index, frame in enumerate(frames_hw3):
            paste_back(frame, box, base[index], feather, chunk, out=targets[index])
    if not is_torch:
        return out.numpy()
    return out.to(frames.device)
