"""Streaming (imtalker_core.stream, runner.audio_to_stream, `audio --stream`) on tiny models.

The generator here has 6-frame windows with a 2-frame context (the official 50/10 structure, shrunk),
so a 0.5 s clip (13 frames) has three windows (6, 6, 1) and a few renderer batches straddle them.
"""
from __future__ import annotations

import io
import threading

import av
import numpy as np
import pytest
import soundfile
import torch
import torch.nn.functional as F

from imtalker_core import (
    IMTRenderer,
    MotionGenerator,
    cli,
    encode_identity,
    generate_motion,
    render_frames,
    runner,
)
from imtalker_core.config import GeneratorConfig, tiny_renderer_config
from imtalker_core.errors import InputError
from imtalker_core.generator.audio import AudioEncoder
from imtalker_core.generator.model import WindowSampler
from imtalker_core.media.images import to_uint8
from imtalker_core.media.video import BackgroundWriter, RawVideoWriter, VideoWriter
from imtalker_core.stream import (
    ChunkedAudioFeatures,
    StreamTimings,
    prepare_identity,
    stream_frames,
)
from tests.helpers.standin import parity_file

SECONDS = 0.5
FRAMES = 13  # ceil(0.5 s × 25)
WINDOWS = [6, 6, 1]


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(1)
    renderer = IMTRenderer(tiny_renderer_config()).eval()
    for m in renderer.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    torch.manual_seed(2)
    generator = MotionGenerator(GeneratorConfig(audio_dim=32, hidden_size=32, depth=2, num_heads=2,
                                                window_frames=6, context_frames=2)).eval()
    for p in generator.parameters():
        torch.nn.init.normal_(p, std=0.05)
    encoder = AudioEncoder.from_folder(parity_file("tiny-wav2vec2")).eval()  # 32 wide, as the generator
    return runner.Models(renderer, generator, encoder)


@pytest.fixture(scope="module")
def wave():
    rng = np.random.default_rng(3)
    t = np.arange(int(16000 * SECONDS)) / 16000
    return (0.3 * np.sin(2 * np.pi * 180 * t) * rng.uniform(0.2, 1, t.size)).astype(np.float32)


@pytest.fixture(scope="module")
def identity(models):
    torch.manual_seed(5)
    return encode_identity(models.renderer, torch.rand(1, 3, 128, 128))


def batch_pipeline(models, identity, wave, batch_size, **settings):
    """The non-streamed pipeline: whole-clip features → generate_motion → render_frames."""
    # Inside no_grad as the nodes run it; outside, pipeline.render_batches computes with autograd on,
    # which picks other kernels (1-ulp differences).
    with torch.no_grad():
        features = models.audio_encoder(torch.from_numpy(wave), window_frames=1500)
        motion = generate_motion(models.generator, features, identity.motion, **settings)
        return render_frames(models.renderer, identity, motion, batch_size=batch_size)


@pytest.fixture(scope="module")
def reference(models, identity, wave):
    return batch_pipeline(models, identity, wave, 4, cfg_scale=2.0, steps=3, seed=7)


class CountWindows:
    """Counts `WindowSampler.step` calls (windows generated)."""

    def __init__(self, monkeypatch):
        self.count = 0
        original = WindowSampler.step

        def counted(sampler, *args, **kwargs):
            self.count += 1
            return original(sampler, *args, **kwargs)

        monkeypatch.setattr(WindowSampler, "step", counted)


def test_streamed_frames_equal_the_batch_pipeline(models, identity, wave, reference):
    timings = StreamTimings()
    seen = []
    batches = list(stream_frames(models.renderer, models.generator, models.audio_encoder, identity, wave,
                                 cfg_scale=2.0, steps=3, seed=7, batch_size=4, timings=timings,
                                 callback=lambda done, total: seen.append((done, total))))
    assert [b.shape[0] for b in batches] == [4, 4, 4, 1]  # [4, 8) straddles windows 0 and 1
    assert torch.equal(torch.cat(batches), reference)
    assert seen == [(4, FRAMES), (8, FRAMES), (12, FRAMES), (13, FRAMES)]
    assert [w.frames for w in timings.windows] == WINDOWS
    assert timings.frames == FRAMES and timings.batches == 4 and timings.first_batch_frames == 4
    assert 0 < timings.first_frame_s <= timings.total_s
    assert timings.steady_fps > 0


def test_controls_fixed_noise_and_a_prepared_identity_stay_exact(models, identity, wave):
    settings = {"cfg_scale": 1.0, "steps": 2, "seed": 11, "noise": "fixed_per_window",
                "pose": torch.full((9, 3), 0.2), "gaze": torch.full((20, 2), -0.1)}  # short pose: zero-padded
    expected = batch_pipeline(models, identity, wave, 5, **settings)
    prepared = prepare_identity(models.renderer, identity)
    got = torch.cat(list(stream_frames(models.renderer, models.generator, models.audio_encoder, prepared, wave,
                                       batch_size=5, **settings)))
    assert torch.equal(got, expected)


def test_first_batch_comes_out_after_the_first_window_only(models, identity, wave, reference, monkeypatch):
    windows = CountWindows(monkeypatch)
    stream = stream_frames(models.renderer, models.generator, models.audio_encoder, identity, wave, cfg_scale=2.0,
                           steps=3, seed=7, batch_size=4)
    assert windows.count == 0  # nothing runs before the first next()
    first = next(stream)
    assert windows.count == 1 and torch.equal(first, reference[:4])
    rest = list(stream)
    assert windows.count == len(WINDOWS)
    assert torch.equal(torch.cat([first, *rest]), reference)


def test_a_small_first_batch_changes_only_the_batching(models, identity, wave, reference):
    timings = StreamTimings()
    batches = list(stream_frames(models.renderer, models.generator, models.audio_encoder, identity, wave,
                                 cfg_scale=2.0, steps=3, seed=7, batch_size=4, first_batch_size=1, timings=timings))
    assert [b.shape[0] for b in batches] == [1, 4, 4, 4]
    assert timings.first_batch_frames == 1
    assert torch.allclose(torch.cat(batches), reference, atol=1e-5, rtol=0)


def test_interrupt_stops_the_stream(models, identity, wave, monkeypatch):
    class Stop(Exception):
        pass

    windows = CountWindows(monkeypatch)
    stop = threading.Event()

    def check_interrupt():
        if stop.is_set():
            raise Stop

    stream = stream_frames(models.renderer, models.generator, models.audio_encoder, identity, wave, cfg_scale=2.0,
                           steps=3, seed=7, batch_size=4, check_interrupt=check_interrupt)
    next(stream)
    stop.set()
    with pytest.raises(Stop):
        next(stream)
    # batch [4, 8) needs window 1, which stopped at its first Euler step; window 2 never started
    assert windows.count == 2
    with pytest.raises(StopIteration):
        next(stream)


def test_bad_settings_are_refused_when_called(models, identity, wave):
    def call(**kw):
        return stream_frames(models.renderer, models.generator, models.audio_encoder,
                             kw.pop("identity", identity), kw.pop("audio", wave), **kw)
    with pytest.raises(InputError, match="audio_mode"):
        call(audio_mode="live")
    with pytest.raises(InputError, match="first batch size"):
        call(first_batch_size=0)
    with pytest.raises(InputError, match="mono"):
        call(audio=np.zeros((2, 800), np.float32))
    with pytest.raises(InputError, match="NaN"):
        call(audio=np.full(800, np.nan, np.float32))
    with pytest.raises(InputError, match="Identity"):
        call(identity=torch.zeros(1, 32))


def test_cnn_interpolation_is_an_exact_decimation(models):
    """What makes spans of audio line up with the clip's frames: T frames of audio padded to T·640 samples
    give 2T - 1 CNN frames, and the align-corners interpolation to T frames takes every second one."""
    encoder = models.audio_encoder
    for frames in (1, 7, 40):
        x = torch.randn(1, frames * 640)
        cnn = encoder._cnn_features(x)
        assert cnn.shape[-1] == 2 * frames - 1
        assert torch.equal(F.interpolate(cnn, size=frames, mode="linear", align_corners=True), cnn[..., ::2])


def test_chunked_features_are_aligned_with_the_whole_clip(models):
    encoder = models.audio_encoder
    rng = np.random.default_rng(0)
    wave = (0.1 * rng.standard_normal(16000 * 2)).astype(np.float32)  # 50 frames
    whole = encoder(torch.from_numpy(wave), window_frames=None)
    chunks = [wave[i:i + 999] for i in range(0, wave.size, 999)]
    windows = list(ChunkedAudioFeatures(encoder, window_frames=8, context_frames=6, lookahead_frames=3)
                   .windows(chunks))
    assert [first for first, _ in windows] == list(range(0, 50, 8))
    chunked = torch.cat([f for _, f in windows], dim=1)
    assert chunked.shape == whole.shape
    error = (chunked - whole).abs().mean()
    shifted = (chunked[:, 1:] - whole[:, :-1]).abs().mean()
    assert 0 < error < 0.1 * shifted  # close to the clip's own frames, far from their neighbours
    # context and look-ahead covering the clip: every span is the whole clip
    full = ChunkedAudioFeatures(encoder, window_frames=8, context_frames=50, lookahead_frames=50)
    assert torch.equal(torch.cat([f for _, f in full.windows(chunks)], dim=1), whole)


def test_chunked_mode_streams_live_input(models, identity, wave, reference):
    consumed = []

    def live(piece=700):
        for start in range(0, wave.size, piece):
            consumed.append(min(start + piece, wave.size))
            yield wave[start:start + piece]

    stream = stream_frames(models.renderer, models.generator, models.audio_encoder, identity, live(),
                           cfg_scale=2.0, steps=3, seed=7, batch_size=4, audio_mode="chunked", context_frames=2,
                           lookahead_frames=1)
    first = next(stream)
    # window 0 (6 frames) + 1 frame of look-ahead = 4480 samples were needed; not the whole clip
    assert 7 * 640 <= consumed[-1] < 7 * 640 + 700 < wave.size
    frames = torch.cat([first, *stream])
    assert frames.shape == reference.shape and consumed[-1] == wave.size
    assert not torch.equal(frames, reference)  # the features come from spans, not the whole clip
    # with context and look-ahead covering the clip, the chunked mode is the whole-clip computation
    full = torch.cat(list(stream_frames(models.renderer, models.generator, models.audio_encoder, identity, live(),
                                        cfg_scale=2.0, steps=3, seed=7, batch_size=4, audio_mode="chunked",
                                        context_frames=100, lookahead_frames=100)))
    assert torch.allclose(full, reference, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- writers


class WriteOnly:
    """A pipe-like binary stream: no seek, no tell."""

    def __init__(self):
        self.data = bytearray()
        self.flushed = 0

    def write(self, data):
        self.data += bytes(data)
        return len(data)

    def flush(self):
        self.flushed += 1


def frames_uint8(n, size=64, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (1, size, size, 3), dtype=np.uint8)
    return np.stack([np.roll(base[0], 2 * i, axis=1) for i in range(n)])


def decode_count(source) -> tuple[int, bool]:
    with av.open(source) as container:
        return sum(1 for _ in container.decode(video=0)), bool(container.streams.audio)


def test_fragmented_mp4_to_a_stream_and_to_a_file(tmp_path):
    frames = frames_uint8(30)
    target = WriteOnly()
    with VideoWriter(target, 25, audio=(np.zeros(16000, np.float32), 16000), preset="veryfast",
                     keyframe_interval=10, tune="zerolatency") as writer:
        for start in range(0, 30, 7):
            writer.write(frames[start:start + 7])
    data = bytes(target.data)
    assert data[4:8] == b"ftyp" and data.count(b"moof") >= 3 and target.flushed
    assert decode_count(io.BytesIO(data)) == (30, True)
    path = tmp_path / "live.mp4"
    with VideoWriter(path, 25, fragmented=True, keyframe_interval=10) as writer:
        writer.write(frames)
        grown = writer.partial_path.read_bytes()
    assert b"moof" in path.read_bytes() and not writer.partial_path.exists()
    assert decode_count(str(path)) == (30, False)
    assert grown[4:8] == b"ftyp"  # readable while it grows: the header is written first


def test_raw_writer_writes_the_frames_bytes():
    frames = frames_uint8(3, size=6)
    target = WriteOnly()
    with RawVideoWriter(target) as writer:
        writer.write(frames[:2])
        writer.write(frames[2].astype(np.float32) / 255)
        with pytest.raises(InputError, match="one size"):
            writer.write(np.zeros((1, 4, 4, 3), np.uint8))
    assert bytes(target.data) == frames.tobytes() and writer.frames_written == 3


def test_background_writer_gives_the_same_output():
    frames = frames_uint8(12)
    outputs = {}
    for threaded in (False, True):
        raw, mp4 = WriteOnly(), WriteOnly()
        for sink in (RawVideoWriter(raw), VideoWriter(mp4, 25, preset="veryfast", keyframe_interval=5)):
            writer = BackgroundWriter(sink, max_pending=1) if threaded else sink
            for start in range(0, 12, 3):
                writer.write(torch.from_numpy(frames[start:start + 3]))
            writer.close()
        outputs[threaded] = (bytes(raw.data), bytes(mp4.data))
    assert outputs[True] == outputs[False]
    assert outputs[True][0] == frames.tobytes() and decode_count(io.BytesIO(outputs[True][1]))[0] == 12


class Broken(Exception):
    pass


class FailingSink:
    def __init__(self, fail_at):
        self.fail_at, self.written, self.closed, self.aborted = fail_at, 0, False, False

    def write(self, frames):
        if self.written == self.fail_at:
            raise Broken(f"sink failed at batch {self.written}")
        self.written += 1

    def close(self):
        self.closed = True

    def abort(self):
        self.aborted = True


def test_background_writer_error_surfaces_in_the_caller():
    sink = FailingSink(fail_at=1)
    writer = BackgroundWriter(sink, max_pending=1)
    with pytest.raises(Broken, match="batch 1"):
        for _ in range(50):  # the error is raised by a later write (or close), never lost
            writer.write(np.zeros((1, 2, 2, 3), np.uint8))
        writer.close()
    assert sink.aborted and not sink.closed and sink.written == 1
    writer.abort()  # already finished: harmless

    sink = FailingSink(fail_at=0)
    writer = BackgroundWriter(sink)
    writer.write(np.zeros((1, 2, 2, 3), np.uint8))
    with pytest.raises(Broken):
        writer.close()
    assert sink.aborted and not sink.closed


def test_background_writer_aborts_on_an_error_in_the_with_block():
    sink = FailingSink(fail_at=-1)
    with pytest.raises(KeyError), BackgroundWriter(sink) as writer:
        writer.write(np.zeros((1, 2, 2, 3), np.uint8))
        raise KeyError("producer failed")
    assert sink.aborted and not sink.closed


# --------------------------------------------------------------------------- runner and command line


SPEECH_FRAMES = 8  # 0.3 s: windows of 6 and 2 frames


@pytest.fixture(scope="module")
def speech(tmp_path_factory, media_dir):
    data, rate = soundfile.read(media_dir / "speech_16k_mono.wav", dtype="float32")
    path = tmp_path_factory.mktemp("audio") / "speech_0.3s.wav"
    soundfile.write(path, data[rate: rate + int(0.3 * rate)], rate)
    return path


@pytest.fixture(scope="module")
def photo(media_dir):
    return media_dir / "photo_512.png"


@pytest.fixture(scope="module")
def runner_reference(models, photo, speech):
    """`audio_to_video`'s frames (batch size 4, 2 steps) as uint8 `[T, S, S, 3]`, from the same steps
    without the MP4 compression."""
    wave, rate = runner.load_audio(speech)
    source, _, _ = runner._prepare_source(photo, runner.CropSettings(), models.renderer.cfg.image_size)
    identity = encode_identity(models.renderer, source)
    frames = batch_pipeline(models, identity, runner.to_mono_16k(wave, rate), 4, cfg_scale=3.0, steps=2, seed=42)
    return to_uint8(frames.permute(0, 2, 3, 1).numpy())


def test_runner_streams_raw_frames_and_a_fragmented_mp4(models, photo, speech, runner_reference, tmp_path):
    raw = WriteOnly()
    timings = runner.audio_to_stream(models, photo, speech, raw, raw=True, steps=2, batch_size=4)
    assert bytes(raw.data) == runner_reference.tobytes() and timings.frames == SPEECH_FRAMES
    out = tmp_path / "live.mp4"
    runner.audio_to_stream(models, photo, speech, out, steps=2, batch_size=4, first_batch_size=1,
                           background=False)
    assert decode_count(str(out)) == (SPEECH_FRAMES, True) and not list(tmp_path.glob("*.partial*"))
    with pytest.raises(InputError, match="raw frames are written to a stream"):
        runner.audio_to_stream(models, photo, speech, tmp_path / "x.mp4", raw=True)


def test_command_line_stream(models, photo, speech, runner_reference, tmp_path, monkeypatch, capsysbinary):
    monkeypatch.setattr(runner, "load_models", lambda *args, **kwargs: models)
    common = [str(photo), str(speech), "--device", "cpu", "--steps", "2", "--batch-size", "4", "--no-download"]
    assert cli.main(["audio", *common, "-o", "-", "--stream-raw"]) == 0
    assert capsysbinary.readouterr().out == runner_reference.tobytes()
    # refused before any model loads
    monkeypatch.setattr(runner, "load_models", lambda *args, **kwargs: pytest.fail("models loaded"))
    assert cli.main(["audio", *common, "-o", "-"]) == 2  # standard output needs --stream
    assert cli.main(["audio", *common, "-o", str(tmp_path / "b.mp4"), "--first-batch-size", "1"]) == 2
    assert cli.main(["audio", *common, "-o", str(tmp_path / "c.mp4"), "--stream-raw"]) == 2
    assert not list(tmp_path.iterdir())
