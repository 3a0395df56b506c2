"""Shared fixtures: stand-in checkpoints are written once per test run."""
from __future__ import annotations

import logging

import pytest
import torch

from tests.helpers.standin import MEDIA, standin_state_dict, write_official_layout, write_small_wav2vec2

logging.getLogger("imtalker_core").setLevel(logging.DEBUG)


@pytest.fixture(scope="session")
def standin_state():
    """Unprefixed stand-in state dicts {'renderer': ..., 'generator': ...}."""
    return {kind: standin_state_dict(kind) for kind in ("renderer", "generator")}


@pytest.fixture(scope="session")
def standin_dir(tmp_path_factory, standin_state):
    """A models folder laid out like `models/imtalker/` with stand-in `renderer.ckpt`,
    `generator.ckpt` (official layout) and a small random wav2vec2 as `wav2vec2-base-960h/`."""
    root = tmp_path_factory.mktemp("models")
    for kind in ("renderer", "generator"):
        write_official_layout(kind, root / f"{kind}.ckpt", state=standin_state[kind])
    write_small_wav2vec2(root / "wav2vec2-base-960h")
    return root


@pytest.fixture(scope="session")
def standin_renderer(standin_dir):
    from imtalker_core import load_renderer
    return load_renderer(standin_dir / "renderer.ckpt")


@pytest.fixture(scope="session")
def standin_generator(standin_dir):
    from imtalker_core import load_generator
    return load_generator(standin_dir / "generator.ckpt")


@pytest.fixture(autouse=True)
def _no_grad_leak():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def media_dir():
    return MEDIA
