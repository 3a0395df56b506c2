"""Reading model files safely: `.safetensors`, or pickles through `torch.load(weights_only=True)`.

Classes a Lightning checkpoint carries in its metadata (hyper-parameter namespaces, callback states)
are unpickled as inert `OpaqueObject`s: nothing from the file is ever imported or executed. A pickle
that names code (`builtins.eval`, `os.system`, `subprocess`, `torch.load`, ...; see `_is_code`) is
refused before it is unpickled, found by reading its opcodes without running them. A damaged file
(empty, truncated, not a checkpoint) raises `CheckpointError` with one line naming the file and what
to do; never the advice to load it unsafely.
"""
from __future__ import annotations

import io
import logging
import os
import pickle
import pickletools
import re
import struct
import zipfile
import zlib
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING  # how pickle maps protocol-2 names to Python 3
from typing import Any, Mapping

import torch

from .errors import CheckpointError
from .model_files import HF_URL

log = logging.getLogger(__name__)

SAFETENSORS_SUFFIX = ".safetensors"


class OpaqueObject(dict):
    """Inert stand-in for any class named in a checkpoint's pickle metadata (never the real class)."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


# Modules whose functions run code, touch files, processes or the network, or unpickle more data: a
# checkpoint has no reason to name any of them, so a pickle that does is refused outright (read as an
# `OpaqueObject` it could do nothing, but refusing names the problem).
_CODE_MODULES = frozenset({
    "os", "posix", "nt", "posixpath", "ntpath", "subprocess", "_posixsubprocess", "sys", "importlib", "imp",
    "runpy", "shutil", "socket", "_socket", "ssl", "pickle", "_pickle", "marshal", "codecs",
    "functools", "_functools", "operator", "_operator", "types", "ctypes", "_ctypes", "io", "_io", "tempfile",
    "glob", "signal", "_thread", "threading", "multiprocessing", "concurrent", "asyncio", "pty", "code", "codeop",
    "pdb", "bdb", "timeit", "trace", "webbrowser", "platform", "inspect", "gc", "zipimport", "pkgutil", "site",
    "http", "urllib", "ftplib", "smtplib", "telnetlib", "requests", "pip", "setuptools", "distutils", "dill",
    "cloudpickle", "joblib",
})
# Data classes inside those modules that hyper-parameters do hold. (`_codecs.encode`, which protocol-2
# pickles use for bytes, is on torch's own allow-list.)
_DATA_NAMES = frozenset({"types.SimpleNamespace"})
# Plain data types a metadata pickle may name as type references (omegaconf's ContainerMetadata names
# `builtins.dict`, `builtins.int`, ...). Every other builtin (eval, exec, getattr, open, __import__, ...)
# is code.
_BUILTIN_DATA_TYPES = frozenset({"object", "dict", "list", "tuple", "set", "frozenset", "int", "float", "complex",
                                 "str", "bytes", "bytearray", "bool", "slice", "range"})
# numpy's array, scalar, dtype and random-state reconstruction: the numpy names metadata needs.
_NUMPY_DATA_PREFIXES = ("numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
                        "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar", "numpy.ndarray",
                        "numpy.dtype", "numpy.dtypes.", "numpy.random._pickle.")
# torch names beyond torch's own allow-list (tensors, storages, dtypes) that load files or modules, compile
# or run code: `torch.load`, `torch._C._...`, `torch.hub.load`, `torch.jit.load`, `torch.ops....`.
_TORCH_CODE_PREFIXES = ("torch._C", "torch._ops", "torch.ops", "torch.serialization", "torch.hub", "torch.jit",
                        "torch.package", "torch.utils", "torch.fx", "torch._dynamo", "torch._inductor", "torch.export",
                        "torch.onnx", "torch.library", "torch._library", "torch.distributed", "torch.multiprocessing",
                        "torch.testing", "torch.backends", "torch.compiler", "torch._functorch", "torch.func")
_UNREADABLE = (ValueError, EOFError, OSError, KeyError, IndexError, NotImplementedError, struct.error, zlib.error,
               zipfile.BadZipFile, pickle.UnpicklingError)


def _is_code(name: str) -> bool:
    """Whether the pickle global `name` (`module.attribute`) is code rather than a metadata class."""
    module, _, attr = name.rpartition(".")
    root = module.split(".")[0]
    if name in _DATA_NAMES:
        return False
    if root == "builtins":
        return attr not in _BUILTIN_DATA_TYPES
    if root == "numpy":
        return not name.startswith(_NUMPY_DATA_PREFIXES)
    if root == "torch":
        # A top-level lowercase torch name is a function (torch.load, torch.compile, torch.from_file).
        return (module == "torch" and attr[:1].islower()) or (name + ".").startswith(
            tuple(p + "." for p in _TORCH_CODE_PREFIXES))
    return not module or root in _CODE_MODULES


def _python3_name(module: str, name: str) -> str:
    """`module.name` as Python 3 spells it (torch.save writes protocol 2, e.g. `__builtin__ eval`), as torch maps it."""
    if (module, name) in NAME_MAPPING:
        module, name = NAME_MAPPING[(module, name)]
    else:
        module = IMPORT_MAPPING.get(module, module)
    return f"{module}.{name}"


def _globals_in(stream, count: int, found: set[str]) -> None:
    """Add to `found` the globals named by the next `count` pickles of `stream`, read opcode by opcode
    (nothing is run). Raises one of `_UNREADABLE` where the stream stops being a pickle; the globals of
    the pickles read so far are then already in `found`."""
    for _ in range(count):
        # Strings pushed recently and the memo, to name protocol-4 STACK_GLOBALs (module and name come
        # from the stack); anything else pushed breaks the chain.
        recent: list[str | None] = []
        memo: dict[int, str | None] = {}
        for op, arg, _pos in pickletools.genops(stream):
            kind = op.name
            if kind in ("GLOBAL", "INST"):
                found.add(_python3_name(*arg.split(" ", 1)))
                recent.append(None)
            elif kind == "STACK_GLOBAL":
                module, name = (recent[-2:] if len(recent) >= 2 else [None, None])
                found.add(_python3_name(module, name) if isinstance(module, str) and isinstance(name, str)
                          else "<a name computed while unpickling>")
                recent.append(None)
            elif kind in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING",
                          "SHORT_BINSTRING"):
                recent.append(arg)
            elif kind in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = recent[-1] if recent else None
            elif kind == "MEMOIZE":
                memo[len(memo)] = recent[-1] if recent else None
            elif kind in ("GET", "BINGET", "LONG_BINGET"):
                recent.append(memo.get(arg))
            elif kind not in ("PROTO", "FRAME"):
                recent.append(None)


def _pickle_globals(path: str) -> tuple[set[str], bool]:
    """`(globals, complete)`: every global the checkpoint's pickle names (zip `torch.save` files and the
    legacy format), found without unpickling anything, and whether the whole pickle could be read (when
    not, `globals` holds those of the part that could)."""
    found: set[str] = set()
    try:
        with open(path, "rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"
        if zipped:
            # A zip that lost its end (truncated) has no readable directory: nothing to scan.
            with zipfile.ZipFile(path) as archive:
                records = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
                if len(records) != 1:
                    raise ValueError(f"{len(records)} data.pkl records in the archive")
                _globals_in(io.BytesIO(archive.read(records[0])), 1, found)
        else:
            with open(path, "rb") as f:
                # The legacy format is pickles in a row: magic number, protocol, system info, then the object.
                _globals_in(f, 4, found)
    except _UNREADABLE as err:
        log.debug("%s: not a complete torch pickle: %r", path, err)
        return found, False
    return found, True


def _torch_safe_names() -> set[str] | None:
    """The globals torch's weights-only unpickler accepts (tensors, storages, dtypes), or None if this torch
    no longer exposes its allow-list (torch then has the last word on every torch name)."""
    try:
        from torch import _weights_only_unpickler as unpickler
        return set(unpickler._get_allowed_globals()) | set(unpickler._get_user_allowed_globals())
    except (ImportError, AttributeError):
        return None


def redownload_hint(path: str) -> str:
    """What to do about a damaged official model file."""
    if path.endswith(SAFETENSORS_SUFFIX):
        return ("convert it again from the official .ckpt (python -m imtalker_core convert), or delete it to use "
                f"the .ckpt beside it (official files: {HF_URL})")
    return f"re-download it from {HF_URL}"


def _unreadable(path: str, what: str = "a PyTorch checkpoint") -> CheckpointError:
    return CheckpointError(f"{path} is truncated or not {what} ({os.path.getsize(path):,} bytes); "
                           + redownload_hint(path))


def _holds_code(path: str, names: list[str]) -> CheckpointError:
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return CheckpointError(f"{path} holds code we refuse to run ({shown}); it is not an official IMTalker "
                           f"checkpoint — re-download it from {HF_URL}")


def _torch_load(path: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - torch's many failure types (EOFError, RuntimeError, UnpicklingError,
        # ...) are all explained below in our words, from a look at the file itself
        log.debug("%s: torch.load(weights_only=True) failed: %s", path, err)
        first = err
    names, complete = _pickle_globals(path)
    safe = _torch_safe_names()
    unsafe = sorted(n for n in names if n not in safe) if safe is not None else sorted(
        n for n in names if not n.startswith("torch."))
    code = [n for n in unsafe if _is_code(n)]
    if code:  # even in a damaged file: code is the first thing to tell
        raise _holds_code(path, code) from first
    if not complete or not unsafe:
        raise _unreadable(path) from first
    log.info("%s: reading %d metadata classes as opaque objects: %s", path, len(unsafe), ", ".join(unsafe))
    try:
        with torch.serialization.safe_globals([(OpaqueObject, name) for name in unsafe]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - as above
        log.debug("%s: torch.load with opaque metadata failed: %s", path, err)
        # A global the opcode scan could not name (built while unpickling) is still refused by torch.
        refused = re.search(r"GLOBAL ([\w.]+)", str(err))
        if isinstance(err, pickle.UnpicklingError) and refused:
            raise _holds_code(path, [refused.group(1)]) from err
        raise _unreadable(path) from err


def read_file(path: str | os.PathLike) -> Mapping[str, Any]:
    """The raw top-level mapping stored in a `.safetensors` or pickle file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CheckpointError(f"model file {path} is a folder, not a file; give the path of the .ckpt or "
                              ".safetensors file inside it")
    if not os.path.isfile(path):
        raise CheckpointError(f"model file {path} does not exist; check the path, or download the official files "
                              f"from {HF_URL}")
    if path.endswith(SAFETENSORS_SUFFIX):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except (SafetensorError, OSError) as err:
            log.debug("%s: safetensors failed: %s", path, err)
            raise _unreadable(path, "a safetensors file") from err
    raw = _torch_load(path)
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{path} holds a {type(raw).__name__}, not a state dict; it is not an IMTalker "
                              f"checkpoint — {redownload_hint(path)}")
    return raw
