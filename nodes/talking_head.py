"""One node for the whole audio-driven path: a portrait + speech → frames, or an MP4 streamed to disk.

It chains the same calls as the composable nodes (Crop Face → Encode Identity → Audio To Motion →
Render / Render To Video, with the paste-back into the photo) and adds no model logic of its own:
the identity and the motion come from those nodes' own methods, the frames from
`imtalker_core.render_batches` a batch at a time, pasted and written as they arrive.
"""
from __future__ import annotations

import logging
import os

import torch

from ..imtalker_core.errors import InputError
from ..imtalker_core.media.face import crop_face
from ..imtalker_core.media.video import BackgroundWriter, VideoWriter
from ..imtalker_core.pipeline import render_batches
from . import bridge
from .encode import IMTalkerEncodeIdentity
from .face import CROP_SIZE, check_originals, paste_into
from .generate import IMTalkerAudioToMotion
from .render import BATCH_SIZE_INPUT, _render_setup
from .types import GENERATOR, RENDERER, Controls, GeneratorModels, ManagedModel

log = logging.getLogger(__name__)

OUTPUTS = ("mp4", "frames")
CROP_SCALE = 1.6  # Crop Face's default: the reference's square of 1.6× the detected face
FEATHER = 0.1  # Paste Back's default soft edge, as a fraction of the crop side
NO_FACE_HINT = "turn 'crop' off to animate the image as it is, or crop the photo around the face yourself"


class IMTalkerTalkingHead:
    """Portrait + speech → talking-head frames or MP4, in one node."""

    @classmethod
    def INPUT_TYPES(cls):
        # The generation widgets are Audio To Motion's own, so ranges, defaults and tooltips stay the same.
        motion = IMTalkerAudioToMotion.INPUT_TYPES()
        generation = {name: motion["required"][name] for name in ("seed", "steps", "cfg_scale", "noise")}
        return {
            "required": {
                "renderer": (RENDERER, {"tooltip": "From IMTalker Load Renderer."}),
                "generator": (GENERATOR, {"tooltip": "From IMTalker Load Generator."}),
                "image": ("IMAGE", {
                    "tooltip": "The portrait to animate (one face, looking at the camera). Only the first image of "
                               "a batch is used."}),
                "audio": ("AUDIO", {
                    "tooltip": "Speech to lip-sync (any sample rate or channel count). One video frame per 40 ms; "
                               "the MP4 and the audio output carry this audio as given, cut or padded with "
                               "silence to the video's length."}),
                **generation,
                "crop": ("BOOLEAN", {
                    "default": True,
                    "tooltip": "On: find the face, animate a 512×512 crop and paste it back into the full photo "
                               "(the video has the photo's size). Off: the image goes to the renderer as it is, as "
                               "IMTalker Encode Identity takes it (for an image that is already a face crop; the "
                               "video is 512×512)."}),
                "batch_size": BATCH_SIZE_INPUT,
                "output": (list(OUTPUTS), {
                    "default": "mp4",
                    "tooltip": "mp4: frames are encoded into an MP4 with the audio in the output folder as they are "
                               "rendered, so memory stays flat for any length (the node shows the video). frames: "
                               "all frames as an IMAGE batch, for further processing (memory grows with length)."}),
                "filename_prefix": ("STRING", {
                    "default": "IMTalker/talking_head",
                    "tooltip": "Name of the MP4 in ComfyUI's output folder (may include sub-folders); a counter is "
                               "appended. Used when output is mp4."}),
            },
            "optional": {
                "controls": motion["optional"]["controls"],
            },
        }

    RETURN_TYPES = ("IMAGE", "AUDIO", "FLOAT", "STRING")
    RETURN_NAMES = ("frames", "audio", "fps", "video_path")
    OUTPUT_TOOLTIPS = (
        ("output=frames: every frame [T, H, W, 3] (the photo's size with crop on, else 512×512). output=mp4: only "
         "the first frame, as a poster."),
        "Your audio as given (its sample rate and channels), cut or padded with silence to the video's length.",
        "The video frame rate (25).",
        "output=mp4: full path of the written MP4; output=frames: empty.",
    )
    OUTPUT_NODE = True
    FUNCTION = "run"
    CATEGORY = "IMTalker"
    DESCRIPTION = ("The whole audio-driven pipeline in one node: crops the face, encodes the portrait, generates "
                   "head and lip motion from the speech, renders it and pastes it back into the photo, then "
                   "streams it into an MP4 with your audio (or returns the frames). The composable IMTalker "
                   "nodes do the same steps one by one.")

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix):
        return bridge.filename_prefix_problem(filename_prefix)

    def run(self, renderer: ManagedModel, generator: GeneratorModels, image: torch.Tensor, audio: dict, seed: int,
            steps: int, cfg_scale: float, noise: str, crop: bool, batch_size: int, output: str,
            filename_prefix: str, controls: Controls | None = None):
        # Every check that needs no model first, so a mistake costs no model time.
        if output not in OUTPUTS:
            raise InputError(f"output must be one of {', '.join(OUTPUTS)}, not {output!r}")
        if output == "mp4":
            bridge.check_filename_prefix(filename_prefix)
        bridge.audio_waveform(audio)
        photos = bridge.image_batch(image, "image").cpu()
        if photos.shape[0] > 1:
            log.info("IMTalker Talking Head got %d images; using the first", photos.shape[0])
        photo = photos[:1]
        if crop:
            face, box = crop_face(photo[0], scale=CROP_SCALE, size=CROP_SIZE, on_no_face="error",
                                  no_face_hint=NO_FACE_HINT)
            source, original = face[None].float().contiguous(), check_originals(photo, box, 1)
        else:
            source, box, original = photo, None, None

        bridge.check_interrupt()
        (identity,) = IMTalkerEncodeIdentity().encode(renderer, source)
        bridge.check_interrupt()
        motion, sound, fps = IMTalkerAudioToMotion().generate(generator, identity, audio, seed=seed, steps=steps,
                                                              cfg_scale=cfg_scale, noise=noise, controls=controls)
        bridge.check_interrupt()

        module, progress, batch_size = _render_setup(renderer, motion, batch_size)
        size = module.cfg.image_size
        height, width = (box.image_h, box.image_w) if box is not None else (size, size)
        batches = render_batches(module, identity, motion.latents, batch_size=batch_size, output_device="cpu",
                                 callback=progress, check_interrupt=bridge.check_interrupt)

        def finished(batch: torch.Tensor, first_index: int) -> torch.Tensor:
            frames = batch.permute(0, 2, 3, 1)
            return frames if box is None else paste_into(frames, box, original, FEATHER, first_index=first_index)

        done = 0
        if output == "frames":
            # Filled in place, batch by batch: no second copy of the clip at the end.
            out = torch.empty(motion.frames, height, width, 3, dtype=torch.float32,
                              device=bridge.intermediate_device())
            for batch in batches:
                out[done:done + batch.shape[0]] = finished(batch, done)
                progress.preview(out[done:done + batch.shape[0]])
                done += batch.shape[0]
            return (out, sound, fps, "")

        path, filename, subfolder = bridge.next_output_path(filename_prefix, "mp4", width, height)
        poster = None
        # Encoding on a thread of its own: the next batch renders while this one is encoded.
        with BackgroundWriter(VideoWriter(path, motion.fps, audio=bridge.audio_waveform(sound))) as writer:
            for batch in batches:
                frames = finished(batch, done)
                writer.write(frames)
                progress.preview(frames)
                if poster is None:
                    poster = frames[:1].clone()
                done += batch.shape[0]
        log.info("IMTalker Talking Head: wrote %d frames to %s", done, path)
        preview = {"filename": filename, "subfolder": subfolder, "type": "output"}
        return {"ui": {"images": [preview], "animated": (True,)},
                "result": (poster.to(bridge.intermediate_device()), sound, fps, os.path.abspath(path))}
