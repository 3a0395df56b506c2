"""Unit tests on tiny configurations: the same code paths as the official models, in milliseconds."""
from __future__ import annotations

import ast
import pathlib

import pytest
import torch
import torch.nn.functional as F

from imtalker_core import (IMTRenderer, InputError, MotionGenerator, encode_identity, encode_motion,
                           generate_motion, render_frames)
from imtalker_core.config import RendererConfig, tiny_generator_config, tiny_renderer_config
from imtalker_core.layers.attention import guided_resample, relative_position_index, shifted_window_mask
from imtalker_core.sampling import euler, guided, time_grid

CORE = pathlib.Path(__file__).resolve().parent.parent / "imtalker_core"


@pytest.fixture(scope="module")
def tiny_renderer():
    torch.manual_seed(1)
    model = IMTRenderer(tiny_renderer_config()).eval()
    for m in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def tiny_generator():
    torch.manual_seed(2)
    model = MotionGenerator(tiny_generator_config()).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model


def test_core_never_imports_comfyui():
    banned = {"comfy", "folder_paths", "nodes", "server", "execution", "comfy_extras"}
    for path in CORE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in banned, f"{path.name} imports {name}"


LIGHT_IMPORT_PROBE = """
import importlib.abc, sys
BLOCKED = {"av", "soxr", "cv2", "soundfile", "PIL"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError("blocked for this test: " + name)
sys.meta_path.insert(0, Block())
import imtalker_core
from imtalker_core import checkpoints, pipeline, sampling, timing
from imtalker_core.generator.audio import AudioEncoder
assert imtalker_core.frame_count(16000) == 25
print(sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED))
"""


def test_core_import_needs_no_media_libraries():
    """`import imtalker_core` (models, checkpoints, pipeline) works with the media libraries
    (PyAV, soxr, OpenCV, soundfile, Pillow) unavailable."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", LIGHT_IMPORT_PROBE], cwd=CORE.parent, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def naive_guided_resample(value, attn_map, ratio):
    """The resampler written as the paper describes it: top-1 cell → mean of its r×r block."""
    b, c, h, w = value.shape
    low = h // ratio
    out = torch.empty_like(value)
    best = attn_map.argmax(dim=-1)  # [B, low²]
    for bi in range(b):
        for y in range(h):
            for x in range(w):
                cell = (y // ratio) * low + (x // ratio)
                j = best[bi, cell].item()
                jy, jx = divmod(j, low)
                block = value[bi, :, jy * ratio:(jy + 1) * ratio, jx * ratio:(jx + 1) * ratio]
                out[bi, :, y, x] = block.sum(dim=(1, 2)) / ratio ** 2
    return out


@pytest.mark.parametrize("ratio", [2, 4])
def test_guided_resample_matches_definition(ratio):
    torch.manual_seed(0)
    value = torch.randn(2, 3, 4 * ratio, 4 * ratio)
    attn = torch.rand(2, 16, 16)
    got = guided_resample(value, attn.argmax(dim=-1), 4)
    assert torch.allclose(got, naive_guided_resample(value, attn, ratio), atol=1e-6)


def test_swin_helpers():
    index = relative_position_index(4)
    assert index.shape == (16, 16) and index.min() == 0 and index.max() == 48
    assert torch.equal(index.diagonal(), torch.full((16,), 24))
    mask = shifted_window_mask(8, 4, 2)
    assert mask.shape == (4, 16, 16)
    assert torch.all(mask[0] == 0)  # the top-left window holds one region only
    assert set(mask.unique().tolist()) == {-100.0, 0.0}


def test_tiny_renderer_shapes_and_range(tiny_renderer):
    cfg = tiny_renderer.cfg
    image = torch.rand(1, 3, cfg.image_size, cfg.image_size)
    identity = encode_identity(tiny_renderer, image)
    assert [f.shape[-1] for f in identity.features] == list(cfg.spatial_dims[::-1])
    assert [m.shape[-1] for m in identity.motion_maps] == [s for s in cfg.spatial_dims[::-1] if s < 32]
    frames = render_frames(tiny_renderer, identity, torch.randn(3, 32), batch_size=2)
    assert frames.shape == (3, 3, 128, 128)
    assert frames.min() >= 0 and frames.max() <= 1


def test_batched_render_equals_frame_by_frame(tiny_renderer):
    torch.manual_seed(3)
    cfg = tiny_renderer.cfg
    identity = encode_identity(tiny_renderer, torch.rand(1, 3, cfg.image_size, cfg.image_size))
    motion = torch.randn(5, 32)
    batched = render_frames(tiny_renderer, identity, motion, batch_size=5)
    single = render_frames(tiny_renderer, identity, motion, batch_size=1)
    assert torch.allclose(batched, single, atol=1e-5)


def test_reenactment_of_source_by_itself_is_consistent(tiny_renderer):
    """forward() and the step-by-step pipeline compute the same frames."""
    cfg = tiny_renderer.cfg
    source, driving = torch.rand(1, 3, cfg.image_size, cfg.image_size), torch.rand(2, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        direct = tiny_renderer(driving, source)
    identity = encode_identity(tiny_renderer, source)
    steps = render_frames(tiny_renderer, identity, encode_motion(tiny_renderer, driving, batch_size=1))
    assert torch.allclose(direct, steps, atol=1e-5)


def test_motion_encoding_on_a_cpu_goes_frame_by_frame(tiny_renderer, monkeypatch):
    """Whatever the batch size, a CPU encoder sees one frame per call (faster there); progress stays per
    batch, and the latents equal encoding the whole batch at once."""
    cfg = tiny_renderer.cfg
    driving = torch.rand(5, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        whole = tiny_renderer.encode_motion(driving)
    sizes, seen = [], []
    encode = tiny_renderer.encode_motion
    monkeypatch.setattr(tiny_renderer, "encode_motion", lambda images: sizes.append(images.shape[0]) or encode(images))
    latents = encode_motion(tiny_renderer, driving, batch_size=3, callback=lambda d, t: seen.append((d, t)))
    assert sizes == [1] * 5 and seen == [(3, 5), (5, 5)]
    torch.testing.assert_close(latents, whole, rtol=0, atol=1e-5)


def test_render_progress_and_interrupt(tiny_renderer):
    cfg = tiny_renderer.cfg
    identity = encode_identity(tiny_renderer, torch.rand(1, 3, cfg.image_size, cfg.image_size))
    seen = []
    render_frames(tiny_renderer, identity, torch.randn(5, 32), batch_size=2, callback=lambda d, t: seen.append((d, t)))
    assert seen == [(2, 5), (4, 5), (5, 5)]

    class Stop(Exception):
        pass

    calls = []

    def interrupt():
        calls.append(1)
        if len(calls) == 2:
            raise Stop

    with pytest.raises(Stop):
        render_frames(tiny_renderer, identity, torch.randn(5, 32), batch_size=2, check_interrupt=interrupt)


def test_image_checks(tiny_renderer):
    with pytest.raises(InputError, match=r"\[B, 3, 128, 128\]"):
        encode_identity(tiny_renderer, torch.rand(1, 3, 64, 64))
    bad = torch.rand(1, 3, 128, 128)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        encode_identity(tiny_renderer, bad)
    with pytest.raises(InputError, match="one source image"):
        encode_identity(tiny_renderer, torch.rand(2, 3, 128, 128))


def test_config_validation():
    with pytest.raises(ValueError, match="motion maps"):
        RendererConfig(image_size=512, swin_res_threshold=512)


def test_time_grid_and_euler():
    grid = time_grid(5)
    assert torch.allclose(grid, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    with pytest.raises(ValueError, match="at least 2"):
        time_grid(1)
    # Constant velocity: Euler is exact, and the callback sees every step.
    steps = []
    x1 = euler(lambda t, x: torch.ones_like(x) * 2, torch.zeros(3), grid, lambda i, n: steps.append((i, n)))
    assert torch.allclose(x1, torch.full((3,), 2.0))
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
    # dx/dt = t: Euler on the left points gives sum(t_i * dt) = 0.375 for 4 steps.
    assert torch.allclose(euler(lambda t, x: t.expand_as(x), torch.zeros(1), grid), torch.tensor([0.375]))


def test_guidance_closure():
    calls = []

    def velocity_fn(t, x, doubled):
        calls.append(doubled)
        if doubled:
            return torch.cat([torch.zeros_like(x[: len(x) // 2]), torch.ones_like(x[: len(x) // 2])])
        return torch.ones_like(x)

    x = torch.zeros(1, 4)
    assert torch.equal(guided(velocity_fn, 1.0)(torch.zeros(1), x), torch.ones(1, 4))
    assert calls == [False]
    assert torch.equal(guided(velocity_fn, 3.0)(torch.zeros(1), x), torch.full((1, 4), 3.0))
    assert calls == [False, True]


def test_generator_windows_seed_and_lengths(tiny_generator):
    torch.manual_seed(4)
    audio = torch.randn(1, 123, 16)
    ref = torch.randn(1, 32)
    a = generate_motion(tiny_generator, audio, ref, steps=3, seed=5)
    b = generate_motion(tiny_generator, audio, ref, steps=3, seed=5)
    c = generate_motion(tiny_generator, audio, ref, steps=3, seed=6)
    assert a.shape == (123, 32)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    # The first window only sees the first 50 frames: changing later audio leaves it unchanged.
    audio2 = audio.clone()
    audio2[:, 60:] += 1
    d = generate_motion(tiny_generator, audio2, ref, steps=3, seed=5)
    assert torch.equal(a[:50], d[:50]) and not torch.allclose(a[50:], d[50:])


def test_generator_progress_counts_all_windows(tiny_generator):
    seen = []
    generate_motion(tiny_generator, torch.randn(1, 60, 16), torch.zeros(1, 32), steps=4, seed=0,
                    callback=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (6, 6) and len(seen) == 6


def test_generator_controls_change_motion_and_are_validated(tiny_generator):
    audio, ref = torch.randn(1, 40, 16), torch.zeros(1, 32)
    plain = generate_motion(tiny_generator, audio, ref, steps=3, seed=1)
    posed = generate_motion(tiny_generator, audio, ref, pose=torch.randn(40, 3), steps=3, seed=1)
    short = generate_motion(tiny_generator, audio, ref, pose=torch.randn(10, 3), steps=3, seed=1)
    assert not torch.allclose(plain, posed) and short.shape == plain.shape
    with pytest.raises(InputError, match=r"pose must be a \[frames, 3\]"):
        generate_motion(tiny_generator, audio, ref, pose=torch.randn(40, 2), steps=3)
    with pytest.raises(InputError, match="steps=1"):
        generate_motion(tiny_generator, audio, ref, steps=1)
    with pytest.raises(InputError, match="audio features must be"):
        generate_motion(tiny_generator, torch.randn(1, 40, 8), ref)


def test_half_precision_renderer_runs(tiny_renderer):
    """bf16 weights work on the CPU and stay close to float32 (speed work builds on this)."""
    cfg = tiny_renderer.cfg
    image = torch.rand(1, 3, cfg.image_size, cfg.image_size)
    motion = torch.randn(2, 32)
    ref = render_frames(tiny_renderer, encode_identity(tiny_renderer, image), motion)
    half = IMTRenderer(cfg).eval()
    half.load_state_dict(tiny_renderer.state_dict())
    half = half.to(torch.bfloat16)
    got = render_frames(half, encode_identity(half, image), motion)
    assert got.dtype == torch.float32 and (got - ref).abs().mean() < 0.05
    assert F.l1_loss(got, ref) < 0.05


def test_render_batches_records_no_autograd_graph():
    """render_batches returns a lazy iterator: its body must run without autograd even when the caller
    iterates outside `torch.no_grad` (a graph per batch costs time and memory)."""
    from imtalker_core.config import tiny_renderer_config
    from imtalker_core.pipeline import encode_identity, render_batches
    from imtalker_core.renderer import IMTRenderer

    torch.manual_seed(0)
    renderer = IMTRenderer(tiny_renderer_config()).eval()  # parameters still require grad
    identity = encode_identity(renderer, torch.rand(1, 3, 128, 128))
    for batch in render_batches(renderer, identity, torch.randn(2, 32), batch_size=2):
        assert not batch.requires_grad and batch.grad_fn is None
