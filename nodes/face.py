"""Face crop and paste-back nodes (thin wrappers of `imtalker_core.media.face`)."""
from __future__ import annotations

import logging

import torch

from ..imtalker_core.errors import InputError
from ..imtalker_core.media.face import CropBox, crop_face, paste_back, paste_mask, stable_video_box
from ..imtalker_core.media.face_device import crop as crop_batch
from ..imtalker_core.media.face_device import paste as paste_on_device
from . import bridge
from .types import CROP

log = logging.getLogger(__name__)

CROP_SIZE = 512  # the renderer's input size
# Frames between face detections when one box is chosen for a batch (the reference app's value).
VIDEO_SAMPLE_EVERY = 15
# How the no-face error tells a node user to fall back to the centred square.
NO_FACE_HINT = "set on_no_face to 'center' to use the centred square, or crop the image around the face yourself"


def check_originals(originals: torch.Tensor, box: CropBox, frames: int) -> torch.Tensor:
    """Validate the originals for pasting `frames` frames; returns them as CPU IMAGE `[N, H, W, 3]`.

    N must be 1 (one photo for every frame) or `frames` (one original per frame), and their size
    the one the crop was made for. Checked before rendering, so a mistake costs no render time.
    """
    originals = bridge.image_batch(originals, "original image").cpu()
    if originals.shape[0] not in (1, frames):
        raise InputError(f"{originals.shape[0]} original images for {frames} frames; give one original image, "
                         "or exactly one per frame")
    if tuple(originals.shape[1:3]) != (box.image_h, box.image_w):
        raise InputError(f"the crop was made from a {box.image_w}x{box.image_h} image, but the original is "
                         f"{originals.shape[2]}x{originals.shape[1]}; connect the image that went into Crop Face")
    return originals


def paste_into(frames: torch.Tensor, box: CropBox, originals: torch.Tensor, feather: float,
               first_index: int = 0, out: torch.Tensor | None = None) -> torch.Tensor:
    """Paste crops `[T, S, S, 3]` into originals (from `check_originals`): `[T, H, W, 3]` float32, on the
    frames' device (crops on a GPU are pasted there, `face_device`; else on the CPU).

    With one original per frame, frame i of this batch goes into original `first_index + i`, so a
    streamed batch lands in the right frames of a video. `out`: a float32 CPU `[T, H, W, 3]` tensor
    (a view of a larger canvas is fine) to write into instead of allocating; it is returned.
    """
    if frames.device.type != "cpu" and out is None:
        # A GPU graph keeps its frames on the device: the torch paste-back (the same numbers as OpenCV's).
        count = frames.shape[0]
        wanted = originals[:1] if originals.shape[0] == 1 else originals[first_index:first_index + count]
        return paste_on_device(frames, box, wanted.to(frames.device), feather, device_path=True)
    frames = frames.cpu()
    if originals.shape[0] == 1:
        return paste_back(frames, box, originals[0], feather, out=out)
    # Each frame is pasted straight into its slot of the result: no per-frame copies to stack.
    if out is None:
        out = torch.empty((frames.shape[0], box.image_h, box.image_w, 3), dtype=torch.float32)
    for i, frame in enumerate(frames):
        paste_back(frame, box, originals[first_index + i], feather, out=out[i])
    return out


# Video encoders (H.264 in yuv420p, as SaveVideo writes) need even widths and heights.
PAD_TO_EVEN_INPUT = ("BOOLEAN", {
    "default": True,
    "tooltip": "Make the width and height even by repeating the last column/row once where needed (a "
               "511×383 photo gives 512×384 frames), so Save Video (H.264) accepts the frames. Logged when "
               "it pads."})


def even_canvas(count: int, height: int, width: int, pad_to_even: bool, what: str,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """An uninitialised float32 IMAGE `[count, H', W', 3]` for frames of `height` x `width`.

    With `pad_to_even` H' and W' are rounded up to even numbers (logged when that pads); fill the
    `[:, :height, :width]` part, then call `fill_even_padding`.
    """
    padded_h, padded_w = (height + height % 2, width + width % 2) if pad_to_even else (height, width)
    if (padded_h, padded_w) != (height, width):
        log.info("%s: the frames are %dx%d; padded to %dx%d (last column/row repeated) so video encoders "
                 "accept them (pad_to_even)", what, width, height, padded_w, padded_h)
    return torch.empty((count, padded_h, padded_w, 3), dtype=torch.float32, device=device)


def fill_even_padding(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Fill the padding of an `even_canvas` by edge replication: rows below `height` repeat row
    `height - 1`, columns right of `width` repeat column `width - 1`. In place; returns `frames`."""
    if frames.shape[1] > height:
        frames[:, height:, :width] = frames[:, height - 1:height, :width]
    if frames.shape[2] > width:
        frames[:, :, width:] = frames[:, :, width - 1:width]
    return frames


class IMTalkerCropFace:
    """Crops the face out of a portrait (or one steady box for a batch of video frames)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {
                    "tooltip": "A portrait, or a batch of video frames (then one steady box is used for all "
                               "frames: the median face position over every 15th frame)."}),
                "scale": ("FLOAT", {
                    "default": 1.6, "min": 1.0, "max": 4.0, "step": 0.05,
                    "tooltip": "Crop side as a multiple of the detected face size (1.6 as in the reference). "
                               "Larger keeps more hair and shoulders."}),
                "on_no_face": (["error", "center"], {
                    "default": "error",
                    "tooltip": "What to do when no face is found (in a batch: in none of the sampled frames): "
                               "stop with an error, or use the centred square."}),
            }
        }

    RETURN_TYPES = ("IMAGE", CROP, "MASK")
    RETURN_NAMES = ("face", "crop", "crop_mask")
    OUTPUT_TOOLTIPS = (
        "The square face crop(s), 512×512, always inside the photo (no black borders): slid inside when the "
        "face is near an edge, and cut to the photo's short side when it would be larger, as in the reference.",
        "Where the crop lies in the original, for IMTalker Paste Back / Render To Video.",
        "1 where the crop covers the original image, 0 elsewhere (original size).",
    )
    FUNCTION = "crop"
    CATEGORY = "IMTalker/face"
    DESCRIPTION = ("Finds the largest face (OpenCV Haar cascade) and crops a 512×512 square around it, as the "
                   "IMTalker reference does. Connect 'crop' to Paste Back to put the animated face back.")

    def crop(self, image: torch.Tensor, scale: float, on_no_face: str):
        images = bridge.image_batch(image, "image").cpu()
        height, width = images.shape[1:3]
        if images.shape[0] == 1:
            face, box = crop_face(images[0], scale=scale, size=CROP_SIZE, on_no_face=on_no_face,
                                  no_face_hint=NO_FACE_HINT)
            faces = face[None]
        else:
            box = stable_video_box(images, scale=scale, sample_every=VIDEO_SAMPLE_EVERY, on_no_face=on_no_face,
                                   no_face_hint=NO_FACE_HINT)
            faces = crop_batch(images, box, CROP_SIZE)
        mask = torch.from_numpy(paste_mask(box, (height, width), feather=0.0))[None]
        return (faces.float().contiguous(), box, mask)


class IMTalkerPasteBack:
    """Puts generated face frames back into the original photo (or video frames)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "frames": ("IMAGE", {"tooltip": "Generated face frames (any square size; upscaled frames are fine)."}),
                "crop": (CROP, {"tooltip": "The crop box from IMTalker Crop Face."}),
                "original": ("IMAGE", {
                    "tooltip": "The image the crop came from: one image for all frames, or one per frame."}),
                "feather": ("FLOAT", {
                    "default": 0.1, "min": 0.0, "max": 0.5, "step": 0.01,
                    "tooltip": "Width of the soft blend at the crop's edge, as a fraction of the crop side "
                               "(0 = hard edge)."}),
            },
            "optional": {
                "pad_to_even": PAD_TO_EVEN_INPUT,
            },
        }

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("Full-size frames: the original with the animated face blended in (one column/row "
                       "larger where the original's size is odd and pad_to_even is on).",)
    FUNCTION = "paste"
    CATEGORY = "IMTalker/face"
    DESCRIPTION = "Blends generated face frames back into the original image at the crop position."

    def paste(self, frames: torch.Tensor, crop: CropBox, original: torch.Tensor, feather: float,
              pad_to_even: bool = True):
        frames = bridge.image_batch(frames, "frames")
        originals = check_originals(original, crop, frames.shape[0])
        height, width = crop.image_h, crop.image_w
        # Pasted straight into the (padded) result: padding afterwards would copy every full frame.
        out = even_canvas(frames.shape[0], height, width, pad_to_even, "IMTalker Paste Back")
        paste_into(frames, crop, originals, feather, out=out[:, :height, :width])
        return (fill_even_padding(out, height, width),)
