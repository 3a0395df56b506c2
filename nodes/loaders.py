"""Loader nodes: the renderer, and the motion generator with its wav2vec2 audio encoder.

Models are read from `ComfyUI/models/imtalker/` (plus any `imtalker:` paths in
`extra_model_paths.yaml`), built on ComfyUI's offload device in the chosen precision, and wrapped
in a `ModelPatcher` so ComfyUI moves them to the GPU when a node needs them and evicts them when
memory is short.
"""
from __future__ import annotations

import logging
from pathlib import Path

from ..imtalker_core import load_generator_and_audio_encoder, load_renderer
from ..imtalker_core import model_files
from ..imtalker_core.compiled import COMPILE_MODES, set_compile
from ..imtalker_core.precision import set_allow_tf32
from . import bridge
from .types import GENERATOR, RENDERER, GeneratorModels

log = logging.getLogger(__name__)

COMPILE_INPUT = (list(COMPILE_MODES), {
    "default": "off",
    "tooltip": "torch.compile the per-frame work (renderer: rendering, and encoding driving frames) or the "
               "sampling steps (generator). The first run of "
               "each batch size compiles (40-80 s on a GPU, minutes on a CPU), later runs are faster. "
               "reduce-overhead also records CUDA graphs and pays most: on an H200 in fp16 a frame takes "
               "2.1 instead of 3.7 ms at batch 32 and 3.6 instead of 15 ms at batch 1, the generator's "
               "steps 0.03 instead of 0.27 s for 10 s of audio. Worth it on a GPU for long clips or many "
               "runs in one session; leave off on the CPU."})


def _set_compile(module, mode: str, node: str) -> None:
    """`compiled.set_compile`, with a notice when it would only cost time: on the CPU compiling takes minutes
    and the compiled renderer measured slower than the eager one (1.66 vs 1.18 s a frame,
    benchmarks/README.md)."""
    set_compile(module, mode)
    if mode != "off" and bridge.compute_device().type == "cpu":
        bridge.notify(f"{node}: compile={mode} on the CPU takes minutes at the first run and is not faster there "
                      "afterwards; set compile to off unless you are measuring it.", logging.WARNING)


PRECISION_TOOLTIP = ("Weight precision. auto: ComfyUI's choice for the device (fp16 on GPUs that support it, "
                     "fp32 on the CPU). fp32 is true float32, the reference's frames. tf32: fp32 weights with "
                     "TF32 math on NVIDIA GPUs, 1.4x faster than fp32 (H200), frames 58.8 dB from the "
                     "reference's. fp16/bf16 halve the memory and are fastest (fp16 54 dB, bf16 44 dB).")


DOWNLOAD_INPUT = ("BOOLEAN", {
    "default": True,
    "tooltip": "If the official file is not in models/imtalker yet, download it once from the authors' "
               "Hugging Face repository (cbsjtu01/IMTalker) before loading. Off: only local files are used."})


def _preferred_first(names: list[str], official: str) -> list[str]:
    """`names` with the official file offered (first) even before it is downloaded, so a shared
    workflow finds its default and the loader can fetch it."""
    names = sorted(set(names) | {official})
    return sorted(names, key=lambda n: (official.split(".")[0] not in n.lower(), n))


def _checkpoint_problem(name: str, download: bool) -> bool | str:
    """True if checkpoint `name` exists or will be downloaded, else the message ComfyUI shows."""
    if download and name in model_files.OFFICIAL_FILES:
        return True
    try:
        bridge.find_checkpoint(name)
    except FileNotFoundError as err:
        return str(err)
    return True


def _has_wav2vec2_weights() -> bool:
    return any((Path(root) / model_files.WAV2VEC2_DIR / f).is_file()
               for root in bridge.model_folders() for f in ("pytorch_model.bin", "model.safetensors"))


def _fetch_if_missing(names: list[str], download: bool) -> None:
    """Download those official `names` that no model folder holds yet (no-op when all exist)."""
    missing = [n for n in names if not any((Path(root) / n).is_file() for root in bridge.model_folders())]
    if download and missing:
        target = bridge.download_folder()
        log.info("IMTalker: downloading %s into %s (first use)", ", ".join(missing), target)
        model_files.fetch(target, missing, progress=bridge.Progress(len(missing), "downloading model files"))


class IMTalkerLoadRenderer:
    """Loads the IMTalker renderer (identity/motion encoders and the image synthesiser)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "renderer_name": (_preferred_first(bridge.list_checkpoints(), model_files.RENDERER_FILE), {
                    "tooltip": "Renderer checkpoint in models/imtalker (official: renderer.ckpt, or a "
                               ".safetensors converted from it)."}),
                "precision": (list(bridge.PRECISIONS), {"default": "auto", "tooltip": PRECISION_TOOLTIP}),
            },
            "optional": {"download_if_missing": DOWNLOAD_INPUT, "compile": COMPILE_INPUT},
        }

    RETURN_TYPES = (RENDERER,)
    RETURN_NAMES = ("renderer",)
    OUTPUT_TOOLTIPS = ("The renderer, managed by ComfyUI (moved to the GPU only while a node uses it).",)
    FUNCTION = "load"
    CATEGORY = "IMTalker/loaders"
    DESCRIPTION = ("Loads the IMTalker renderer from models/imtalker. It encodes the portrait and driving frames "
                   "and draws the talking-face frames. " + bridge.OFFICIAL_FILES_HELP)

    @classmethod
    def VALIDATE_INPUTS(cls, renderer_name, download_if_missing=True):
        return _checkpoint_problem(renderer_name, download_if_missing)

    def load(self, renderer_name: str, precision: str, download_if_missing: bool = True, compile: str = "off"):
        _fetch_if_missing([renderer_name] if renderer_name == model_files.RENDERER_FILE else [], download_if_missing)
        path = bridge.find_checkpoint(renderer_name)
        dtype = bridge.choose_dtype(precision, bridge.compute_device())
        log.info("loading IMTalker renderer %s as %s", path, dtype)
        module = load_renderer(path, device=bridge.offload_device(), dtype=dtype)
        _set_compile(module, compile, "IMTalker Load Renderer")
        set_allow_tf32(module, precision == "tf32")
        return (bridge.manage_model(module, renderer_name, dtype),)


class IMTalkerLoadGenerator:
    """Loads the flow-matching motion generator and the wav2vec2 audio encoder it listens with."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "generator_name": (_preferred_first(bridge.list_checkpoints(), model_files.GENERATOR_FILE), {
                    "tooltip": "Motion generator checkpoint in models/imtalker (official: generator.ckpt)."}),
                "wav2vec2_folder": (sorted(set(bridge.list_wav2vec2_folders()) | {model_files.WAV2VEC2_DIR}), {
                    "tooltip": "Folder in models/imtalker holding wav2vec2-base-960h (config.json, "
                               "preprocessor_config.json, pytorch_model.bin)."}),
                "precision": (list(bridge.PRECISIONS), {"default": "auto", "tooltip": PRECISION_TOOLTIP}),
                "use_ema": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Use the checkpoint's EMA (averaged) generator weights instead of the trained ones. "
                               "The reference uses the trained weights (off)."}),
            },
            "optional": {"download_if_missing": DOWNLOAD_INPUT, "compile": COMPILE_INPUT},
        }

    RETURN_TYPES = (GENERATOR,)
    RETURN_NAMES = ("generator",)
    OUTPUT_TOOLTIPS = ("The motion generator and its audio encoder, managed by ComfyUI.",)
    FUNCTION = "load"
    CATEGORY = "IMTalker/loaders"
    DESCRIPTION = ("Loads the IMTalker motion generator (audio → head and lip motion) and the wav2vec2 audio "
                   "encoder from models/imtalker. " + bridge.OFFICIAL_FILES_HELP)

    @classmethod
    def VALIDATE_INPUTS(cls, generator_name, wav2vec2_folder, download_if_missing=True):
        problem = _checkpoint_problem(generator_name, download_if_missing)
        if problem is not True:
            return problem
        if download_if_missing and wav2vec2_folder == model_files.WAV2VEC2_DIR:
            return True
        try:
            bridge.find_wav2vec2_folder(wav2vec2_folder)
        except FileNotFoundError as err:
            return str(err)
        return True

    def load(self, generator_name: str, wav2vec2_folder: str, precision: str, use_ema: bool,
             download_if_missing: bool = True, compile: str = "off"):
        official = [generator_name] if generator_name == model_files.GENERATOR_FILE else []
        if wav2vec2_folder == model_files.WAV2VEC2_DIR:
            official += [f"{model_files.WAV2VEC2_DIR}/{f}" for f in ("config.json", "preprocessor_config.json")]
            if not _has_wav2vec2_weights():
                official.append(f"{model_files.WAV2VEC2_DIR}/pytorch_model.bin")
        _fetch_if_missing(official, download_if_missing)
        path = bridge.find_checkpoint(generator_name)
        folder = bridge.find_wav2vec2_folder(wav2vec2_folder)
        dtype = bridge.choose_dtype(precision, bridge.compute_device())
        log.info("loading IMTalker generator %s%s and wav2vec2 %s as %s", path, " (EMA)" if use_ema else "",
                 folder, dtype)
        # One read of the generator file; its wav2vec2 copy (if any) replaces the folder's weights.
        generator, encoder = load_generator_and_audio_encoder(path, folder, device=bridge.offload_device(),
                                                              dtype=dtype, use_ema=use_ema)
        _set_compile(generator, compile, "IMTalker Load Generator")
        for model in (generator, encoder):
            set_allow_tf32(model, precision == "tf32")
        return (GeneratorModels(bridge.manage_model(generator, generator_name, dtype),
                                bridge.manage_model(encoder, wav2vec2_folder, dtype)),)
