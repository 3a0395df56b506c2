"""The wav2vec2 framing: bounded-memory chunking of the CNN, windowed transformer, frame counts."""
from __future__ import annotations

import copy

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode

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


class _Float64OffCpu(TorchFunctionMode):
    """Records every torch call that returns a float64 tensor on a device other than the CPU."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor) and value.dtype == torch.float64 and value.device.type != "cpu":
                self.calls.append(getattr(func, "__name__", repr(func)))
        return out


@pytest.mark.parametrize("seconds", [3, 31])  # 31 s: the chunked CNN with its global statistics
def test_no_float64_tensor_on_the_compute_device(tiny_encoder, seconds):
    """MPS has no float64: the audio path keeps all float64 arithmetic on the CPU. Fake tensors on
    the meta device stand for an accelerator (shapes and devices are tracked, nothing is computed)."""
    encoder = copy.deepcopy(tiny_encoder)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        encoder = encoder.to("meta")
        waveform = mode.from_tensor(torch.zeros(16000 * seconds)).to("meta")
        with _Float64OffCpu() as recorder:
            features = encoder(waveform)
    assert features.device.type == "meta" and features.shape == (1, 25 * seconds, 32)
    assert recorder.calls == []


def test_the_float64_rule_is_detected(tiny_encoder):
    """The recorder above does see float64 on a fake device (so its empty list means something)."""
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        waveform = mode.from_tensor(torch.zeros(16000)).to("meta")
        with _Float64OffCpu() as recorder:
            waveform.double().mean()
    assert recorder.calls


@torch.no_grad()
def test_normalisation_matches_a_float64_reference(tiny_encoder):
    torch.manual_seed(2)
    x = torch.randn(2, 20000) * 0.3 + 0.05
    w = x.double()
    want = (w - w.mean(-1, keepdim=True)) / torch.sqrt(w.var(-1, unbiased=False, keepdim=True) + 1e-7)
    assert torch.allclose(tiny_encoder.normalize(x).double(), want, atol=1e-6)
