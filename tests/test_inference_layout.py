"""Inference layout of the synthesis network (issue 11): channels-last activations, BatchNorm folded
into the preceding conv and the up-sampling convs as four 2×2 phase convs, on tiny configs (CPU).

- the fold and the phase kernels are exact in float64 and equal to conv → BatchNorm (nearest ×2 → conv)
  within float32 rounding;
- every layout gives the plain layout's frames within FRAME_TOL, at batch 1 and 2, and NCHW frames;
- with channels-last on, every image-space operation of the synthesis network returns channels-last;
- the cached weights are rebuilt after `load_state_dict`, `.to(dtype)` and in-place edits, and never
  used in training mode or under autograd;
- the state dict (keys, values, layout) is unchanged, and the per-device defaults hold.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from imtalker_core import IMTRenderer
from imtalker_core.config import tiny_renderer_config
from imtalker_core.layers import conv_blocks
from imtalker_core.layers.conv_blocks import ConvBlock, ConvResBlock, InferenceConvs, fold_conv_batchnorm
from imtalker_core.renderer.synthesis import as_channels_last, set_inference_layout
from imtalker_core.renderer.encoders import MOTION_CHANNELS_LAST_BY_DEVICE

# Frames are in [0, 1]; float32 rounding of the fold and of NHWC accumulation measured ≤ 3e-7 here.
FRAME_TOL = 2e-6
LAYOUTS = [(False, False, False), (True, False, False), (False, True, False), (True, True, False),
           (False, False, True), (True, True, True)]
LAYOUT_IDS = ["plain", "channels-last", "fold", "both", "phases", "all"]
# Operations on image maps `[B, C, H, W]` (the attention blocks' token tensors are not image maps).
IMAGE_OPS = ("convolution", "upsample_nearest2d", "cat", "batch_norm", "leaky_relu", "add.Tensor",
             "pixel_shuffle", "sigmoid", "constant_pad_nd", "empty")


def randomize_batchnorms(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial statistics and affine parameters (the defaults fold to identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.randn(c, generator=g) * 0.5 + 1.0)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)


@pytest.fixture(scope="module")
def renderer():
    torch.manual_seed(0)
    model = IMTRenderer(tiny_renderer_config()).eval()
    randomize_batchnorms(model)
    return model


@pytest.fixture(scope="module")
def synthesis_inputs(renderer):
    """The synthesis network's real inputs (aligned features, coarsest first) at batch 1 and 2."""
    inputs = {}
    g = torch.Generator().manual_seed(1)
    source = torch.rand(1, 3, 128, 128, generator=g)
    for batch in (1, 2):
        captured = []
        hook = renderer.frame_decoder.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
        try:
            with torch.no_grad():
                renderer(torch.rand(batch, 3, 128, 128, generator=g), source)
        finally:
            hook.remove()
        inputs[batch] = captured[0]
    return inputs


@pytest.fixture(autouse=True)
def default_layout(renderer):
    set_inference_layout(renderer)
    yield
    set_inference_layout(renderer)


def plain_frames(renderer, aligned):
    set_inference_layout(renderer, channels_last=False, fold_batchnorm=False, upsample_phases=False)
    with torch.no_grad():
        return renderer.frame_decoder(aligned)


def test_fold_is_exact_in_float64():
    g = torch.Generator().manual_seed(0)
    norm = torch.nn.BatchNorm2d(6, eps=1e-3).double().eval()
    with torch.no_grad():
        norm.running_mean.copy_(torch.randn(6, generator=g, dtype=torch.float64))
        norm.running_var.copy_(torch.rand(6, generator=g, dtype=torch.float64) + 0.1)
        norm.weight.copy_(torch.randn(6, generator=g, dtype=torch.float64))
        norm.bias.copy_(torch.randn(6, generator=g, dtype=torch.float64))
    weight = torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64)
    x = torch.randn(2, 4, 9, 9, generator=g, dtype=torch.float64)
    w, b = fold_conv_batchnorm(weight, norm)
    assert w.dtype == b.dtype == torch.float64 and b.shape == (6,)
    expected = norm(F.conv2d(x, weight, padding=1))
    assert (F.conv2d(x, w, b, padding=1) - expected).abs().max().item() < 1e-12
    # And the fold of a half-precision model is rounded once from float32.
    w16, b16 = fold_conv_batchnorm(weight.half(), norm.half(), torch.float16)
    assert w16.dtype == b16.dtype == torch.float16
    assert torch.equal(w16, (weight.half().float() * (norm.weight.float() * torch.rsqrt(
        norm.running_var.float() + norm.eps)).view(-1, 1, 1, 1)).half())


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_layouts_give_the_plain_frames(renderer, synthesis_inputs, batch, layout):
    aligned = synthesis_inputs[batch]
    expected = plain_frames(renderer, aligned)
    set_inference_layout(renderer, *layout)
    for m in renderer.modules():
        if isinstance(m, InferenceConvs):
            m.drop_caches()  # (the module-wide renderer kept the other layouts' weights)
    with torch.no_grad():
        frames = renderer.frame_decoder(aligned)
    assert frames.shape == (batch, 3, 128, 128)
    assert frames.is_contiguous()  # NCHW frames in every layout
    assert (frames - expected).abs().max().item() <= FRAME_TOL
    with torch.no_grad():
        assert renderer.frame_decoder.uses_channels_last(aligned[0]) == layout[0]
    if layout[0] or layout[1]:  # the cached weights were built and used
        assert renderer.frame_decoder.resblocks[0]._conv_cache
    assert ("conv1/phases" in renderer.frame_decoder.upconv_blocks[0]._conv_cache) == layout[2]


@pytest.mark.parametrize("size", [(5, 5), (4, 7)])
def test_phase_kernels_equal_the_upsampled_conv_in_float64(size):
    """Four 2×2 convs on the small map give exactly the 3×3 conv of the nearest ×2 map (borders included)."""
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64)
    x = torch.randn(2, 4, *size, generator=g, dtype=torch.float64)
    expected = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, padding=1)
    phases = conv_blocks.upsample_phase_weights(weight)
    assert phases.shape == (4 * 6, 4, 2, 2)
    padded = F.pad(x, (1, 1, 1, 1))
    h, w = size
    got = torch.empty_like(expected)
    for phase, kernel in enumerate(phases.chunk(4)):
        a, c = divmod(phase, 2)
        got[:, :, a::2, c::2] = F.conv2d(padded[:, :, a:a + h + 1, c:c + w + 1], kernel)
    assert (got - expected).abs().max().item() < 1e-12


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
@pytest.mark.parametrize("fold", [False, True], ids=["unfolded", "folded"])
def test_phase_up_block_equals_the_plain_block(channels_last, fold):
    """An up-sampling ConvResBlock with the phases on runs no ×2 interpolation and gives the plain output."""
    torch.manual_seed(4)
    block = ConvResBlock(6, 5, resample="up").eval()
    randomize_batchnorms(block, seed=4)
    x = torch.randn(2, 6, 7, 6)
    with torch.no_grad():
        expected = block(x)  # the class defaults: plain
        conv_blocks.configure_inference(block, channels_last, fold, upsample_phases=True)
        inputs = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        with ImageOpLayouts() as layouts:
            got = block(inputs)
    ops = [name for name, _ in layouts.seen]
    assert not any("upsample" in name for name in ops) and "aten.constant_pad_nd.default" in ops
    assert got.shape == (2, 5, 14, 12)
    assert conv_blocks.is_channels_last(got) == channels_last
    assert (got - expected).abs().max().item() <= 1e-5


def test_fold_changes_the_computation(renderer, synthesis_inputs):
    """The fold really replaces the BatchNorm: no BatchNorm runs, and a stale cache would show."""
    aligned = synthesis_inputs[1]
    calls = []
    hooks = [m.register_forward_hook(lambda *args: calls.append(1))
             for m in renderer.frame_decoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    try:
        set_inference_layout(renderer, channels_last=False, fold_batchnorm=True)
        with torch.no_grad():
            renderer.frame_decoder(aligned)
        assert calls == []
        set_inference_layout(renderer, channels_last=False, fold_batchnorm=False)
        with torch.no_grad():
            renderer.frame_decoder(aligned)
        assert len(calls) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in renderer.frame_decoder.modules())
    finally:
        for hook in hooks:
            hook.remove()


class ImageOpLayouts(TorchDispatchMode):
    """Records (op, channels-last?) for every image-space operation returning a 4-D tensor."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, bool]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        first = out[0] if isinstance(out, tuple) else out  # batch norm returns (out, mean, invstd)
        if isinstance(first, torch.Tensor) and first.dim() == 4 and any(op in name for op in IMAGE_OPS):
            self.seen.append((name, first.is_contiguous(memory_format=torch.channels_last)
                              and first.stride()[0] == first[0].numel()))
        return out


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("fold", [False, True], ids=["unfolded", "folded"])
@pytest.mark.parametrize("phases", [False, True], ids=["upsampled", "phases"])
def test_channels_last_is_kept_through_every_stage(renderer, synthesis_inputs, batch, fold, phases):
    """Nothing converts back to NCHW inside the network (at batch 1 the attention blocks' outputs carry
    an odd batch stride that made `F.interpolate` return NCHW before `as_channels_last`)."""
    set_inference_layout(renderer, channels_last=True, fold_batchnorm=fold, upsample_phases=phases)
    with torch.no_grad():
        renderer.frame_decoder(synthesis_inputs[batch])  # builds the cached weights (4-D tensors, not images)
    with torch.no_grad(), ImageOpLayouts() as layouts:
        frames = renderer.frame_decoder(synthesis_inputs[batch])
    ops = {name for name, _ in layouts.seen}
    resample = "aten.constant_pad_nd.default" if phases else "aten.upsample_nearest2d.default"
    assert {"aten.convolution.default", resample, "aten.cat.out", "aten.pixel_shuffle.default"} <= ops, ops
    assert ("aten.upsample_nearest2d.default" in ops) != phases
    assert any("batch_norm" in name for name in ops) != fold
    assert [name for name, channels_last in layouts.seen if not channels_last] == []
    assert frames.is_contiguous()


def test_as_channels_last_restrides_a_batch_one_token_view():
    seq = torch.randn(1, 6 * 5, 4)
    x = seq.transpose(1, 2).reshape(1, 4, 6, 5)
    y = as_channels_last(x)
    assert y.data_ptr() == x.data_ptr() and torch.equal(y, x)
    assert y.stride() == (4 * 6 * 5, 1, 5 * 4, 4)
    assert F.interpolate(y, scale_factor=2.0).is_contiguous(memory_format=torch.channels_last)
    nchw = torch.randn(2, 4, 6, 5)
    converted = as_channels_last(nchw)
    assert torch.equal(converted, nchw) and converted.stride() == (120, 1, 20, 4)


def _frames(renderer, aligned):
    with torch.no_grad():
        return renderer.frame_decoder(aligned)


def test_cache_follows_load_state_dict(renderer, synthesis_inputs):
    aligned = synthesis_inputs[1]
    model = IMTRenderer(tiny_renderer_config()).eval()
    set_inference_layout(model, channels_last=True, fold_batchnorm=True)
    before = _frames(model, aligned)  # fills the caches with the default BatchNorm statistics
    assert model.frame_decoder.resblocks[0]._conv_cache
    model.load_state_dict(renderer.state_dict())
    assert model.frame_decoder.resblocks[0]._conv_cache == {}
    after = _frames(model, aligned)
    expected = plain_frames(renderer, aligned)
    assert (before - expected).abs().max().item() > 1e-3  # the two weight sets differ visibly ...
    assert (after - expected).abs().max().item() <= FRAME_TOL  # ... and the loaded ones are used


def test_cache_follows_load_state_dict_of_inference_tensors(renderer, synthesis_inputs):
    """Inference tensors keep no version counter, so only the load hook can drop the stale fold."""
    aligned = synthesis_inputs[1]
    with torch.inference_mode():
        model = IMTRenderer(tiny_renderer_config()).eval()
        set_inference_layout(model, channels_last=True, fold_batchnorm=True)
        model.frame_decoder(aligned)
        model.load_state_dict(renderer.state_dict())
        after = model.frame_decoder(aligned)
    assert (after - plain_frames(renderer, aligned)).abs().max().item() <= FRAME_TOL


def _cached_copy(renderer: IMTRenderer, aligned) -> IMTRenderer:
    """A copy of `renderer` with both layout options on, its weight caches filled by one forward pass."""
    model = IMTRenderer(tiny_renderer_config()).eval()
    model.load_state_dict(renderer.state_dict())
    set_inference_layout(model, channels_last=True, fold_batchnorm=True)
    _frames(model, aligned)
    return model


def test_cache_follows_dtype_and_in_place_edits(renderer, synthesis_inputs):
    aligned = synthesis_inputs[2]
    model = _cached_copy(renderer, aligned)
    block = model.frame_decoder.resblocks[1]
    assert block._conv_cache
    model.double()
    assert block._conv_cache == {}
    aligned64 = [a.double() for a in aligned]
    frames64 = _frames(model, aligned64)
    assert frames64.dtype == torch.float64
    assert block._conv_cache["conv1"][1].dtype == torch.float64
    set_inference_layout(model, channels_last=False, fold_batchnorm=False)
    assert (frames64 - _frames(model, aligned64)).abs().max().item() < 1e-12
    set_inference_layout(model, channels_last=True, fold_batchnorm=True)
    # In-place edits of a conv weight and of BatchNorm statistics (version counters) rebuild the fold.
    with torch.no_grad():
        for m in model.frame_decoder.modules():
            if isinstance(m, ConvBlock):
                m.conv.weight.mul_(1.5)
                m.norm.norm.running_var.mul_(2.0)
        model.frame_decoder.final_conv[1].bias.add_(0.25)
    edited = _frames(model, aligned64)
    set_inference_layout(model, channels_last=False, fold_batchnorm=False)
    expected = _frames(model, aligned64)
    assert (edited - frames64).abs().max().item() > 1e-3
    assert (edited - expected).abs().max().item() < 1e-12


def _poison_caches(module: torch.nn.Module) -> int:
    """Replace every cached weight by zeros under its still valid key, so any use of a cache would show."""
    count = 0
    for m in module.modules():
        if isinstance(m, InferenceConvs):
            for name, (key, weight, bias) in list(m._conv_cache.items()):
                m._conv_cache[name] = (key, torch.zeros_like(weight), None if bias is None else torch.zeros_like(bias))
                count += 1
    return count


def test_training_and_autograd_never_use_the_cache(renderer, synthesis_inputs):
    aligned = synthesis_inputs[2]
    model = _cached_copy(renderer, aligned)
    assert _poison_caches(model.frame_decoder) > 0
    with torch.no_grad():  # the poison has teeth: inference does use the caches
        assert (model.frame_decoder(aligned) - plain_frames(renderer, aligned)).abs().max().item() > 1e-2
    # Eval mode with autograd on: the module's own parameters, with gradients into the BatchNorm.
    assert not model.frame_decoder.uses_channels_last(aligned[0])
    frames = model.frame_decoder(aligned)
    assert (frames - plain_frames(renderer, aligned)).abs().max().item() <= FRAME_TOL
    frames.mean().backward()
    norm = model.frame_decoder.resblocks[0].norm.norm
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0
    # Training mode without autograd: batch statistics, exactly as the plain BatchNorm.
    set_inference_layout(model, channels_last=True, fold_batchnorm=True)
    reference = IMTRenderer(tiny_renderer_config())
    reference.load_state_dict(renderer.state_dict())
    set_inference_layout(reference, channels_last=False, fold_batchnorm=False)
    model.train()
    reference.train()
    with torch.no_grad():
        assert not model.frame_decoder.uses_channels_last(aligned[0])
        assert torch.equal(model.frame_decoder(aligned), reference.frame_decoder(aligned))


def test_state_dict_is_unchanged(renderer, synthesis_inputs):
    fresh = IMTRenderer(tiny_renderer_config())
    before = {k: v.clone() for k, v in renderer.state_dict().items()}
    set_inference_layout(renderer, channels_last=True, fold_batchnorm=True)
    _frames(renderer, synthesis_inputs[1])
    after = renderer.state_dict()
    assert list(after) == list(fresh.state_dict())
    for key, value in after.items():
        assert torch.equal(value, before[key]), key
        assert value.is_contiguous(), key  # the parameters stay NCHW; only the caches are channels-last


def test_defaults_per_device(renderer, synthesis_inputs):
    synthesis = renderer.frame_decoder
    cpu = synthesis_inputs[1][0]
    meta = torch.empty(1, 4, 2, 2, device="meta")
    assert synthesis.channels_last is None and synthesis.fold_batchnorm is None
    with torch.no_grad():
        assert synthesis.uses_channels_last(cpu)
        assert not synthesis.uses_channels_last(meta)  # devices that were not measured stay NCHW
    # Measured defaults: channels-last and the fold on a CPU and on CUDA, the up-sampling phases on a CPU only,
    # the motion encoder's channels-last on a CPU only; explicit settings win everywhere.
    cuda_on = {id(conv_blocks.CHANNELS_LAST_BY_DEVICE): True, id(conv_blocks.FOLD_BATCHNORM_BY_DEVICE): True,
               id(conv_blocks.UPSAMPLE_PHASES_BY_DEVICE): False, id(MOTION_CHANNELS_LAST_BY_DEVICE): False}
    for defaults in (conv_blocks.CHANNELS_LAST_BY_DEVICE, conv_blocks.FOLD_BATCHNORM_BY_DEVICE,
                     conv_blocks.UPSAMPLE_PHASES_BY_DEVICE, MOTION_CHANNELS_LAST_BY_DEVICE):
        assert conv_blocks.layout_enabled(None, defaults, torch.device("cpu"))
        assert conv_blocks.layout_enabled(None, defaults, torch.device("cuda")) is cuda_on[id(defaults)]
        assert not conv_blocks.layout_enabled(None, defaults, torch.device("mps"))
        assert conv_blocks.layout_enabled(True, defaults, torch.device("cuda"))
        assert not conv_blocks.layout_enabled(False, defaults, torch.device("cpu"))
    encoder_blocks = [m for m in renderer.dense_feature_encoder.modules() if isinstance(m, InferenceConvs)]
    synthesis_blocks = [m for m in synthesis.modules() if isinstance(m, (ConvBlock, ConvResBlock))]
    assert encoder_blocks and synthesis_blocks
    assert all(m.channels_last is None and m.fold_batchnorm is None and m.upsample_phases is None
               for m in synthesis_blocks)
    set_inference_layout(renderer, channels_last=True, fold_batchnorm=True, upsample_phases=True)
    assert all(m.channels_last is True and m.fold_batchnorm is True and m.upsample_phases is True
               for m in synthesis_blocks)
    with torch.no_grad():
        assert synthesis.uses_channels_last(meta)
    # The identity encoder (once per video) stays plain, so it holds no second copy of its weights.
    assert all(m.channels_last is False and m.fold_batchnorm is False and m.upsample_phases is False
               for m in encoder_blocks)
    with torch.no_grad():
        renderer.encode_identity(torch.rand(1, 3, 128, 128))
    assert all(m._conv_cache == {} for m in encoder_blocks)


def test_devices_without_defaults_keep_the_plain_path(renderer, synthesis_inputs, monkeypatch):
    """Where the defaults are off (MPS, say; simulated on the CPU), the network computes exactly the plain
    frames and caches nothing, even where the coarse levels hand it channels-last tensors."""
    monkeypatch.delitem(conv_blocks.CHANNELS_LAST_BY_DEVICE, "cpu")
    monkeypatch.delitem(conv_blocks.FOLD_BATCHNORM_BY_DEVICE, "cpu")
    monkeypatch.delitem(conv_blocks.UPSAMPLE_PHASES_BY_DEVICE, "cpu")
    model = IMTRenderer(tiny_renderer_config()).eval()
    model.load_state_dict(renderer.state_dict())
    aligned = synthesis_inputs[2]
    assert conv_blocks.is_channels_last(aligned[0])
    frames = _frames(model, aligned)
    assert all(m._conv_cache == {} for m in model.modules() if isinstance(m, InferenceConvs))
    assert torch.equal(frames, plain_frames(renderer, aligned))


def test_motion_encoder_runs_channels_last_in_inference_on_a_cpu(renderer):
    """The motion encoder's device default (channels-last on a CPU): every conv keeps the layout, the latents
    equal the plain layout's within rounding, and autograd or `channels_last=False` keep NCHW."""
    encoder = renderer.latent_token_encoder
    images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(6))

    def conv_layouts(grad: bool, setting: bool | None) -> tuple[torch.Tensor, list[bool]]:
        encoder.channels_last = setting
        try:
            with torch.set_grad_enabled(grad), ImageOpLayouts() as layouts:
                latents = encoder(images)
        finally:
            encoder.channels_last = None
        return latents.detach(), [cl for name, cl in layouts.seen if "convolution" in name]

    latents, layouts = conv_layouts(False, None)
    plain, plain_layouts = conv_layouts(False, False)
    trained, trained_layouts = conv_layouts(True, None)
    assert latents.shape == (2, 32) and layouts and all(layouts)
    assert not any(plain_layouts) and not any(trained_layouts)
    assert (latents - plain).abs().max().item() <= 1e-5 * plain.abs().max().item()
    assert torch.equal(trained, plain)
