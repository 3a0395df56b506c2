"""Motion editing (`imtalker_core.motion_edit`) and its nodes (`nodes/motion_edit.py`), on small seeded
latent sequences; the nodes run in-process without ComfyUI (standalone folders from the environment)."""
from __future__ import annotations

import importlib
import inspect
import math

import pytest
import torch
from safetensors.torch import save_file

from imtalker_core import motion_edit as me
from imtalker_core.errors import InputError
from tests.test_nodes import PACK_NAME, load_pack

D = 32


def latents(frames=12, width=D, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(frames, width, generator=generator)


def constant(frames=10, width=D, value=0.37):
    return torch.full((frames, width), value)


# ------------------------------------------------------------------------------------------------
# Exact identities
# ------------------------------------------------------------------------------------------------

def test_scale_one_returns_an_exact_copy():
    x = latents()
    for reference in (None, latents(1, seed=5)):
        out = me.scale_intensity(x, 1.0, reference)
        assert torch.equal(out, x) and out.dtype == torch.float32
        assert out.data_ptr() != x.data_ptr()  # a copy: editing it never touches the input


def test_blend_weights_zero_and_one_are_exactly_a_and_b():
    a, b = latents(seed=1) * 1e4, latents(seed=2) * 1e-3  # magnitudes where a recomputed mix would round
    assert torch.equal(me.blend(a, b, 0.0), a)
    assert torch.equal(me.blend(a, b, 1.0), b)
    curve = torch.tensor([0, 1, 0.5, 0, 1, 0.25, 1, 0, 0, 1, 0.75, 0], dtype=torch.float32)
    out = me.blend(a, b, curve)
    assert torch.equal(out[curve == 0], a[curve == 0])
    assert torch.equal(out[curve == 1], b[curve == 1])
    assert torch.allclose(out[2], (a[2] + b[2]) / 2, rtol=1e-6, atol=1e-3)


def test_smoothing_with_zero_strength_is_the_identity():
    x = latents()
    assert torch.equal(me.smooth(x, 0.0), x)
    assert torch.equal(me.smooth(x, method="moving_average", window_frames=1), x)
    assert torch.equal(me.smooth(x[:1], 3.0), x[:1])  # one frame: nothing to smooth


def test_relative_motion_of_a_still_driver_is_exactly_the_source():
    source = latents(1, seed=3)
    driving = constant(9, value=1.234567)
    for anchor in (0, 4, -1, "mean"):
        out = me.relative_motion(driving, source, anchor)
        assert out.shape == (9, D)
        assert torch.equal(out, source.expand(9, D))


def test_trim_full_range_and_resample_same_rate_are_exact_copies():
    x = latents()
    for out in (me.trim(x, 0), me.trim(x, 0, None), me.trim(x, 0, x.shape[0]), me.resample(x, 25, 25.0),
                me.loop(x, x.shape[0]), me.concat([x])):
        assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()


# ------------------------------------------------------------------------------------------------
# Known values
# ------------------------------------------------------------------------------------------------

def test_scale_about_the_reference_and_about_the_mean():
    x = latents()
    reference = latents(1, seed=9)
    assert torch.allclose(me.scale_intensity(x, 2.0, reference), reference + 2 * (x - reference), atol=1e-6)
    assert torch.equal(me.scale_intensity(x, 0.0, reference), reference.expand_as(x))
    # The identity's latent arrives as [1, 32] in the renderer's dtype, or [32]: same result.
    half = reference.half()
    expected = half.float() + 0.5 * (x - half.float())
    assert torch.equal(me.scale_intensity(x, 0.5, half), expected)
    assert torch.equal(me.scale_intensity(x, 0.5, half[0]), expected)
    calmer = me.scale_intensity(x, 0.5)  # about the mean: the mean stays, deviations halve
    assert torch.allclose(calmer.mean(0), x.mean(0), atol=1e-6)
    assert torch.allclose(calmer - calmer.mean(0), 0.5 * (x - x.mean(0)), atol=1e-6)


def test_blend_half_is_the_mean_and_length_policies():
    a, b = latents(8, seed=1), latents(5, seed=2)
    assert torch.allclose(me.blend(a[:5], b, 0.5), (a[:5] + b) / 2, atol=1e-6)
    with pytest.raises(InputError, match="8 frames but b has 5"):
        me.blend(a, b, 0.5)
    shortest = me.blend(a, b, 0.25, length="shortest")
    assert shortest.shape == (5, D)
    assert torch.allclose(shortest, 0.75 * a[:5] + 0.25 * b, atol=1e-6)
    held = me.blend(a, b, 1.0, length="hold")
    assert held.shape == (8, D)
    assert torch.equal(held[:5], b) and torch.equal(held[5:], b[-1:].expand(3, D))


def test_weight_curve_shapes():
    linear = me.weight_curve(10, 0.0, 1.0, ramp_start=2, ramp_end=6)
    assert linear.tolist() == [0, 0, 0, 0.25, 0.5, 0.75, 1, 1, 1, 1]
    smooth = me.weight_curve(10, 0.0, 1.0, 2, 6, shape="smooth")
    assert smooth[:3].tolist() == [0, 0, 0] and smooth[6:].tolist() == [1, 1, 1, 1]
    assert smooth[3].item() == pytest.approx(3 * 0.25 ** 2 - 2 * 0.25 ** 3) and smooth[4].item() == 0.5
    step = me.weight_curve(5, 0.2, 0.8, 2, 2)
    assert step.tolist() == pytest.approx([0.2, 0.2, 0.8, 0.8, 0.8]) and step.dtype == torch.float32
    down = me.weight_curve(4, 1.0, 0.0, 0, 3)
    assert down.tolist() == pytest.approx([1, 2 / 3, 1 / 3, 0])
    assert down[0].item() == 1.0 and down[-1].item() == 0.0
    assert me.weight_curve(3, 0.3, 0.3).tolist() == pytest.approx([0.3] * 3)


def test_loop_and_pingpong_index_patterns():
    assert me.loop_indices(4, 10, "loop").tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert me.loop_indices(4, 12, "pingpong").tolist() == [0, 1, 2, 3, 2, 1, 0, 1, 2, 3, 2, 1]
    assert me.loop_indices(2, 5, "pingpong").tolist() == [0, 1, 0, 1, 0]
    assert me.loop_indices(1, 3, "pingpong").tolist() == [0, 0, 0]
    x = latents(4)
    out = me.loop(x, 7, "pingpong")
    assert torch.equal(out, x[[0, 1, 2, 3, 2, 1, 0]])
    assert torch.equal(me.loop(x, 3), x[:3])  # shorter than the motion: cut


def test_trim_frames_and_negative_end():
    x = latents(10)
    assert torch.equal(me.trim(x, 2, 5), x[2:5])
    assert torch.equal(me.trim(x, 3, -2), x[3:8])
    assert torch.equal(me.trim(x, 9), x[9:])


def test_concat_and_crossfade_values():
    a, b, c = torch.zeros(4, 2), torch.ones(4, 2), torch.full((3, 2), 3.0)
    assert torch.equal(me.concat([a, b, c]), torch.cat([a, b, c]))
    faded = me.concat([a, b], crossfade_frames=3)
    assert faded[:, 0].tolist() == [0, 0.25, 0.5, 0.75, 1]
    three = me.concat([a, b, c], crossfade_frames=2)
    assert three.shape[0] == 4 + 4 + 3 - 2 * 2
    assert three[:, 0].tolist() == pytest.approx([0, 0, 1 / 3, 2 / 3, 1 + 2 / 3, 1 + 4 / 3, 3])


def test_resample_is_linear_in_time():
    x = latents(6)
    up = me.resample(x, 25, 50)
    assert up.shape == (12, D)
    assert torch.equal(up[0:12:2], x)  # frames that fall on input frames are those frames, bit for bit
    assert torch.allclose(up[1:10:2], (x[:-1] + x[1:]) / 2, atol=1e-6)
    assert torch.equal(up[11], x[5])  # past the last input frame: held
    assert torch.equal(me.resample(x, 50, 25), x[0:6:2])
    ramp = torch.arange(10, dtype=torch.float32)[:, None]
    assert me.resample(ramp, 30, 25)[:, 0].tolist() == pytest.approx([0, 1.2, 2.4, 3.6, 4.8, 6.0, 7.2, 8.4])
    assert me.resampled_length(100, 30, 25) == 83 and me.resampled_length(1, 25, 5) == 1


def test_relative_motion_adds_the_drivers_changes_to_the_source():
    driving, source = latents(6, seed=1), latents(1, seed=2)
    out = me.relative_motion(driving, source, anchor=2)
    assert torch.allclose(out, source + driving - driving[2], atol=1e-6)
    assert torch.equal(out[2], source[0])  # at the anchor the portrait's own expression, exactly
    assert torch.allclose(me.relative_motion(driving, source, -1), source + driving - driving[-1], atol=1e-6)
    mean = me.relative_motion(driving, source[0].half(), "mean")
    assert torch.allclose(mean.mean(0), source[0].half().float(), atol=1e-6)


def test_smoothing_preserves_constants_and_ramps_and_reduces_noise():
    for method in me.SMOOTH_METHODS:
        for edge in me.SMOOTH_EDGES:
            out = me.smooth(constant(), 2.0, method, 5, edge)
            assert out.shape == (10, D)
            assert torch.allclose(out, constant(), atol=1e-6), (method, edge)
    noise = latents(200, seed=4)
    smoothed = me.smooth(noise, 2.0)
    assert smoothed.var().item() < 0.3 * noise.var().item()
    assert torch.equal(smoothed[0], noise[0]) and torch.equal(smoothed[-1], noise[-1])  # ends kept
    averaged = me.smooth(noise, method="moving_average", window_frames=3, edge="reflect")
    assert torch.allclose(averaged[1:-1], (noise[:-2] + noise[1:-1] + noise[2:]) / 3, atol=1e-6)
    assert torch.allclose(averaged[0], (2 * noise[1] + noise[0]) / 3, atol=1e-6)  # mirrored edge
    ramp = 0.5 * torch.arange(12, dtype=torch.float32)[:, None] + 1.0
    assert torch.allclose(me.smooth(ramp, 3.0), ramp, atol=1e-5)  # a steady drift survives up to the ends
    # A kernel much longer than the motion: ends kept, a straight line between them.
    short = torch.tensor([[0.0], [1.0], [5.0], [3.0]])
    assert me.smooth(short, 50.0)[:, 0].tolist() == pytest.approx([0, 1, 2, 3], abs=1e-5)


def test_edits_are_deterministic_and_leave_inputs_alone():
    x, y = latents(20, seed=1), latents(15, seed=2)
    snapshot = (x.clone(), y.clone())

    def chain():
        smoothed = me.smooth(x, 1.5)
        mixed = me.blend(smoothed, me.loop(y, 20, "pingpong"), me.weight_curve(20, 0, 1, 5, 15, "smooth"))
        joined = me.concat([mixed, me.scale_intensity(y, 1.3)], crossfade_frames=4)
        return me.resample(me.relative_motion(joined, x[:1], "mean"), 25, 30)

    assert torch.equal(chain(), chain())
    assert torch.equal(x, snapshot[0]) and torch.equal(y, snapshot[1])


# ------------------------------------------------------------------------------------------------
# Motion files
# ------------------------------------------------------------------------------------------------

def test_motion_file_round_trip_is_exact(tmp_path):
    x = latents(17)
    path = me.save_motion(tmp_path / "take.safetensors", x, 30000 / 1001)
    loaded, fps = me.load_motion(path)
    assert torch.equal(loaded, x) and loaded.dtype == torch.float32 and loaded.device.type == "cpu"
    assert fps == 30000 / 1001
    from safetensors import safe_open
    with safe_open(path, framework="pt") as handle:
        meta = handle.metadata()
    assert meta["format"] == me.MOTION_FORMAT and meta["frames"] == "17" and meta["latent_dim"] == "32"
    assert not list(tmp_path.glob("*.part"))


def test_motion_files_refuse_bad_content(tmp_path):
    with pytest.raises(InputError, match="must end with .safetensors"):
        me.save_motion(tmp_path / "take.pt", latents(), 25)
    with pytest.raises(InputError, match="does not exist"):
        me.save_motion(tmp_path / "missing" / "take.safetensors", latents(), 25)
    with pytest.raises(InputError, match="does not exist"):
        me.load_motion(tmp_path / "absent.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(InputError, match="not a readable .safetensors"):
        me.load_motion(garbage)

    def write(name, tensors, metadata):
        path = tmp_path / name
        save_file(tensors, str(path), metadata=metadata)
        return path

    tag = {"format": me.MOTION_FORMAT, "fps": "25.0"}
    with pytest.raises(InputError, match="not an IMTalker motion file"):
        me.load_motion(write("weights.safetensors", {"motion": latents()}, {"format": "pt"}))
    with pytest.raises(InputError, match="no 'motion' tensor"):
        me.load_motion(write("other.safetensors", {"weights": latents()}, tag))
    for fps in ("0", "-25", "nan", "fast"):
        with pytest.raises(InputError, match="frame rate"):
            me.load_motion(write("fps.safetensors", {"motion": latents()}, {**tag, "fps": fps}))
    with pytest.raises(InputError, match="frame rate"):
        me.load_motion(write("nofps.safetensors", {"motion": latents()}, {"format": me.MOTION_FORMAT}))
    bad = latents()
    bad[3, 4] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        me.load_motion(write("nan.safetensors", {"motion": bad}, tag))
    with pytest.raises(InputError, match=r"\[frames, dim\]"):
        me.load_motion(write("cube.safetensors", {"motion": torch.zeros(2, 3, 4)}, tag))
    with pytest.raises(InputError, match=r"expected \[frames, 32\]"):
        me.load_motion(write("wide.safetensors", {"motion": torch.zeros(5, 16)}, tag), latent_dim=32)
    with pytest.raises(InputError, match="no frames"):
        me.load_motion(write("empty.safetensors", {"motion": torch.zeros(0, 32)}, tag))


# ------------------------------------------------------------------------------------------------
# Input errors
# ------------------------------------------------------------------------------------------------

def test_bad_latents_are_refused_with_their_name():
    nan = latents()
    nan[0, 0] = float("nan")
    cases = [(torch.zeros(32), r"shaped \[frames, dim\]"), (torch.zeros(0, 32), "no frames"),
             (nan, "NaN"), (torch.zeros(3, 0), "width 0"), ("text", "frames, dim")]
    for value, message in cases:
        with pytest.raises(InputError, match=message):
            me.smooth(value, 1.0)
    with pytest.raises(InputError, match="driving motion"):
        me.relative_motion(torch.zeros(4, 32, 1), latents(1))
    with pytest.raises(InputError, match=r"source motion must be one motion latent \[1, 32\]"):
        me.relative_motion(latents(), latents(2))
    with pytest.raises(InputError, match="width 32 but b of width 16"):
        me.blend(latents(), latents(width=16), 0.5)
    with pytest.raises(InputError, match="reference motion"):
        me.scale_intensity(latents(), 1.0, torch.zeros(1, 16))  # checked even when scale is 1
    with pytest.raises(InputError, match="width 32 but motion 2 of width 8"):
        me.concat([latents(), latents(width=8)])


@pytest.mark.parametrize("weight, message", [
    (-0.1, "from 0"), (1.5, "from 0"), (float("nan"), "finite"), ("half", "not a number"),
    (torch.tensor([0.0, 1.2, 0.5]), "reaches 1.2"), (torch.tensor([0.0, float("nan"), 0.5]), "NaN"),
    (torch.zeros(4), "4 values for 3 frames"), (torch.zeros(3, 2), r"must be \[frames\]"),
])
def test_bad_blend_weights_are_refused(weight, message):
    with pytest.raises(InputError, match=message):
        me.blend(latents(3), latents(3, seed=1), weight)


def test_bad_settings_are_refused():
    x = latents(10)
    checks = [
        (lambda: me.smooth(x, -1.0), "sigma_frames"),
        (lambda: me.smooth(x, float("inf")), "finite"),
        (lambda: me.smooth(x, method="median"), "gaussian, moving_average"),
        (lambda: me.smooth(x, method="moving_average", window_frames=4), "odd"),
        (lambda: me.smooth(x, edge="wrap"), "anchor, reflect"),
        (lambda: me.scale_intensity(x, -0.5), "scale"),
        (lambda: me.match_lengths(x, x, "pad"), "error, shortest, hold"),
        (lambda: me.weight_curve(10, 0, 1, 6, 2), "before ramp start"),
        (lambda: me.weight_curve(10, 0, 1.5), "end weight"),
        (lambda: me.weight_curve(10, 0, 1, -1, 2), "≥ 0"),
        (lambda: me.weight_curve(0, 0, 1), "at least 1"),
        (lambda: me.weight_curve(5, 0, 1, shape="cubic"), "linear, smooth"),
        (lambda: me.trim(x, 10), "from 0 to 9"),
        (lambda: me.trim(x, -1), "from 0 to 9"),
        (lambda: me.trim(x, 0, 11), "up to 10"),
        (lambda: me.trim(x, 5, 5), "keeps no frames"),
        (lambda: me.trim(x, 5, -6), "keeps no frames"),
        (lambda: me.trim(x, 1.5), "whole frame"),
        (lambda: me.loop(x, 0), "at least 1"),
        (lambda: me.loop(x, 5, "bounce"), "loop, pingpong"),
        (lambda: me.concat([], 0), "one or more"),
        (lambda: me.concat([x, latents(2)], 3), "motion 2 has 2 frames"),
        (lambda: me.resample(x, 0, 25), "fps_in"),
        (lambda: me.resample(x, 25, -1), "fps_out"),
        (lambda: me.resample(x, 25, float("nan")), "fps_out"),
        (lambda: me.relative_motion(x, x[:1], 10), "from -10 to 9"),
        (lambda: me.relative_motion(x, x[:1], "median"), "'mean'"),
        (lambda: me.save_motion("x.safetensors", x, 0), "fps"),
    ]
    for call, message in checks:
        with pytest.raises(InputError, match=message):
            call()


# ------------------------------------------------------------------------------------------------
# Nodes, run in-process without ComfyUI
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def nodes_module():
    load_pack()
    return importlib.import_module(f"{PACK_NAME}.nodes.motion_edit")


@pytest.fixture(scope="module")
def Motion():
    load_pack()
    return importlib.import_module(f"{PACK_NAME}.nodes.types").Motion


@pytest.fixture(scope="module")
def PackInputError():
    """The pack's own InputError (the pack is imported under its own name, as ComfyUI imports it)."""
    load_pack()
    return importlib.import_module(f"{PACK_NAME}.imtalker_core.errors").InputError


@pytest.fixture
def folders(tmp_path, monkeypatch):
    """Standalone output and input folders."""
    output, inputs = tmp_path / "output", tmp_path / "input"
    output.mkdir()
    inputs.mkdir()
    monkeypatch.setenv("IMTALKER_OUTPUT_DIR", str(output))
    monkeypatch.setenv("IMTALKER_INPUT_DIR", str(inputs))
    return output, inputs


def run_node(module, node_id, **inputs):
    instance = module.MOTION_EDIT_NODES[node_id]()
    out = getattr(instance, instance.FUNCTION)(**inputs)
    return out["result"] if isinstance(out, dict) else out


def identity_with(motion_latent):
    from imtalker_core.pipeline import Identity
    return Identity(features=[], vector=torch.zeros(1, 512), motion=motion_latent, motion_maps=[])


def test_node_definitions_are_well_formed(nodes_module, folders):
    assert set(nodes_module.MOTION_EDIT_NODES) == set(nodes_module.MOTION_EDIT_DISPLAY_NAMES)
    for node_id, cls in nodes_module.MOTION_EDIT_NODES.items():
        assert cls.CATEGORY == "IMTalker/motion" and cls.DESCRIPTION, node_id
        assert nodes_module.MOTION_EDIT_DISPLAY_NAMES[node_id].startswith("IMTalker "), node_id
        assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES) == len(cls.OUTPUT_TOOLTIPS), node_id
        spec = cls.INPUT_TYPES()
        params = inspect.signature(getattr(cls, cls.FUNCTION)).parameters
        for section in ("required", "optional"):
            for name, (kind, opts) in spec.get(section, {}).items():
                assert opts.get("tooltip") and name in params, f"{node_id}.{name}"
                if section == "optional":
                    assert params[name].default is not inspect.Parameter.empty, f"{node_id}.{name}"
                if isinstance(kind, list):
                    assert "default" not in opts or opts["default"] in kind, f"{node_id}.{name}"
                elif kind in ("INT", "FLOAT"):
                    assert opts["min"] <= opts["default"] <= opts["max"], f"{node_id}.{name}"
                    assert isinstance(opts["default"], int if kind == "INT" else float), f"{node_id}.{name}"
        required = {n for n, p in params.items() if p.default is inspect.Parameter.empty and n != "self"}
        assert required <= set(spec["required"]), node_id
    assert nodes_module.IMTalkerSaveMotion.OUTPUT_NODE is True


def test_edit_nodes_compute_the_core_edits(nodes_module, Motion, PackInputError):
    x, y = latents(10, seed=1), latents(6, seed=2)
    motion = Motion(x, 25.0)
    (out,) = run_node(nodes_module, "IMTalkerSmoothMotion", motion=motion, method="gaussian", sigma_frames=1.5,
                      window_frames=5, keep_ends=True)
    assert torch.equal(out.latents, me.smooth(x, 1.5)) and out.fps == 25.0
    (out,) = run_node(nodes_module, "IMTalkerSmoothMotion", motion=motion, method="moving_average",
                      sigma_frames=0.0, window_frames=3, keep_ends=False)
    assert torch.equal(out.latents, me.smooth(x, method="moving_average", window_frames=3, edge="reflect"))

    source = latents(1, seed=3).half()  # an fp16 renderer's identity
    (out,) = run_node(nodes_module, "IMTalkerScaleMotion", motion=motion, scale=0.5, identity=identity_with(source))
    assert torch.equal(out.latents, me.scale_intensity(x, 0.5, source))
    (out,) = run_node(nodes_module, "IMTalkerScaleMotion", motion=motion, scale=1.0)
    assert torch.equal(out.latents, x)

    (out,) = run_node(nodes_module, "IMTalkerRelativeMotion", driving=motion, identity=identity_with(source),
                      anchor="frame", anchor_frame=3)
    assert torch.equal(out.latents[3], source[0].float())
    (out,) = run_node(nodes_module, "IMTalkerRelativeMotion", driving=motion, identity=identity_with(source),
                      anchor="mean", anchor_frame=3)
    assert torch.equal(out.latents, me.relative_motion(x, source, "mean"))

    (out,) = run_node(nodes_module, "IMTalkerTrimMotion", motion=motion, unit="seconds", start=0.08, end=-0.04)
    assert torch.equal(out.latents, x[2:9])
    (out,) = run_node(nodes_module, "IMTalkerTrimMotion", motion=motion, unit="frames", start=1.0, end=4.0)
    assert torch.equal(out.latents, x[1:4])
    with pytest.raises(PackInputError, match="whole number"):
        run_node(nodes_module, "IMTalkerTrimMotion", motion=motion, unit="frames", start=1.5, end=0.0)

    (out,) = run_node(nodes_module, "IMTalkerLoopMotion", motion=Motion(y, 25.0), mode="pingpong", unit="seconds",
                      length=0.4)
    assert torch.equal(out.latents, y[[0, 1, 2, 3, 4, 5, 4, 3, 2, 1]])
    audio = {"waveform": torch.zeros(1, 2, 16000 + 1), "sample_rate": 16000}  # 1 s and one sample: 26 frames
    (out,) = run_node(nodes_module, "IMTalkerLoopMotion", motion=Motion(y, 25.0), mode="loop", unit="seconds",
                      length=99.0, audio=audio)
    assert out.frames == 26 and torch.equal(out.latents[6], y[0])
    assert out.latents.dtype == torch.float32 and out.latents.device.type == "cpu"


def test_blend_and_concat_nodes_match_frame_rates(nodes_module, Motion, PackInputError, caplog):
    a = Motion(latents(10, seed=1), 25.0)
    b = Motion(latents(20, seed=2), 50.0)  # the same 0.4 s at twice the rate
    with caplog.at_level("INFO"):
        (out,) = run_node(nodes_module, "IMTalkerBlendMotion", motion_a=a, motion_b=b, start_weight=0.0,
                          end_weight=1.0, ramp_start=0.08, ramp_end=0.24, shape="linear", length="error")
    assert "resampled to 25 fps (20 → 10 frames)" in caplog.text and "length policy" not in caplog.text
    assert out.frames == 10 and out.fps == 25.0
    b25 = me.resample(b.latents, 50, 25)
    assert torch.equal(out.latents[:3], a.latents[:3]) and torch.equal(out.latents[6:], b25[6:])
    assert torch.allclose(out.latents[4], (a.latents[4] + b25[4]) / 2, atol=1e-6)

    with pytest.raises(PackInputError, match="motion_a has 10 frames but motion_b has 4"):
        run_node(nodes_module, "IMTalkerBlendMotion", motion_a=a, motion_b=Motion(latents(4), 25.0), start_weight=0.5,
                 end_weight=0.5, length="error")
    with caplog.at_level("INFO"):
        (out,) = run_node(nodes_module, "IMTalkerBlendMotion", motion_a=a, motion_b=Motion(latents(4), 25.0),
                          start_weight=0.5, end_weight=0.5, length="shortest")
    assert out.frames == 4 and "the result has 4 (length policy 'shortest')" in caplog.text

    (out,) = run_node(nodes_module, "IMTalkerConcatMotion", motion_a=a, motion_b=b, crossfade_frames=2,
                      motion_d=Motion(latents(3, seed=4), 25.0))
    assert out.frames == 10 + 10 + 3 - 2 * 2 and out.fps == 25.0
    assert torch.equal(out.latents[:8], a.latents[:8])


def test_save_and_load_motion_nodes_round_trip(nodes_module, Motion, PackInputError, folders):
    output, inputs = folders
    motion = Motion(latents(9), 29.97)
    result = nodes_module.IMTalkerSaveMotion().save(motion=motion, filename_prefix="IMTalker/take")
    (path,) = result["result"]
    assert path == str(output / "IMTalker" / "take_00001_.safetensors")
    assert result["ui"]["text"] == ["IMTalker/take_00001_.safetensors"]
    (second,) = run_node(nodes_module, "IMTalkerSaveMotion", motion=motion, filename_prefix="IMTalker/take")
    assert second.endswith("take_00002_.safetensors")

    # Offered from the output folder (marked) and, once copied there, from the input folder.
    (inputs / "clips").mkdir()
    (inputs / "clips" / "idle.safetensors").write_bytes((output / "IMTalker" / "take_00001_.safetensors").read_bytes())
    (inputs / "notes.txt").write_text("not motion")
    listed = nodes_module.list_motion_files()
    assert listed == ["clips/idle.safetensors", "IMTalker/take_00001_.safetensors [output]",
                      "IMTalker/take_00002_.safetensors [output]"]
    assert nodes_module.IMTalkerLoadMotion.INPUT_TYPES()["required"]["motion_file"][0] == listed

    for name, extra in (("IMTalker/take_00001_.safetensors [output]", ""), ("clips/idle.safetensors", ""),
                        ("", path), ("", "clips/idle.safetensors")):
        loaded, fps, frames = run_node(nodes_module, "IMTalkerLoadMotion", motion_file=name, motion_path=extra)
        assert torch.equal(loaded.latents, motion.latents) and fps == loaded.fps == 29.97 and frames == 9

    load = nodes_module.IMTalkerLoadMotion
    assert load.VALIDATE_INPUTS("clips/idle.safetensors") is True
    assert "not a file in the input folder" in load.VALIDATE_INPUTS("../output/IMTalker/take_00001_.safetensors")
    assert "not a file" in load.VALIDATE_INPUTS("", "missing.safetensors")
    assert "choose a motion file" in load.VALIDATE_INPUTS("", "")
    assert load.IS_CHANGED("clips/idle.safetensors") == load.IS_CHANGED("clips/idle.safetensors")
    assert math.isnan(load.IS_CHANGED("absent.safetensors"))
    save_file({"motion": latents()}, str(inputs / "weights.safetensors"))
    with pytest.raises(PackInputError, match="not an IMTalker motion file"):
        run_node(nodes_module, "IMTalkerLoadMotion", motion_file="weights.safetensors", motion_path="")
    save_file({"motion": latents(width=16)}, str(inputs / "narrow.safetensors"),
              metadata={"format": me.MOTION_FORMAT, "fps": "25.0"})
    with pytest.raises(PackInputError, match=r"expected \[frames, 32\]"):
        run_node(nodes_module, "IMTalkerLoadMotion", motion_file="narrow.safetensors", motion_path="")
    assert "names no file" in nodes_module.IMTalkerSaveMotion.VALIDATE_INPUTS("IMTalker/")
