"""Where the official model files live, and fetching them once from the authors' repository.

Layout of a models folder (ComfyUI: `models/imtalker/`)::

    imtalker/
      renderer.ckpt                 (or renderer.safetensors, see `convert`)
      generator.ckpt
      wav2vec2-base-960h/
        config.json  pytorch_model.bin  preprocessor_config.json  feature_extractor_config.json

Default folder: `$IMTALKER_MODELS` if set, else ComfyUI's `models/imtalker` when this package
sits inside a ComfyUI tree (`ComfyUI/custom_nodes/<pack>/`), else `~/.cache/imtalker`.
"""
from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from .errors import InputError

log = logging.getLogger(__name__)

# The models folder outside ComfyUI (command line, scripts, the nodes run standalone).
MODELS_ENV = "IMTALKER_MODELS"
HF_REPO = "cbsjtu01/IMTalker"
HF_URL = f"https://huggingface.co/{HF_REPO}"
RENDERER_FILE = "renderer.ckpt"
GENERATOR_FILE = "generator.ckpt"
WAV2VEC2_DIR = "wav2vec2-base-960h"
WAV2VEC2_FILES = ("config.json", "pytorch_model.bin", "preprocessor_config.json", "feature_extractor_config.json")
OFFICIAL_FILES = (RENDERER_FILE, GENERATOR_FILE, *(f"{WAV2VEC2_DIR}/{f}" for f in WAV2VEC2_FILES))
WAV2VEC2_UPSTREAM = "https://huggingface.co/facebook/wav2vec2-base-960h"
# What to do about a missing or damaged wav2vec2 folder.
WAV2VEC2_FIX = f"re-download {WAV2VEC2_DIR}/ from {HF_URL} (or {WAV2VEC2_UPSTREAM})"


class MissingFilesError(InputError, FileNotFoundError):
    """A model file or folder is not where it was looked for. Also a `FileNotFoundError`, so callers that
    catch that for missing files (ComfyUI's node validation among them) keep working."""


def default_models_dir() -> Path:
    """The models folder used when none is given (see the module docstring); the nodes outside ComfyUI too."""
    env = os.environ.get(MODELS_ENV)
    if env:
        return Path(env).expanduser()
    pack_dir = Path(__file__).resolve().parent.parent
    if pack_dir.parent.name == "custom_nodes":
        return pack_dir.parent.parent / "models" / "imtalker"
    return Path.home() / ".cache" / "imtalker"


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "IMTALKER_OFFLINE"))


def missing_files(models_dir: Path) -> list[str]:
    """Official files absent from `models_dir` (a `.safetensors` twin counts for a `.ckpt`)."""
    missing = []
    for name in OFFICIAL_FILES:
        path = models_dir / name
        # A converted renderer/generator and a safetensors wav2vec2 count as present.
        twin = {".ckpt": path.with_suffix(".safetensors"),
                ".bin": path.with_name("model.safetensors")}.get(path.suffix)
        if name.endswith("feature_extractor_config.json"):
            continue  # optional: preprocessor_config.json carries the same settings
        if not path.is_file() and not (twin and twin.is_file()):
            missing.append(name)
    return missing


def placement_help(models_dir: Path, missing: list[str]) -> str:
    return (f"IMTalker model files are missing from {models_dir}: {', '.join(missing)}. Download them from "
            f"{HF_URL} (files {', '.join(OFFICIAL_FILES)}) and place them there, keeping the "
            f"{WAV2VEC2_DIR}/ sub-folder.")


def ensure_models(models_dir: str | os.PathLike | None = None, download: bool = True) -> Path:
    """Return a models folder holding the official files, downloading missing ones when allowed.

    Offline, or with `download=False`, a missing file raises `InputError` naming the exact files
    and the folder to put them in.
    """
    root = Path(models_dir).expanduser() if models_dir else default_models_dir()
    missing = missing_files(root)
    if missing:
        if not download:
            raise InputError(placement_help(root, missing))
        fetch(root, missing)
    return root


#: Seconds to wait for the hub's server before deciding the machine is offline.
CONNECT_TIMEOUT = 3.0


def _hub_reachable(timeout: float = CONNECT_TIMEOUT) -> bool:
    """Whether the hub's host (`HF_ENDPOINT`, default huggingface.co) accepts a connection in time."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        with socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError as err:
        log.debug("hub %s:%s not reachable: %s", endpoint.hostname, port, err)
        return False


def fetch(root: str | os.PathLike, names: list[str] | tuple[str, ...],
          progress: Callable[[int, int], None] | None = None) -> None:
    """Download official files (`OFFICIAL_FILES` names) from the authors' repository into `root`.

    Uses `huggingface_hub`, so `HF_ENDPOINT`, `HF_HOME` and `HF_HUB_OFFLINE` are respected (its
    own byte-level bars show on a terminal); `progress(files_done, files_total)` is called before
    the first file and after each one. A wav2vec2 file brings the optional
    `feature_extractor_config.json` along. Offline (the variables above, or the hub not answering
    within `CONNECT_TIMEOUT` seconds) or on failure, `InputError` names the files and the folder to
    place them in by hand.
    """
    root = Path(root)
    unknown = [n for n in names if n not in OFFICIAL_FILES]
    if unknown:
        raise InputError(f"{', '.join(unknown)} is not an official IMTalker file ({', '.join(OFFICIAL_FILES)})")
    if _offline():
        raise InputError(placement_help(root, list(names)) + " (downloads are off: HF_HUB_OFFLINE is set)")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as err:
        raise InputError(placement_help(root, list(names)) + " (huggingface_hub is not installed)") from err
    if not _hub_reachable():
        raise InputError(placement_help(root, list(names)) + f" (the hub did not answer within {CONNECT_TIMEOUT:g} s: "
                         "offline? set HF_ENDPOINT for a mirror)")
    root.mkdir(parents=True, exist_ok=True)
    optional = f"{WAV2VEC2_DIR}/feature_extractor_config.json"
    wanted = list(names) + ([optional] if any(n.startswith(WAV2VEC2_DIR) for n in names) and optional not in names
                            else [])
    if progress is not None:
        progress(0, len(wanted))
    for done, name in enumerate(wanted, start=1):
        log.info("downloading %s from %s into %s (%d of %d)", name, HF_REPO, root, done, len(wanted))
        try:
            hf_hub_download(repo_id=HF_REPO, filename=name, local_dir=root)
        except Exception as err:  # noqa: BLE001 - network errors come in many types; re-raised with context
            if name == optional:
                log.info("optional file %s not downloaded: %s", name, err)
                continue
            raise InputError(f"could not download {name} from {HF_URL} ({err}). "
                             + placement_help(root, [n for n in names if not (root / n).is_file()])) from err
        finally:
            if progress is not None:
                progress(done, len(wanted))


def model_path(models_dir: Path, name: str) -> Path:
    """`renderer.ckpt` or its `.safetensors` twin inside `models_dir`, whichever exists (safetensors first)."""
    path = models_dir / name
    twin = path.with_suffix(".safetensors")
    return twin if twin.is_file() else path
