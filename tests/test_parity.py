"""Golden parity: our modules under the stand-in weights reproduce the reference's outputs.

Tolerances (float32, CPU) are those of tests/data/parity/README.md.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from imtalker_core import encode_identity, generate_motion, render_frames
from imtalker_core.generator.audio import AudioEncoder
from tests.helpers.standin import parity_file

LATENT_TOL = 1e-4
SAMPLE_TOL = 1e-3


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module")
def renderer_golden():
    return load_file(parity_file("renderer_golden.safetensors"))


@pytest.fixture(scope="module")
def generator_golden():
    return load_file(parity_file("generator_golden.safetensors"))


def as_images(u8: torch.Tensor) -> torch.Tensor:
    """The fixture's image convention: uint8 HWC → float CHW / 255."""
    if u8.dim() == 3:
        u8 = u8[None]
    return u8.permute(0, 3, 1, 2).float() / 255


@torch.no_grad()
def test_renderer_latents_and_maps(standin_renderer, renderer_golden):
    g, r = renderer_golden, standin_renderer
    source, driving = as_images(g["source_u8"]), as_images(g["driving_u8"])
    identity = encode_identity(r, source)
    assert max_diff(identity.vector, g["f_global"]) <= LATENT_TOL
    assert max_diff(identity.motion, g["z_source"]) <= LATENT_TOL
    assert max_diff(r.encode_motion(driving), g["z_driving"]) <= LATENT_TOL
    assert max_diff(r.adapt(identity.motion, identity.vector), g["z_source_adapted"]) <= LATENT_TOL
    z_driving = r.adapt(g["z_driving"], identity.vector.expand(2, -1))
    assert max_diff(z_driving, g["z_driving_adapted"]) <= LATENT_TOL
    assert max_diff(identity.motion_maps[0], g["motion_map_source_8"]) <= LATENT_TOL
    assert max_diff(identity.motion_maps[3], g["motion_map_source_64"]) <= LATENT_TOL


@torch.no_grad()
def test_renderer_frames(standin_renderer, renderer_golden):
    g, r = renderer_golden, standin_renderer
    identity = encode_identity(r, as_images(g["source_u8"]))
    motion = r.encode_motion(as_images(g["driving_u8"]))
    frames = render_frames(r, identity, motion, batch_size=2)
    diff = (frames - g["frames"]).abs().flatten()
    assert diff.mean().item() <= 2e-5
    assert torch.quantile(diff[::7], 0.999).item() <= 1e-3
    assert diff.max().item() <= 5e-2


@pytest.fixture(scope="module")
def fresh_noise_golden():
    return load_file(parity_file("generator_golden_fresh_noise.safetensors"))


def _controls(g, use: bool) -> dict:
    return {"pose": g["pose"], "cam": g["cam"], "gaze": g["gaze"]} if use else {}


@pytest.mark.parametrize("name,kwargs", [
    ("sample_audio_cfg2", {"cfg_scale": 2.0}),
    ("sample_audio_cfg1", {"cfg_scale": 1.0}),
    ("sample_all_conditions_cfg3", {"cfg_scale": 3.0, "controls": True}),
])
def test_generator_samples_fixed_noise(standin_generator, generator_golden, name, kwargs):
    """The reference's `--fix_noise_seed` mode: every window starts from the same noise."""
    g = generator_golden
    controls = _controls(g, kwargs.pop("controls", False))
    sample = generate_motion(standin_generator, g["audio_features"], g["z_ref"], steps=10, seed=7,
                             noise="fixed_per_window", **kwargs, **controls)
    assert max_diff(sample, g[name][0]) <= SAMPLE_TOL


@pytest.mark.parametrize("name,seed,cfg_scale,controls", [
    ("sample_cfg2_seed7", 7, 2.0, False),
    ("sample_cfg3_seed42_all", 42, 3.0, True),
])
def test_generator_samples_default_noise(standin_generator, fresh_noise_golden, name, seed, cfg_scale, controls):
    """The default is the reference's default: seeded once, fresh noise for every window."""
    g = fresh_noise_golden
    sample = generate_motion(standin_generator, g["audio_features"], g["z_ref"], steps=10, seed=seed,
                             cfg_scale=cfg_scale, **_controls(g, controls))
    assert max_diff(sample, g[name][0]) <= SAMPLE_TOL


@pytest.mark.parametrize("mode", ["reference", "fixed_per_window"])
def test_sampler_initial_noise_per_window(standin_generator, generator_golden, fresh_noise_golden, monkeypatch,
                                          mode):
    """The noise the sampler integrates from, window by window, is the reference's for each mode."""
    import imtalker_core.generator.model as generator_model

    starts = []
    real_euler = generator_model.euler

    def recording_euler(velocity, x, grid, callback=None):
        starts.append(x.clone())
        return real_euler(velocity, x, grid, callback)

    monkeypatch.setattr(generator_model, "euler", recording_euler)
    g = fresh_noise_golden
    generate_motion(standin_generator, g["audio_features"], g["z_ref"], steps=2, seed=7, cfg_scale=1.0, noise=mode)
    expected = (list(g["x0_windows_seed7"]) if mode == "reference"
                else [generator_golden["x0_seed7"]] * 3)
    assert len(starts) == 3
    for got, want in zip(starts, expected):
        assert torch.equal(got, want)


def test_audio_features():
    g = load_file(parity_file("audio_golden.safetensors"))
    encoder = AudioEncoder.from_folder(parity_file("tiny-wav2vec2")).eval()
    assert max_diff(encoder.normalize(g["waveform_16k"][None]), g["normalized"]) <= LATENT_TOL
    features = encoder(g["waveform_16k"])
    assert features.shape == (1, 58, 32)
    assert max_diff(features, g["features"]) <= LATENT_TOL
