"""Stripping model files down to the model's entries, and strict loading.

Every key remapping of the project lives here. Accepted layouts:

- the official Lightning-style pickles: `{"state_dict": {"gen." + key: ...}}` (renderer) and
  `{"state_dict": {"model." + key: ...}}` (generator), possibly with training extras beside the
  model: `model.audio_encoder.wav2vec2.*` (a frozen stock wav2vec2), `disc.*`, `criterion_vgg.*`,
  `ema_state_dict`, optimizer / scheduler / loop states, hyper-parameters;
- bare state dicts, with or without the prefix, as `.ckpt`/`.pt`/`.pth` or `.safetensors` (a converted
  generator may keep its wav2vec2 copy under `audio_encoder.wav2vec2.*`).

The generator file's wav2vec2 copy is not part of the generator: `wav2vec2_copy` extracts it and
`load_generator_and_audio_encoder` loads it into the audio encoder, as the reference app does (it copies
every `model.*` parameter of the file, the wav2vec2 copy included, over the model it built from the
`wav2vec2-base-960h/` folder).

Files are read by `safe_read.read_file` (safetensors, or pickles with `weights_only=True`; code in a
pickle is refused). A damaged model (missing or extra keys, NaN/inf weights) raises `CheckpointError`
with one line naming the file and what to do. Derived buffers (blur kernels, Swin indices and masks, RoPE
frequencies) are recomputed by the model and may be absent from a file.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Mapping

import torch
from torch import nn

from .errors import CheckpointError, InputError

from .safe_read import SAFETENSORS_SUFFIX, read_file, redownload_hint

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
# Where a generator file keeps its frozen wav2vec2 copy (after the `model.` prefix).
WAV2VEC2_PREFIX = "audio_encoder.wav2vec2."
# Weight-norm tensors of wav2vec2's positional convolution under the two namings of transformers:
# `torch.nn.utils.weight_norm` (older) and `torch.nn.utils.parametrizations.weight_norm` (newer).
_POS_CONV = "encoder.pos_conv_embed.conv."
_WEIGHT_NORM_NAMES = (("weight_g", "parametrizations.weight.original0"),
                      ("weight_v", "parametrizations.weight.original1"))
# wav2vec2 parameters a copy may lack (or carry while the folder's model lacks them): SpecAugment's mask
# embedding, used only in training; the model built from the folder keeps its own.
_WAV2VEC2_OPTIONAL = frozenset({"masked_spec_embed"})


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
    copy = [k for k in extras if k.startswith(WAV2VEC2_PREFIX)]
    if copy:
        log.debug("%s: %d entries of the wav2vec2 copy are not generator weights (the audio encoder loader "
                  "reads them)", source, len(copy))
    extras = [k for k in extras if not k.startswith(WAV2VEC2_PREFIX)]
    if extras:
        log.info("%s: dropping %d training-only entries (e.g. %s)", source, len(extras), extras[0])
    return {k: v for k, v in entries.items() if not k.startswith(TRAINING_EXTRAS[kind])}


def guess_kind(entries: Mapping[str, Any]) -> str | None:
    """'renderer', 'generator' or None, from the signature keys present (prefixed or not)."""
    for kind, key in SIGNATURES.items():
        if key in entries or PREFIXES[kind] + key in entries:
            return kind
    return None


def _all_finite(t: torch.Tensor) -> bool:
    # A sum is NaN/inf whenever an element is, and on the CPU it runs ~40x faster than
    # `isfinite(t).all()`; only a non-finite sum (a NaN, an inf, or the sum itself overflowing) is
    # confirmed element by element. The float32 accumulator keeps fp16 sums from overflowing.
    total = t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
    return bool(torch.isfinite(total)) or bool(torch.isfinite(t).all())


def check_finite(entries: Mapping[str, torch.Tensor], source: str, fix: str | None = None) -> None:
    """`CheckpointError` naming `source`, the first tensor with a NaN or inf value and `fix` (default:
    re-download the official file).

    A model file of NaN weights loads without complaint and renders black frames much later; one sum
    per tensor (a small fraction of reading the file) catches it at load time.
    """
    bad = [k for k, v in entries.items() if v.is_floating_point() and not _all_finite(v)]
    if bad:
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise CheckpointError(f"{source} has NaN/inf values in {bad[0]}{more}; the file is damaged — "
                              + (fix or redownload_hint(source)))


def key_mismatches(own: Mapping[str, torch.Tensor], entries: Mapping[str, torch.Tensor]) -> list[str]:
    """How `entries` differ from a model's state dict `own`: "N missing (e.g. …)", "N unexpected (e.g. …)",
    "N with the wrong shape (e.g. …)", each only when there are such keys; empty when they match."""
    missing = sorted(set(own) - set(entries))
    unexpected = sorted(set(entries) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(entries) if tuple(own[k].shape) != tuple(entries[k].shape))
    return [f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("with the wrong shape", wrong_shape))
            if keys]


def load_strict(model: nn.Module, entries: Mapping[str, torch.Tensor], source: str, kind: str) -> None:
    """Load `entries` into `model`: derived buffers may be missing, those of integers (the window
    attention's relative-position index) must equal the architecture's when present, nothing else may
    differ, and every floating value must be finite."""
    own = model.state_dict()
    derived = {name for name, _ in model.named_buffers() if not name.endswith(("running_mean", "running_var",
                                                                                "num_batches_tracked"))}
    entries = dict(entries)
    for name in sorted(derived):
        given = entries.setdefault(name, own[name])
        # An index is used to gather (by the window kernel too, which trusts it); the architecture defines it.
        if not own[name].is_floating_point() and given.shape == own[name].shape and not torch.equal(given, own[name]):
            raise CheckpointError(f"{source} has a damaged {name} (it differs from the index the architecture "
                                  "defines); download the file again")
    parts = key_mismatches(own, entries)
    if parts:
        other = guess_kind(entries)
        hint = (f" It looks like an IMTalker {other} file; use the {other} loader." if other and other != kind
                else " Is it the official IMTalker " + kind + " file, complete and not truncated?")
        raise CheckpointError(f"{source} does not match the IMTalker {kind}: " + "; ".join(parts) + "." + hint)
    check_finite(entries, source)
    model.load_state_dict(entries, strict=True)


def wav2vec2_copy(raw: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The frozen wav2vec2 copy inside a raw generator file, as a `transformers.Wav2Vec2Model` state dict.

    `raw` is what `read_file` returns. The copy is taken from the trained weights (`state_dict`, as the
    reference does; wav2vec2 is frozen in training, so an EMA of it would be the same tensors): entries
    `model.audio_encoder.wav2vec2.<name>` (official layout) or `audio_encoder.wav2vec2.<name>` (a bare or
    converted file) become `{<name>: tensor}`, e.g. `encoder.layers.0.attention.q_proj.weight` `[768, 768]`.
    Names are returned as stored; `match_weight_norm_names` maps the positional convolution's weight-norm
    naming to the installed transformers. Empty when the file carries no copy.
    """
    entries = _trained_tensors(raw)
    prefix = PREFIXES["generator"]
    if any(k.startswith(prefix) for k in entries):
        entries = {k[len(prefix):]: v for k, v in entries.items() if k.startswith(prefix)}
    return {k[len(WAV2VEC2_PREFIX):]: v for k, v in entries.items() if k.startswith(WAV2VEC2_PREFIX)}


def match_weight_norm_names(state: Mapping[str, torch.Tensor], target_keys) -> dict[str, torch.Tensor]:
    """`state` with the positional convolution's weight-norm tensors renamed to the naming of `target_keys`.

    Older transformers store `encoder.pos_conv_embed.conv.weight_g` `[1, 1, K]` and `.weight_v`
    `[C, C/groups, K]`; newer ones the same tensors as `.parametrizations.weight.original0` and
    `.original1`. A name is changed only when `target_keys` (the installed model's state-dict keys)
    has the other name and `state` does not already hold it; everything else is returned unchanged.
    """
    target = set(target_keys)
    out = dict(state)
    for old, new in _WEIGHT_NORM_NAMES:
        for src, dst in ((_POS_CONV + old, _POS_CONV + new), (_POS_CONV + new, _POS_CONV + old)):
            if src in out and src not in target and dst in target and dst not in out:
                out[dst] = out.pop(src)
    return out


def load_wav2vec2_weights(model: nn.Module, state: Mapping[str, torch.Tensor], source: str,
                          architecture: str = "the wav2vec2 folder") -> int:
    """Load a wav2vec2 state dict (e.g. `wav2vec2_copy(raw)`) strictly into `model`, a `Wav2Vec2Model`
    built from the folder's `config.json` (`architecture` names that folder in errors).

    Like the reference, only parameters are copied (buffers in `state` are ignored, the model keeps
    its own). Every other parameter must be present with the model's shape; only `masked_spec_embed`
    (a training-only SpecAugment embedding) may be absent on either side. Otherwise `CheckpointError`
    names `source`, the counts and examples of missing, unexpected and wrongly shaped keys, and what
    to do. Returns the number of tensors loaded.
    """
    own = model.state_dict()
    state = match_weight_norm_names(state, own)
    buffers = {name for name, _ in model.named_buffers()}
    params = set(own) - buffers
    state = {k: v for k, v in state.items() if k not in buffers}
    missing = sorted(params - set(state) - _WAV2VEC2_OPTIONAL)
    unexpected = sorted(set(state) - params - _WAV2VEC2_OPTIONAL)
    wrong_shape = sorted(k for k in params & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong_shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("with the wrong shape", wrong_shape)):
            if keys:
                examples = ", ".join(keys[:3])
                if label == "with the wrong shape":
                    examples = ", ".join(f"{k} {list(state[k].shape)} in the file, {list(own[k].shape)} in the folder"
                                         for k in keys[:3])
                parts.append(f"{len(keys)} {label} (e.g. {examples})")
        raise CheckpointError(
            f"{source}: its wav2vec2 copy ({WAV2VEC2_PREFIX}*, {len(state)} tensors) does not match the "
            f"architecture in {architecture} (config.json): " + "; ".join(parts) + ". Use the wav2vec2 folder "
            "the generator was trained with (the official wav2vec2-base-960h), or convert the generator without "
            "its copy (`python -m imtalker_core convert SRC DST.safetensors --drop-wav2vec2`) to use the "
            "folder's own weights.")
    state = {k: v for k, v in state.items() if k in params}
    check_finite({WAV2VEC2_PREFIX + k: v for k, v in state.items()}, source)
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    assert set(result.missing_keys) <= _WAV2VEC2_OPTIONAL | buffers, result.missing_keys
    return len(state)


def load_audio_encoder(folder: str | os.PathLike, device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32, weights: Mapping[str, torch.Tensor] | None = None,
                       source: str = "the given wav2vec2 weights"):
    """wav2vec2 from a local folder (`wav2vec2-base-960h/`), in eval mode on `device`.

    Without `weights` the folder's own weights (`pytorch_model.bin` / `model.safetensors`) are used.
    With `weights` (a `Wav2Vec2Model` state dict, e.g. `wav2vec2_copy(read_file("generator.ckpt"))`)
    the folder gives only the architecture and audio settings (`config.json`,
    `preprocessor_config.json`), `weights` are loaded strictly (`load_wav2vec2_weights`, errors name
    `source`), and the folder's weights file is neither read nor needed.
    """
    from .generator.audio import AudioEncoder

    if weights:
        encoder = AudioEncoder.from_config(folder)
        load_wav2vec2_weights(encoder.wav2vec2, weights, source, architecture=os.fspath(folder))
    else:
        encoder = AudioEncoder.from_folder(folder)
    return encoder.to(device=device, dtype=dtype).eval().requires_grad_(False)


# A `.safetensors` model file may record the configuration it was built with (JSON of the config
# dataclass's fields) under this metadata key: files of non-official sizes (fine-tuned small models,
# test models) then load without the caller naming their config. Official-size files need none.
CONFIG_METADATA_KEY = "imtalker_config"


def _config_class(kind: str):
    from .config import GeneratorConfig, RendererConfig
    return {"renderer": RendererConfig, "generator": GeneratorConfig}[kind]


def config_metadata(cfg) -> dict[str, str]:
    """Safetensors metadata recording `cfg` (a `RendererConfig` or `GeneratorConfig`)."""
    return {CONFIG_METADATA_KEY: json.dumps(dataclasses.asdict(cfg), sort_keys=True)}


def config_from_file(path: str | os.PathLike, kind: str):
    """The config recorded in a `.safetensors` file's metadata (`config_metadata`), or None (pickles,
    files without one). A record that does not describe a valid `kind` config raises `CheckpointError`."""
    path = os.fspath(path)
    if not path.endswith(SAFETENSORS_SUFFIX) or not os.path.isfile(path):
        return None
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, framework="pt") as handle:
            text = (handle.metadata() or {}).get(CONFIG_METADATA_KEY)
    except (SafetensorError, OSError) as err:
        log.debug("%s: no safetensors header: %s", path, err)
        return None  # read_file reports an unreadable file with its own message
    if text is None:
        return None
    cls = _config_class(kind)
    try:
        fields = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(fields, dict) or not set(fields) <= names:
            raise TypeError(f"unknown fields {sorted(set(fields) - names) if isinstance(fields, dict) else fields}")
        cfg = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: its {CONFIG_METADATA_KEY} metadata is not a valid {kind} configuration "
                              f"({err}); re-export the file") from err
    log.info("%s: %s configuration from the file's metadata", path, kind)
    return cfg


def load_renderer(path: str | os.PathLike, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32, cfg=None):
    """Build the renderer and load `path` into it strictly; returns it in eval mode on `device`.

    `cfg` None: the configuration recorded in the file (`config_from_file`), else the official one.
    """
    from .renderer import IMTRenderer

    model = IMTRenderer(cfg if cfg is not None else config_from_file(path, "renderer"))
    load_strict(model, model_entries(read_file(path), "renderer", source=os.fspath(path)), os.fspath(path), "renderer")
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _generator_from(raw: Mapping[str, Any], source: str, device, dtype: torch.dtype, use_ema: bool, cfg):
    from .generator import MotionGenerator

    model = MotionGenerator(cfg)
    load_strict(model, model_entries(raw, "generator", use_ema=use_ema, source=source), source, "generator")
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_generator(path: str | os.PathLike, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32, use_ema: bool = False, cfg=None):
    """Build the motion generator and load `path` (optionally its EMA weights) strictly.

    The file's wav2vec2 copy, if any, is ignored here; `load_generator_and_audio_encoder` uses it.
    The configuration is `cfg`, else the file's recorded one (`config_from_file`), else the official one.
    """
    cfg = cfg if cfg is not None else config_from_file(path, "generator")
    return _generator_from(read_file(path), os.fspath(path), device, dtype, use_ema, cfg)


def load_generator_and_audio_encoder(generator_path: str | os.PathLike, wav2vec2_folder: str | os.PathLike,
                                     device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                                     use_ema: bool = False, cfg=None):
    """`(MotionGenerator, AudioEncoder)` from one read of `generator_path`, with the reference's wav2vec2.

    The audio encoder's architecture and audio settings always come from `wav2vec2_folder`. Its
    weights are the generator file's wav2vec2 copy when the file carries one (what the reference
    runs: it copies the file's parameters over the folder's model), loaded strictly: a copy that does
    not match the folder's architecture raises `CheckpointError`; the folder's weights file is then
    not needed. A file without a copy (e.g. converted with `keep_wav2vec2=False`) uses the folder's
    weights. The source is logged at INFO. Both models are in eval mode on `device` in `dtype`;
    `use_ema` picks the generator's EMA weights (the wav2vec2 copy is frozen and read from the trained
    weights either way).
    """
    from .generator.audio import AudioEncoder

    path = os.fspath(generator_path)
    AudioEncoder.check_folder(wav2vec2_folder)  # a wrong folder is reported before the long generator read
    raw = read_file(path)
    copy = wav2vec2_copy(raw)
    cfg = cfg if cfg is not None else config_from_file(path, "generator")
    generator = _generator_from(raw, path, device, dtype, use_ema, cfg)
    del raw  # optimizer and loop states go before wav2vec2 is built
    name = os.path.basename(path)
    if copy:
        encoder = load_audio_encoder(wav2vec2_folder, device, dtype, weights=copy, source=path)
        log.info("wav2vec2 weights: the copy inside %s (%d tensors)", name, len(copy))
    else:
        encoder = load_audio_encoder(wav2vec2_folder, device, dtype)
        log.info("wav2vec2 weights: the folder %s (%s carries no copy)",
                 os.path.basename(os.path.normpath(os.fspath(wav2vec2_folder))), name)
    return generator, encoder


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: str, metadata: Mapping[str, str] | None = None,
                      instead: str = "choose another output path") -> None:
    """Write `tensors` (contiguous CPU tensors) to `path` through `<path>.part`, renamed when complete: an
    interrupted or failed write never leaves a truncated file under the name. A failure is an `InputError`
    naming the path and the reason, ending with "free some space or `instead`"."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    part = path + ".part"
    try:
        save_file(dict(tensors), part, metadata=dict(metadata) if metadata else None)
        os.replace(part, path)
    except (OSError, SafetensorError) as err:
        reason = getattr(err, "strerror", None) or " ".join(str(err).split())
        raise InputError(f"cannot write {path}: {reason}; free some space or {instead}") from err
    finally:
        if os.path.exists(part):
            os.remove(part)


def convert_to_safetensors(src: str | os.PathLike, dst: str | os.PathLike, kind: str | None = None,
                           dtype: torch.dtype | None = None, use_ema: bool = False,
                           keep_wav2vec2: bool = True) -> dict[str, int]:
    """Write only the model's entries of `src` to `dst` (.safetensors), optionally cast to `dtype`.

    The model's entries are validated by a strict load into a fresh model before the file is written.
    A generator's wav2vec2 copy is kept by default, stored as it is under `audio_encoder.wav2vec2.*`,
    so the converted file computes what the reference computes with the original (it is checked
    against the wav2vec2 folder's architecture when loaded); `keep_wav2vec2=False` drops it, and the
    loaders then use the folder's weights. Returns `{"tensors": n, "values": n, "wav2vec2_tensors": n}`
    (`tensors` counts everything written, the copy included).
    """
    src, dst = os.fspath(src), os.fspath(dst)
    _check_output(src, dst)
    raw = read_file(src)
    kind = kind or guess_kind(_trained_tensors(raw))
    if kind is None:
        raise CheckpointError(f"{src} is neither an IMTalker renderer nor a generator checkpoint")
    entries = model_entries(raw, kind, use_ema=use_ema, source=src)
    if kind == "renderer":
        from .renderer import IMTRenderer as Model
    else:
        from .generator import MotionGenerator as Model
    model = Model()
    load_strict(model, entries, src, kind)
    copy = wav2vec2_copy(raw) if kind == "generator" else {}
    if copy and keep_wav2vec2:
        log.info("%s: keeping the wav2vec2 copy (%d tensors) under %s*", src, len(copy), WAV2VEC2_PREFIX)
        entries.update({WAV2VEC2_PREFIX + k: v for k, v in copy.items()})
    elif copy:
        log.info("%s: dropping the wav2vec2 copy (%d tensors); loaders will use the wav2vec2 folder's weights",
                 src, len(copy))
        copy = {}
    if dtype is not None:
        entries = {k: v.to(dtype) if v.is_floating_point() else v for k, v in entries.items()}
    # Never truncated under the output name (the loaders prefer a .safetensors to its .ckpt).
    write_safetensors({k: v.contiguous() for k, v in entries.items()}, dst,
                      {"imtalker_kind": kind, **config_metadata(model.cfg)})
    return {"tensors": len(entries), "values": sum(v.numel() for v in entries.values()),
            "wav2vec2_tensors": len(copy)}


def _check_output(src: str, dst: str) -> None:
    """`InputError` for an output path `convert_to_safetensors` cannot write, before anything is read."""
    if not dst.endswith(SAFETENSORS_SUFFIX):
        raise InputError(f"output {dst} must end with {SAFETENSORS_SUFFIX}, e.g. "
                         f"{os.path.splitext(dst)[0] + SAFETENSORS_SUFFIX}")
    if os.path.realpath(src) == os.path.realpath(dst) or (
            os.path.exists(src) and os.path.exists(dst) and os.path.samefile(src, dst)):
        raise InputError(f"output {dst} is the source file itself; write the converted file under another name")
    folder = os.path.dirname(dst) or os.curdir
    if not os.path.isdir(folder):
        what = "is a file" if os.path.exists(folder) else "does not exist"
        raise InputError(f"cannot write {dst}: the folder {folder} {what}; create it first or choose another "
                         "output path")
