"""The only module of the pack that talks to ComfyUI.

Everything ComfyUI-specific goes through here: the `models/imtalker` folder (via `folder_paths`),
devices and dtypes (`comfy.model_management`), model offloading (`comfy.model_patcher`), the
progress bar (`comfy.utils.ProgressBar`), cancellation, the output folder, and the conversions
between ComfyUI's IMAGE/AUDIO values and what `imtalker_core` expects.

Running outside ComfyUI (unit tests, scripts) is a *standalone mode* with explicit fallbacks:
compute on the CPU, no progress bar, no cancellation, the command line's model folders (`$IMTALKER_MODELS`,
several separated by the path separator, else `model_files.default_models_dir()`) and outputs under
`IMTALKER_OUTPUT_DIR` (default `./output`). The mode is
chosen once: if ComfyUI's modules are already loaded (we are inside a ComfyUI process), a failure
to import them is an error, never a silent fallback. Standalone mode is logged once at WARNING.

ComfyUI modules are imported inside functions so that importing this package never needs them.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..imtalker_core import render_memory
from ..imtalker_core.errors import InputError
from ..imtalker_core.model_files import MODELS_ENV, default_models_dir
from ..imtalker_core.precision import PRECISION_DTYPES
from .types import ManagedModel

log = logging.getLogger(__name__)

MODEL_FOLDER_KEY = "imtalker"
CHECKPOINT_EXTENSIONS = (".ckpt", ".pt", ".pth", ".safetensors")
WAV2VEC2_MARKER = "config.json"
OUTPUT_ENV = "IMTALKER_OUTPUT_DIR"
PRECISIONS = ("auto", *PRECISION_DTYPES)
OFFICIAL_FILES_HELP = (
    "Download the official IMTalker files from https://huggingface.co/cbsjtu01/IMTalker into "
    "ComfyUI/models/imtalker/: renderer.ckpt, generator.ckpt and the folder wav2vec2-base-960h/ with "
    "config.json, pytorch_model.bin and preprocessor_config.json (then refresh the browser page).")

_standalone_logged = False


class ComfyUnavailableError(RuntimeError):
    """ComfyUI's modules are loaded in this process but one of them could not be imported."""


# --------------------------------------------------------------------------------------------
# Mode detection and imports
# --------------------------------------------------------------------------------------------

def inside_comfyui() -> bool:
    """True when this process is a ComfyUI server (its `folder_paths` and `comfy` are loaded).

    Custom nodes are imported by ComfyUI after it has imported both, so their presence in
    `sys.modules` is what tells the two modes apart.
    """
    return "folder_paths" in sys.modules and "comfy.model_management" in sys.modules


def _comfy(module_name: str) -> Any | None:
    """ComfyUI module `module_name`, or None in standalone mode (logged once).

    Inside ComfyUI an import failure raises `ComfyUnavailableError`, so a broken install is
    reported instead of silently running on the CPU without progress or cancellation.
    """
    global _standalone_logged
    if not inside_comfyui():
        if not _standalone_logged:
            _standalone_logged = True
            log.warning("ComfyUI is not loaded: IMTalker nodes run standalone (CPU, no progress bar, "
                        "no cancellation, models from $%s)", MODELS_ENV)
        return None
    import importlib
    try:
        return importlib.import_module(module_name)
    except ImportError as err:
        raise ComfyUnavailableError(f"IMTalker could not import ComfyUI's {module_name}: {err}. "
                                    "Update ComfyUI (tested with 0.3.64).") from err


# --------------------------------------------------------------------------------------------
# Model folders
# --------------------------------------------------------------------------------------------

def register_model_folder() -> None:
    """Register `models/imtalker` with ComfyUI (no-op standalone). Safe to call repeatedly.

    Paths that `extra_model_paths.yaml` added under the `imtalker` key before us are kept (ComfyUI
    creates such keys with an empty extension set, which would list every file), and only
    checkpoint extensions are listed.
    """
    folder_paths = _comfy("folder_paths")
    if folder_paths is None:
        return
    default = os.path.join(folder_paths.models_dir, MODEL_FOLDER_KEY)
    paths = list(folder_paths.folder_names_and_paths.get(MODEL_FOLDER_KEY, ([], set()))[0])
    if default not in paths:
        paths.insert(0, default)
    folder_paths.folder_names_and_paths[MODEL_FOLDER_KEY] = (paths, set(CHECKPOINT_EXTENSIONS))


def model_folders() -> list[str]:
    """The folders searched for IMTalker models, in priority order."""
    folder_paths = _comfy("folder_paths")
    if folder_paths is not None:
        if MODEL_FOLDER_KEY not in folder_paths.folder_names_and_paths:
            register_model_folder()  # the pack's import normally did this already
        return folder_paths.get_folder_paths(MODEL_FOLDER_KEY)
    return [p for p in os.environ.get(MODELS_ENV, "").split(os.pathsep) if p] or [str(default_models_dir())]


def download_folder() -> str:
    """Where first-use downloads go: the first IMTalker model folder (ComfyUI's models/imtalker)."""
    folders = model_folders()
    if not folders:
        raise FileNotFoundError(f"no IMTalker model folder to download into; set ${MODELS_ENV} outside ComfyUI")
    return folders[0]


def _wav2vec2_dirs(root: str) -> list[str]:
    """Sub-folders of `root` (relative, '/'-separated, up to two levels) holding a config.json."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        rel = os.path.relpath(dirpath, root)
        if rel != "." and WAV2VEC2_MARKER in filenames:
            found.append(rel.replace(os.sep, "/"))
            dirnames.clear()  # a Hugging Face folder's own sub-folders are not further models
        elif rel.count(os.sep) >= 1:
            dirnames.clear()
        dirnames.sort()
    return found


def list_checkpoints() -> list[str]:
    """Checkpoint files under the model folders (relative names), excluding wav2vec2 folders.

    Only `.ckpt/.pt/.pth/.safetensors`; a wav2vec2 folder's `model.safetensors` is not offered.
    """
    names: set[str] = set()
    for root in model_folders():
        if not os.path.isdir(root):
            continue
        skip = tuple(d + "/" for d in _wav2vec2_dirs(root))
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames.sort()
            for filename in filenames:
                if not filename.lower().endswith(CHECKPOINT_EXTENSIONS):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, filename), root).replace(os.sep, "/")
                if not rel.startswith(skip):
                    names.add(rel)
    return sorted(names)


def list_wav2vec2_folders() -> list[str]:
    """wav2vec2 folders (sub-folders holding a config.json) under the model folders."""
    names: set[str] = set()
    for root in model_folders():
        if os.path.isdir(root):
            names.update(_wav2vec2_dirs(root))
    return sorted(names)


def _missing_model_message(what: str, name: str) -> str:
    searched = ", ".join(model_folders()) or f"(none: set ${MODELS_ENV} outside ComfyUI)"
    return f"IMTalker {what} '{name}' was not found in the model folders ({searched}). {OFFICIAL_FILES_HELP}"


def inside_folder(root: str, name: str) -> str | None:
    """`root/name` if it stays inside `root` (names come from the prompt and may be edited)."""
    root = os.path.abspath(root)
    path = os.path.abspath(os.path.join(root, name))
    return path if os.path.commonpath((root, path)) == root else None


def find_checkpoint(name: str) -> str:
    """Full path of checkpoint `name` (as listed by `list_checkpoints`); FileNotFoundError if absent."""
    for root in model_folders():
        path = inside_folder(root, name)
        if path is not None and os.path.isfile(path):
            return path
    raise FileNotFoundError(_missing_model_message("model file", name))


def find_wav2vec2_folder(name: str) -> str:
    """Full path of wav2vec2 folder `name`; FileNotFoundError if absent or lacking config.json."""
    for root in model_folders():
        path = inside_folder(root, name)
        if path is not None and os.path.isfile(os.path.join(path, WAV2VEC2_MARKER)):
            return path
    raise FileNotFoundError(_missing_model_message("wav2vec2 folder", name))


# --------------------------------------------------------------------------------------------
# Devices, dtypes and model management
# --------------------------------------------------------------------------------------------

def system_memory() -> int:
    """Total physical memory of this machine in bytes (0 if unknown)."""
    try:
        import psutil
        return int(psutil.virtual_memory().total)
    except ImportError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def auto_batch_size(bytes_per_frame: int, cap: int, fixed_bytes: int = 0) -> int:
    """Frames to render at once when the user left it to us: 1 on a CPU (progress and Cancel per
    frame, and no speed to gain), else what 80 % of the device's free memory holds after `fixed_bytes`
    (workspaces needed at any batch size), 1 to `cap`."""
    device = compute_device()
    mm = _comfy("comfy.model_management")
    if device.type == "cpu" or mm is None:
        return 1
    return render_memory.batch_that_fits(int(mm.get_free_memory(device)), bytes_per_frame, fixed_bytes, cap)


def compute_device() -> torch.device:
    """Where models run: ComfyUI's torch device (honours --cpu etc.); the CPU standalone."""
    mm = _comfy("comfy.model_management")
    return mm.get_torch_device() if mm is not None else torch.device("cpu")


def offload_device() -> torch.device:
    """Where idle models wait: ComfyUI's offload device; the CPU standalone."""
    mm = _comfy("comfy.model_management")
    return mm.unet_offload_device() if mm is not None else torch.device("cpu")


def intermediate_device() -> torch.device:
    """Where node outputs (IMAGE, AUDIO, motion) live: the CPU unless ComfyUI runs --gpu-only."""
    mm = _comfy("comfy.model_management")
    return mm.intermediate_device() if mm is not None else torch.device("cpu")


def choose_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The weight dtype for `precision` ('auto' | 'fp32' | 'tf32' | 'fp16' | 'bf16') on `device` ('tf32':
    float32 weights; the loaders let them use TF32, `precision.set_allow_tf32`).

    'auto' is ComfyUI's choice for the device: fp16 where `should_use_fp16` says it is
    supported and fast (CUDA, MPS, ...), otherwise fp32 (always on the CPU).
    """
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision != "auto":
        dtype = PRECISION_DTYPES[precision]
        if device.type == "cpu" and dtype != torch.float32:
            log.warning("%s weights on the CPU are slow and may be unsupported; fp32 is recommended", precision)
        return dtype
    mm = _comfy("comfy.model_management")
    if mm is not None and mm.should_use_fp16(device):
        return torch.float16
    return torch.float32


def manage_model(module: torch.nn.Module, name: str, dtype: torch.dtype) -> ManagedModel:
    """Wrap a freshly loaded module (on the offload device) so ComfyUI can move and evict it."""
    model_patcher = _comfy("comfy.model_patcher")
    if model_patcher is None:
        return ManagedModel(module, None, name, dtype)
    patcher = model_patcher.ModelPatcher(module, load_device=compute_device(), offload_device=offload_device())
    return ManagedModel(module, patcher, name, dtype)


def ensure_loaded(model: ManagedModel, memory_required: int = 0) -> torch.nn.Module:
    """Move `model` to its compute device through ComfyUI's model management; returns the module.

    Call right before each use: another node may have evicted it since. `memory_required` is an
    estimate of activation memory in bytes, so ComfyUI frees that much too. The load is full
    (`force_full_load`) because the modules are plain torch layers, which cannot run partly
    offloaded the way `comfy.ops` layers can.
    """
    if model.patcher is None:
        return model.module
    mm = _comfy("comfy.model_management")
    mm.load_models_gpu([model.patcher], memory_required=int(memory_required), force_full_load=True)
    return model.patcher.model


# --------------------------------------------------------------------------------------------
# Progress and cancellation
# --------------------------------------------------------------------------------------------

#: Seconds between two frame previews on a node: the first frame at once, then about two a second, so that
#: making the JPEG (a few milliseconds) never slows a fast GPU run.
PREVIEW_INTERVAL_S = 0.5
#: Longest side of a frame preview, as ComfyUI's sampler previews (its `--preview-size` default).
PREVIEW_SIZE = 512


class Progress:
    """`callback(done, total)` for `imtalker_core`, shown as ComfyUI's node progress bar, and `preview`
    for the frames made so far.

    Standalone it only logs at DEBUG. Inside ComfyUI every update is also a cancel point
    (ComfyUI's progress hook checks for interruption).
    """

    def __init__(self, total: int, what: str):
        self.what = what
        utils = _comfy("comfy.utils")
        self._total = max(int(total), 1)
        self._done = 0
        self._bar = utils.ProgressBar(self._total) if utils is not None else None
        self._previewed_at: float | None = None

    def __call__(self, done: int, total: int) -> None:
        self._done, self._total = int(done), int(total)
        if self._bar is not None:
            self._bar.update_absolute(self._done, self._total)
        else:
            log.debug("%s: %d/%d", self.what, done, total)

    def preview(self, frames: torch.Tensor) -> None:
        """Show the newest of `frames` (`[b, H, W, 3]`, float in [0, 1] or uint8, on any device) on the node,
        as ComfyUI shows a sampler's previews: the first call's at once, then at most one every
        `PREVIEW_INTERVAL_S`. A no-op standalone."""
        if self._bar is None or frames.shape[0] == 0:
            return
        now = time.perf_counter()
        if self._previewed_at is not None and now - self._previewed_at < PREVIEW_INTERVAL_S:
            return
        self._previewed_at = now
        self._bar.update_absolute(self._done, self._total, ("JPEG", preview_image(frames[-1]), PREVIEW_SIZE))


def preview_image(frame: torch.Tensor):
    """One frame `[H, W, 3]` (float in [0, 1] or uint8, any device) as a PIL RGB image whose longest side is
    at most `PREVIEW_SIZE` (a pasted-back photo shrunk on its device first, so only the preview's pixels
    are converted and copied)."""
    from PIL import Image

    from ..imtalker_core.media.images import to_uint8

    height, width = frame.shape[:2]
    scale = PREVIEW_SIZE / max(height, width)
    if scale < 1:
        pixels = frame.detach().permute(2, 0, 1)[None].float()
        if frame.dtype == torch.uint8:
            pixels = pixels / 255
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        frame = torch.nn.functional.interpolate(pixels, size=size, mode="bilinear", antialias=True,
                                                align_corners=False)[0].permute(1, 2, 0)
    return Image.fromarray(to_uint8(frame if frame.dtype == torch.uint8 else frame.float()))


def check_interrupt() -> None:
    """Raise ComfyUI's interruption exception if the user pressed Cancel (no-op standalone)."""
    mm = _comfy("comfy.model_management")
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()


# --------------------------------------------------------------------------------------------
# Output folder
# --------------------------------------------------------------------------------------------

def output_directory() -> str:
    """ComfyUI's output folder; standalone `$IMTALKER_OUTPUT_DIR` or `./output`."""
    folder_paths = _comfy("folder_paths")
    if folder_paths is not None:
        return folder_paths.get_output_directory()
    return os.path.abspath(os.environ.get(OUTPUT_ENV, "output"))


def input_directory() -> str | None:
    """ComfyUI's input folder (what LoadImage/LoadAudio/LoadVideo read); None standalone."""
    folder_paths = _comfy("folder_paths")
    return folder_paths.get_input_directory() if folder_paths is not None else None


def check_filename_prefix(filename_prefix: str) -> None:
    """A prefix must name a file: not empty, and not ending in a folder separator or a dot."""
    name = os.path.basename(filename_prefix.strip().replace("\\", "/").rstrip())
    if not name or name in (".", "..") or filename_prefix.strip().endswith(("/", "\\")):
        raise InputError(f"filename_prefix {filename_prefix!r} names no file; give a name such as "
                         "'IMTalker/talking' (sub-folders allowed)")


def filename_prefix_problem(filename_prefix: str) -> bool | str:
    """For `VALIDATE_INPUTS`: True when the prefix names a file, else the message ComfyUI shows."""
    try:
        check_filename_prefix(filename_prefix)
    except InputError as err:
        return str(err)
    return True


def next_output_path(filename_prefix: str, extension: str, width: int = 0, height: int = 0
                     ) -> tuple[str, str, str]:
    """A new `(full_path, filename, subfolder)` in the output folder, numbered like SaveVideo.

    `filename_prefix` may hold sub-folders and ComfyUI's %date% style variables; escaping the
    output folder is refused.
    """
    check_filename_prefix(filename_prefix)
    folder_paths = _comfy("folder_paths")
    out_dir = output_directory()
    if folder_paths is not None:
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, out_dir, width, height)
    else:
        subfolder = os.path.dirname(os.path.normpath(filename_prefix))
        name = os.path.basename(os.path.normpath(filename_prefix))
        folder = os.path.abspath(os.path.join(out_dir, subfolder))
        if os.path.commonpath((out_dir, folder)) != out_dir:
            raise InputError(f"filename_prefix {filename_prefix!r} points outside the output folder")
        os.makedirs(folder, exist_ok=True)
        counter = 1 + sum(1 for f in os.listdir(folder) if f.startswith(name + "_"))
    os.makedirs(folder, exist_ok=True)
    filename = f"{name}_{counter:05}_.{extension}"
    return os.path.join(folder, filename), filename, subfolder


# --------------------------------------------------------------------------------------------
# Input videos (IMTalker Video To Motion)
# --------------------------------------------------------------------------------------------

INPUT_ENV = "IMTALKER_INPUT_DIR"
# Listed even where the system's MIME table lacks them (LoadVideo lists by MIME type only).
VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".wmv",
                              ".flv", ".ts", ".mts", ".m2ts", ".3gp"})


def video_input_folder() -> str | None:
    """Where driving videos are listed from: ComfyUI's input folder; standalone `$IMTALKER_INPUT_DIR`
    (None when unset)."""
    root = input_directory() or os.environ.get(INPUT_ENV) or None
    return os.path.abspath(root) if root else None


def _is_video_file(name: str) -> bool:
    import mimetypes

    if name.startswith("."):
        return False
    if os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS:
        return True
    mime, _ = mimetypes.guess_type(name, strict=False)
    return bool(mime and mime.startswith("video/"))


def list_files(root: str | None, accept: Callable[[str], bool]) -> list[str]:
    """Files of `root` whose names `accept` takes, and those of its sub-folders one level down ('sub/name'),
    sorted; hidden entries skipped. Empty when `root` is None or no folder."""
    if root is None or not os.path.isdir(root):
        return []
    names = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            if entry.is_file() and accept(entry.name):
                names.append(entry.name)
            elif entry.is_dir():
                names.extend(f"{entry.name}/{sub.name}" for sub in os.scandir(entry.path)
                             if sub.is_file() and not sub.name.startswith(".") and accept(sub.name))
        except OSError:  # an unreadable sub-folder does not hide the rest
            continue
    return sorted(names)


def list_input_videos() -> list[str]:
    """Video files in the input folder and in its sub-folders one level down ('sub/name.mp4'), sorted.

    Like core Load Video's list (by file type), plus one level of sub-folders so that e.g.
    `imtalker_examples/driving_short.mp4` is offered. Empty when there is no input folder.
    """
    return list_files(video_input_folder(), _is_video_file)


def given_path(path: str, name: str, error: type[Exception] = InputError) -> str | None:
    """The file a node's path widget names: None when it is empty; else absolute, or relative to the input
    folder. `error` naming the widget `name` when it is not a file."""
    given = (path or "").strip().strip('"')
    if not given:
        return None
    given = os.path.expanduser(given)
    if not os.path.isabs(given):
        folder = video_input_folder()
        given = os.path.join(folder, given) if folder else os.path.abspath(given)
    if not os.path.isfile(given):
        raise error(f"{name} '{path}' is not a file")
    return given


def file_state(resolve: Callable[[], str]) -> str | float:
    """IS_CHANGED of a node that reads a file: its path, modification time and size, so an edited or replaced
    file runs the node again; NaN (never equal: run again, and report the problem) when `resolve` fails."""
    try:
        path = resolve()
        stat = os.stat(path)
    except (InputError, OSError):
        return float("nan")
    return f"{path}|{stat.st_mtime_ns}|{stat.st_size}"


def input_path(name: str) -> str:
    """Full path of input-folder file `name` (as `list_input_videos` names it).

    Inside ComfyUI the annotations of its file widgets (`'clip.mp4 [output]'`, `[temp]`, `[input]`)
    pick the folder, as for core Load Video. A name that leaves its folder, or a missing file, raises
    FileNotFoundError naming the folder.
    """
    folder_paths = _comfy("folder_paths")
    bare, base = name, None
    if folder_paths is not None:
        annotated = getattr(folder_paths, "annotated_filepath", None)
        if annotated is not None:
            bare, base = annotated(name)
    base = base or video_input_folder()
    if not base:
        raise FileNotFoundError(f"no input folder to find '{name}' in: set ${INPUT_ENV} outside ComfyUI, "
                                "or give the video's full path")
    path = inside_folder(base, bare) if bare else None
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(f"the video '{name}' is not a file in the input folder {base}; upload it or "
                                "choose another one (press R to refresh the list)")
    return path


# --------------------------------------------------------------------------------------------
# Notices shown to the user
# --------------------------------------------------------------------------------------------

# The notices of each (prompt, node) shown so far: the frontend shows one text per node, so a node's
# notices of one run are shown together. Only the latest few runs/nodes are kept.
_NOTICES: dict[tuple[str, str], list[str]] = {}
_NOTICE_KEYS_KEPT = 32
_NOTICE_LINES_SHOWN = 6


def notify(message: str, level: int | str = logging.WARNING) -> None:
    """Tell the user `message`: in the log at `level` always, and inside ComfyUI also on the node.

    Inside ComfyUI the text appears on the node that is running, through ComfyUI's own progress-text
    message (`PromptServer.send_progress_text`, the one core's Get Image Size uses; the frontend shows
    it under the node's widgets, no web extension needed), prefixed with a warning sign at WARNING
    and above. Several notices of one node in one run are shown together (the latest few). Standalone
    (or if ComfyUI's server cannot be reached) it is the log line only. Never raises for the display.
    `level` is a `logging` level number or name ("warning", "info", ...).
    """
    if isinstance(level, str):
        number = logging.getLevelName(level.upper())
        level = number if isinstance(number, int) else logging.WARNING
    log.log(level, "%s", message)
    if not inside_comfyui():
        return
    try:
        _show_on_node(message, level)
    except Exception as err:  # noqa: BLE001 - the log line above is the fallback
        log.debug("could not show the notice in ComfyUI's interface: %s", err)


def _show_on_node(message: str, level: int) -> None:
    server = _comfy("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None or not hasattr(instance, "send_progress_text"):
        return
    context = None
    try:
        context = _comfy("comfy_execution.utils").get_executing_context()
    except (ComfyUnavailableError, AttributeError):
        pass
    node_id = context.node_id if context is not None else getattr(instance, "last_node_id", None)
    if node_id is None:
        return
    prompt_id = context.prompt_id if context is not None else getattr(instance, "last_prompt_id", None)
    key = (str(prompt_id), str(node_id))
    if key not in _NOTICES and len(_NOTICES) >= _NOTICE_KEYS_KEPT:
        del _NOTICES[next(iter(_NOTICES))]
    lines = _NOTICES.setdefault(key, [])
    lines.append(("⚠ " if level >= logging.WARNING else "") + message)
    del lines[:-_NOTICE_LINES_SHOWN]
    instance.send_progress_text("\n\n".join(lines), str(node_id), getattr(instance, "client_id", None))


# --------------------------------------------------------------------------------------------
# Conversions between ComfyUI values and imtalker_core tensors
# --------------------------------------------------------------------------------------------

def image_batch(image: torch.Tensor, name: str) -> torch.Tensor:
    """Check a ComfyUI IMAGE `[B, H, W, C]` float in [0, 1]; returns it with C = 3 (alpha dropped)."""
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[-1] not in (3, 4):
        shape = list(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise InputError(f"{name} must be a ComfyUI IMAGE [batch, height, width, 3], got {shape}")
    if image.shape[0] == 0:
        raise InputError(f"{name} is an empty image batch")
    return image[..., :3]


def audio_waveform(audio: Any, name: str = "audio") -> tuple[torch.Tensor, int]:
    """The first clip `[C, S]` (float32, CPU) and sample rate of a ComfyUI AUDIO dict.

    AUDIO is `{"waveform": [B, C, S], "sample_rate": int}`; extra clips of a batch are ignored
    (logged).
    """
    if not isinstance(audio, dict) or "waveform" not in audio or "sample_rate" not in audio:
        raise InputError(f"{name} must be a ComfyUI AUDIO value (a dict with 'waveform' and 'sample_rate'), "
                         f"got {type(audio).__name__}")
    waveform = torch.as_tensor(audio["waveform"])
    if waveform.dim() == 2:
        waveform = waveform[None]
    if waveform.dim() != 3 or waveform.shape[0] == 0:
        raise InputError(f"{name} waveform must be [batch, channels, samples], got {list(waveform.shape)}")
    if waveform.shape[0] > 1:
        log.info("%s holds %d clips; using the first", name, waveform.shape[0])
    return waveform[0].detach().to("cpu", torch.float32), int(audio["sample_rate"])


def make_audio(waveform: np.ndarray | torch.Tensor, sample_rate: int) -> dict:
    """A ComfyUI AUDIO dict from a mono `[S]` or `[C, S]` waveform (batch of one, CPU float32)."""
    tensor = torch.as_tensor(np.asarray(waveform, dtype=np.float32) if isinstance(waveform, np.ndarray)
                             else waveform).float().cpu()
    if tensor.dim() == 1:
        tensor = tensor[None]
    return {"waveform": tensor[None].contiguous(), "sample_rate": int(sample_rate)}

