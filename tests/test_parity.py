"""Golden parity: our modules under the stand-in weights reproduce the reference's outputs.

Tolerances (float32, CPU) are those of tests/data/parity/README.md, except for the frames: the
renderer's guided resampler copies whole feature blocks chosen by an argmax over a nearly flat
attention map (under the stand-in weights most top-1/top-2 margins are below 1e-6 of the top
weight), so a different CPU, torch build, thread count or memory layout can flip a near-tie and
change one 8x8 block. The frame checks are what such a flip cannot fake (mean error, PSNR, share of
values off by more than 1e-3), plus an explicit check that every anchor pick with a clear margin
is the float64 one. The renderer tests run under 1 and 2 threads.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from safetensors.torch import load_file

from imtalker_core import encode_identity, generate_motion, render_frames
from imtalker_core.generator.audio import AudioEncoder
from imtalker_core.renderer.transfer import CoarseTransfer
from tests.helpers.standin import parity_file

LATENT_TOL = 1e-4
SAMPLE_TOL = 1e-3
FRAME_MEAN_TOL = 2e-5
FRAME_MIN_PSNR_DB = 60.0
FRAME_OFF_BY = 1e-3        # a value "off" differs from the golden frame by more than this ...
FRAME_MAX_OFF_SHARE = 0.01  # ... and at most this share of the values may be off
# Anchor picks are compared where (top1 - top2) / top1 of the head-averaged map exceeds this.
ARGMAX_CLEAR_MARGIN = 1e-4


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


@pytest.fixture(params=[1, 2], ids=lambda n: f"{n}-threads")
def threads(request):
    """Run a test under a given intra-op thread count (reductions may split differently)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@torch.no_grad()
def test_renderer_latents_and_maps(standin_renderer, renderer_golden, threads):
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


def frame_errors(frames: torch.Tensor, golden: torch.Tensor) -> dict[str, float]:
    """Mean absolute error, PSNR (dB, peak 1) and share of values off by more than FRAME_OFF_BY."""
    diff = (frames.double() - golden.double()).abs()
    mse = diff.pow(2).mean().item()
    return {"mean": diff.mean().item(), "psnr": 10 * math.log10(1 / mse) if mse > 0 else math.inf,
            "off_share": (diff > FRAME_OFF_BY).double().mean().item(), "max": diff.max().item()}


def test_frame_checks_catch_a_real_error(standin_renderer, renderer_golden):
    """The frame checks are not toothless: a 1% brightness error fails them, a flipped block does not."""
    g = renderer_golden
    assert frame_errors(g["frames"] * 0.99, g["frames"])["psnr"] < FRAME_MIN_PSNR_DB
    flipped = g["frames"].clone()
    flipped[0, :, 200:208, 300:308] = flipped[0, :, 208:216, 300:308]  # one 8x8 block from its neighbour
    errors = frame_errors(flipped, g["frames"])
    assert errors["off_share"] <= FRAME_MAX_OFF_SHARE and errors["mean"] <= FRAME_MEAN_TOL


def _anchor_level(renderer) -> int:
    coarse = [i for i, level in enumerate(renderer.imt) if isinstance(level, CoarseTransfer)]
    return coarse[-1]


def _head_mean_attention(attention, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """The head-averaged attention map `[B, Nq, Nk]` of a FullAttention, written out independently."""
    q, k = attention.q_proj(query), attention.k_proj(key)
    b, n, c = q.shape
    heads = attention.num_heads
    q = q.view(b, n, heads, c // heads).transpose(1, 2)
    k = k.view(b, -1, heads, c // heads).transpose(1, 2)
    return ((q @ k.transpose(-2, -1)) * attention.scale).softmax(dim=-1).mean(dim=1)


@pytest.fixture(scope="module")
def float64_anchor_picks(standin_renderer, renderer_golden):
    """The anchor level's picks computed in float64 from the images on: (indices, clear) `[2, 4096]`,
    `clear` marking picks whose relative top-1/top-2 margin exceeds ARGMAX_CLEAR_MARGIN."""
    g, level = renderer_golden, _anchor_level(standin_renderer)
    r64 = copy.deepcopy(standin_renderer).double()
    with torch.no_grad():
        source, driving = as_images(g["source_u8"]).double(), as_images(g["driving_u8"]).double()
        features, vector = r64.encode_identity(source)
        source_maps = r64.decode_motion(r64.adapt(r64.encode_motion(source), vector))
        driving_maps = r64.decode_motion(r64.adapt(r64.encode_motion(driving), vector.expand(2, -1)))
        query = driving_maps[level].flatten(2).transpose(1, 2)
        key = source_maps[level].expand(2, -1, -1, -1).flatten(2).transpose(1, 2)
        top = _head_mean_attention(r64.imt[level].block_efc, query, key).topk(2, dim=-1)
    clear = (top.values[..., 0] - top.values[..., 1]) / top.values[..., 0] > ARGMAX_CLEAR_MARGIN
    return top.indices[..., 0], clear


@torch.no_grad()
def test_renderer_frames(standin_renderer, renderer_golden, float64_anchor_picks, threads):
    g, r = renderer_golden, standin_renderer
    picked = {}
    hook = r.imt[_anchor_level(r)].register_forward_hook(lambda module, args, out: picked.update(argmax=out[1]))
    try:
        identity = encode_identity(r, as_images(g["source_u8"]))
        frames = render_frames(r, identity, r.encode_motion(as_images(g["driving_u8"])), batch_size=2)
    finally:
        hook.remove()
    errors = frame_errors(frames, g["frames"])
    assert errors["mean"] <= FRAME_MEAN_TOL, errors
    assert errors["psnr"] >= FRAME_MIN_PSNR_DB, errors
    assert errors["off_share"] <= FRAME_MAX_OFF_SHARE, errors
    # Every anchor pick with a clear margin is the float64 pick (near-ties may go either way).
    indices, clear = float64_anchor_picks
    assert clear.float().mean() > 0.5, "too few clear picks for the check to mean anything"
    assert torch.equal(picked["argmax"][clear], indices[clear])


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
