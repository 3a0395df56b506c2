"""Deterministic stand-in weights in the official checkpoint layout (the parity fixtures' rule).

Each tensor is a pure function of its manifest entry: a PCG64 generator seeded with the first 16
hex digits of sha256(key) draws `normal(mean, std)` or `uniform(low, high)` as float32; `zeros`
entries are zeros of their dtype; `derived` buffers are not written (the model computes them).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).resolve().parent.parent / "data"
PARITY = DATA / "parity"
MEDIA = DATA / "media"
PREFIX = {"renderer": "gen.", "generator": "model."}


def parity_file(name: str) -> Path:
    """A vendored fixture; a missing one is an error, never a skip."""
    path = PARITY / name
    if not path.exists():
        raise FileNotFoundError(f"parity fixture tests/data/parity/{name} is missing; restore it from git")
    return path


def manifest() -> dict:
    with open(parity_file("official_keys.json")) as f:
        return json.load(f)


def standin_tensor(entry: dict) -> torch.Tensor | None:
    init = entry["init"]
    shape = tuple(entry["shape"])
    if init["kind"] == "derived":
        return None
    if init["kind"] == "zeros":
        return torch.zeros(shape, dtype=getattr(torch, entry["dtype"]))
    seed = int(hashlib.sha256(entry["key"].encode()).hexdigest()[:16], 16)
    rng = np.random.Generator(np.random.PCG64(seed))
    if init["kind"] == "normal":
        values = rng.standard_normal(shape) * init["std"] + init["mean"]
    elif init["kind"] == "uniform":
        values = rng.uniform(init["low"], init["high"], shape)
    else:
        raise ValueError(f"unknown init kind {init['kind']!r} for {entry['key']}")
    return torch.from_numpy(np.asarray(values, dtype=np.float32).reshape(shape))


def standin_state_dict(kind: str) -> dict[str, torch.Tensor]:
    """Unprefixed stand-in state dict of 'renderer' or 'generator'."""
    out = {}
    for entry in manifest()[kind]["entries"]:
        t = standin_tensor(entry)
        if t is not None:
            out[entry["key"]] = t
    return out


def standin_renderer(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """The full-size renderer (official configuration) on the stand-in weights, in eval mode without
    gradients, on `device` in `dtype` (the benchmarks' model: speed does not depend on the values)."""
    from imtalker_core import IMTRenderer

    model = IMTRenderer().eval().requires_grad_(False)
    model.load_state_dict(standin_state_dict("renderer"), strict=False)
    return model.to(device, dtype)


def write_official_layout(kind: str, path: os.PathLike, extra: dict | None = None,
                          state: dict[str, torch.Tensor] | None = None) -> Path:
    """`torch.save({"state_dict": {prefix + key: tensor}, **extra})`, as the official files."""
    state = state if state is not None else standin_state_dict(kind)
    payload = {"state_dict": {PREFIX[kind] + k: v for k, v in state.items()}}
    payload.update(extra or {})
    torch.save(payload, path)
    return Path(path)


def write_small_wav2vec2(folder: os.PathLike, seed: int = 0) -> Path:
    """A random wav2vec2 with the real model's output width (768) but one small layer, saved in
    Hugging Face format beside the tiny fixture's preprocessor config: it lets the audio-driven
    path run end to end on stand-in generator weights without the 360 MB original."""
    import shutil

    from transformers import Wav2Vec2Config, Wav2Vec2Model

    folder = Path(folder)
    config = Wav2Vec2Config.from_pretrained(PARITY / "tiny-wav2vec2")
    config.hidden_size = 768
    config.num_attention_heads = 12
    config.num_hidden_layers = 1
    config.intermediate_size = 256
    config.num_conv_pos_embedding_groups = 16
    torch.manual_seed(seed)
    Wav2Vec2Model(config).eval().save_pretrained(folder)
    shutil.copy(PARITY / "tiny-wav2vec2" / "preprocessor_config.json", folder)
    return folder
