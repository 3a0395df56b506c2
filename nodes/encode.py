"""Encoding nodes: a portrait → identity, driving frames → motion latents."""
from __future__ import annotations

import logging

import torch

from ..imtalker_core.media.face import center_box
from ..imtalker_core.media.images import to_model_input
from ..imtalker_core.pipeline import encode_identity
from . import bridge
from .types import IDENTITY, MOTION, RENDERER, ManagedModel, Motion
from .video import (BAD_FRAME_POLICIES, BLANK, MOTION_BATCH_INPUT, BadFrames, MotionBatches, bad_frame_tooltip,
                    bad_frames_error, blank_frame, check_policy, motion_batch_size, settle_bad_frames)

log = logging.getLogger(__name__)


def center_square(images: torch.Tensor) -> tuple[torch.Tensor, str | None]:
    """IMAGE `[B, H, W, 3]` cut to its largest centred square (a view, no copy), and a description of
    the cut (None when the images are square already)."""
    height, width = images.shape[1:3]
    if height == width:
        return images, None
    box = center_box(height, width)
    square = images[:, box.y0:box.y0 + box.size, box.x0:box.x0 + box.size]
    where = f"columns {box.x0}-{box.x1 - 1}" if width > height else f"rows {box.y0}-{box.y1 - 1}"
    return square, f"{width}x{height}, not square: using the centred {box.size}x{box.size} square ({where})"


class IMTalkerEncodeIdentity:
    """Encodes the portrait to animate (once per video)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "renderer": (RENDERER, {"tooltip": "From IMTalker Load Renderer."}),
                "image": ("IMAGE", {
                    "tooltip": "The portrait, ideally a 512×512 face crop from IMTalker Crop Face. Other sizes are "
                               "resized to 512×512 with antialiasing; a non-square image is cut to its centred "
                               "square (never stretched; warned). Only the first image of a batch is used."}),
            }
        }

    RETURN_TYPES = (IDENTITY,)
    RETURN_NAMES = ("identity",)
    OUTPUT_TOOLTIPS = ("The portrait's appearance features and its own pose/expression latent, kept on the "
                       "compute device for rendering.",)
    FUNCTION = "encode"
    CATEGORY = "IMTalker"
    DESCRIPTION = "Encodes the source portrait once; every rendered frame reuses it."

    def encode(self, renderer: ManagedModel, image: torch.Tensor):
        images = bridge.image_batch(image, "image")
        if images.shape[0] > 1:
            log.info("IMTalker Encode Identity got %d images; using the first", images.shape[0])
        portrait, cut = center_square(images[:1])
        if cut is not None:
            bridge.notify(f"IMTalker Encode Identity: the portrait is {cut}. IMTalker Crop Face frames the face "
                          "instead; connect it before this node.", logging.WARNING)
        module = bridge.ensure_loaded(renderer)
        source = to_model_input(portrait[0].cpu(), module.cfg.image_size)
        identity = encode_identity(module, source, callback=bridge.Progress(3, "encoding the portrait"),
                                   check_interrupt=bridge.check_interrupt)
        # Kept off the GPU between nodes: ComfyUI manages only the renderer's weights, so device tensors
        # here would stay in VRAM after it offloads the renderer. Rendering moves them over per call.
        return (identity.to(device=bridge.offload_device()),)


class IMTalkerEncodeMotion:
    """Turns driving frames (e.g. a video of someone talking) into motion latents."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "renderer": (RENDERER, {"tooltip": "From IMTalker Load Renderer."}),
                "images": ("IMAGE", {
                    "tooltip": "Driving frames, ideally face crops from IMTalker Crop Face (one box for the "
                               "whole batch). Other sizes are resized to 512×512; non-square frames are cut to "
                               "their centred square (never stretched; warned). For a video file, IMTalker Video "
                               "To Motion does all of this without holding the frames in memory."}),
                "fps": ("FLOAT", {
                    "default": 25.0, "min": 1.0, "max": 120.0, "step": 0.01,
                    "tooltip": "Frame rate of the driving frames (connect Get Video Components' fps); the "
                               "rendered video plays at this rate."}),
                "batch_size": MOTION_BATCH_INPUT,
            },
            "optional": {
                "on_bad_frame": (list(BAD_FRAME_POLICIES), {"default": "hold", "tooltip": bad_frame_tooltip(False)}),
            },
        }

    RETURN_TYPES = (MOTION,)
    RETURN_NAMES = ("motion",)
    OUTPUT_TOOLTIPS = ("One motion latent per driving frame, with the frame rate.",)
    FUNCTION = "encode"
    CATEGORY = "IMTalker"
    DESCRIPTION = "Encodes each driving frame's head pose and expression, for video-driven reenactment."

    def encode(self, renderer: ManagedModel, images: torch.Tensor, fps: float, batch_size: int = 0,
               on_bad_frame: str = "hold"):
        what = "IMTalker Encode Motion"
        check_policy(on_bad_frame)
        frames, cut = center_square(bridge.image_batch(images, "images"))
        if cut is not None:
            bridge.notify(f"{what}: the driving frames are {cut}. IMTalker Crop Face (or IMTalker Video To Motion) "
                          "follows the face instead.", logging.WARNING)
        # Checked before encoding, so 'error' costs no encoding time (frames are in memory already).
        bad = BadFrames(fps)
        for index, frame in enumerate(frames):
            if blank_frame(frame):
                bad.add(index, BLANK)
        if on_bad_frame == "error" and len(bad):
            raise bad_frames_error(bad, what)
        batch_size = motion_batch_size(batch_size)
        module = bridge.ensure_loaded(renderer)
        total = frames.shape[0]
        progress = bridge.Progress(total, "encoding driving frames")
        # Resized batch by batch into one reused buffer, so a long video never exists as 512² float
        # copies all at once, and memory does not creep up batch after batch.
        encoder = MotionBatches(module, batch_size, total)
        for index, frame in enumerate(frames):
            encoder.add(frame)
            if encoder.pending == 0:
                progress(index + 1, total)
        motion = settle_bad_frames(encoder.result(), bad, on_bad_frame, what)
        progress(total, total)
        return (Motion(motion, float(fps)),)
