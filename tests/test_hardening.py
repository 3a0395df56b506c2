"""Fault injection: every bad input gives one clear line, exit code 2, and leaves every file as it was.

Each case runs the command line with a models folder that does not exist and downloads off: a check
that ran only after the models loaded would report the missing models instead of the real problem,
so these tests also prove that the checks come first.
"""
from __future__ import annotations

import hashlib
import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from imtalker_core import cli, encode_identity, encode_motion, generate_motion, render_frames
from imtalker_core.errors import IMTalkerError, InputError
from imtalker_core.validation import check_control, check_device, check_seed

MEDIA = Path(__file__).parent / "data" / "media"


def checksum(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def inputs(tmp_path):
    """Copies of a portrait, a speech clip and a driving video in a scratch folder."""
    files = {}
    for name in ("photo_512.png", "speech_16k_mono.wav", "driving_short.mp4"):
        files[name] = tmp_path / name
        shutil.copy(MEDIA / name, files[name])
    return files


def run_cli(args: list[str], tmp_path: Path, caplog) -> tuple[int, str]:
    caplog.clear()
    with caplog.at_level(logging.INFO):
        code = cli.main([*args, "--models", str(tmp_path / "no-models"), "--no-download", "--device", "cpu"])
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    return code, "\n".join(errors)


def audio_args(files, output, *extra) -> list[str]:
    return ["audio", str(files["photo_512.png"]), str(files["speech_16k_mono.wav"]), "-o", str(output), *extra]


def assert_refused(code: int, message: str, *fragments: str) -> None:
    assert code == 2, message
    assert len(message.splitlines()) == 1, message
    assert "renderer.ckpt" not in message, "the check ran after the model files were looked up"
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize("target", ["photo_512.png", "speech_16k_mono.wav"])
def test_output_equal_to_an_input_is_refused_quickly(inputs, tmp_path, caplog, target):
    before = {name: checksum(path) for name, path in inputs.items()}
    start = time.perf_counter()
    code, message = run_cli(audio_args(inputs, inputs[target]), tmp_path, caplog)
    assert time.perf_counter() - start < 10  # generous for slow CI; the target is 2 s
    assert_refused(code, message, target)
    assert {name: checksum(path) for name, path in inputs.items()} == before


def test_output_equal_to_the_driving_video_is_refused(inputs, tmp_path, caplog):
    before = checksum(inputs["driving_short.mp4"])
    code, message = run_cli(["video", str(inputs["photo_512.png"]), str(inputs["driving_short.mp4"]), "-o",
                             str(inputs["driving_short.mp4"])], tmp_path, caplog)
    assert_refused(code, message, "driving_short.mp4")
    assert checksum(inputs["driving_short.mp4"]) == before


def test_output_through_another_path_to_an_input_is_refused(inputs, tmp_path, caplog):
    link = tmp_path / "talk.mp4"
    link.hardlink_to(inputs["photo_512.png"])
    code, message = run_cli(audio_args(inputs, link), tmp_path, caplog)
    assert_refused(code, message)
    assert "photo_512.png" in message or "talk.mp4" in message
    dotted = tmp_path / "sub" / ".." / "speech_16k_mono.wav"
    (tmp_path / "sub").mkdir()
    code, message = run_cli(audio_args(inputs, dotted), tmp_path, caplog)
    assert_refused(code, message, "speech_16k_mono.wav")


@pytest.mark.parametrize("flag,value,fragment", [
    ("--cfg", "nan", "cfg scale"),
    ("--cfg", "inf", "cfg scale"),
    ("--cfg", "-1", "cfg scale"),
    ("--steps", "1000", "steps"),
    ("--steps", "1", "steps"),
    ("--seed", str(2 ** 64), "seed"),
    ("--seed", str(-(2 ** 63) - 1), "seed"),
    ("--batch-size", "-1", "batch size"),  # 0 is "auto" (the default)
    ("--feather", "2", "feather"),
    ("--crop-scale", "nan", "crop scale"),
])
def test_bad_numbers_are_refused_before_loading(inputs, tmp_path, caplog, flag, value, fragment):
    out = tmp_path / "talk.mp4"
    code, message = run_cli(audio_args(inputs, out, flag, value), tmp_path, caplog)
    assert_refused(code, message, fragment, value if value != "inf" else "inf")
    assert not out.exists() and not list(tmp_path.glob("*.partial*"))


@pytest.mark.parametrize("value", ["-1", "-64"])
def test_video_batch_size_is_checked_before_any_frame(inputs, tmp_path, caplog, value):
    code, message = run_cli(["video", str(inputs["photo_512.png"]), str(inputs["driving_short.mp4"]), "-o",
                             str(tmp_path / "out.mp4"), "--batch-size", value], tmp_path, caplog)
    assert_refused(code, message, "batch size")


@pytest.mark.parametrize("device,fragment", [
    pytest.param("cuda", "no CUDA", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")),
    ("foo", "not a device name"),
    ("meta", "not supported"),
])
def test_unavailable_devices_are_one_line(inputs, tmp_path, caplog, device, fragment):
    caplog.clear()
    with caplog.at_level(logging.INFO):
        code = cli.main([*audio_args(inputs, tmp_path / "t.mp4"), "--models", str(tmp_path / "none"),
                         "--no-download", "--device", device])
    message = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    assert_refused(code, message, fragment)


def test_mps_without_mps_is_one_line():
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    with pytest.raises(InputError, match="MPS is not available"):
        check_device("mps")


def test_control_files_with_garbage_are_one_line(inputs, tmp_path, caplog):
    words = tmp_path / "pose.npy"
    np.save(words, np.array([["a", "b", "c"]]))
    code, message = run_cli(audio_args(inputs, tmp_path / "t.mp4", "--pose", str(words)), tmp_path, caplog)
    assert_refused(code, message, "pose.npy")
    huge = tmp_path / "gaze.npy"
    np.save(huge, np.full((10, 2), 1e30, np.float32))
    code, message = run_cli(audio_args(inputs, tmp_path / "t.mp4", "--gaze", str(huge)), tmp_path, caplog)
    assert_refused(code, message, "gaze", "plausible")


class _Payload:
    """Unpickling this would create the marker file; the loader must never run it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_control_file_with_code_is_refused_and_not_run(inputs, tmp_path, caplog):
    marker = tmp_path / "ran"
    evil = tmp_path / "pose.pt"
    torch.save({"pose_params": _Payload(marker)}, evil)
    code, message = run_cli(audio_args(inputs, tmp_path / "t.mp4", "--pose", str(evil)), tmp_path, caplog)
    assert_refused(code, message, "pose.pt", "refuse")
    assert not marker.exists()


def test_missing_image_and_faceless_photo_are_reported_before_models_load(inputs, tmp_path, caplog):
    code, message = run_cli(["audio", str(tmp_path / "nobody.png"), str(inputs["speech_16k_mono.wav"]), "-o",
                             str(tmp_path / "t.mp4")], tmp_path, caplog)
    assert_refused(code, message, "nobody.png")
    blank = tmp_path / "wall.png"
    from PIL import Image
    Image.fromarray(np.full((300, 300, 3), 128, np.uint8)).save(blank)
    code, message = run_cli(["audio", str(blank), str(inputs["speech_16k_mono.wav"]), "-o",
                             str(tmp_path / "t.mp4")], tmp_path, caplog)
    assert_refused(code, message, "wall.png", "--center-crop-if-no-face")


def test_output_naming_a_folder_is_refused_first(inputs, tmp_path, caplog):
    folder = tmp_path / "videos"
    folder.mkdir()
    code, message = run_cli(audio_args(inputs, folder), tmp_path, caplog)
    assert_refused(code, message, "videos")


def test_paste_back_without_crop_is_refused(inputs, tmp_path, caplog):
    code, message = run_cli(audio_args(inputs, tmp_path / "t.mp4", "--no-crop", "--paste-back"), tmp_path, caplog)
    assert_refused(code, message, "--no-crop")


def test_half_precision_on_cpu_warns(inputs, tmp_path, caplog):
    run_cli(audio_args(inputs, tmp_path / "t.mp4", "--precision", "fp16"), tmp_path, caplog)
    assert any("fp16 on the CPU" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


# ------------------------------------------------------------------------------------------------
# The Python API: shapes, dtypes, ranges, empty tensors, numpy; non-finite results never pass
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_renderer():
    from imtalker_core.config import tiny_renderer_config
    from imtalker_core.renderer import IMTRenderer
    torch.manual_seed(0)
    return IMTRenderer(tiny_renderer_config()).eval()


def test_api_refuses_bad_images(tiny_renderer):
    good = torch.rand(1, 3, 128, 128)
    with pytest.raises(InputError, match="divide by 255"):
        encode_identity(tiny_renderer, good * 255)
    with pytest.raises(InputError, match="uint8"):
        encode_identity(tiny_renderer, (good * 255).to(torch.uint8))
    with pytest.raises(InputError, match="to_model_input"):
        encode_identity(tiny_renderer, good[0].permute(1, 2, 0).numpy())
    with pytest.raises(InputError, match="NaN"):
        encode_motion(tiny_renderer, torch.full((2, 3, 128, 128), math.nan))
    with pytest.raises(InputError, match="batch size 0"):
        encode_motion(tiny_renderer, good, batch_size=0)


def test_api_refuses_bad_motion(tiny_renderer):
    identity = encode_identity(tiny_renderer, torch.rand(1, 3, 128, 128))
    with pytest.raises(InputError, match="no frames"):
        render_frames(tiny_renderer, identity, torch.zeros(0, 32))
    with pytest.raises(InputError, match="NaN"):
        render_frames(tiny_renderer, identity, torch.full((2, 32), math.nan))
    with pytest.raises(InputError, match=r"\[frames, 32\]"):
        render_frames(tiny_renderer, identity, torch.zeros(2, 31))
    frames = render_frames(tiny_renderer, identity, np.zeros((1, 32), np.float32))  # numpy motion is converted
    assert frames.shape == (1, 3, 128, 128)


def test_non_finite_frames_stop_the_job(tiny_renderer):
    import copy
    broken = copy.deepcopy(tiny_renderer)
    with torch.no_grad():
        broken.frame_decoder.final_conv[1].bias.fill_(math.nan)
    identity = encode_identity(broken, torch.rand(1, 3, 128, 128))
    with pytest.raises(IMTalkerError, match="NaN or infinite.*renderer weights"):
        render_frames(broken, identity, torch.zeros(2, 32))


def test_generator_settings_are_checked():
    from imtalker_core.config import tiny_generator_config
    from imtalker_core.generator import MotionGenerator
    torch.manual_seed(0)
    generator = MotionGenerator(tiny_generator_config()).eval()
    features, ref = torch.randn(5, 16), torch.randn(1, 32)
    for bad in ({"cfg_scale": math.nan}, {"cfg_scale": math.inf}, {"steps": 1}, {"steps": 101},
                {"seed": 2 ** 64}, {"pose": torch.full((5, 3), 1e30)}, {"gaze": torch.zeros(0, 2)}):
        with pytest.raises(InputError):
            generate_motion(generator, features, ref, **bad)
    with torch.no_grad():
        generator.fmt.x_embedder.proj.weight.fill_(math.inf)
    with pytest.raises(IMTalkerError, match="generated motion.*NaN or infinite"):
        generate_motion(generator, features, ref, steps=2)


def test_seeds_map_as_torch_does():
    assert check_seed(-1) == 2 ** 64 - 1 and check_seed(0) == 0 and check_seed(np.int64(7)) == 7
    with pytest.raises(InputError):
        check_seed(True)


def test_controls_warn_beyond_typical_and_refuse_absurd(caplog):
    with caplog.at_level(logging.WARNING):
        check_control(np.full((4, 3), 1.5, np.float32), 3, "pose")
    assert "beyond its typical range" in caplog.text
    with pytest.raises(InputError, match="degrees|radians"):
        check_control(np.full((4, 3), 90.0, np.float32), 3, "pose")


def test_identity_encoding_reports_progress_and_can_be_cancelled(tiny_renderer):
    seen = []
    encode_identity(tiny_renderer, torch.rand(1, 3, 128, 128), callback=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 3), (2, 3), (3, 3)]

    class Cancelled(Exception):
        pass

    calls = []

    def cancel_on_second_check():
        calls.append(1)
        if len(calls) == 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        encode_identity(tiny_renderer, torch.rand(1, 3, 128, 128), check_interrupt=cancel_on_second_check)


def test_render_checks_for_cancel_before_the_synthesis_of_each_batch(tiny_renderer, monkeypatch):
    identity = encode_identity(tiny_renderer, torch.rand(1, 3, 128, 128))
    events = []
    real_render = tiny_renderer.render
    monkeypatch.setattr(tiny_renderer, "render", lambda *a, **k: events.append("render") or real_render(*a, **k))
    render_frames(tiny_renderer, identity, torch.zeros(2, 32), batch_size=1,
                  check_interrupt=lambda: events.append("check"))
    assert events == ["check", "check", "render", "check", "check", "render"]
