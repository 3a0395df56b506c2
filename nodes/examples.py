"""The templates' example inputs, made available to ComfyUI's Load Image / Load Audio / Load Video.

The workflows in `workflows/` load `imtalker_examples/<file>` from ComfyUI's input folder. When the
pack loads inside ComfyUI, `install_examples` copies the pack's `example_inputs/` files there, into
the `imtalker_examples/` sub-folder: only files that are missing, never over anything already there
(the copy is opened exclusively, so even a file that appears meanwhile is kept). Problems (a
read-only input folder, a missing source file) are logged as a warning and never stop the pack from
loading: the templates then need inputs chosen by hand.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parent.parent / "example_inputs"
SUBFOLDER = "imtalker_examples"
FILES = ("photo_512.png", "speech_16k_mono.wav", "driving_short.mp4")


def widget_value(name: str) -> str:
    """What a Load Image/Audio/Video widget holds to load example `name` from the input folder."""
    return f"{SUBFOLDER}/{name}"


def install_examples(input_dir: str | os.PathLike | None, source_dir: str | os.PathLike = SOURCE_DIR) -> list[str]:
    """Copy the example inputs missing from `<input_dir>/imtalker_examples/`; returns the names copied.

    Existing files (whatever their content) are left alone. Never raises: a failure is logged once
    as a warning and the names copied so far are returned. `input_dir` None (standalone) does nothing.
    """
    if input_dir is None:
        return []
    target = Path(input_dir) / SUBFOLDER
    source_dir = Path(source_dir)
    copied: list[str] = []
    try:
        missing = [name for name in FILES if not os.path.lexists(target / name)]
        if not missing:
            log.debug("IMTalker: example inputs already in %s", target)
            return copied
        target.mkdir(parents=True, exist_ok=True)
        for name in missing:
            if _copy_new(source_dir / name, target / name):
                copied.append(name)
    except Exception as err:  # noqa: BLE001 -- never stop the pack from loading over its examples
        log.warning("IMTalker: could not copy the example inputs into %s (%s); the workflow templates will need "
                    "their image/audio/video chosen by hand", target, err)
        return copied
    if copied:
        log.info("IMTalker: copied the example inputs %s into %s (used by the workflow templates)",
                 ", ".join(copied), target)
    return copied


def _copy_new(source: Path, destination: Path) -> bool:
    """Copy `source` to `destination` only if `destination` does not exist; True if copied.

    The destination is created exclusively (O_EXCL), so a file made in the meantime is never
    overwritten; a copy that fails half-way is removed.
    """
    created = False
    with open(source, "rb") as src:  # a missing source raises before anything is created
        try:
            with open(destination, "xb") as dst:
                created = True
                shutil.copyfileobj(src, dst)
        except BaseException as err:
            if not created and isinstance(err, FileExistsError):
                return False  # there already: the user's file, or one made meanwhile
            if created:  # closed by now, so removable on Windows too
                destination.unlink(missing_ok=True)
            raise
    return True
