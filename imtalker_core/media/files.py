"""The one check every media reader starts with: the path names an existing regular file."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputError


def existing_file(path: str | os.PathLike, kind: str) -> Path:
    """`path` as a `Path`, or `InputError` naming it when it is missing or not a regular file.

    `kind` is the word used in the message ("image", "audio", "video").
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{kind.capitalize()} file not found: '{path}'. Check the path and file name.")
    if not path.is_file():
        article = "an" if kind[0] in "aeiou" else "a"
        raise InputError(f"'{path}' is not a file (it is a folder or a device); "
                         f"give the path of {article} {kind} file.")
    return path
