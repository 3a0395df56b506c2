"""Reading model files safely, stripping them down to the model's entries, and strict loading.

Every key remapping of the project lives here. Accepted layouts:

- the official Lightning-style pickles: `{"state_dict": {"gen." + key: ...}}` (renderer) and
  `{"state_dict": {"model." + key: ...}}` (generator), possibly with training extras beside the
  model: `model.audio_encoder.wav2vec2.*` (a frozen stock wav2vec2), `disc.*`, `criterion_vgg.*`,
  `ema_state_dict`, optimizer / scheduler / loop states, hyper-parameters;
- bare state dicts, with or without the prefix, as `.ckpt`/`.pt`/`.pth` or `.safetensors`.

Pickles are read with `torch.load(weights_only=True)`. Classes a Lightning checkpoint carries in its
metadata (hyper-parameter namespaces, callback states) are unpickled as inert `OpaqueObject`s:
nothing from the file is ever imported or executed. Derived buffers (blur kernels, Swin indices
and masks, RoPE frequencies) are recomputed by the model and may be absent from a file.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import torch
from torch import nn

from .errors import CheckpointError

log = logging.getLogger(__name__)

PREFIXES = {"renderer": "gen.", "generator": "model."}
# Entries of the official training checkpoints that belong to no inference model.
TRAINING_EXTRAS = {
    "renderer": ("disc.", "criterion_vgg.", "criterion_", "loss_fn."),
    "generator": ("audio_encoder.",),
}
SIGNATURES = {
    "renderer": "latent_token_decoder.const",
    "generator": "fmt.x_embedder.proj.weight",
}
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


def _torch_load(path: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as first:  # noqa: BLE001 - re-raised below with the file named
        unsafe = _unsafe_globals(path)
        if not unsafe:
            raise CheckpointError(f"cannot read {path!r} as a PyTorch checkpoint: {first}") from first
    log.info("%s: reading %d metadata classes as opaque objects: %s", path, len(unsafe), ", ".join(unsafe))
    try:
        with torch.serialization.safe_globals([(OpaqueObject, name) for name in unsafe]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"cannot read {path!r} safely: {err}") from err


def _unsafe_globals(path: str) -> list[str]:
    finder = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if finder is None:
        return []
    try:
        return [name for name in finder(path) if not name.startswith("torch.")]
    except Exception:  # noqa: BLE001 - an unreadable file: the caller reports the first error
        return []


def read_file(path: str | os.PathLike) -> Mapping[str, Any]:
    """The raw top-level mapping stored in a `.safetensors` or pickle file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"model file {path!r} does not exist")
    if path.endswith(SAFETENSORS_SUFFIX):
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(f"cannot read {path!r} as safetensors (truncated or not a model?): {err}") from err
    raw = _torch_load(path)
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{path!r} holds a {type(raw).__name__}, not a state dict")
    return raw


def _tensors(d: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in d.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _trained_tensors(raw: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of a file's trained weights: its `state_dict` (Lightning), its `model` entry, or itself."""
    for key in ("state_dict", "model"):
        if isinstance(raw.get(key), Mapping) and _tensors(raw[key]):
            return _tensors(raw[key])
    return _tensors(raw)


def model_entries(raw: Mapping[str, Any], kind: str, use_ema: bool = False, source: str = "<dict>"
                  ) -> dict[str, torch.Tensor]:
    """The unprefixed state dict of `kind` ('renderer' or 'generator') inside a loaded file.

    With `use_ema=True` the generator's `ema_state_dict` is used instead of the trained weights
    (the reference ignores it).
    """
    if kind not in PREFIXES:
        raise ValueError(f"kind must be 'renderer' or 'generator', not {kind!r}")
    if use_ema:
        if kind != "generator":
            raise CheckpointError("EMA weights exist only for the generator")
        ema = raw.get("ema_state_dict")
        if not isinstance(ema, Mapping):
            raise CheckpointError(f"{source} has no 'ema_state_dict'; load it without the EMA option")
        entries = _tensors(ema)
    else:
        entries = _trained_tensors(raw)
    prefix = PREFIXES[kind]
    if any(k.startswith(prefix) for k in entries):
        dropped = [k for k in entries if not k.startswith(prefix)]
        if dropped:
            log.info("%s: ignoring %d entries outside '%s' (e.g. %s)", source, len(dropped), prefix, dropped[0])
        entries = {k[len(prefix):]: v for k, v in entries.items() if k.startswith(prefix)}
    extras = [k for k in entries if k.startswith(TRAINING_EXTRAS[kind])]
    if extras:
        log.info("%s: dropping %d training-only entries (e.g. %s)", source, len(extras), extras[0])
    return {k: v for k, v in entries.items() if not k.startswith(TRAINING_EXTRAS[kind])}


def guess_kind(entries: Mapping[str, Any]) -> str | None:
    """'renderer', 'generator' or None, from the signature keys present (prefixed or not)."""
    for kind, key in SIGNATURES.items():
        if key in entries or PREFIXES[kind] + key in entries:
            return kind
    return None


def load_strict(model: nn.Module, entries: Mapping[str, torch.Tensor], source: str, kind: str) -> None:
    """Load `entries` into `model`: derived buffers may be missing, nothing else may differ."""
    own = model.state_dict()
    derived = {name for name, _ in model.named_buffers() if not name.endswith(("running_mean", "running_var",
                                                                                "num_batches_tracked"))}
    entries = dict(entries)
    for name in derived:
        entries.setdefault(name, own[name])
    missing = sorted(set(own) - set(entries))
    unexpected = sorted(set(entries) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(entries) if tuple(own[k].shape) != tuple(entries[k].shape))
    if missing or unexpected or wrong_shape:
        other = guess_kind(entries)
        hint = (f" It looks like an IMTalker {other} file; use the {other} loader." if other and other != kind
                else " Is it the official IMTalker " + kind + " file, complete and not truncated?")
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("with the wrong shape", wrong_shape)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        raise CheckpointError(f"{source} does not match the IMTalker {kind}: " + "; ".join(parts) + "." + hint)
    model.load_state_dict(entries, strict=True)


def load_renderer(path: str | os.PathLike, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32, cfg=None):
    """Build the renderer and load `path` into it strictly; returns it in eval mode on `device`."""
    from .renderer import IMTRenderer

    model = IMTRenderer(cfg)
    load_strict(model, model_entries(read_file(path), "renderer", source=os.fspath(path)), os.fspath(path), "renderer")
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_generator(path: str | os.PathLike, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32, use_ema: bool = False, cfg=None):
    """Build the motion generator and load `path` (optionally its EMA weights) strictly."""
    from .generator import MotionGenerator

    model = MotionGenerator(cfg)
    entries = model_entries(read_file(path), "generator", use_ema=use_ema, source=os.fspath(path))
    load_strict(model, entries, os.fspath(path), "generator")
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def convert_to_safetensors(src: str | os.PathLike, dst: str | os.PathLike, kind: str | None = None,
                           dtype: torch.dtype | None = None, use_ema: bool = False) -> dict[str, int]:
    """Write only the model's entries of `src` to `dst` (.safetensors), optionally cast to `dtype`.

    The file is validated by a strict load into a fresh model before it is written. Returns
    `{"tensors": n, "values": n}`.
    """
    from safetensors.torch import save_file

    src, dst = os.fspath(src), os.fspath(dst)
    raw = read_file(src)
    kind = kind or guess_kind(_trained_tensors(raw))
    if kind is None:
        raise CheckpointError(f"{src} is neither an IMTalker renderer nor a generator checkpoint")
    entries = model_entries(raw, kind, use_ema=use_ema, source=src)
    if kind == "renderer":
        from .renderer import IMTRenderer as Model
    else:
        from .generator import MotionGenerator as Model
    load_strict(Model(), entries, src, kind)
    if dtype is not None:
        entries = {k: v.to(dtype) if v.is_floating_point() else v for k, v in entries.items()}
    if not dst.endswith(SAFETENSORS_SUFFIX):
        raise CheckpointError(f"output {dst!r} must end with {SAFETENSORS_SUFFIX}")
    save_file({k: v.contiguous() for k, v in entries.items()}, dst, metadata={"imtalker_kind": kind})
    return {"tensors": len(entries), "values": sum(v.numel() for v in entries.values())}
