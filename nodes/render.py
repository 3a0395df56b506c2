"""Rendering nodes: identity + motion → frames (IMAGE), or streamed straight into an MP4."""
from __future__ import annotations

import logging
import os
import time

import torch

from ..imtalker_core.errors import InputError
from ..imtalker_core.media.face import CropBox
from ..imtalker_core.media.video import BackgroundWriter, VideoWriter
from ..imtalker_core import render_memory
from ..imtalker_core.pipeline import Identity, render_batches
from . import bridge
from .face import PAD_TO_EVEN_INPUT, check_originals, even_canvas, fill_even_padding, paste_into
from .types import CROP, IDENTITY, MOTION, RENDERER, ManagedModel, Motion

log = logging.getLogger(__name__)

BATCH_SIZE_INPUT = ("INT", {
    "default": 0, "min": 0, "max": 64,
    "tooltip": "Frames rendered at once. 0 = auto: 1 on the CPU (the bar and Cancel then act on every frame), "
               "on a GPU as many as its free memory holds (up to 32). Higher is faster until memory runs out."})


def _render_setup(renderer: ManagedModel, motion: Motion, batch_size: int):
    """Load the renderer for `batch_size` frames (0: chosen by `bridge.auto_batch_size`);
    returns (module, progress, batch size)."""
    device = bridge.compute_device()
    # The budgets are measured (imtalker_core.render_memory); on the CPU the nodes render one frame at a
    # time (bridge.auto_batch_size), so the bar and Cancel act on every frame.
    per_frame = render_memory.bytes_per_frame(device, renderer.dtype)
    fixed = render_memory.fixed_bytes(device, renderer.dtype)
    if batch_size == 0:
        batch_size = bridge.auto_batch_size(per_frame, render_memory.MAX_AUTO_BATCH, fixed)
        log.info("IMTalker: rendering %d frame(s) at a time (batch_size 0 = auto)", batch_size)
    module = bridge.ensure_loaded(renderer, memory_required=fixed + batch_size * per_frame)
    return module, bridge.Progress(motion.frames, "rendering frames"), batch_size


#: Share of the machine's memory an IMAGE output may take before Render warns.
IMAGE_MEMORY_SHARE = 0.25


def warn_if_frames_fill_memory(frames: int, height: int, width: int) -> None:
    """Warn (in the UI too) when `frames` float32 RGB frames would take more than `IMAGE_MEMORY_SHARE`
    of the machine's memory: ComfyUI keeps a node's outputs cached after the run."""
    needed = frames * height * width * 3 * 4
    total = bridge.system_memory()
    if total and needed > IMAGE_MEMORY_SHARE * total:
        bridge.notify(f"IMTalker Render: {frames} frames take {needed / 2**30:.1f} GiB as an IMAGE batch, over "
                      f"{IMAGE_MEMORY_SHARE:.0%} of this machine's {total / 2**30:.0f} GiB; IMTalker Render To Video "
                      "streams them into an MP4 in constant memory instead.", logging.WARNING)


class IMTalkerRender:
    """Renders the talking-face frames as an IMAGE batch."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "renderer": (RENDERER, {"tooltip": "From IMTalker Load Renderer."}),
                "identity": (IDENTITY, {"tooltip": "From IMTalker Encode Identity."}),
                "motion": (MOTION, {"tooltip": "From IMTalker Audio To Motion or IMTalker Encode Motion."}),
                "batch_size": BATCH_SIZE_INPUT,
            },
            "optional": {
                "pad_to_even": PAD_TO_EVEN_INPUT,
            },
        }

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("frames",)
    OUTPUT_TOOLTIPS = ("The frames [T, 512, 512, 3] on the CPU (even-sized when pad_to_even is on). For long "
                       "clips use IMTalker Render To Video, which does not keep all frames in memory.",)
    FUNCTION = "render"
    CATEGORY = "IMTalker"
    DESCRIPTION = "Draws the portrait with each frame's motion, a batch at a time."

    def render(self, renderer: ManagedModel, identity: Identity, motion: Motion, batch_size: int,
               pad_to_even: bool = True):
        module, progress, batch_size = _render_setup(renderer, motion, batch_size)
        size = module.cfg.image_size
        warn_if_frames_fill_memory(motion.frames, size, size)
        # Filled in place: concatenating batches would need twice the memory at the end.
        frames = even_canvas(motion.frames, size, size, pad_to_even, "IMTalker Render",
                             device=bridge.intermediate_device())
        done = 0
        for batch in render_batches(module, identity, motion.latents, batch_size=batch_size,
                                    output_device=frames.device, callback=progress,
                                    check_interrupt=bridge.check_interrupt):
            frames[done:done + batch.shape[0], :size, :size] = batch.permute(0, 2, 3, 1)
            progress.preview(frames[done:done + batch.shape[0], :size, :size])
            done += batch.shape[0]
        return (fill_even_padding(frames, size, size),)


class IMTalkerRenderToVideo:
    """Renders and encodes straight into an MP4 (with sound), for clips of any length."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "renderer": (RENDERER, {"tooltip": "From IMTalker Load Renderer."}),
                "identity": (IDENTITY, {"tooltip": "From IMTalker Encode Identity."}),
                "motion": (MOTION, {"tooltip": "From IMTalker Audio To Motion or IMTalker Encode Motion; the "
                                               "video plays at its frame rate."}),
                "filename_prefix": ("STRING", {
                    "default": "IMTalker/talking",
                    "tooltip": "Name of the MP4 in ComfyUI's output folder (may include sub-folders); a counter "
                               "is appended."}),
                "batch_size": BATCH_SIZE_INPUT,
            },
            "optional": {
                "audio": ("AUDIO", {"tooltip": "Sound track to mux (e.g. Audio To Motion's audio); cut to the "
                                               "video's length."}),
                "crop": (CROP, {"tooltip": "With 'original': paste each frame back into the original image "
                                           "while streaming (from IMTalker Crop Face)."}),
                "original": ("IMAGE", {"tooltip": "The image the crop came from (one, or one per frame)."}),
                "feather": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 0.5, "step": 0.01,
                                      "tooltip": "Soft edge of the paste-back, as a fraction of the crop side."}),
            },
        }

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("video_path",)
    OUTPUT_TOOLTIPS = ("Full path of the written MP4 file.",)
    OUTPUT_NODE = True
    FUNCTION = "render"
    CATEGORY = "IMTalker"
    DESCRIPTION = ("Renders a batch of frames at a time and encodes it into an H.264 MP4 in the output folder "
                   "right away, so memory stays flat for long audio. Optionally pastes the face back into "
                   "the original photo and muxes the sound.")

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix):
        return bridge.filename_prefix_problem(filename_prefix)

    def render(self, renderer: ManagedModel, identity: Identity, motion: Motion, filename_prefix: str,
               batch_size: int, audio: dict | None = None, crop: CropBox | None = None,
               original: torch.Tensor | None = None, feather: float = 0.1):
        bridge.check_filename_prefix(filename_prefix)
        if (crop is None) != (original is None):
            raise InputError("IMTalker Render To Video: connect both 'crop' and 'original' to paste the face "
                             "back, or neither")
        if crop is not None:
            original = check_originals(original, crop, motion.frames)
        module, progress, batch_size = _render_setup(renderer, motion, batch_size)
        size = module.cfg.image_size
        width, height = (crop.image_w, crop.image_h) if crop is not None else (size, size)
        path, filename, subfolder = bridge.next_output_path(filename_prefix, "mp4", width, height)
        sound = bridge.audio_waveform(audio) if audio is not None else None
        done, started = 0, time.perf_counter()
        # Encoding on a thread of its own: the next batch renders while this one is encoded.
        with BackgroundWriter(VideoWriter(path, motion.fps, audio=sound)) as writer:
            # Straight into the video, frames leave the device as bytes (a quarter of the copy); pasting back
            # blends in float.
            for batch in render_batches(module, identity, motion.latents, batch_size=batch_size,
                                        output_device="cpu", callback=progress,
                                        check_interrupt=bridge.check_interrupt,
                                        output_dtype=torch.float32 if crop is not None else torch.uint8):
                frames = batch.permute(0, 2, 3, 1)
                if crop is not None:
                    frames = paste_into(frames, crop, original, feather, first_index=done)
                writer.write(frames)
                progress.preview(frames)
                done += batch.shape[0]
        seconds = time.perf_counter() - started
        log.info("IMTalker: wrote %d frames to %s in %.2f s (%.1f ms a frame, rendering and encoding)", done, path,
                 seconds, 1000 * seconds / max(done, 1))
        preview = {"filename": filename, "subfolder": subfolder, "type": "output"}
        return {"ui": {"images": [preview], "animated": (True,)}, "result": (os.path.abspath(path),)}
