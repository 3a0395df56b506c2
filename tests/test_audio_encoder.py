"""The wav2vec2 framing: bounded-memory chunking of the CNN, windowed transformer, frame counts."""
from __future__ import annotations

import pytest
import torch

from imtalker_core.generator.audio import AudioEncoder
from tests.helpers.standin import parity_file


@pytest.fixture(scope="module")
def tiny_encoder():
    return AudioEncoder.from_folder(parity_file("tiny-wav2vec2")).eval()


@torch.no_grad()
def test_chunked_cnn_equals_whole_clip(tiny_encoder):
    torch.manual_seed(0)
    x = torch.randn(2, 16000 * 5 + 123)
    whole = tiny_encoder.wav2vec2.feature_extractor(x)
    for chunk in (37, 100, 1000):
        assert torch.allclose(tiny_encoder._cnn_features(x, chunk_frames=chunk), whole, atol=1e-5), chunk


@torch.no_grad()
def test_windowed_transformer_is_exact_for_short_clips_and_close_for_long(tiny_encoder):
    torch.manual_seed(1)
    x = torch.randn(16000 * 8)
    whole = tiny_encoder(x, window_frames=None)
    assert whole.shape == (1, 200, 32)
    assert torch.equal(tiny_encoder(x, window_frames=200), whole)
    windows = []
    win = tiny_encoder(x, window_frames=80, overlap_frames=20, callback=lambda d, t: windows.append((d, t)))
    assert win.shape == whole.shape and windows[-1] == (5, 5)
    assert (win - whole).abs().mean() < 0.05 * whole.abs().mean()
    with pytest.raises(ValueError, match="overlap_frames"):
        tiny_encoder(x, window_frames=80, overlap_frames=40)


@torch.no_grad()
def test_frame_count_and_explicit_length(tiny_encoder):
    assert tiny_encoder(torch.randn(4800)).shape[1] == 8  # ceil(4800 · 25 / 16000) = ceil(7.5)
    assert tiny_encoder(torch.randn(16000)).shape[1] == 25
    assert tiny_encoder(torch.randn(16000), num_frames=30).shape[1] == 30
    with pytest.raises(ValueError, match="empty"):
        tiny_encoder(torch.zeros(0))


def test_folder_without_config_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        AudioEncoder.from_folder(tmp_path)
