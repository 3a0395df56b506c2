"""The renderer's output path (imtalker_core.pipeline): bytes made on the device, the one-batch look-ahead
that overlaps a GPU's rendering with the caller's work, and the deferred finiteness check.

The look-ahead only runs from a CUDA renderer to the CPU; here it is forced on the CPU (`_lookahead`), where
the same code orders, checks and hands out the batches.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from imtalker_core import IMTRenderer, pipeline, render_batches, render_frames
from imtalker_core.errors import IMTalkerError, InputError
from tests.helpers.tiny_render import tiny_render_case

FRAMES = 5


@pytest.fixture(scope="module")
def tiny():
    return tiny_render_case(FRAMES)


def to_uint8(values: np.ndarray) -> np.ndarray:
    # Imported here: the media package needs PyAV and OpenCV, which the GPU machine's image may lack, and the
    # CUDA test below must run there.
    from imtalker_core.media.images import to_uint8 as convert
    return convert(values)


def test_uint8_tensor_rounds_like_the_cpu_converter():
    # Ties at k + 0.5 steps (half to even in both), values outside [0, 1], the ends.
    steps = torch.arange(0, 256, dtype=torch.float32)
    values = torch.cat([steps / 255, (steps + 0.5) / 255, (steps + 0.49) / 255,
                        torch.tensor([-0.2, -0.0, 1.0, 1.3, 1e-9])])
    values = torch.cat([values, torch.rand(4000, generator=torch.Generator().manual_seed(2)) * 1.2 - 0.1])
    ours = pipeline.to_uint8_tensor(values)
    assert ours.dtype == torch.uint8
    np.testing.assert_array_equal(ours.numpy(), to_uint8(values.numpy()))


def test_uint8_output_is_the_float_output_in_bytes(tiny):
    model, identity, motion = tiny
    floats = render_frames(model, identity, motion, batch_size=2)
    as_bytes = torch.cat(list(render_batches(model, identity, motion, batch_size=2, output_dtype=torch.uint8)))
    assert as_bytes.dtype == torch.uint8 and as_bytes.shape == floats.shape
    assert as_bytes.float().std() > 10  # real pictures, not a constant
    np.testing.assert_array_equal(as_bytes.numpy(), to_uint8(floats.numpy()))


def test_unsupported_output_dtype_is_refused(tiny):
    model, identity, motion = tiny
    with pytest.raises(InputError, match="output_dtype"):
        render_batches(model, identity, motion, output_dtype=torch.float16)


def test_lookahead_is_only_for_gpu_to_cpu():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert pipeline._lookahead(cuda, "cpu") == 1
    assert pipeline._lookahead(cuda, None) == 0
    assert pipeline._lookahead(cuda, cuda) == 0
    assert pipeline._lookahead(cpu, "cpu") == 0


class Recorder:
    """Records, in order, the interrupt checks (one per launched batch) and the progress reports."""

    def __init__(self, stop_at_check: int | None = None):
        self.events: list = []
        self.stop_at_check = stop_at_check

    def check(self):
        checks = sum(1 for e in self.events if e == "check")
        self.events.append("check")
        if self.stop_at_check is not None and checks + 1 >= self.stop_at_check:
            raise KeyboardInterrupt("stop")

    def progress(self, done, total):
        self.events.append((done, total))


@pytest.fixture
def forced_lookahead(monkeypatch):
    monkeypatch.setattr(pipeline, "_lookahead", lambda device, output_device: 1)


def test_lookahead_gives_the_same_frames_and_reports_at_hand_out(tiny, forced_lookahead):
    model, identity, motion = tiny
    with pipeline.torch.no_grad():
        expected = [pipeline.render_batch(model, *pipeline.prepare_render_source(model, identity),
                                          motion[i:i + 2], output_device="cpu") for i in range(0, FRAMES, 2)]
    record = Recorder()
    batches = list(render_batches(model, identity, motion, batch_size=2, callback=record.progress,
                                  check_interrupt=record.check))
    assert [b.shape[0] for b in batches] == [2, 2, 1]
    for got, want in zip(batches, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # Batch k+1 is launched (its interrupt checks: two per eager batch) before batch k is handed out.
    reports = [e for e in record.events if e != "check"]
    assert reports == [(2, FRAMES), (4, FRAMES), (5, FRAMES)]
    first_report = record.events.index((2, FRAMES))
    assert record.events[:first_report].count("check") == 4


def test_interrupt_during_lookahead_stops_before_more_batches(tiny, forced_lookahead):
    model, identity, motion = tiny
    record = Recorder(stop_at_check=3)  # the first check of the second batch
    got = []
    with pytest.raises(KeyboardInterrupt):
        for batch in render_batches(model, identity, motion, batch_size=2, callback=record.progress,
                                    check_interrupt=record.check):
            got.append(batch)
    assert got == [] and not [e for e in record.events if e != "check"]


@pytest.mark.parametrize("ahead", [0, 1])
def test_non_finite_frames_stop_at_their_batch(tiny, monkeypatch, ahead):
    model, identity, motion = tiny
    monkeypatch.setattr(pipeline, "_lookahead", lambda device, output_device: ahead)
    real_render = IMTRenderer.render
    calls = []

    def render_nan_in_second_batch(self, maps, *args, **kwargs):
        frames = real_render(self, maps, *args, **kwargs)
        calls.append(frames.shape[0])
        return frames * float("nan") if len(calls) == 2 else frames

    monkeypatch.setattr(IMTRenderer, "render", render_nan_in_second_batch)
    got = []
    with pytest.raises(IMTalkerError, match="frames 2–3 came out as NaN"):
        for batch in render_batches(model, identity, motion, batch_size=2, output_dtype=torch.uint8):
            got.append(batch)
    assert len(got) == 1 and got[0].dtype == torch.uint8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_lookahead_and_bytes_match_the_plain_hand_out(tiny, monkeypatch):
    """On a GPU the look-ahead and the pinned non-blocking copies are real: same frames as handing out each
    batch before launching the next, and the bytes are the float frames rounded."""
    model, identity, motion = tiny
    gpu = model.to("cuda")
    try:
        assert pipeline._lookahead(torch.device("cuda"), "cpu") == 1
        ahead = list(render_batches(gpu, identity, motion, batch_size=2))
        as_bytes = torch.cat(list(render_batches(gpu, identity, motion, batch_size=2, output_dtype=torch.uint8)))
        monkeypatch.setattr(pipeline, "_lookahead", lambda device, output_device: 0)
        plain = list(render_batches(gpu, identity, motion, batch_size=2))
    finally:
        model.to("cpu")
    assert [b.device.type for b in ahead] == ["cpu"] * 3
    for got, want in zip(ahead, plain):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(as_bytes, pipeline.to_uint8_tensor(torch.cat(plain)), rtol=0, atol=0)
