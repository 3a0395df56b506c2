"""The fast renderer paths (issue 11) against the plain ones they replace, on tiny configs (CPU).

- the chunked head-mean argmax picks exactly what the plain float32 map picks (random inputs,
  exact ties → lowest index, near-ties, half-precision inputs, every chunking);
- attention outputs, window attention, the guided resampler and the modulated convolutions match the
  plain paths;
- rendering with a prepared source equals rendering without one, and the plain render;
- the state dict is unchanged, the TF32 context restores the caller's flags, and the speed
  benchmark imports without the media libraries.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from imtalker_core import IMTRenderer
from imtalker_core.config import tiny_renderer_config
from imtalker_core.layers import attention as A
from imtalker_core.layers.stylegan import ModulatedConv2d
from imtalker_core.precision import fp32_matmul, tf32_state
from imtalker_core.renderer.transfer import CoarseTransfer

ROOT = Path(__file__).resolve().parent.parent


def plain_picks(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """The plain path's picks written out: float32 logits scaled after the product, softmax per
    head over the whole key set, mean over heads, argmax. q `[B, H, Nq, d]`, k `[B or 1, H, Nk, d]`."""
    attn = ((q.float() @ k.float().transpose(-2, -1)) * scale).softmax(dim=-1)
    return attn.mean(dim=1).argmax(dim=-1)


def random_qk(b, kb, h, nq, nk, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, nq, d, generator=g).to(dtype)
    k = torch.randn(kb, h, nk, d, generator=g).to(dtype)
    return q, k


@pytest.mark.parametrize("kb", [1, 3], ids=["shared-keys", "per-frame-keys"])
@pytest.mark.parametrize("d", [16, 8], ids=["scale-power-of-two", "scale-not-power-of-two"])
@pytest.mark.parametrize("chunk_bytes", [None, 1, 4096, 1 << 30], ids=["default", "one-row", "some-rows", "one-chunk"])
def test_argmax_equals_plain_on_random_inputs(kb, d, chunk_bytes):
    q, k = random_qk(3, kb, 4, 50, 70, d)
    scale = d ** -0.5
    picks, values = A.head_mean_argmax(q, k, scale, chunk_bytes=chunk_bytes)
    assert values is None
    assert picks.dtype == torch.int64 and picks.shape == (3, 50)
    assert torch.equal(picks, plain_picks(q, k, scale))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_picks_come_from_float32_logits(dtype):
    """Half-precision q/k give exactly the plain path's picks: both upcast before the product."""
    q, k = random_qk(2, 1, 8, 64, 64, 16, dtype=dtype, seed=1)
    picks, _ = A.head_mean_argmax(q, k, 0.25, chunk_bytes=8 * 64 * 4 * 5)
    assert torch.equal(picks, plain_picks(q, k, 0.25))


def test_exact_ties_pick_the_lowest_index():
    """Duplicated keys tie exactly (small dyadic values: every product and sum is exact in any
    order), in every head; the lowest index wins as with torch.argmax, whatever the chunking."""
    g = torch.Generator().manual_seed(2)
    q = torch.randint(-3, 4, (2, 4, 40, 16), generator=g).float() / 4
    k = torch.randint(-3, 4, (1, 4, 60, 16), generator=g).float() / 4
    best = torch.zeros(4, 16)
    best[:, :] = 1.0
    k[0, :, 7] = best
    k[0, :, 30] = best
    k[0, :, 59] = best
    q[:, :, :10] = 1.0  # these queries prefer the duplicated key by a wide margin
    expected = plain_picks(q, k, 0.25)
    assert (expected[:, :10] == 7).all()
    for chunk in (None, 1, 4 * 60 * 4 * 3):
        picks, _ = A.head_mean_argmax(q, k, 0.25, chunk_bytes=chunk)
        assert torch.equal(picks, expected)


@pytest.mark.parametrize("margin", [1e-3, 1e-5])
def test_near_ties_are_resolved_like_the_plain_path(margin):
    """Two keys whose head-averaged weights differ by a small relative margin: the larger one is
    picked by both paths, whether it comes first or second."""
    q, k = random_qk(1, 1, 4, 32, 48, 16, seed=3)
    target = q[0, :, 0].clone()  # query 0 of every head points at keys 11 and 40
    k[0, :, 11] = target
    k[0, :, 40] = target * (1 + margin)
    k[0, :, 5] = target * (1 - margin)
    picks, _ = A.head_mean_argmax(q, k, 0.25)
    expected = plain_picks(q, k, 0.25)
    assert expected[0, 0] == 40
    assert torch.equal(picks, expected)


def test_values_from_the_same_probabilities():
    q, k = random_qk(2, 1, 4, 30, 40, 8, seed=4)
    v = torch.randn(1, 4, 40, 8)
    picks, values = A.head_mean_argmax(q, k, 8 ** -0.5, v, chunk_bytes=4 * 40 * 4 * 7)
    attn = ((q @ k.transpose(-2, -1)) * 8 ** -0.5).softmax(dim=-1)
    assert torch.equal(picks, attn.mean(dim=1).argmax(dim=-1))
    torch.testing.assert_close(values, attn @ v, rtol=0, atol=1e-6)
    torch.testing.assert_close(A.attend(q, k, v), attn @ v, rtol=0, atol=1e-6)


@pytest.mark.parametrize("values_from_probs", [True, False], ids=["cpu-route", "gpu-route"])
def test_full_attention_fast_equals_plain(monkeypatch, values_from_probs):
    """Both routes of the fast path (values from the float32 map on CPUs, SDPA elsewhere) against
    the plain path, with the source projected once and shared by the batch."""
    monkeypatch.setattr(A, "_values_from_probs", lambda device: values_from_probs)
    torch.manual_seed(5)
    attn = A.FullAttention(32, 4).eval()
    query, key, value = torch.randn(3, 64, 32), torch.randn(1, 64, 32), torch.randn(1, 64, 32)
    with torch.no_grad():
        with A.fast_paths(False):
            ref_out, ref_picks = attn(query, key.expand(3, -1, -1), value.expand(3, -1, -1), return_argmax=True)
            ref_plain = attn(query, key.expand(3, -1, -1), value.expand(3, -1, -1))
        out, picks = attn(query, return_argmax=True, kv=attn.project_kv(key, value))
        out2, picks2 = attn(query, key, value, return_argmax=True)
        plain = attn(query, key, value)
    assert torch.equal(picks, ref_picks) and torch.equal(picks2, ref_picks)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-6)
    torch.testing.assert_close(out2, ref_out, rtol=0, atol=1e-6)
    torch.testing.assert_close(plain, ref_plain, rtol=0, atol=1e-6)


def test_guided_resample_fast_equals_plain():
    torch.manual_seed(6)
    value = torch.randn(3, 5, 32, 32)
    argmax = torch.randint(0, 64, (3, 64))
    with A.fast_paths(False):
        expected = A.guided_resample(value, argmax, 8)
    assert torch.equal(A.guided_resample(value, argmax, 8), expected)
    pooled = A.pool_for_resample(value[:1], 8)
    with A.fast_paths(False):
        shared = A.guided_resample(value[:1].expand(3, -1, -1, -1), argmax, 8)
    assert torch.equal(A.resample_pooled(pooled, argmax, 8, 32), shared)


@pytest.mark.parametrize("shift", [0, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_window_attention_fast_equals_plain(shift, dtype):
    torch.manual_seed(7)
    block = A.SwinBlock(16, 32, 2, 8, shift).eval().to(dtype)
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_()
    x = torch.randn(2, 16, 32, 32).to(dtype)
    with torch.no_grad():
        with A.fast_paths(False):
            expected = block(x)
        got = block(x)
        # The cached bias follows in-place changes of the table (load_state_dict copies in place).
        state = {k: v.clone() for k, v in block.state_dict().items()}
        state["attn.relative_position_bias_table"].mul_(-1)
        block.load_state_dict(state)
        with A.fast_paths(False):
            expected2 = block(x)
        got2 = block(x)
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got, expected, rtol=0, atol=tol)
    torch.testing.assert_close(got2, expected2, rtol=0, atol=tol)
    assert not torch.allclose(got, got2)


@pytest.mark.parametrize("shift", [0, 4])
def test_chunked_window_attention_equals_one_product(shift):
    """The GPU route bounds the map per chunk of whole images; every window is computed as in one product."""
    torch.manual_seed(8)
    block = A.SwinBlock(16, 32, 2, 8, shift).eval()
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_()
    windows = 16  # (32 / 8)² per image
    q, kv = torch.randn(3 * windows, 64, 16), torch.randn(3 * windows, 64, 16)
    per_window = 2 * 64 * 64 * 4  # heads × n² float32
    with torch.no_grad():
        whole = block.attn._forward_explicit(q, kv, kv, block.attn_mask)
        calls = []
        explicit = block.attn._forward_explicit

        def counted(*args):
            calls.append(args[0].shape[0])
            return explicit(*args)

        block.attn._forward_explicit = counted
        # A budget of 20 windows: with the shift mask, chunks of whole images (one here: a window never leaves
        # its image's mask behind); without it, of 20 windows.
        chunked = block.attn._forward_chunked(q, kv, kv, block.attn_mask, chunk_bytes=20 * per_window)
    assert calls == ([windows] * 3 if shift else [20, 20, 8])
    torch.testing.assert_close(chunked, whole, rtol=0, atol=0)


def seeded_modulated_conv(seed: int, in_channels: int, out_channels: int, upsample: bool, batch: int, size: int):
    """A seeded ModulatedConv2d (3×3, style width 8) with inputs `[batch, in, size, size]` and styles `[batch, 8]`."""
    torch.manual_seed(seed)
    conv = ModulatedConv2d(in_channels, out_channels, 3, 8, upsample=upsample)
    return conv, torch.randn(batch, in_channels, size, size), torch.randn(batch, 8)


@pytest.mark.parametrize("upsample", [False, True])
def test_modulated_conv_batched_equals_grouped(upsample):
    """One conv with the style on the activations gives the grouped per-sample-weight conv's output."""
    conv, x, style = seeded_modulated_conv(11, 12, 20, upsample, batch=3, size=8)
    with torch.no_grad():
        grouped = conv._forward_grouped(x, style)
        batched = conv(x, style)
        # Each sample's output depends on its own style only (a batch of one gives the same rows).
        alone = conv(x[1:2], style[1:2])
    assert batched.shape == grouped.shape == (3, 20, 16 if upsample else 8, 16 if upsample else 8)
    torch.testing.assert_close(batched, grouped, rtol=0, atol=1e-5)
    torch.testing.assert_close(alone, grouped[1:2], rtol=0, atol=1e-5)
    with A.fast_paths(False), torch.no_grad():
        assert torch.equal(conv(x, style), grouped)


def test_modulated_conv_batched_gradients_match():
    conv, x, style = seeded_modulated_conv(12, 6, 10, True, batch=2, size=4)
    grads = []
    for form in (conv._forward_grouped, conv._forward_batched):
        conv.zero_grad()
        form(x, style).square().sum().backward()
        grads.append([p.grad.clone() for p in conv.parameters()])
    for batched, grouped in zip(grads[1], grads[0]):
        torch.testing.assert_close(batched, grouped, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("upsample", [False, True])
def test_modulated_conv_weight_cache_follows_the_weights(upsample):
    """The cached scaled weight is built once in inference and rebuilt after an in-place edit or a load."""
    conv, x, style = seeded_modulated_conv(14, 6, 10, upsample, batch=2, size=5)
    with torch.no_grad():
        first = conv(x, style)
        cached = conv._weight_cache
        assert cached is not None and conv(x, style) is not None and conv._weight_cache is cached
        conv.weight.mul_(-0.5)
        edited = conv(x, style)
        torch.testing.assert_close(edited, conv._forward_grouped(x, style), rtol=0, atol=1e-5)
        assert not torch.allclose(edited, first)
    state = {k: v.clone() for k, v in conv.state_dict().items()}
    assert "_weight_cache" not in "".join(state)
    state["weight"].mul_(-2.0)
    conv.load_state_dict(state)
    assert conv._weight_cache is None
    with torch.no_grad():
        torch.testing.assert_close(conv(x, style), first, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_modulated_conv_half_precision_with_large_styles(dtype):
    """Styles far from 1 would overflow fp16 activations scaled by them; the per-sample
    normalisation (exact under the demodulation) keeps the half-precision output near float32's."""
    torch.manual_seed(13)
    conv = ModulatedConv2d(16, 16, 3, 8)
    with torch.no_grad():
        conv.modulation.bias.fill_(3000.0)
    x, style = torch.randn(2, 16, 8, 8) * 8, torch.randn(2, 8)
    with torch.no_grad():
        expected = conv._forward_grouped(x, style)
        half = conv.to(dtype)(x.to(dtype), style.to(dtype)).float()
    assert torch.isfinite(half).all()
    torch.testing.assert_close(half, expected, rtol=0.05, atol=0.05 * expected.abs().max().item())


@pytest.mark.parametrize("shift", [0, 4])
@pytest.mark.parametrize("target", [5, 37, 70, 10_000])
def test_cpu_window_chunks_equal_one_product(shift, target):
    """The CPU's chunked product gives the one-product map for chunks inside a bias period (the shift
    mask's 32 window-heads here), of whole periods, with a ragged last chunk, and for all at once."""
    torch.manual_seed(9)
    block = A.SwinBlock(16, 32, 2, 8, shift).eval()
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_()
    q, kv = torch.randn(3 * 16, 64, 16), torch.randn(3 * 16, 64, 16)  # 3 images of 16 windows
    with torch.no_grad():
        whole = block.attn._forward_explicit(q, kv, kv, block.attn_mask)
        chunked = block.attn._forward_cpu(q, kv, kv, block.attn_mask, chunk_bytes=target * 64 * 64 * 4)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)


def test_cpu_window_route_is_for_float32_inference(monkeypatch):
    calls = []
    original = A.WindowAttention._forward_cpu
    monkeypatch.setattr(A.WindowAttention, "_forward_cpu",
                        lambda self, *args: calls.append(1) or original(self, *args))
    block = A.SwinBlock(16, 16, 2, 8, 4).eval()
    x = torch.randn(1, 16, 16, 16)
    with torch.no_grad():
        block(x)
        block.to(torch.bfloat16)(x.bfloat16())
    block.float()(x)  # autograd on
    assert calls == [1]


def test_window_bias_gets_gradients_when_training():
    block = A.SwinBlock(16, 16, 2, 8, 4)
    block(torch.randn(1, 16, 16, 16)).sum().backward()
    assert block.attn.relative_position_bias_table.grad is not None
    assert block.attn.relative_position_bias_table.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def tiny():
    """A seeded tiny renderer, one source (batch 1) and three driving frames' motion maps."""
    torch.manual_seed(8)
    model = IMTRenderer(tiny_renderer_config()).eval().requires_grad_(False)
    with torch.no_grad():
        source, driving = torch.rand(1, 3, 128, 128), torch.rand(3, 3, 128, 128)
        features, vector = model.encode_identity(source)
        source_maps = model.decode_motion(model.adapt(model.encode_motion(source), vector))
        driving_maps = model.decode_motion(model.adapt(model.encode_motion(driving), vector.expand(3, -1)))
    return model, features, source_maps, driving_maps


def _render_with_picks(model, *args, **kwargs):
    picks = {}
    anchor = [m for m in model.imt if isinstance(m, CoarseTransfer)][-1]
    hook = anchor.register_forward_hook(lambda mod, a, out: picks.update(argmax=out[1]))
    try:
        with torch.no_grad():
            frames = model.render(*args, **kwargs)
    finally:
        hook.remove()
    return frames, picks["argmax"]


def test_cached_source_render_equals_uncached(tiny):
    model, features, source_maps, driving_maps = tiny
    with A.fast_paths(False):
        plain, plain_picks_ = _render_with_picks(model, driving_maps, source_maps, features)
    uncached, picks = _render_with_picks(model, driving_maps, source_maps, features)
    with torch.no_grad():
        cache = model.prepare_source(source_maps, features)
    cached, cached_picks = _render_with_picks(model, driving_maps, source=cache)
    assert torch.equal(cached, uncached) and torch.equal(cached_picks, picks)
    assert torch.equal(picks, plain_picks_)
    torch.testing.assert_close(cached, plain, rtol=0, atol=1e-6)
    # The plain path accepts a cache too (it re-reads the inputs the cache keeps).
    with A.fast_paths(False):
        again, _ = _render_with_picks(model, driving_maps, source=cache)
    assert torch.equal(again, plain)


def test_cached_source_with_a_batch_of_sources(tiny):
    model, features, source_maps, driving_maps = tiny
    feats3 = [f.expand(3, -1, -1, -1).contiguous() for f in features]
    maps3 = [m.expand(3, -1, -1, -1).contiguous() for m in source_maps]
    with torch.no_grad():
        cache = model.prepare_source(maps3, feats3)
    frames, picks = _render_with_picks(model, driving_maps, source=cache)
    with A.fast_paths(False):
        plain, plain_picks_ = _render_with_picks(model, driving_maps, source_maps, features)
    assert torch.equal(picks, plain_picks_)
    torch.testing.assert_close(frames, plain, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="batch"):
        model.render([m[:2] for m in driving_maps], source=cache)


def test_cache_in_another_dtype_is_refused(tiny):
    model, features, source_maps, driving_maps = tiny
    with torch.no_grad():
        cache = model.prepare_source(source_maps, features)
    with pytest.raises(ValueError, match="prepare it again"):
        model.render([m.double() for m in driving_maps], source=cache)
    with pytest.raises(TypeError):
        model.render(driving_maps)


def test_state_dict_unchanged_by_the_fast_paths(tiny):
    model, features, source_maps, driving_maps = tiny
    fresh = IMTRenderer(tiny_renderer_config())
    with torch.no_grad():
        model.render(driving_maps, source_maps, features)  # fills the window-bias caches
    assert list(model.state_dict()) == list(fresh.state_dict())


def test_fast_paths_switch_restores():
    assert A.fast_paths_enabled()
    with pytest.raises(RuntimeError):
        with A.fast_paths(False):
            assert not A.fast_paths_enabled()
            raise RuntimeError
    assert A.fast_paths_enabled()


def test_fp32_matmul_sets_and_restores_tf32_flags():
    before = tf32_state()
    with fp32_matmul(device="cpu"):  # a CPU device: nothing to do
        assert tf32_state() == before
    with pytest.raises(KeyError):
        with fp32_matmul(allow_tf32=False, device="cuda"):  # flags only: works without a GPU
            assert tf32_state() == {"matmul": False, "conv": False}
            with fp32_matmul(allow_tf32=True, device="cuda"):
                assert tf32_state() == {"matmul": True, "conv": True}
            assert tf32_state() == {"matmul": False, "conv": False}
            raise KeyError
    assert tf32_state() == before


NEW_API_SCRIPT = """
import torch
from imtalker_core.precision import fp32_matmul, tf32_state
if not hasattr(torch.backends.cudnn, "conv"):
    raise SystemExit(0)  # torch < 2.9: no per-backend settings to mix
torch.backends.cuda.matmul.fp32_precision = "tf32"
torch.backends.cudnn.conv.fp32_precision = "ieee"
before = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
          torch.backends.cudnn.rnn.fp32_precision)
with fp32_matmul(device="cuda"):
    assert tf32_state() == {"matmul": "ieee", "conv": "ieee"}, tf32_state()
after = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
         torch.backends.cudnn.rnn.fp32_precision)
assert after == before, (after, before)
"""


def test_fp32_matmul_with_the_new_tf32_api():
    """A caller who set torch's per-backend `fp32_precision` gets exactly those settings back
    (in a subprocess: the flags are process-wide)."""
    result = subprocess.run([sys.executable, "-c", NEW_API_SCRIPT], check=False, cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_speed_benchmark_imports_without_media_libraries():
    """The GPU machine may lack av, cv2, soxr and soundfile: the benchmark must not need them."""
    code = ("import sys\n"
            "for name in ('av', 'cv2', 'soxr', 'soundfile'):\n"
            "    sys.modules[name] = None\n"
            "import runpy\n"
            f"runpy.run_path({str(ROOT / 'benchmarks' / 'speed.py')!r}, run_name='not_main')\n"
            "assert not [m for m in sys.modules if m.startswith(('imtalker_core.media', 'imtalker_core.runner'))]\n")
    result = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_sdpa_scale_matches_the_module_scale():
    """`attend` relies on SDPA's default scale 1/√d being FullAttention's scale."""
    q, k = random_qk(1, 1, 2, 5, 6, 12, seed=9)
    v = torch.randn(1, 2, 6, 12)
    expected = ((q @ k.transpose(-2, -1)) * A.FullAttention(24, 2).scale).softmax(-1) @ v
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v), expected, rtol=0, atol=1e-6)


def test_models_built_under_inference_mode_render(tmp_path):
    """ComfyUI runs nodes under torch.inference_mode, so the renderer's weights are inference tensors,
    which keep no version counter: the cached window-attention bias must cope, and follow a reload."""
    from imtalker_core.config import tiny_renderer_config
    from imtalker_core.renderer import IMTRenderer

    torch.manual_seed(0)
    with torch.inference_mode():
        model = IMTRenderer(tiny_renderer_config()).eval()
        state = {k: v.clone() for k, v in model.state_dict().items()}
        image = torch.rand(1, 3, 128, 128)
        features, vector = model.encode_identity(image)
        maps = model.decode_motion(model.adapt(model.encode_motion(image), vector))
        first = model.render(maps, maps, features)
        tables = [k for k in state if k.endswith("relative_position_bias_table")]
        assert tables
        changed = dict(state, **{k: state[k] + 1.0 for k in tables})
        model.load_state_dict(changed)
        second = model.render(maps, maps, features)
        model.load_state_dict(state)
        third = model.render(maps, maps, features)
    assert not torch.equal(first, second)  # the reloaded table was used, not a stale cached bias
    assert torch.equal(first, third)
