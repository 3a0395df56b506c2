"""Encoding nodes: a portrait → identity, driving frames → motion latents."""
from __future__ import annotations

import logging

import torch

from ..imtalker_core.media.images import to_model_input
from ..imtalker_core.pipeline import encode_identity, encode_motion
from . import bridge
from .types import IDENTITY, MOTION, RENDERER, ManagedModel, Motion

log = logging.getLogger(__name__)


class IMTalkerEncodeIdentity:
    """Encodes the portrait to animate (once per video)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "renderer": (RENDERER, {"tooltip": "From IMTalker Load Renderer."}),
                "image": ("IMAGE", {
                    "tooltip": "The portrait, ideally a 512×512 face crop from IMTalker Crop Face. Other sizes are "
                               "resized to 512×512 with antialiasing (non-square images are stretched). Only the "
                               "first image of a batch is used."}),
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
        height, width = images.shape[1:3]
        if height != width:
            log.warning("the portrait is %dx%d, not square: it is stretched to a square; crop it first with "
                        "IMTalker Crop Face to keep its proportions", width, height)
        module = bridge.ensure_loaded(renderer)
        source = to_model_input(images[0].cpu(), module.cfg.image_size)
        return (encode_identity(module, source),)


class IMTalkerEncodeMotion:
    """Turns driving frames (e.g. a video of someone talking) into motion latents."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "renderer": (RENDERER, {"tooltip": "From IMTalker Load Renderer."}),
                "images": ("IMAGE", {
                    "tooltip": "Driving frames, ideally face crops from IMTalker Crop Face (one box for the "
                               "whole batch). Other sizes are resized to 512×512."}),
                "fps": ("FLOAT", {
                    "default": 25.0, "min": 1.0, "max": 120.0, "step": 0.01,
                    "tooltip": "Frame rate of the driving frames (connect Get Video Components' fps); the "
                               "rendered video plays at this rate."}),
                "batch_size": ("INT", {
                    "default": 8, "min": 1, "max": 256,
                    "tooltip": "Frames encoded at once; lower it if the GPU runs out of memory."}),
            }
        }

    RETURN_TYPES = (MOTION,)
    RETURN_NAMES = ("motion",)
    OUTPUT_TOOLTIPS = ("One motion latent per driving frame, with the frame rate.",)
    FUNCTION = "encode"
    CATEGORY = "IMTalker"
    DESCRIPTION = "Encodes each driving frame's head pose and expression, for video-driven reenactment."

    def encode(self, renderer: ManagedModel, images: torch.Tensor, fps: float, batch_size: int):
        frames = bridge.image_batch(images, "images")
        module = bridge.ensure_loaded(renderer)
        size = module.cfg.image_size
        total = frames.shape[0]
        progress = bridge.Progress(total, "encoding driving frames")
        latents = []
        # Resize batch by batch so a long video never exists as 512² float copies all at once.
        for start in range(0, total, batch_size):
            chunk = torch.cat([to_model_input(frame.cpu(), size) for frame in frames[start:start + batch_size]])
            latents.append(encode_motion(module, chunk, batch_size=batch_size,
                                         check_interrupt=bridge.check_interrupt).cpu())
            progress(min(start + batch_size, total), total)
        return (Motion(torch.cat(latents).float(), float(fps)),)
