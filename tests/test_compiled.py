"""The torch.compile option (imtalker_core.compiled) on tiny models.

Tracing is checked with a backend that records each graph and runs it as traced (no code generation, so the
tests take seconds): the frames step and the generator's velocity must each trace as one whole graph, once per
batch size, and give the eager results. What inductor then makes of the graphs is measured by
benchmarks/speed.py (`--compile`), not here.
"""
from __future__ import annotations

import logging

import pytest
import torch

from imtalker_core import IMTRenderer, MotionGenerator, compiled, pipeline, render_frames
from imtalker_core.cli import build_parser
from imtalker_core.config import GeneratorConfig, tiny_renderer_config
from imtalker_core.errors import InputError
from imtalker_core.layers import stylegan
from imtalker_core.layers.stylegan import Blur
from tests.helpers.tiny_render import tiny_render_case

FRAMES = 5


class RecordingBackend:
    """A torch.compile backend that keeps the traced graphs and runs them unchanged."""

    def __init__(self):
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, graph: torch.fx.GraphModule, example_inputs):
        self.graphs.append(graph)
        return graph.forward


@pytest.fixture
def tiny():
    model, identity, motion = tiny_render_case(FRAMES)
    yield model, identity, motion
    compiled.set_compile(model, "off")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_frames_step_traces_whole_once_per_batch_size(tiny):
    model, identity, motion = tiny
    eager = render_frames(model, identity, motion, batch_size=2)
    backend = RecordingBackend()
    compiled.set_compile(model, "default", backend=backend)
    assert compiled.compile_mode(model) == "default"
    frames = render_frames(model, identity, motion, batch_size=2)  # batches 2, 2, 1 (padded to 2)
    assert len(backend.graphs) == 1
    # The graph holds the whole step: the anchor attention, the resampler and the synthesis network.
    targets = {str(node.target) for node in backend.graphs[0].graph.nodes}
    assert any("scaled_dot_product_attention" in t for t in targets)
    assert any("argmax" in t for t in targets)
    assert any("conv2d" in t for t in targets)
    assert frames.shape == eager.shape
    torch.testing.assert_close(frames, eager, rtol=0, atol=1e-6)
    # Another batch size is one more graph; the same one again is none.
    render_frames(model, identity, motion, batch_size=3)
    render_frames(model, identity, motion, batch_size=2)
    assert len(backend.graphs) == 2


def test_motion_encoder_traces_whole_once_per_batch_size(tiny, monkeypatch):
    """Driving frames through the compiled motion encoder: one graph for parts of two frames, the short
    last part padded into it, latents equal to eager ones."""
    model = tiny[0]
    monkeypatch.setattr(pipeline, "CPU_MOTION_ENCODE_FRAMES", 2)  # a CPU part is one frame otherwise
    size = model.cfg.image_size
    images = torch.rand(5, 3, size, size, generator=torch.Generator().manual_seed(7))
    eager = pipeline.encode_motion(model, images, batch_size=4)  # batches 4, 1; parts 2, 2, 1
    backend = RecordingBackend()
    compiled.set_compile(model, "default", backend=backend)
    latents = pipeline.encode_motion(model, images, batch_size=4)
    assert len(backend.graphs) == 1
    graph = backend.graphs[0]
    assert any("conv2d" in str(node.target) for node in graph.graph.nodes)
    inputs = [node.meta["example_value"].shape for node in graph.graph.find_nodes(op="placeholder")
              if "example_value" in node.meta]
    assert [shape for shape in inputs if tuple(shape[1:]) == (3, size, size)] == [(2, 3, size, size)]
    assert latents.shape == eager.shape == (5, model.cfg.latent_dim) and latents.dtype == torch.float32
    assert eager.abs().max() > 0
    torch.testing.assert_close(latents, eager, rtol=0, atol=1e-6)
    pipeline.encode_motion(model, images[:3], batch_size=4)  # the same parts: no new graph
    assert len(backend.graphs) == 1
    compiled.set_compile(model, "off")
    assert compiled.motion_step(model) is compiled.eager_motion


def test_without_the_bucket_a_short_batch_would_compile_again(tiny):
    model, identity, motion = tiny
    backend = RecordingBackend()
    compiled.set_compile(model, "default", backend=backend)
    with torch.no_grad():
        ident, source = pipeline.prepare_render_source(model, identity)
        padded = pipeline.render_batch(model, ident, source, motion[:1], pad_to=2)
        pipeline.render_batch(model, ident, source, motion[:2])
        assert len(backend.graphs) == 1
        unpadded = pipeline.render_batch(model, ident, source, motion[:1])
    assert len(backend.graphs) == 2
    assert padded.shape[0] == unpadded.shape[0] == 1
    torch.testing.assert_close(padded, unpadded, rtol=0, atol=1e-6)


def test_the_first_call_of_each_shape_is_logged_as_compiling(tiny, caplog):
    model, identity, motion = tiny
    compiled.set_compile(model, "default", backend=RecordingBackend())
    with caplog.at_level(logging.INFO, logger=compiled.__name__):
        render_frames(model, identity, motion, batch_size=2)  # batches 2, 2, 1 (padded): one shape
        compiling = [r.getMessage() for r in caplog.records if "compiling" in r.getMessage()]
        assert len(compiling) == 1 and "IMTRenderer" in compiling[0] and "[2, 32]" in compiling[0]
        assert any("compiled in" in r.getMessage() for r in caplog.records)
        caplog.clear()
        render_frames(model, identity, motion, batch_size=2)
        assert not any("compiling" in r.getMessage() for r in caplog.records)
        render_frames(model, identity, motion, batch_size=3)
        assert sum("compiling" in r.getMessage() for r in caplog.records) == 1


def test_suspended_runs_eagerly_and_keeps_the_compiled_code(tiny):
    model, identity, motion = tiny
    backend = RecordingBackend()
    compiled.set_compile(model, "default", backend=backend)
    render_frames(model, identity, motion, batch_size=2)
    compiled_step = compiled.frames_step(model)
    assert compiled_step is not compiled.eager_frames and len(backend.graphs) == 1
    with compiled.suspended(model):
        assert compiled.frames_step(model) is compiled.eager_frames
        assert compiled.compile_mode(model) == "off"
        render_frames(model, identity, motion, batch_size=2)
    assert compiled.frames_step(model) is compiled_step  # the same compiled function: nothing to recompile
    render_frames(model, identity, motion, batch_size=2)
    assert len(backend.graphs) == 1
    with pytest.raises(RuntimeError, match="inside"), compiled.suspended(model):
        raise RuntimeError("inside")
    assert compiled.frames_step(model) is compiled_step
    with compiled.suspended(torch.nn.Linear(1, 1)):  # never compiled: nothing to hand back
        pass


def test_off_returns_to_eager_and_leaves_the_model_alone(tiny):
    model, identity, motion = tiny
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    attributes = set(vars(model))
    backend = RecordingBackend()
    compiled.set_compile(model, "default", backend=backend)
    compiled.set_compile(model, "default", backend=backend)  # same settings: the compiled code is kept
    render_frames(model, identity, motion[:2], batch_size=2)
    compiled.set_compile(model, "off")
    assert compiled.compile_mode(model) == "off" and compiled.bucket_size(model, 4) is None
    render_frames(model, identity, motion[:2], batch_size=2)
    assert len(backend.graphs) == 1
    assert set(vars(model)) == attributes
    assert model.state_dict().keys() == keys.keys()
    for name, value in model.state_dict().items():
        assert torch.equal(value, keys[name]), name


def test_generator_velocity_traces_once_and_samples_the_same_motion():
    torch.manual_seed(2)
    generator = MotionGenerator(GeneratorConfig(audio_dim=32, hidden_size=32, depth=2, num_heads=2,
                                                window_frames=6, context_frames=2)).eval()
    for p in generator.parameters():
        torch.nn.init.normal_(p, std=0.05)
    audio = torch.randn(1, 13, 32, generator=torch.Generator().manual_seed(3))
    ref = torch.randn(1, generator.cfg.motion_dim, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        eager = generator.sample(audio, ref, cfg_scale=2.0, steps=4, seed=5)
        backend = RecordingBackend()
        compiled.set_compile(generator, "default", backend=backend)
        try:
            motion = generator.sample(audio, ref, cfg_scale=2.0, steps=4, seed=5)
        finally:
            compiled.set_compile(generator, "off")
    assert len(backend.graphs) == 1  # three windows × three steps, one shape
    assert eager.abs().max() > 0
    torch.testing.assert_close(motion, eager, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pad, gain", [((1, 1), 4.0), ((2, 2), 1.0), ((2, 1), 1.0)])  # up-, downsampling, odd
def test_compiled_blur_is_the_depthwise_conv_without_a_conv(dtype, pad, gain):
    blur = Blur(pad=pad, gain=gain)
    x = torch.randn(2, 3, 9, 7, generator=torch.Generator().manual_seed(6)).to(dtype)
    backend = RecordingBackend()
    with torch.no_grad():
        eager = blur(x.float()).to(dtype)  # the conv in float32, rounded once, as the shifted sums are
        traced = torch.compile(blur, backend=backend, fullgraph=True)(x)
    targets = {str(node.target) for node in backend.graphs[0].graph.nodes}
    assert not any("conv" in t for t in targets), targets
    assert traced.dtype == dtype and traced.shape == eager.shape == (2, 3, 9 + sum(pad) - 3, 7 + sum(pad) - 3)
    torch.testing.assert_close(traced, eager, rtol=1e-6 if dtype == torch.float32 else None,
                               atol=1e-6 if dtype == torch.float32 else None)


def test_compiled_blur_switch_keeps_the_conv():
    backend = RecordingBackend()
    x = torch.randn(1, 2, 6, 6)
    original = stylegan.BLUR_BY_SHIFTS_WHEN_COMPILING
    stylegan.BLUR_BY_SHIFTS_WHEN_COMPILING = False
    try:
        with torch.no_grad():
            traced = torch.compile(Blur(pad=(1, 1)), backend=backend, fullgraph=True)(x)
    finally:
        stylegan.BLUR_BY_SHIFTS_WHEN_COMPILING = original
    assert any("conv2d" in str(node.target) for node in backend.graphs[0].graph.nodes)
    torch.testing.assert_close(traced, Blur(pad=(1, 1))(x), rtol=0, atol=0)


def test_settings_are_checked():
    model = IMTRenderer(tiny_renderer_config())
    with pytest.raises(InputError, match="compile='fast'"):
        compiled.set_compile(model, "fast")
    with pytest.raises(TypeError, match="Linear"):
        compiled.set_compile(torch.nn.Linear(2, 2), "default")
    args = build_parser().parse_args(["video", "face.png", "drive.mp4", "-o", "out.mp4", "--compile",
                                      "reduce-overhead"])
    assert args.compile == "reduce-overhead"
    assert build_parser().parse_args(["audio", "face.png", "speech.wav", "-o", "out.mp4"]).compile == "off"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["batch", "jobs.csv", "--compile", "always"])
