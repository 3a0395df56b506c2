"""IMTalker Video To Motion (streamed driving video), bad-frame policies, centre crops instead of
stretching, even-sized frames, and `bridge.notify`.

Most tests swap the renderer's motion encoder for a cheap deterministic stand-in (`FakeEncoder`):
the stand-in renderer costs about 2 s per frame on a CPU, and what is tested here is which pixels
reach the encoder, in which batches, and what happens to the latents afterwards. One test runs the
real stand-in encoder on two frames.
"""
from __future__ import annotations

import logging
import math
import shutil
import sys
import types
from collections import namedtuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests import test_nodes as shared
from tests.test_nodes import FakeComfy, driving_frames, run

# The node tests' fixtures (the pack, its modules, standalone folders, the stand-in renderer), by name.
pack, sub, env_dirs, renderer = shared.pack, shared.sub, shared.env_dirs, shared.renderer

DRIVING = "driving_short.mp4"  # 100 frames, 512x512, 25 fps, 44.1 kHz stereo sound of 3.95 s


class FakeEncoder:
    """Stands for `IMTRenderer.encode_motion`: a latent made of block means of the frame it sees.

    Records the batch sizes, the frames seen, and (with `pending`) how many decoded frames were
    waiting to be encoded at each call.
    """

    def __init__(self, pending=None):
        self.batches, self.seen, self.pending, self.max_pending = [], [], pending, 0
        self.buffers = set()  # the memory blocks the batches lie in
        self.encoded = 0

    def __call__(self, images):
        self.batches.append(images.shape[0])
        self.buffers.add(images.untyped_storage().data_ptr())  # (a CPU encoder gets one-frame slices of it)
        self.seen.append(images.detach().cpu().clone())
        if self.pending is not None:
            self.max_pending = max(self.max_pending, self.pending() - self.encoded)
        self.encoded += images.shape[0]
        return F.adaptive_avg_pool2d(images.float(), (4, 4)).flatten(1)[:, :32] * 10


@pytest.fixture
def fake_encoder(renderer, monkeypatch):
    encoder = FakeEncoder()
    monkeypatch.setattr(renderer.module, "encode_motion", encoder)
    return encoder


@pytest.fixture
def input_dir(tmp_path, media_dir, monkeypatch):
    """A standalone input folder with the driving clip, a clip in a sub-folder and a non-video file."""
    folder = tmp_path / "input"
    (folder / "clips").mkdir(parents=True)
    shutil.copy(media_dir / DRIVING, folder / DRIVING)
    shutil.copy(media_dir / DRIVING, folder / "clips" / "copy.mov")
    (folder / "notes.txt").write_text("not a video")
    monkeypatch.setenv("IMTALKER_INPUT_DIR", str(folder))
    return folder


@pytest.fixture
def progress_updates(sub, monkeypatch):
    """What the nodes report to `bridge.Progress`: ("new", total) per bar, then (done, total) per step."""
    updates = []

    class RecordingProgress:
        def __init__(self, total, what):
            updates.append(("new", total))

        def __call__(self, done, total):
            updates.append((done, total))

    monkeypatch.setattr(sub("nodes.bridge"), "Progress", RecordingProgress)
    return updates


def video_to_motion(pack, renderer, **options):
    defaults = {"video": DRIVING, "crop": "face", "scale": 1.6, "batch_size": 8, "on_bad_frame": "hold"}
    return run(pack, "IMTalkerVideoToMotion", renderer=renderer, **{**defaults, **options})


def write_video(sub, path, frames, fps=25):
    """Frames uint8 [T, H, W, 3] into an H.264 file (lossy, as any driving video)."""
    with sub("imtalker_core.media.video").VideoWriter(path, fps) as writer:
        writer.write(frames)
    return path


# ------------------------------------------------------------------------------------------------
# Video To Motion: what it encodes, its outputs, streaming
# ------------------------------------------------------------------------------------------------

def test_video_to_motion_equals_crop_face_then_encode_motion(pack, sub, renderer, fake_encoder, input_dir,
                                                             media_dir):
    motion, _, fps = video_to_motion(pack, renderer)
    assert motion.latents.shape == (100, 32) and motion.fps == fps == 25.0
    assert motion.latents.dtype == torch.float32 and motion.latents.device.type == "cpu"
    # The composable chain on the same decoded frames: Crop Face (one steady box) → Encode Motion.
    frames = driving_frames(sub, media_dir, 100)
    faces, box, _ = run(pack, "IMTalkerCropFace", image=frames, scale=1.6, on_no_face="center")
    assert box.size < 512  # a real face box, not the whole frame
    (chained,) = run(pack, "IMTalkerEncodeMotion", renderer=renderer, images=faces, fps=25.0, batch_size=8)
    assert torch.equal(motion.latents, chained.latents)
    # center_square on a square video is the whole frame, as the reference takes it.
    centred, _, _ = video_to_motion(pack, renderer, crop="center_square", max_frames=10)
    (whole,) = run(pack, "IMTalkerEncodeMotion", renderer=renderer, images=frames[:10], fps=25.0, batch_size=8)
    assert torch.equal(centred.latents, whole.latents)
    assert not torch.equal(centred.latents, motion.latents[:10])


def test_video_to_motion_outputs_the_videos_own_sound(pack, sub, renderer, fake_encoder, input_dir, media_dir):
    original, rate = sub("imtalker_core.media.audio").load_audio(media_dir / DRIVING)
    _, audio, _ = video_to_motion(pack, renderer, crop="center_square")
    expected = math.ceil(100 * rate / 25)  # 4.0 s of video, 3.95 s of sound: padded with silence
    assert audio["sample_rate"] == rate == 44100
    assert audio["waveform"].shape == (1, 2, expected)
    assert torch.equal(audio["waveform"][0, :, :original.shape[1]], torch.from_numpy(original))
    assert not audio["waveform"][0, :, original.shape[1]:].any()
    short, audio, _ = video_to_motion(pack, renderer, crop="center_square", max_frames=5)
    assert short.latents.shape == (5, 32) and audio["waveform"].shape == (1, 2, math.ceil(5 * rate / 25))


def test_video_to_motion_with_the_real_encoder(pack, sub, renderer, input_dir, media_dir):
    motion, _, _ = video_to_motion(pack, renderer, crop="center_square", max_frames=2, batch_size=2)
    (direct,) = run(pack, "IMTalkerEncodeMotion", renderer=renderer, images=driving_frames(sub, media_dir, 2),
                    fps=25.0, batch_size=2)
    assert motion.latents.shape == (2, 32) and torch.isfinite(motion.latents).all()
    assert torch.equal(motion.latents, direct.latents)


@pytest.mark.parametrize("crop", ["face", "center_square"])
def test_video_to_motion_holds_one_batch_of_frames_at_a_time(pack, sub, renderer, input_dir, monkeypatch, crop):
    """Decoding runs at most one batch ahead of encoding, and the encoder never sees more than
    batch_size frames: memory does not grow with the video."""
    video_module = sub("nodes.video")
    decoded = [0]
    real_read = video_module.read_video

    def counting_read(path, max_frames=None):
        decoded[0] = 0  # per pass

        def frames():
            for frame in real_read(path, max_frames):
                decoded[0] += 1
                yield frame
        return frames()

    monkeypatch.setattr(video_module, "read_video", counting_read)
    encoder = FakeEncoder(pending=lambda: decoded[0])
    monkeypatch.setattr(renderer.module, "encode_motion", encoder)
    motion, _, _ = video_to_motion(pack, renderer, crop=crop, batch_size=3)
    assert motion.latents.shape == (100, 32)
    assert max(encoder.batches) <= 3 and sum(encoder.batches) == 100
    assert encoder.max_pending <= 3
    # Every batch is encoded from one reused buffer: nothing is allocated per batch (a 1080p clip of
    # 750 frames peaked at 421 MiB RSS against 414 MiB for 50 frames; with per-batch tensors kept it
    # grew by about 2 MB a frame).
    assert len(encoder.buffers) == 1


def test_video_to_motion_reports_progress_per_frame_and_stops_on_cancel(pack, sub, renderer, fake_encoder,
                                                                        input_dir, monkeypatch, progress_updates):
    bridge = sub("nodes.bridge")
    updates = progress_updates
    video_to_motion(pack, renderer, crop="face", max_frames=20)
    assert updates[0] == ("new", 40)  # two passes over 20 frames
    assert updates[1:] == [(done, 40) for done in range(1, 41)]

    checks = [0]

    def interrupt_at_frame_12():
        checks[0] += 1
        if checks[0] > 12:
            raise InterruptedError("cancelled")

    monkeypatch.setattr(bridge, "check_interrupt", interrupt_at_frame_12)
    fake_encoder.batches.clear()
    with pytest.raises(InterruptedError):
        video_to_motion(pack, renderer, crop="center_square", batch_size=4)
    assert sum(fake_encoder.batches) <= 12


def test_video_to_motion_lists_and_finds_input_videos(pack, sub, input_dir, tmp_path, renderer, fake_encoder,
                                                     monkeypatch):
    bridge = sub("nodes.bridge")
    cls = pack.NODE_CLASS_MAPPINGS["IMTalkerVideoToMotion"]
    assert bridge.list_input_videos() == ["clips/copy.mov", DRIVING]
    spec = cls.INPUT_TYPES()["required"]["video"]
    assert spec[0] == ["clips/copy.mov", DRIVING] and spec[1]["video_upload"] is True
    assert bridge.input_path("clips/copy.mov") == str(input_dir / "clips" / "copy.mov")
    (tmp_path / "outside.mp4").write_bytes(b"")
    for bad in ("../outside.mp4", str(tmp_path / "outside.mp4"), "missing.mp4", "clips"):
        with pytest.raises(FileNotFoundError, match="not a file in the input folder"):
            bridge.input_path(bad)
    assert cls.VALIDATE_INPUTS(video=DRIVING) is True
    assert "missing.mp4" in cls.VALIDATE_INPUTS(video="missing.mp4")
    assert "choose a driving video" in cls.VALIDATE_INPUTS(video="")
    # A path (absolute, or relative to the input folder) wins over the list.
    outside = tmp_path / "elsewhere.mp4"
    shutil.copy(input_dir / DRIVING, outside)
    assert cls.VALIDATE_INPUTS(video="missing.mp4", video_path=str(outside)) is True
    assert "is not a file" in cls.VALIDATE_INPUTS(video=DRIVING, video_path=str(tmp_path / "nope.mp4"))
    motion, _, _ = video_to_motion(pack, renderer, video="", video_path="clips/copy.mov", crop="center_square",
                                   max_frames=3)
    assert motion.frames == 3
    # IS_CHANGED follows the file, so a replaced video is read again.
    before = cls.IS_CHANGED(video=DRIVING, crop="face")
    (input_dir / DRIVING).write_bytes((input_dir / DRIVING).read_bytes() + b"\0")
    assert cls.IS_CHANGED(video=DRIVING, crop="face") != before
    assert math.isnan(cls.IS_CHANGED(video="missing.mp4"))
    # An empty input folder still gives the prompt a value for 'video', so video_path can be used.
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("IMTALKER_INPUT_DIR", str(empty))
    assert cls.INPUT_TYPES()["required"]["video"][0] == [""]
    assert cls.VALIDATE_INPUTS(video="", video_path=str(outside)) is True


def test_video_to_motion_centre_crops_a_wide_video_without_stretching(pack, sub, renderer, fake_encoder, tmp_path,
                                                                      monkeypatch):
    # 128x64: red | green (the centred square) | blue. Stretching would bring red and blue in.
    frames = np.zeros((4, 64, 128, 3), np.uint8)
    frames[:, :, :32, 0] = frames[:, :, 32:96, 1] = frames[:, :, 96:, 2] = 255
    path = write_video(sub, tmp_path / "wide.mp4", frames)
    monkeypatch.setenv("IMTALKER_INPUT_DIR", str(tmp_path))
    motion, _, _ = video_to_motion(pack, renderer, video="wide.mp4", crop="center_square")
    assert motion.frames == 4
    seen = torch.cat(fake_encoder.seen)  # [4, 3, 512, 512]
    assert seen.shape == (4, 3, 512, 512)
    inner = seen[:, :, 32:-32, 32:-32]  # away from the chroma-subsampled edges
    assert inner[:, 1].min() > 0.9 and inner[:, 0].max() < 0.1 and inner[:, 2].max() < 0.1
    assert path.exists()


# ------------------------------------------------------------------------------------------------
# Bad frames
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bad_video(sub, media_dir, tmp_path_factory):
    """40 frames of the driving clip: 0-2 and 10-12 black, 15-19 a face-less gradient."""
    frames = np.stack(list(sub("imtalker_core.media.video").read_video(media_dir / DRIVING, max_frames=40)))
    frames[0:3] = 0
    frames[10:13] = 0
    gradient = np.linspace(40, 220, 512, dtype=np.float32)[None, :, None]
    frames[15:20] = np.broadcast_to(gradient, (512, 512, 3)).astype(np.uint8)
    folder = tmp_path_factory.mktemp("bad")
    write_video(sub, folder / "bad.mp4", frames)
    return folder


def test_video_to_motion_bad_frame_policies(pack, sub, renderer, fake_encoder, bad_video, monkeypatch, caplog):
    monkeypatch.setenv("IMTALKER_INPUT_DIR", str(bad_video))
    errors = sub("imtalker_core.errors")
    with caplog.at_level(logging.WARNING):
        kept, _, _ = video_to_motion(pack, renderer, video="bad.mp4", on_bad_frame="keep")
    warning = next(r.getMessage() for r in caplog.records if "driving frames are bad" in r.getMessage())
    assert "11 of 40" in warning and "6 black or one flat colour: frames 0-2 (0.00-0.08 s), 10-12" in warning
    assert "5 no face inside the crop: frames 15-19 (0.60-0.76 s)" in warning

    held, _, _ = video_to_motion(pack, renderer, video="bad.mp4", on_bad_frame="hold")
    k, h = kept.latents, held.latents
    assert h.shape == k.shape == (40, 32)
    for bad, source in [(range(3), 3), (range(10, 13), 9), (range(15, 20), 14)]:
        for i in bad:
            assert torch.equal(h[i], k[source]) and not torch.equal(k[i], k[source]), i
    good = [i for i in range(40) if i not in (*range(3), *range(10, 13), *range(15, 20))]
    assert torch.equal(h[good], k[good])

    fake_encoder.batches.clear()
    with pytest.raises(errors.InputError, match=r"bad driving frames: 3 black or one flat colour: frames 0-2 "
                                                r"\(0\.00-0\.08 s\)"):
        video_to_motion(pack, renderer, video="bad.mp4", on_bad_frame="error")
    assert fake_encoder.batches == []  # stopped at the first bad stretch, before encoding anything


def test_video_to_motion_without_any_good_frame(pack, sub, renderer, fake_encoder, tmp_path, monkeypatch):
    write_video(sub, tmp_path / "black.mp4", np.zeros((3, 64, 64, 3), np.uint8))
    monkeypatch.setenv("IMTALKER_INPUT_DIR", str(tmp_path))
    with pytest.raises(sub("imtalker_core.errors").InputError, match="all 3 driving frames are bad"):
        video_to_motion(pack, renderer, video="black.mp4", crop="center_square")
    motion, _, _ = video_to_motion(pack, renderer, video="black.mp4", crop="center_square", on_bad_frame="keep")
    assert motion.frames == 3


def test_face_check_follows_a_long_faceless_stretch_cheaply(sub, monkeypatch):
    video_module = sub("nodes.video")
    looked = []

    def detect(frame):  # frames carry their "face" flag in one pixel
        looked.append(round(float(frame[0, 0, 1]) * 100))
        return [(0, 0, 1, 1)] if frame[0, 0, 0] > 0.5 else []
    monkeypatch.setattr(video_module, "detect_faces", detect)
    checker = video_module.FrameChecker(faces=True, sample_every=15)
    bad = []
    for index in range(120):
        frame = np.full((8, 8, 3), 0.3, np.float32)
        frame[0, 0, 1] = index / 100
        frame[0, 0, 0] = 0.0 if 30 <= index < 80 else 1.0
        frame[1, 1] = 0.9  # not flat
        if checker(index, frame) is not None:
            bad.append(index)
    # The miss at 30 is followed on every frame for 15 frames, then on every 15th: 60, 75, then 90 finds
    # the face again, so 80-89 count as face-less too (the stretch is only known to the 15th frame).
    assert bad == list(range(30, 90))
    assert looked == [0, 15, 30, *range(31, 46), 60, 75, 90, 105]


def test_video_to_motion_on_a_video_without_a_visible_face(pack, sub, renderer, fake_encoder, tmp_path,
                                                          monkeypatch, caplog):
    rng = np.random.default_rng(0)
    frames = (rng.random((20, 64, 64, 3)) * 255).astype(np.uint8)
    write_video(sub, tmp_path / "noface.mp4", frames)
    monkeypatch.setenv("IMTALKER_INPUT_DIR", str(tmp_path))
    with caplog.at_level(logging.WARNING):
        motion, _, _ = video_to_motion(pack, renderer, video="noface.mp4")
    assert motion.frames == 20  # not 20 "bad" frames: without any face the face check is off
    assert "no face found in any sampled frame of 'noface.mp4'" in caplog.text
    assert "driving frames are bad" not in caplog.text


def test_encode_motion_bad_frame_policies(pack, sub, renderer, fake_encoder, media_dir, caplog):
    frames = driving_frames(sub, media_dir, 6)
    frames[0] = 0.0
    frames[3] = 0.0
    frames[4] = 0.5  # flat grey
    args = {"renderer": renderer, "images": frames, "fps": 25.0, "batch_size": 4}
    with caplog.at_level(logging.WARNING):
        (kept,) = run(pack, "IMTalkerEncodeMotion", on_bad_frame="keep", **args)
    assert any("frames 0 (0.00 s), 3-4 (0.12-0.16 s)" in r.getMessage() for r in caplog.records)
    (held,) = run(pack, "IMTalkerEncodeMotion", **args)  # hold is the default
    k, h = kept.latents, held.latents
    assert torch.equal(h[0], k[1]) and torch.equal(h[3], k[2]) and torch.equal(h[4], k[2])
    assert torch.equal(h[[1, 2, 5]], k[[1, 2, 5]]) and not torch.equal(k[0], k[1])
    fake_encoder.batches.clear()
    with pytest.raises(sub("imtalker_core.errors").InputError, match=r"frames 0 \(0\.00 s\), 3-4"):
        run(pack, "IMTalkerEncodeMotion", on_bad_frame="error", **args)
    assert fake_encoder.batches == []  # checked before any encoding
    (clean,) = run(pack, "IMTalkerEncodeMotion", on_bad_frame="error", **{**args, "images": frames[[1, 2, 5]]})
    assert clean.frames == 3


# ------------------------------------------------------------------------------------------------
# Centre crops instead of stretching
# ------------------------------------------------------------------------------------------------

def red_green_blue(height=60, width=150):
    image = torch.zeros(2, height, width, 3)
    side = min(height, width)
    x0 = (width - side) // 2
    image[:, :, :x0, 0] = 1.0
    image[:, :, x0:x0 + side, 1] = 1.0
    image[:, :, x0 + side:, 2] = 1.0
    return image


def test_encode_motion_centre_crops_non_square_frames(pack, renderer, fake_encoder, caplog):
    with caplog.at_level(logging.WARNING):
        (motion,) = run(pack, "IMTalkerEncodeMotion", renderer=renderer, images=red_green_blue(), fps=25.0,
                        batch_size=8)
    seen = torch.cat(fake_encoder.seen)
    assert motion.frames == 2 and seen.shape == (2, 3, 512, 512)
    assert seen[:, 1].min() == 1.0 and seen[:, 0].max() == 0.0 and seen[:, 2].max() == 0.0
    assert any("150x60, not square: using the centred 60x60 square (columns 45-104)" in r.getMessage()
               for r in caplog.records)


def test_encode_identity_centre_crops_a_non_square_portrait(pack, sub, renderer, monkeypatch, caplog):
    sources = []

    class FakeIdentity:
        def to(self, device=None, dtype=None):
            return "id"

    def fake_encode(module, image, **progress_and_cancel):
        sources.append(image)
        return FakeIdentity()

    monkeypatch.setattr(sub("nodes.encode"), "encode_identity", fake_encode)
    with caplog.at_level(logging.WARNING):
        (identity,) = run(pack, "IMTalkerEncodeIdentity", renderer=renderer, image=red_green_blue(150, 60))
    assert identity == "id" and sources[0].shape == (1, 3, 512, 512)
    assert sources[0][:, 1].min() == 1.0 and sources[0][:, 0].max() == 0.0 and sources[0][:, 2].max() == 0.0
    message = next(r.getMessage() for r in caplog.records if "not square" in r.getMessage())
    assert "(rows 45-104)" in message and "Crop Face" in message


# ------------------------------------------------------------------------------------------------
# Even frame sizes
# ------------------------------------------------------------------------------------------------

def test_paste_back_pads_odd_sizes_to_even(pack, sub, caplog):
    torch.manual_seed(1)
    original = torch.rand(1, 383, 511, 3)
    _, box, _ = run(pack, "IMTalkerCropFace", image=original, scale=1.6, on_no_face="center")
    frames = torch.rand(2, 512, 512, 3)
    with caplog.at_level(logging.INFO):
        (padded,) = run(pack, "IMTalkerPasteBack", frames=frames, crop=box, original=original, feather=0.1)
    assert any("padded to 512x384" in r.getMessage() for r in caplog.records)
    (exact,) = run(pack, "IMTalkerPasteBack", frames=frames, crop=box, original=original, feather=0.1,
                   pad_to_even=False)
    assert exact.shape == (2, 383, 511, 3) and padded.shape == (2, 384, 512, 3)
    assert torch.equal(padded[:, :383, :511], exact)
    assert torch.equal(padded[:, 383, :511], exact[:, 382]) and torch.equal(padded[:, :383, 511], exact[:, :, 510])
    assert torch.equal(padded[:, 383, 511], exact[:, 382, 510])
    # One original per frame takes the same path into the padded result.
    (each,) = run(pack, "IMTalkerPasteBack", frames=frames, crop=box, original=original.repeat(2, 1, 1, 1),
                  feather=0.1)
    assert torch.equal(each, padded)
    # Even sizes are left alone.
    even = original[:, :382, :510].contiguous()
    _, even_box, _ = run(pack, "IMTalkerCropFace", image=even, scale=1.6, on_no_face="center")
    (same,) = run(pack, "IMTalkerPasteBack", frames=frames, crop=even_box, original=even, feather=0.1)
    (unpadded,) = run(pack, "IMTalkerPasteBack", frames=frames, crop=even_box, original=even, feather=0.1,
                      pad_to_even=False)
    assert same.shape == (2, 382, 510, 3) and torch.equal(same, unpadded)


def test_render_pads_odd_sizes_to_even(pack, sub, monkeypatch):
    render_module = sub("nodes.render")
    drawn = torch.rand(3, 3, 5, 5)
    module = types.SimpleNamespace(cfg=types.SimpleNamespace(image_size=5))
    progress = sub("nodes.bridge").Progress(3, "rendering frames")  # standalone: no bar, no previews
    monkeypatch.setattr(render_module, "_render_setup", lambda renderer, motion, batch_size: (module, progress,
                                                                                             batch_size))

    def fake_batches(module, identity, latents, batch_size, **_):
        for start in range(0, latents.shape[0], batch_size):
            yield drawn[start:start + batch_size]
    monkeypatch.setattr(render_module, "render_batches", fake_batches)
    motion = sub("nodes.types").Motion(torch.zeros(3, 32), 25.0)
    (padded,) = run(pack, "IMTalkerRender", renderer=None, identity=None, motion=motion, batch_size=2)
    (exact,) = run(pack, "IMTalkerRender", renderer=None, identity=None, motion=motion, batch_size=2,
                   pad_to_even=False)
    assert exact.shape == (3, 5, 5, 3) and torch.equal(exact, drawn.permute(0, 2, 3, 1))
    assert padded.shape == (3, 6, 6, 3) and torch.equal(padded[:, :5, :5], exact)
    assert torch.equal(padded[:, 5, :5], exact[:, 4]) and torch.equal(padded[:, :, 5], padded[:, :, 4])


# ------------------------------------------------------------------------------------------------
# bridge.notify
# ------------------------------------------------------------------------------------------------

def test_notify_logs_standalone(sub, caplog):
    bridge = sub("nodes.bridge")
    with caplog.at_level(logging.INFO):
        bridge.notify("careful", logging.WARNING)
        bridge.notify("fyi", "info")
    assert [(r.levelno, r.getMessage()) for r in caplog.records if r.name.endswith("bridge")] == [
        (logging.WARNING, "careful"), (logging.INFO, "fyi")]


def test_notify_shows_the_text_on_the_running_node_inside_comfyui(sub, tmp_path, monkeypatch, caplog):
    bridge = sub("nodes.bridge")
    fake = FakeComfy(tmp_path / "models", tmp_path / "out")
    for name, module in fake.modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    sent = []

    class PromptServer:
        client_id = "client-1"
        last_node_id = "99"
        last_prompt_id = "p0"

        def send_progress_text(self, text, node_id, sid=None):
            sent.append((text, node_id, sid))
    server = types.ModuleType("server")
    server.PromptServer = PromptServer
    server.PromptServer.instance = PromptServer()
    context = namedtuple("ExecutionContext", "prompt_id node_id list_index")
    utils = types.ModuleType("comfy_execution.utils")
    utils.get_executing_context = lambda: context("prompt-7", "12", None)
    monkeypatch.setitem(sys.modules, "server", server)
    monkeypatch.setitem(sys.modules, "comfy_execution", types.ModuleType("comfy_execution"))
    monkeypatch.setitem(sys.modules, "comfy_execution.utils", utils)
    with caplog.at_level(logging.INFO):
        bridge.notify("3 frames are black", logging.WARNING)
        bridge.notify("the video has no sound", logging.INFO)
    assert sent[0] == ("⚠ 3 frames are black", "12", "client-1")
    assert sent[1] == ("⚠ 3 frames are black\n\nthe video has no sound", "12", "client-1")  # shown together
    assert "3 frames are black" in caplog.text  # the log line is always written
    # Without an execution context the server's current node is used; a failing display never raises.
    utils.get_executing_context = lambda: None
    bridge.notify("elsewhere")
    assert sent[2] == ("⚠ elsewhere", "99", "client-1")

    def broken(*args, **kwargs):
        raise RuntimeError("socket closed")
    server.PromptServer.instance.send_progress_text = broken
    bridge.notify("still logged")
    assert "still logged" in caplog.text


def test_render_warns_before_an_image_batch_would_fill_memory(pack, sub, monkeypatch):
    render = sub("nodes.render")
    bridge = sub("nodes.bridge")
    notes = []
    monkeypatch.setattr(bridge, "notify", lambda message, level=None: notes.append(message))
    monkeypatch.setattr(bridge, "system_memory", lambda: 8 * 2**30)
    render.warn_if_frames_fill_memory(100, 512, 512)  # 0.3 GiB: fine
    assert notes == []
    render.warn_if_frames_fill_memory(1000, 512, 512)  # 2.9 GiB > 25 % of 8 GiB
    assert len(notes) == 1 and "Render To Video" in notes[0] and "2.9 GiB" in notes[0]


def test_auto_batch_size_is_one_on_the_cpu_and_fits_free_gpu_memory(sub, monkeypatch):
    bridge = sub("nodes.bridge")
    gib = 2 ** 30
    assert bridge.auto_batch_size(gib // 2, 32) == 1  # standalone: the CPU
    fake_mm = types.SimpleNamespace(get_torch_device=lambda: torch.device("cuda", 0),
                                    get_free_memory=lambda device: 10 * gib)
    monkeypatch.setattr(bridge, "_comfy", lambda name: fake_mm if name == "comfy.model_management" else None)
    assert bridge.auto_batch_size(gib // 2, 32) == 16  # 80 % of 10 GiB in 0.5 GiB frames
    assert bridge.auto_batch_size(gib // 2, 8) == 8
    fake_mm.get_free_memory = lambda device: gib // 4
    assert bridge.auto_batch_size(gib // 2, 32) == 1


def test_frame_memory_budget_follows_the_device_and_precision(sub, monkeypatch):
    memory = sub("imtalker_core.render_memory")
    bridge = sub("nodes.bridge")
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert memory.bytes_per_frame(cpu, torch.float16) == memory.CPU_BYTES_PER_FRAME
    assert memory.fixed_bytes(cpu, torch.float32) == 0
    assert memory.bytes_per_frame(cuda, torch.float16) == memory.bytes_per_frame(cuda, torch.bfloat16) == 96 << 20
    assert memory.bytes_per_frame(cuda, torch.float32) == 160 << 20
    # The budgets cover the peaks measured on an H200 (weights included) at batch 32 and 64.
    for dtype, peaks in ((torch.float16, {32: 2.75, 64: 4.84}), (torch.float32, {8: 5.79, 32: 6.09, 64: 9.44})):
        for batch, peak_gib in peaks.items():
            budget = memory.fixed_bytes(cuda, dtype) + batch * memory.bytes_per_frame(cuda, dtype)
            assert budget >= peak_gib * 2**30, (dtype, batch)
    # 80 % of 8 GiB free on a GPU: fp16 57 frames after its 1 GiB fixed part (capped at 32); fp32 5 after
    # its 5.5 GiB; the CPU figure would give 12. The nodes and the core's own count agree.
    fake_mm = types.SimpleNamespace(get_torch_device=lambda: cuda, get_free_memory=lambda device: 8 * 2**30)
    monkeypatch.setattr(bridge, "_comfy", lambda name: fake_mm if name == "comfy.model_management" else None)
    for dtype, expected in ((torch.float16, 32), (torch.float32, 5)):
        budget = (memory.bytes_per_frame(cuda, dtype), memory.MAX_AUTO_BATCH, memory.fixed_bytes(cuda, dtype))
        assert bridge.auto_batch_size(*budget) == expected
        assert memory.frames_that_fit(8 * 2**30, cuda, dtype) == expected
    assert bridge.auto_batch_size(memory.CPU_BYTES_PER_FRAME, memory.MAX_AUTO_BATCH) == 12
    # Less free memory than the fixed part: still one frame at a time (ComfyUI then offloads what it can).
    fake_mm.get_free_memory = lambda device: 2 * 2**30
    assert bridge.auto_batch_size(*budget) == 1
    assert memory.frames_that_fit(2 * 2**30, cuda, torch.float32) == 1


def test_render_with_auto_batch_size_renders_every_frame(pack, sub, renderer, monkeypatch):
    render = sub("nodes.render")
    seen = []
    real = render.render_batches

    def spy(*args, **kwargs):
        seen.append(kwargs["batch_size"])
        return real(*args, **kwargs)

    monkeypatch.setattr(render, "render_batches", spy)
    encode = sub("nodes.encode")
    identity = encode.IMTalkerEncodeIdentity().encode(renderer, torch.rand(1, 512, 512, 3))[0]
    motion = sub("nodes.types").Motion(torch.zeros(2, 32), 25.0)
    (frames,) = render.IMTalkerRender().render(renderer, identity, motion, batch_size=0)
    assert seen == [1] and frames.shape[0] == 2


def test_render_nodes_preview_each_batch_as_it_is_rendered(pack, sub, renderer, env_dirs, monkeypatch):
    """Render and Render To Video hand every batch's frames, as they leave the node, to the bar's preview
    (which shows the newest, throttled: `Progress.preview`)."""
    bridge, render = sub("nodes.bridge"), sub("nodes.render")
    previews = []

    class RecordingProgress(bridge.Progress):
        def preview(self, frames):
            previews.append(frames.clone())

    monkeypatch.setattr(bridge, "Progress", RecordingProgress)
    identity = sub("nodes.encode").IMTalkerEncodeIdentity().encode(renderer, torch.rand(1, 512, 512, 3))[0]
    motion = sub("nodes.types").Motion(torch.randn(2, 32, generator=torch.Generator().manual_seed(3)), 25.0)
    (frames,) = render.IMTalkerRender().render(renderer, identity, motion, batch_size=1)
    assert [p.shape for p in previews] == [(1, 512, 512, 3)] * 2
    assert torch.equal(torch.cat(previews), frames)

    previews.clear()
    first = sub("nodes.types").Motion(motion.latents[:1], 25.0)
    render.IMTalkerRenderToVideo().render(renderer, identity, first, "tests/preview", batch_size=1)
    (shown,) = previews
    assert shown.dtype == torch.uint8 and shown.shape == (1, 512, 512, 3)
    assert (shown.float() / 255 - frames[:1]).abs().max() <= 0.5 / 255 + 1e-6  # the same frame, as bytes


def test_encode_motion_auto_batch_moves_the_bar_every_frame_on_the_cpu(pack, sub, renderer, fake_encoder,
                                                                      media_dir, progress_updates):
    updates = progress_updates
    frames = driving_frames(sub, media_dir, 5)
    (motion,) = run(pack, "IMTalkerEncodeMotion", renderer=renderer, images=frames, fps=25.0, batch_size=0)
    assert motion.frames == 5
    assert fake_encoder.batches == [1] * 5  # 0 = auto: one frame at a time on the CPU
    assert [u for u in updates[1:] if u[0] != 5] == [(done, 5) for done in range(1, 5)]
    with pytest.raises(sub("imtalker_core.errors").InputError, match="batch_size must be 0"):
        run(pack, "IMTalkerEncodeMotion", renderer=renderer, images=frames, fps=25.0, batch_size=-1)
