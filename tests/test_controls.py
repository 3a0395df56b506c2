"""Generator controls: `imtalker_core.controls.sequence` (the sequence type, its builders and files) and the
nodes of `nodes/controls.py`, run in-process without ComfyUI."""
from __future__ import annotations

import importlib
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from imtalker_core.controls import sequence as cs
from imtalker_core.controls.sequence import ControlSequence
from imtalker_core.errors import InputError
from tests.test_nodes import PACK_NAME, load_pack



def random_controls(frames: int = 12, fps: float = 25.0, seed: int = 0, cls=ControlSequence) -> ControlSequence:
    generator = torch.Generator().manual_seed(seed)
    return cls(pose=torch.randn(frames, 3, generator=generator) * 0.3,
                           cam=torch.randn(frames, 3, generator=generator) * 2 + 7,
                           gaze=torch.randn(frames, 2, generator=generator) * 0.2, fps=fps)


# --------------------------------------------------------------------------------------------
# The sequence type
# --------------------------------------------------------------------------------------------

def test_sequence_holds_float32_cpu_copies_and_knows_its_parts():
    pose = np.zeros((5, 3), np.float64)
    controls = ControlSequence(pose=pose, gaze=[[0.1, 0.2]] * 5, fps=30)
    assert controls.parts == ("pose", "gaze") and controls.frames == 5 and controls.fps == 30.0
    assert controls.pose.dtype == torch.float32 and controls.pose.device.type == "cpu" and controls.cam is None
    assert controls.seconds == pytest.approx(5 / 30)
    pose[0, 0] = 1.0  # the caller's array is not the sequence's
    assert controls.pose[0, 0] == 0.0
    source = torch.ones(2, 3)
    held = ControlSequence(pose=source)
    source.zero_()
    assert held.pose.eq(1).all()
    assert ControlSequence().parts == () and ControlSequence().frames == 0
    assert repr(controls) == "ControlSequence(5 frames at 30 fps: pose, gaze)"


@pytest.mark.parametrize("kwargs,match", [
    ({"pose": torch.zeros(4, 2)}, r"pose must be a \[frames, 3\]"),
    ({"gaze": torch.zeros(4, 3)}, r"gaze must be a \[frames, 2\]"),
    ({"cam": torch.full((2, 3), math.nan)}, "NaN"),
    ({"pose": torch.zeros(0, 3)}, "no frames"),
    ({"pose": torch.full((2, 3), 90.0)}, "radians"),
    ({"pose": torch.zeros(4, 3), "gaze": torch.zeros(5, 2)}, "different frame counts.*pose 4, gaze 5"),
    ({"pose": torch.zeros(4, 3), "fps": 0}, "fps 0"),
    ({"pose": torch.zeros(4, 3), "fps": math.inf}, "fps inf"),
])
def test_bad_sequences_are_refused_with_the_reason(kwargs, match):
    with pytest.raises(InputError, match=match):
        ControlSequence(**kwargs)


def test_values_beyond_typical_are_warned(caplog):
    with caplog.at_level(logging.WARNING):
        ControlSequence(gaze=torch.full((3, 2), 1.2))
    assert "gaze reaches 1.2" in caplog.text and "typical" in caplog.text


def test_resample_25_50_25_round_trip_and_linear_midpoints():
    ramp = torch.arange(10, dtype=torch.float32)[:, None] * torch.tensor([0.01, -0.02, 0.03])
    controls = ControlSequence(pose=ramp, gaze=ramp[:, :2] * 2)
    double = controls.resample(50)
    assert double.frames == 20 and double.fps == 50.0
    assert torch.allclose(double.pose[1::2][:-1], (ramp[:-1] + ramp[1:]) / 2, atol=1e-7)  # midpoints
    assert torch.equal(double.pose[0::2], ramp)  # every old frame kept exactly
    assert torch.equal(double.pose[-1], ramp[-1])  # past the last frame: held
    back = double.resample(25)
    assert back.equals(controls)
    # 25 → 30 fps keeps the duration; frame j of the result is at j/30 s.
    thirty = controls.resample(30)
    assert thirty.frames == 12 and torch.allclose(thirty.pose[6], ramp[5], atol=1e-7)  # 6/30 s = 5/25 s
    assert torch.allclose(thirty.pose[1], ramp[0] + (ramp[1] - ramp[0]) * (25 / 30), atol=1e-7)
    assert controls.resample(25) is controls
    with pytest.raises(InputError, match="fps"):
        controls.resample(-5)


def test_fit_hold_and_trim_or_zero(caplog):
    controls = ControlSequence(pose=torch.arange(12, dtype=torch.float32).reshape(4, 3) / 20)
    with caplog.at_level(logging.INFO):
        held = controls.fit(6)
    assert held.frames == 6 and torch.equal(held.pose[:4], controls.pose)
    assert torch.equal(held.pose[4], controls.pose[3]) and torch.equal(held.pose[5], controls.pose[3])
    assert "holding the last frame for 2 frames (0.08 s)" in caplog.text
    padded = controls.fit(6, "trim_or_zero")
    assert torch.equal(padded.pose[:4], controls.pose) and not padded.pose[4:].any()
    for mode in cs.FIT_MODES:
        cut = controls.fit(2, mode)
        assert cut.frames == 2 and torch.equal(cut.pose, controls.pose[:2])
    assert controls.fit(4) is controls
    assert ControlSequence().fit(10).frames == 0
    with pytest.raises(InputError, match="fit mode"):
        controls.fit(6, "loop")
    with pytest.raises(InputError, match="frames"):
        controls.fit(0)


def test_merge_overrides_fills_and_holds_the_shorter_parts():
    base = ControlSequence(pose=torch.zeros(4, 3), gaze=torch.full((4, 2), 0.1))
    override = ControlSequence(gaze=torch.full((6, 2), 0.2), cam=torch.full((6, 3), 7.0))
    merged = base.merge(override)
    assert merged.parts == ("pose", "cam", "gaze") and merged.frames == 6
    assert merged.gaze.eq(0.2).all() and merged.cam.eq(7.0).all() and not merged.pose.any()
    # A faster override is resampled to the base's rate first (8 frames at 50 fps = 4 at 25).
    fast = ControlSequence(pose=torch.ones(8, 3) * 0.5, fps=50)
    assert base.merge(fast).frames == 4 and base.merge(fast).pose.eq(0.5).all()
    assert base.merge(ControlSequence()) is base and ControlSequence().merge(base) is base


def test_dict_round_trip_and_strict_keys():
    controls = random_controls(fps=30)
    assert ControlSequence.from_dict(controls.to_dict()).equals(controls)
    assert ControlSequence.from_dict(controls.to_dict(tensors=True)).equals(controls)
    assert json.loads(json.dumps(controls.to_dict()))["fps"] == 30.0
    with pytest.raises(InputError, match="unknown control entries.*'gazes'"):
        ControlSequence.from_dict({"gazes": [[0, 0]]})
    smirk = ControlSequence.from_dict({"pose_params": torch.zeros(3, 3), "shape_params": torch.zeros(3, 300)},
                                      strict=False)
    assert smirk.parts == ("pose",) and smirk.fps == 25.0


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------

def test_constant_lengths_and_values():
    assert cs.constant(10, pose=(0, 0.1, 0)).frames == 10
    assert cs.constant(2.0, gaze=(0, 0)).frames == 50
    assert cs.constant("2s", gaze=(0, 0)).frames == 50 and cs.constant("50f", gaze=(0, 0)).frames == 50
    controls = cs.constant("1s", pose=(0.1, -0.2, 0.05), cam=(7, 0.01, -0.02), fps=30)
    assert controls.frames == 30 and controls.parts == ("pose", "cam")
    assert torch.equal(controls.pose, torch.tensor([[0.1, -0.2, 0.05]]).expand(30, 3))
    with pytest.raises(InputError, match="at least one"):
        cs.constant(10)
    with pytest.raises(InputError, match=r"pose needs 3 numbers \(pitch, yaw, roll\)"):
        cs.constant(10, pose=(0, 1))
    with pytest.raises(InputError, match="duration"):
        cs.constant(-1.0, gaze=(0, 0))
    with pytest.raises(InputError, match="no unit"):
        cs.constant("2.5", gaze=(0, 0))


def test_keyframes_of_zeros_and_of_a_constant():
    zeros = cs.keyframes("0s: pose=0,0,0 gaze=0,0 cam=0,0,0\n2s: pose=0,0,0 gaze=0,0 cam=0,0,0",
                         interpolation="smooth")
    assert zeros.frames == 51 and zeros.parts == ("pose", "cam", "gaze")
    assert not zeros.pose.any() and not zeros.cam.any() and not zeros.gaze.any()
    for interpolation in cs.INTERPOLATIONS:
        flat = cs.keyframes("0s: pose=0.1,-0.2,0.3\n1s: pose=0.1,-0.2,0.3\n40f: pose=0.1,-0.2,0.3",
                            interpolation=interpolation)
        assert torch.equal(flat.pose, torch.tensor([[0.1, -0.2, 0.3]]).expand(41, 3))


def test_keyframe_interpolation_at_known_times():
    linear = cs.keyframes("0f: yaw=0\n10f: yaw=1")
    smooth = cs.keyframes("0f: yaw=0\n10f: yaw=1", interpolation="smooth")
    assert linear.frames == 11 and linear.parts == ("pose",)
    assert linear.pose[:, 1].tolist() == pytest.approx([i / 10 for i in range(11)])
    assert not linear.pose[:, 0].any() and not linear.pose[:, 2].any()  # never set: 0
    w = np.arange(11) / 10
    assert smooth.pose[:, 1].tolist() == pytest.approx((w * w * (3 - 2 * w)).tolist())
    # Same ends and midpoint; smooth starts and stops gently.
    for frame in (0, 5, 10):
        assert smooth.pose[frame, 1] == linear.pose[frame, 1]
    assert smooth.pose[1, 1] < linear.pose[1, 1] and smooth.pose[9, 1] > linear.pose[9, 1]
    # Constant before the first and after the last keyframe of each component; times in s, ms and frames.
    held = cs.keyframes("1s: yaw=0.2\n2000ms: yaw=0.4", frames=75)
    assert held.frames == 75
    assert held.pose[:26, 1].eq(torch.tensor(0.2)).all() and held.pose[50:, 1].eq(torch.tensor(0.4)).all()
    assert held.pose[37, 1] == pytest.approx(0.2 + 0.2 * 12 / 25)
    # A keyframe between frames (0.5 s at 25 fps = frame 12.5).
    between = cs.keyframes("0s: gaze_pitch=0\n0.5s: gaze_pitch=0.25")
    assert between.frames == 14 and between.gaze[12, 0] == pytest.approx(0.24) and between.gaze[13, 0] == 0.25


def test_keyframe_syntax_variants_agree():
    reference = cs.keyframes("0s: pose=0,0,0\n0s: gaze=0,0\n2s: pose=0,0.3,0\n2s: gaze=0.1,-0.1")
    variants = [
        "0s: pose=0,0,0; gaze=0,0\n2s: pose=0,0.3,0; gaze=0.1,-0.1",
        "0s: pose=(0, 0, 0) gaze=[0 0]; 2s: yaw=0.3 pitch=0 roll=0 gaze_pitch=0.1 gaze_yaw=-0.1",
        ("# a comment\n2s:  # the end first\n  pose_1=0.3 pose_0=0 pose_2=0\n  gaze=0.1,-0.1\n\n"
         "0:  POSE=0,0,0 GAZE=0,0   # frame 0"),
        "0f: pose=0,0,0 gaze=0,0\n50f: pose=0,17.188733853924695deg,0 gaze=0.1,-0.1",
    ]
    for text in variants:
        assert cs.keyframes(text).equals(reference), text


def test_keyframes_in_degrees_and_cam():
    controls = cs.keyframes("0s: yaw=30deg pitch=-10° cam=7,0.01,0")
    assert controls.pose[0].tolist() == pytest.approx([math.radians(-10), math.radians(30), 0.0])
    assert controls.cam[0].tolist() == pytest.approx([7.0, 0.01, 0.0])


@pytest.mark.parametrize("text,match", [
    ("0s: yaw=0\n1s: yaw=0.1\n2x: yaw=0", r"line 3 \('2x: yaw=0'\): '2x' is not a time"),
    ("0s yaw=0", r"line 1 .*the time '0s' needs a ':'"),
    ("yaw=0.3", "line 1 .*settings before any time"),
    ("0s: yawn=0.3", "line 1 .*unknown setting 'yawn'"),
    ("0s: pose=0,0.3", r"pose=0,0.3 needs 3 numbers \(pitch, yaw, roll\), got 2"),
    ("0s: yaw=abc", "'abc' in yaw=abc is not a number"),
    ("0s: yaw=nan", "'nan' in yaw=nan is not a number"),
    ("\n\n0s: yaw=90", r"line 3 .*beyond any plausible pose value.*write 90deg for degrees"),
    ("0s: gaze=4,0", "beyond any plausible gaze value"),
    ("0s: cam=7deg,0,0", "not angles"),
    ("0s: yaw=0\n0s: yaw=0.1", r"line 2 .*pose_1 \(yaw\) is set twice at frame 0 \(also on line 1\)"),
    ("1.5: yaw=0", "has no unit"),
    ("2.5f: yaw=0", "frames are whole numbers"),
    ("-1s: yaw=0", "negative"),
    ("100000s: yaw=0", "beyond 1,000,000.*unit"),
    ("0s: yaw=", "has no value"),
    ("# only a comment\n5s:", "nothing is set"),
    ("", "nothing is set"),
])
def test_keyframe_errors_name_the_line_and_the_problem(text, match):
    with pytest.raises(InputError, match=match):
        cs.keyframes(text)


def test_keyframes_refuse_bad_options():
    with pytest.raises(InputError, match="interpolation"):
        cs.keyframes("0s: yaw=0", interpolation="cubic")
    with pytest.raises(InputError, match="frames"):
        cs.keyframes("0s: yaw=0", frames=0)


def test_the_documented_example_parses():
    doc = cs.__doc__
    example = doc[doc.index("    # A keyframe is"):doc.index("(With the signs above")]
    controls = cs.keyframes(example, interpolation="smooth")
    assert controls.frames == 126 and controls.parts == ("pose", "gaze")
    # 1.5 s and 2.5 s fall between frames (37.5 and 62.5 at 25 fps).
    assert controls.pose[37, 1] == pytest.approx(0.3, abs=1e-3) and controls.pose[38:63, 1].eq(torch.tensor(0.3)).all()
    assert controls.pose[100:, 1].eq(0).all() and controls.pose[:, [0, 2]].eq(0).all()
    assert controls.gaze[63:].eq(0).all() and controls.gaze[37, 0] == pytest.approx(-0.25, abs=1e-3)


def test_idle_motion_is_seeded_bounded_and_moves():
    first = cs.idle_motion(250, seed=7)
    again = cs.idle_motion("10s", seed=7)
    other = cs.idle_motion(250, seed=8)
    assert first.parts == ("pose", "gaze") and first.frames == 250 and first.fps == 25.0
    assert first.equals(again) and not torch.equal(first.pose, other.pose)
    peak = first.pose.abs().amax(dim=0)
    assert peak[0] <= 0.06 + 1e-6 and peak[1] <= 0.1 + 1e-6 and peak[2] <= 0.04 + 1e-6
    assert (first.pose.amax(0) - first.pose.amin(0)).gt(0.005).all()  # every axis moves
    assert (first.pose[1:] - first.pose[:-1]).abs().max() < 0.01  # smoothly: < 0.01 rad per frame
    assert first.gaze.abs().amax(0)[0] <= 0.1 + 1e-6 and first.gaze.abs().amax(0)[1] <= 0.05 + 1e-6
    assert torch.equal(first.gaze[0], torch.zeros(2))  # starts on the camera
    assert first.gaze[:, 0].unique().numel() > 3  # several fixations
    calm = cs.idle_motion(50, seed=7, gaze=False, amplitude=0.0)
    assert calm.parts == ("pose",) and not calm.pose.any()
    lively = cs.idle_motion(250, seed=7, amplitude=0.3, speed=2.0)
    assert lively.pose.abs().amax(0)[1] <= 0.3 + 1e-6 and not torch.equal(lively.pose, first.pose * 3)
    with pytest.raises(InputError, match="amplitude"):
        cs.idle_motion(10, amplitude=90.0)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".json", ".csv", ".npz", ".pt", ".pth"])
def test_named_formats_round_trip_exactly(tmp_path, suffix):
    controls = random_controls(frames=9, fps=29.97)
    path = cs.save_controls(controls, tmp_path / f"c{suffix}")
    back = cs.load_controls(path)
    assert back.equals(controls), suffix
    assert cs.load_controls(path, parts="gaze+pose").equals(controls.select(["pose", "gaze"]))
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("suffix", [".npy", ".txt"])
def test_bare_formats_round_trip_exactly_with_their_parts(tmp_path, suffix, caplog):
    controls = random_controls(frames=7).select(["pose", "gaze"])
    with caplog.at_level(logging.INFO):
        path = cs.save_controls(controls, tmp_path / f"c{suffix}")
    assert "read it back with parts='pose+gaze'" in caplog.text
    assert cs.load_controls(path, parts=("pose", "gaze")).equals(controls)
    with pytest.raises(InputError, match="does not name its columns"):
        cs.load_controls(path)  # 5 columns: pose+gaze or cam+gaze


def test_text_formats_are_readable(tmp_path):
    controls = ControlSequence(pose=[[0.1, 0.0, -0.25]], gaze=[[0.5, 0.0]])
    csv_text = cs.save_controls(controls, tmp_path / "c.csv").read_text()
    assert csv_text == "# fps=25.0\npose_0,pose_1,pose_2,gaze_0,gaze_1\n0.1,0.0,-0.25,0.5,0.0\n"
    data = json.loads(cs.save_controls(controls, tmp_path / "c.json").read_text())
    assert data == {"fps": 25.0, "pose": [[0.1, 0.0, -0.25]], "gaze": [[0.5, 0.0]]}


def test_smirk_files_and_the_reference_key(tmp_path):
    smirk = {"pose_params": torch.randn(6, 3) * 0.1, "cam": torch.tensor([[7.5, 0.01, -0.02]]).repeat(6, 1),
             "shape_params": torch.zeros(6, 300), "expression_params": torch.zeros(6, 50),
             "jaw_params": torch.zeros(6, 3), "eyelid_params": torch.zeros(6, 2)}
    torch.save(smirk, tmp_path / "clip.pt")
    loaded = cs.load_controls(tmp_path / "clip.pt")
    assert loaded.parts == ("pose", "cam") and torch.equal(loaded.pose, smirk["pose_params"])
    assert cs.load_controls(tmp_path / "clip.pt", parts=["cam"]).parts == ("cam",)
    with pytest.raises(InputError, match="holds no gaze"):
        cs.load_controls(tmp_path / "clip.pt", parts="gaze")
    # What we write, the reference's loader reads: pose under SMIRK's key, cam beside it.
    cs.save_controls(loaded, tmp_path / "ours.pt")
    raw = torch.load(tmp_path / "ours.pt", weights_only=True)
    assert set(raw) == {"pose_params", "cam", "fps"} and torch.equal(raw["pose_params"], smirk["pose_params"])


def test_csv_headers_in_any_order_with_aliases_and_an_fps_column(tmp_path):
    path = tmp_path / "gaze_pose.csv"
    path.write_text("fps,yaw,gaze_1,pitch,gaze_0,roll\n50,0.1,0.2,0.3,0.4,0.5\n50,0.6,0.7,0.8,0.9,1.0\n")
    controls = cs.load_controls(path)
    assert controls.fps == 50.0 and controls.parts == ("pose", "gaze")
    assert torch.equal(controls.pose, torch.tensor([[0.3, 0.1, 0.5], [0.8, 0.6, 1.0]]))
    assert torch.equal(controls.gaze, torch.tensor([[0.4, 0.2], [0.9, 0.7]]))
    bare = tmp_path / "bare.csv"
    np.savetxt(bare, np.ones((4, 2)), delimiter=",")
    assert cs.load_controls(bare).parts == ("gaze",)
    partial = tmp_path / "partial.csv"
    partial.write_text("pose_0,pose_1\n0,0\n")
    with pytest.raises(InputError, match="not pose_2"):
        cs.load_controls(partial)
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("gaze_0,gaze_1\n0,0\n0\n")
    with pytest.raises(InputError, match="row 2 has 1 values"):
        cs.load_controls(ragged)


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(InputError, match="pose file not found"):
        cs.load_controls(tmp_path / "none.npy", parts="pose")
    (tmp_path / "c.yaml").write_text("pose: []")
    with pytest.raises(InputError, match="'c.yaml' must be"):
        cs.load_controls(tmp_path / "c.yaml")
    (tmp_path / "bad.json").write_text('{"fps": 25, "pose": [[0, 0]]}')
    with pytest.raises(InputError, match=r"'bad.json'.*\[frames, 3\]"):
        cs.load_controls(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{pose")
    with pytest.raises(InputError, match="cannot read controls file 'broken.json'"):
        cs.load_controls(tmp_path / "broken.json")
    np.save(tmp_path / "nan.npy", np.full((3, 2), np.nan, np.float32))
    with pytest.raises(InputError, match="'nan.npy'.*NaN"):
        cs.load_controls(tmp_path / "nan.npy")
    with pytest.raises(InputError, match="no controls to save"):
        cs.save_controls(ControlSequence(), tmp_path / "empty.json")
    with pytest.raises(InputError, match="cannot save controls as 'x.mp4'"):
        cs.save_controls(random_controls(), tmp_path / "x.mp4")


# --------------------------------------------------------------------------------------------
# Nodes
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def nodes():
    load_pack()
    return importlib.import_module(f"{PACK_NAME}.nodes.controls")


@pytest.fixture(scope="module")
def pack_cs(nodes):
    """The pack's own copy of the controls module: the nodes make and accept its classes."""
    return importlib.import_module(f"{PACK_NAME}.imtalker_core.controls.sequence")


def node_classes(nodes):
    return [nodes.IMTalkerControlsConstant, nodes.IMTalkerControlsKeyframes, nodes.IMTalkerIdleMotion,
            nodes.IMTalkerLoadControls, nodes.IMTalkerSaveControls, nodes.IMTalkerCombineControls]


def test_node_definitions_follow_the_pack_conventions(nodes):
    for cls in node_classes(nodes):
        spec = cls.INPUT_TYPES()
        assert cls.CATEGORY == "IMTalker" and cls.DESCRIPTION and hasattr(cls, cls.FUNCTION)
        for name, (_, options) in {**spec["required"], **spec.get("optional", {})}.items():
            assert options.get("tooltip"), f"{cls.__name__}.{name} has no tooltip"
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)
    assert nodes.IMTalkerSaveControls.OUTPUT_NODE is True
    assert all(cls.RETURN_TYPES == ("IMTALKER_CONTROLS",) for cls in node_classes(nodes)
               if cls is not nodes.IMTalkerSaveControls)


def test_builder_nodes(nodes, pack_cs):
    (constant,) = nodes.IMTalkerControlsConstant().build(seconds=2.0, yaw=0.2, gaze_pitch=-0.1)
    assert constant.parts == ("pose", "gaze") and constant.frames == 50
    assert constant.pose[0].tolist() == pytest.approx([0, 0.2, 0]) and constant.gaze[0].tolist() == pytest.approx(
        [-0.1, 0])
    (with_cam,) = nodes.IMTalkerControlsConstant().build(seconds=1.0, use_pose=False, use_gaze=False, use_cam=True)
    assert with_cam.parts == ("cam",) and with_cam.cam[0].tolist() == [7.0, 0.0, 0.0]
    with pytest.raises(pack_cs.InputError, match="at least one"):
        nodes.IMTalkerControlsConstant().build(seconds=1.0, use_pose=False, use_gaze=False)

    default = nodes.IMTalkerControlsKeyframes.INPUT_TYPES()["required"]["keyframes"][1]["default"]
    (turn,) = nodes.IMTalkerControlsKeyframes().build(default, "smooth", 0.0)
    assert turn.frames == 89 and turn.parts == ("pose", "gaze")  # 0 … 3.5 s = frame 87.5
    assert turn.pose[25:51, 1].eq(torch.tensor(0.3)).all()  # turned from 1 s to 2 s
    assert turn.gaze[25, 0] == pytest.approx(-0.3) and turn.gaze[50:].eq(0).all()  # then on the camera
    assert turn.pose[88].eq(0).all() and turn.pose[:, [0, 2]].eq(0).all()
    (longer,) = nodes.IMTalkerControlsKeyframes().build(default, "linear", 6.0)
    assert longer.frames == 150
    problem = nodes.IMTalkerControlsKeyframes.VALIDATE_INPUTS(keyframes="0s: yaw=0\n1s yaw=1",
                                                              interpolation="linear", seconds=0.0)
    assert isinstance(problem, str) and "line 2" in problem
    assert nodes.IMTalkerControlsKeyframes.VALIDATE_INPUTS(keyframes=default, interpolation="smooth", seconds=0)

    (idle,) = nodes.IMTalkerIdleMotion().build(seconds=4.0, seed=3)
    assert idle.frames == 100 and idle.equals(pack_cs.idle_motion(100, seed=3))


def test_save_load_and_combine_nodes(nodes, pack_cs, tmp_path, monkeypatch):
    monkeypatch.setenv("IMTALKER_OUTPUT_DIR", str(tmp_path / "output"))
    monkeypatch.setenv("IMTALKER_INPUT_DIR", str(tmp_path / "output"))
    controls = random_controls(frames=8, cls=pack_cs.ControlSequence)
    saved = {}
    for format in nodes.SAVE_FORMATS:
        result = nodes.IMTalkerSaveControls().save(controls, "IMTalker/ctl", format)
        (path,) = result["result"]
        assert Path(path).suffix == f".{format}" and Path(path).parent == tmp_path / "output" / "IMTalker"
        columns = "pose+cam+gaze" if format == "npy" else "auto"
        name = f"IMTalker/{Path(path).name}"
        assert name in nodes.list_control_files()
        assert nodes.IMTalkerLoadControls.VALIDATE_INPUTS(file=name) is True
        (loaded,) = nodes.IMTalkerLoadControls().load(file=name, columns=columns)
        assert loaded.equals(controls), format
        (by_path,) = nodes.IMTalkerLoadControls().load(file="", path=path, columns=columns)
        assert by_path.equals(controls)
        saved[format] = name
    problem = nodes.IMTalkerLoadControls.VALIDATE_INPUTS(file="../secret.json")
    assert isinstance(problem, str) and "not in the input folder" in problem
    (gaze_only,) = nodes.IMTalkerLoadControls().load(file=saved["json"], columns="gaze")
    assert gaze_only.parts == ("gaze",) and torch.equal(gaze_only.gaze, controls.gaze)
    assert "names no file" in nodes.IMTalkerSaveControls.VALIDATE_INPUTS(filename_prefix="IMTalker/")

    base = pack_cs.idle_motion(50, seed=1)
    (combined,) = nodes.IMTalkerCombineControls().combine(base, controls, "cam+gaze")
    assert combined.parts == ("pose", "cam", "gaze") and combined.frames == 50
    assert torch.equal(combined.pose, base.pose) and torch.equal(combined.gaze[:8], controls.gaze)
    assert combined.gaze[8:].eq(controls.gaze[-1]).all()  # the shorter override holds its last frame
    with pytest.raises(pack_cs.InputError, match="hold no pose"):
        nodes.IMTalkerCombineControls().combine(base, pack_cs.ControlSequence(gaze=torch.zeros(2, 2)), "pose")


def test_audio_to_motion_resamples_and_holds_the_controls(pack_cs, caplog):
    generate = importlib.import_module(f"{PACK_NAME}.nodes.generate")
    types = importlib.import_module(f"{PACK_NAME}.nodes.types")
    assert types.Controls is pack_cs.ControlSequence  # the nodes use the pack's own class
    fast = pack_cs.ControlSequence(pose=torch.arange(40, dtype=torch.float32)[:, None].repeat(1, 3) / 100, fps=50)
    with caplog.at_level(logging.INFO):
        fitted = generate.fit_controls(fast, frames=30, fps=25.0)
    assert fitted.fps == 25.0 and fitted.frames == 30
    assert torch.equal(fitted.pose[:20], fast.pose[0::2]) and fitted.pose[20:].eq(fast.pose[38]).all()
    assert "the controls last 0.80 s (20 frames at 25 fps) and the speech 1.20 s (30 frames)" in caplog.text
    assert "held to the end" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        one_short = generate.fit_controls(pack_cs.ControlSequence(gaze=torch.zeros(29, 2)), frames=30, fps=25.0)
    assert one_short.frames == 30 and "the controls last" not in caplog.text  # within a frame: no notice
    assert generate.fit_controls(None, frames=30, fps=25.0).parts == ()
