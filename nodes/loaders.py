"""Loader nodes: the renderer, and the motion generator with its wav2vec2 audio encoder.

Models are read from `ComfyUI/models/imtalker/` (plus any `imtalker:` paths in
`extra_model_paths.yaml`), built on ComfyUI's offload device in the chosen precision, and wrapped
in a `ModelPatcher` so ComfyUI moves them to the GPU when a node needs them and evicts them when
memory is short.
"""
from __future__ import annotations

import logging

from ..imtalker_core import load_audio_encoder, load_generator, load_renderer
from . import bridge
from .types import GENERATOR, RENDERER, GeneratorModels

log = logging.getLogger(__name__)

PRECISION_TOOLTIP = ("Weight precision. auto: ComfyUI's choice for the device (fp16 on GPUs that support it, "
                     "fp32 on the CPU). fp32 is the reference precision; fp16/bf16 halve the memory.")


def _preferred_first(names: list[str], hint: str) -> list[str]:
    """`names` with those containing `hint` first, so the dropdown's default is the likely file."""
    return sorted(names, key=lambda n: (hint not in n.lower(), n))


def _checkpoint_problem(name: str) -> bool | str:
    """True if checkpoint `name` exists, else the message ComfyUI shows before running."""
    try:
        bridge.find_checkpoint(name)
    except FileNotFoundError as err:
        return str(err)
    return True


class IMTalkerLoadRenderer:
    """Loads the IMTalker renderer (identity/motion encoders and the image synthesiser)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "renderer_name": (_preferred_first(bridge.list_checkpoints(), "renderer"), {
                    "tooltip": "Renderer checkpoint in models/imtalker (official: renderer.ckpt, or a "
                               ".safetensors converted from it)."}),
                "precision": (list(bridge.PRECISIONS), {"default": "auto", "tooltip": PRECISION_TOOLTIP}),
            }
        }

    RETURN_TYPES = (RENDERER,)
    RETURN_NAMES = ("renderer",)
    OUTPUT_TOOLTIPS = ("The renderer, managed by ComfyUI (moved to the GPU only while a node uses it).",)
    FUNCTION = "load"
    CATEGORY = "IMTalker/loaders"
    DESCRIPTION = ("Loads the IMTalker renderer from models/imtalker. It encodes the portrait and driving frames "
                   "and draws the talking-face frames. " + bridge.OFFICIAL_FILES_HELP)

    @classmethod
    def VALIDATE_INPUTS(cls, renderer_name):
        return _checkpoint_problem(renderer_name)

    def load(self, renderer_name: str, precision: str):
        path = bridge.find_checkpoint(renderer_name)
        dtype = bridge.choose_dtype(precision, bridge.compute_device())
        log.info("loading IMTalker renderer %s as %s", path, dtype)
        module = load_renderer(path, device=bridge.offload_device(), dtype=dtype)
        return (bridge.manage_model(module, renderer_name, dtype),)


class IMTalkerLoadGenerator:
    """Loads the flow-matching motion generator and the wav2vec2 audio encoder it listens with."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "generator_name": (_preferred_first(bridge.list_checkpoints(), "generator"), {
                    "tooltip": "Motion generator checkpoint in models/imtalker (official: generator.ckpt)."}),
                "wav2vec2_folder": (bridge.list_wav2vec2_folders(), {
                    "tooltip": "Folder in models/imtalker holding wav2vec2-base-960h (config.json, "
                               "preprocessor_config.json, pytorch_model.bin)."}),
                "precision": (list(bridge.PRECISIONS), {"default": "auto", "tooltip": PRECISION_TOOLTIP}),
                "use_ema": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Use the checkpoint's EMA (averaged) generator weights instead of the trained ones. "
                               "The reference uses the trained weights (off)."}),
            }
        }

    RETURN_TYPES = (GENERATOR,)
    RETURN_NAMES = ("generator",)
    OUTPUT_TOOLTIPS = ("The motion generator and its audio encoder, managed by ComfyUI.",)
    FUNCTION = "load"
    CATEGORY = "IMTalker/loaders"
    DESCRIPTION = ("Loads the IMTalker motion generator (audio → head and lip motion) and the wav2vec2 audio "
                   "encoder from models/imtalker. " + bridge.OFFICIAL_FILES_HELP)

    @classmethod
    def VALIDATE_INPUTS(cls, generator_name, wav2vec2_folder):
        problem = _checkpoint_problem(generator_name)
        if problem is not True:
            return problem
        try:
            bridge.find_wav2vec2_folder(wav2vec2_folder)
        except FileNotFoundError as err:
            return str(err)
        return True

    def load(self, generator_name: str, wav2vec2_folder: str, precision: str, use_ema: bool):
        path = bridge.find_checkpoint(generator_name)
        folder = bridge.find_wav2vec2_folder(wav2vec2_folder)
        dtype = bridge.choose_dtype(precision, bridge.compute_device())
        log.info("loading IMTalker generator %s%s and wav2vec2 %s as %s", path, " (EMA)" if use_ema else "",
                 folder, dtype)
        generator = load_generator(path, device=bridge.offload_device(), dtype=dtype, use_ema=use_ema)
        encoder = load_audio_encoder(folder, device=bridge.offload_device(), dtype=dtype)
        return (GeneratorModels(bridge.manage_model(generator, generator_name, dtype),
                                bridge.manage_model(encoder, wav2vec2_folder, dtype)),)
