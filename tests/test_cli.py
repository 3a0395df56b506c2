"""End to end from files: the command line and the runner on stand-in weights and real media."""
from __future__ import annotations

import av
import numpy as np
import pytest
import soundfile
import torch

from imtalker_core import cli, runner
from imtalker_core.errors import InputError
from imtalker_core.precision import allows_tf32

FPS = 25


def decode(path):
    """(frame count, frame size, video duration s, audio duration s or None, codec, pix_fmt)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f for f in container.decode(stream)]
        audio = None
        if container.streams.audio:
            a = container.streams.audio[0]
            audio = float(a.duration * a.time_base) if a.duration else None
        return (len(frames), (frames[0].width, frames[0].height), len(frames) / float(stream.average_rate),
                audio, stream.codec_context.name, stream.codec_context.pix_fmt)


@pytest.fixture(scope="module")
def speech_excerpt(tmp_path_factory, media_dir):
    """0.3 s of the test speech, 44.1 kHz stereo: 13230 samples → 4800 at 16 kHz → ceil(7.5) = 8 frames."""
    data, rate = soundfile.read(media_dir / "speech_44k_stereo.wav", dtype="float32")
    path = tmp_path_factory.mktemp("audio") / "speech_0.3s.wav"
    start = rate // 2
    soundfile.write(path, data[start:start + int(0.3 * rate)], rate)
    return path


def test_audio_command_end_to_end(tmp_path, standin_dir, media_dir, speech_excerpt, caplog):
    out = tmp_path / "talk.mp4"
    code = cli.main(["audio", str(media_dir / "photo_512.png"), str(speech_excerpt), "-o", str(out),
                     "--models", str(standin_dir), "--no-download", "--device", "cpu", "--steps", "3",
                     "--batch-size", "4"])
    assert code == 0, caplog.text
    frames, size, duration, audio, codec, pix_fmt = decode(out)
    assert frames == 8 and size == (512, 512)
    assert duration == pytest.approx(8 / FPS)
    assert audio == pytest.approx(0.3, abs=0.05)
    assert (codec, pix_fmt) == ("h264", "yuv420p")
    assert not list(tmp_path.glob("*.partial*"))


def test_video_reenactment_with_paste_back(tmp_path, standin_dir, media_dir):
    models = runner.load_models(standin_dir, audio=False, download=False)
    out = tmp_path / "reenact.mp4"
    runner.video_to_video(models, media_dir / "painting_rgba.png", media_dir / "driving_short.mp4", out,
                          runner.CropSettings(paste_back=True), batch_size=2, max_frames=2)
    frames, size, _, audio, codec, _ = decode(out)
    from imtalker_core.media.images import load_image
    h, w = load_image(media_dir / "painting_rgba.png").shape[:2]
    assert frames == 2 and codec == "h264"
    assert size == (w - w % 2, h - h % 2)


class _StopAfterFirstBatch(Exception):
    pass


def test_driving_video_is_cropped_only_when_asked(tmp_path, media_dir, monkeypatch):
    """The reference resizes whole driving frames; `crop_driving` crops one steady face box instead."""
    from types import SimpleNamespace

    from imtalker_core.media.face import crop_box, stable_video_box
    from imtalker_core.media.images import to_model_input
    from imtalker_core.media.video import read_video

    video = media_dir / "driving_short.mp4"
    first = next(iter(read_video(video, 1)))
    seen = []

    def first_batch_only(renderer, images, batch_size):  # stands in for encoding: no model needed
        seen.append(images)
        raise _StopAfterFirstBatch

    monkeypatch.setattr(runner, "encode_motion", first_batch_only)
    models = runner.Models(renderer=SimpleNamespace(cfg=SimpleNamespace(image_size=512)))
    for crop_driving in (False, True):
        with pytest.raises(_StopAfterFirstBatch):
            runner.video_to_video(models, media_dir / "statue_256.png", video, tmp_path / "x.mp4",
                                  runner.CropSettings(crop_driving=crop_driving), batch_size=1,
                                  keep_audio=False, max_frames=3)
    box = stable_video_box(read_video(video, 3))
    assert box.size < 512  # the crop differs from the whole frame
    assert torch.equal(seen[0], to_model_input(first, 512))
    assert torch.equal(seen[1], to_model_input(crop_box(first, box, 512), 512))
    assert not (tmp_path / "x.mp4").exists()


def test_crop_driving_flag(tmp_path, monkeypatch, media_dir):
    captured = {}

    def fake_video_to_video(models, image, driving, output, crop, **kwargs):
        captured["crop"] = crop
        return output

    monkeypatch.setattr(runner, "load_models", lambda *args, **kwargs: None)
    monkeypatch.setattr(runner, "video_to_video", fake_video_to_video)
    base = ["video", str(media_dir / "photo_512.png"), str(media_dir / "driving_short.mp4"), "-o",
            str(tmp_path / "out.mp4"), "--device", "cpu"]
    assert cli.main(base) == 0
    assert captured.pop("crop").crop_driving is False
    assert cli.main(base + ["--crop-driving"]) == 0
    assert captured.pop("crop").crop_driving is True


def test_precision_tf32_loads_float32_models_allowed_tf32(tmp_path, monkeypatch, media_dir, standin_dir):
    loaded = {}

    def load_models(*args, **kwargs):
        loaded["models"] = real_load(standin_dir, *args[1:], **{**kwargs, "download": False})
        loaded["dtype"] = args[2]
        return loaded["models"]

    real_load = runner.load_models
    monkeypatch.setattr(runner, "load_models", load_models)
    monkeypatch.setattr(runner, "video_to_video", lambda models, image, driving, output, crop, **kwargs: output)
    base = ["video", str(media_dir / "photo_512.png"), str(media_dir / "driving_short.mp4"), "-o",
            str(tmp_path / "out.mp4"), "--device", "cpu"]
    assert cli.main(base + ["--precision", "tf32"]) == 0
    assert loaded["dtype"] == torch.float32 and allows_tf32(loaded["models"].renderer)
    assert cli.main(base + ["--precision", "fp32"]) == 0
    assert loaded["dtype"] == torch.float32 and not allows_tf32(loaded["models"].renderer)


def test_missing_models_name_the_files(tmp_path, media_dir, speech_excerpt, caplog):
    code = cli.main(["audio", str(media_dir / "photo_512.png"), str(speech_excerpt), "-o", str(tmp_path / "x.mp4"),
                     "--models", str(tmp_path / "empty"), "--no-download"])
    assert code == 2
    assert "renderer.ckpt" in caplog.text and "wav2vec2-base-960h/config.json" in caplog.text
    assert "huggingface.co/cbsjtu01/IMTalker" in caplog.text


def test_unreadable_image_is_reported(tmp_path, standin_dir, speech_excerpt, caplog):
    bad = tmp_path / "face.png"
    bad.write_bytes(b"not an image")
    code = cli.main(["audio", str(bad), str(speech_excerpt), "-o", str(tmp_path / "x.mp4"),
                     "--models", str(standin_dir), "--no-download"])
    assert code == 2 and "face.png" in caplog.text
    assert not (tmp_path / "x.mp4").exists()


def test_control_files(tmp_path):
    np.save(tmp_path / "pose.npy", np.zeros((10, 3), np.float32))
    np.savetxt(tmp_path / "gaze.csv", np.ones((4, 2)), delimiter=",")
    assert runner.load_controls(tmp_path / "pose.npy", 3, "pose").shape == (10, 3)
    assert runner.load_controls(tmp_path / "gaze.csv", 2, "gaze").shape == (4, 2)
    with pytest.raises(InputError, match=r"\[frames, 2\]"):
        runner.load_controls(tmp_path / "pose.npy", 2, "gaze")
    with pytest.raises(InputError, match="not found"):
        runner.load_controls(tmp_path / "none.npy", 3, "pose")


def test_convert_command(tmp_path, standin_dir, caplog):
    out = tmp_path / "renderer.safetensors"
    assert cli.main(["convert", str(standin_dir / "renderer.ckpt"), str(out), "--dtype", "bf16"]) == 0
    from imtalker_core.checkpoints import read_file
    entries = read_file(out)
    floats = {v.dtype for v in entries.values() if v.is_floating_point()}
    assert len(entries) == 807 and floats == {__import__("torch").bfloat16}
    assert "807 tensors" in caplog.text


def test_models_are_downloaded_once_when_missing(tmp_path, monkeypatch):
    """The download path, with the hub replaced by a fake that writes placeholder files (no network)."""
    import huggingface_hub

    from imtalker_core import model_files

    calls = []

    def fake_download(repo_id, filename, local_dir):
        calls.append((repo_id, filename))
        target = tmp_path / "models" / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"placeholder")
        return str(target)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(model_files, "_hub_reachable", lambda timeout=None: True)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    root = model_files.ensure_models(tmp_path / "models", download=True)
    assert model_files.missing_files(root) == []
    assert {f for _, f in calls} == set(model_files.OFFICIAL_FILES)
    assert all(repo == "cbsjtu01/IMTalker" for repo, _ in calls)
    calls.clear()
    model_files.ensure_models(root, download=True)
    assert calls == []


def test_offline_download_names_the_files(tmp_path, monkeypatch):
    from imtalker_core import model_files

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match=r"generator\.ckpt.*HF_HUB_OFFLINE"):
        model_files.fetch(tmp_path, ["generator.ckpt"])
    with pytest.raises(InputError, match="not an official IMTalker file"):
        model_files.fetch(tmp_path, ["weights.bin"])


def test_noise_option_defaults_to_the_reference_schedule():
    parser = cli.build_parser()
    args = parser.parse_args(["audio", "face.png", "speech.wav", "-o", "talk.mp4"])
    assert args.noise == "reference"
    args = parser.parse_args(["audio", "face.png", "speech.wav", "-o", "talk.mp4", "--noise", "fixed_per_window"])
    assert args.noise == "fixed_per_window"
    with pytest.raises(SystemExit):
        parser.parse_args(["audio", "face.png", "speech.wav", "-o", "talk.mp4", "--noise", "same"])


def test_download_progress_counts_files(tmp_path, monkeypatch):
    import huggingface_hub

    from imtalker_core import model_files

    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo_id, filename, local_dir: (tmp_path / filename).write_bytes(b"x"))
    monkeypatch.setattr(model_files, "_hub_reachable", lambda timeout=None: True)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    seen = []
    model_files.fetch(tmp_path, ["renderer.ckpt", "generator.ckpt"], progress=lambda d, t: seen.append((d, t)))
    assert seen == [(0, 2), (1, 2), (2, 2)]


def test_unreachable_hub_is_decided_quickly(tmp_path, monkeypatch):
    """No network: one connection attempt with a short timeout, then the placement message."""
    import socket
    import time

    from imtalker_core import model_files

    attempts = []

    def refuse(address, timeout=None):
        attempts.append((address, timeout))
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.example:8443")
    start = time.perf_counter()
    with pytest.raises(InputError, match=r"renderer\.ckpt.*did not answer within 3 s"):
        model_files.fetch(tmp_path, ["renderer.ckpt"])
    assert time.perf_counter() - start < 1
    assert attempts == [(("mirror.example", 8443), model_files.CONNECT_TIMEOUT)]


def test_control_files_are_fitted_to_the_speech():
    """The command line fits control files to the clip: longer ones cut, shorter ones hold their last value
    (default) or are padded with zeros as the reference does (`--controls-fit trim_or_zero`)."""
    pose = torch.arange(30, dtype=torch.float32).reshape(10, 3) / 100
    gaze = torch.tensor([[0.1, -0.2], [0.3, 0.4]])
    fitted_pose, cam, fitted_gaze = runner.fit_controls(pose, None, gaze, 6)
    assert cam is None and torch.equal(fitted_pose, pose[:6])
    assert torch.equal(fitted_gaze, torch.cat([gaze, gaze[-1:].expand(4, 2)]))
    _, _, zero_gaze = runner.fit_controls(None, None, gaze, 6, "trim_or_zero")
    assert torch.equal(zero_gaze, torch.cat([gaze, torch.zeros(4, 2)]))
    args = cli.build_parser().parse_args(["audio", "a.png", "b.wav", "-o", "c.mp4", "--controls-fit", "trim_or_zero"])
    assert args.controls_fit == "trim_or_zero"


def test_relative_motion_mode_starts_from_the_portraits_own_latent(tmp_path, standin_dir, media_dir, monkeypatch):
    """`video --motion-mode relative`: portrait latent + (driver − driver's first frame), so the first frame
    renders the portrait's own expression; absolute (the reference) renders the driver's latents as they are."""
    models = runner.load_models(standin_dir, audio=False, download=False)
    rendered = {}

    def capture(writer, renderer, identity, motion, *rest):  # stands in for rendering
        rendered["motion"], rendered["identity"] = motion.float().cpu(), identity.motion.float().cpu()
        raise _StopAfterFirstBatch

    monkeypatch.setattr(runner, "_render_into", capture)
    for mode in ("absolute", "relative"):
        with pytest.raises(_StopAfterFirstBatch):
            runner.video_to_video(models, media_dir / "photo_512.png", media_dir / "driving_short.mp4",
                                  tmp_path / f"{mode}.mp4", batch_size=2, max_frames=3, keep_audio=False,
                                  motion_mode=mode)
        rendered[mode] = rendered.pop("motion")
    driver, portrait = rendered["absolute"], rendered["identity"].reshape(-1)
    assert torch.allclose(rendered["relative"][0], portrait, atol=1e-6)
    assert torch.allclose(rendered["relative"] - rendered["relative"][0], driver - driver[0], atol=1e-5)
    with pytest.raises(InputError, match="motion mode"):
        runner.video_to_video(models, media_dir / "photo_512.png", media_dir / "driving_short.mp4",
                              tmp_path / "x.mp4", motion_mode="mirrored")
    assert cli.build_parser().parse_args(["video", "a.png", "b.mp4", "-o", "c.mp4", "--motion-mode",
                                          "relative"]).motion_mode == "relative"


@pytest.mark.parametrize("paste_back", [False, True])
def test_video_job_encodes_on_a_writer_thread_unless_pasting_back(tmp_path, standin_dir, media_dir, monkeypatch,
                                                                    paste_back):
    """Without paste-back the MP4 is encoded on its own thread (the next batch renders meanwhile); pasting back
    reuses one full-size buffer per frame, so it writes in the caller's thread."""
    import threading

    from imtalker_core.media import video

    threads, real_write = [], video.VideoWriter.write

    def recording_write(self, frames):
        threads.append(threading.current_thread().name)
        return real_write(self, frames)

    monkeypatch.setattr(video.VideoWriter, "write", recording_write)
    models = runner.load_models(standin_dir, audio=False, download=False)
    out = tmp_path / "reenact.mp4"
    runner.video_to_video(models, media_dir / "photo_512.png", media_dir / "driving_short.mp4", out,
                          runner.CropSettings(paste_back=paste_back), batch_size=2, max_frames=3, keep_audio=False)
    assert decode(out)[0] == 3
    main = threading.current_thread().name
    if paste_back:
        assert threads == [main] * 3  # frame by frame from the reused buffer
    else:
        assert threads == ["imtalker-writer"] * 2  # two batches (2 + 1), uint8
