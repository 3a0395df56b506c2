"""fp32 means fp32: every entry point of the pack runs a float32 model's work with TF32 off on CUDA, unless TF32
was allowed for that model (`precision.set_allow_tf32`, the "tf32" precision); the caller's settings come back.

CUDA's TF32 switches are plain process-wide flags, so the tests run on the CPU with the models treated as CUDA
models (`precision._is_cuda` patched) and read the flags from inside the models' forward passes.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from imtalker_core import MotionGenerator, encode_identity, precision, render_frames
from imtalker_core.config import GeneratorConfig
from imtalker_core.generator.audio import AudioEncoder
from imtalker_core.pipeline import encode_motion, generate_motion
from imtalker_core.precision import allows_tf32, set_allow_tf32, tf32_state
from imtalker_core.stream import stream_frames
from tests.helpers.standin import parity_file
from tests.helpers.tiny_render import tiny_render_case

CALLER = {"matmul": True, "conv": True}  # what the caller (e.g. ComfyUI, or torch's cuDNN default) left on


@pytest.fixture
def as_cuda(monkeypatch):
    """Every device counts as CUDA for `fp32_matmul`; the caller's flags are TF32 on, and restored after."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    monkeypatch.setattr(precision, "_is_cuda", lambda device: True)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def record_flags(*modules: torch.nn.Module) -> list[dict]:
    """The TF32 flags at every forward pass of `modules` (appended as they run)."""
    seen: list[dict] = []
    for module in modules:
        module.register_forward_pre_hook(lambda *_: seen.append(tf32_state()))
    return seen


@pytest.fixture
def models():
    renderer, identity, motion = tiny_render_case(3)
    torch.manual_seed(2)
    generator = MotionGenerator(GeneratorConfig(audio_dim=32, hidden_size=32, depth=2, num_heads=2,
                                                window_frames=6, context_frames=2)).eval()
    encoder = AudioEncoder.from_folder(parity_file("tiny-wav2vec2")).eval()  # 32 wide, as the generator
    return renderer, identity, motion, generator, encoder


def test_every_entry_point_runs_true_float32(as_cuda, models):
    renderer, identity, motion, generator, encoder = models
    seen = {
        "identity": record_flags(renderer.dense_feature_encoder),
        "motion": record_flags(renderer.latent_token_encoder),
        "render": record_flags(renderer.frame_decoder),
        "generator": record_flags(generator.fmt, generator.audio_projection),
        "audio": record_flags(encoder.wav2vec2.feature_extractor, encoder.wav2vec2.encoder),
    }
    image = torch.rand(1, 3, renderer.cfg.image_size, renderer.cfg.image_size)
    encode_identity(renderer, image)
    encode_motion(renderer, image.expand(2, -1, -1, -1))
    render_frames(renderer, identity, motion, batch_size=2)
    features = encoder(torch.randn(8000) * 0.1)
    generate_motion(generator, features, identity.motion, steps=2)
    for name, states in seen.items():
        assert states, f"{name}: the model never ran"
        assert all(state == {"matmul": False, "conv": False} for state in states), (name, states)
    assert tf32_state() == CALLER  # the caller's flags are back


def test_the_stream_runs_true_float32_and_leaves_the_flags_alone_between_frames(as_cuda, models):
    renderer, identity, _, generator, encoder = models
    inside = record_flags(generator.fmt, generator.audio_projection, renderer.frame_decoder,
                          encoder.wav2vec2.encoder)
    wave = (0.3 * np.sin(np.linspace(0, 200, 8000))).astype(np.float32)
    between = []
    for mode in ("whole", "chunked"):
        for _ in stream_frames(renderer, generator, encoder, identity, wave, steps=2, batch_size=2,
                               audio_mode=mode, context_frames=4, lookahead_frames=2):
            between.append(tf32_state())  # the consumer's code runs with its own settings
    assert inside and all(state == {"matmul": False, "conv": False} for state in inside)
    assert between and all(state == CALLER for state in between)


def test_tf32_when_allowed_for_the_model(as_cuda, models):
    renderer, identity, motion, generator, encoder = models
    set_allow_tf32(renderer)
    assert allows_tf32(renderer) and not allows_tf32(generator)
    rendered, generated = record_flags(renderer.frame_decoder), record_flags(generator.fmt)
    render_frames(renderer, identity, motion, batch_size=2)
    generate_motion(generator, encoder(torch.randn(8000) * 0.1), identity.motion, steps=2)
    assert rendered and all(state == {"matmul": True, "conv": True} for state in rendered)
    assert generated and all(state == {"matmul": False, "conv": False} for state in generated)
    set_allow_tf32(renderer, False)
    assert not allows_tf32(renderer)
    rendered.clear()
    render_frames(renderer, identity, motion, batch_size=2)
    assert rendered and all(state == {"matmul": False, "conv": False} for state in rendered)


def test_half_precision_models_are_left_alone(as_cuda, models):
    renderer, identity, motion, *_ = models
    renderer = renderer.to(torch.bfloat16)
    seen = record_flags(renderer.frame_decoder)
    render_frames(renderer, identity, motion, batch_size=2)
    assert seen and all(state == CALLER for state in seen)
