"""BatchNorm convolution blocks of the identity encoder and the synthesis network.

The official checkpoint wraps every BatchNorm in a `norm` attribute (keys `...norm.norm.weight`),
which `NormLayer` keeps. The activations are `nn.LeakyReLU` with PyTorch's default slope 0.01.

Inference layout (`InferenceConvs`, set per synthesis network by `synthesis.set_inference_layout`):
in eval mode with autograd off, a bias-free conv followed by BatchNorm (running statistics) is one
affine map per output channel, so it can run as a single conv with a folded weight and bias
(`fold_conv_batchnorm`); and a channels-last activation wants a channels-last weight, which a conv
would otherwise reorder on every call. Both weights are cached per module and never stored in the
state dict. A third setting, `upsample_phases`, runs the synthesis network's "nearest ×2 → 3×3 conv"
as four 2×2 convs on the small map (`upsample_phase_weights`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .parameter_cache import ParameterCaches, tensor_key

# parity: the reference builds these activations as nn.LeakyReLU() with the default 0.01 slope.
BLOCK_SLOPE = 0.01

# The defaults (setting None) per device type; other devices: off. Measured on a CPU (fp32, 2 threads,
# batch 1 and 2, benchmarks/layout_speed.py): channels-last makes the synthesis network 6-9 % faster
# (oneDNN's NHWC convolutions, cached NHWC weights, no token copies in the attention blocks); the fold
# adds 0-3 % on top (the bias is added inside the conv, saving the BatchNorm's pass) and costs no
# memory once the channels-last weights are cached anyway; alone it is within the noise. On an H200
# (fp16, benchmarks/layout_speed.py --device cuda --dtype fp16 --batch-sizes 1 32, 5 alternated repeats,
# 2026-11-27) the two together took the renderer from 14.7 to 12.6 ms a frame at batch 1 and from 3.50
# to 3.35 ms at batch 32 (cuDNN runs NHWC kernels, so NCHW inputs cost it two transposes per conv).
CHANNELS_LAST_BY_DEVICE = {"cpu": True, "cuda": True}
FOLD_BATCHNORM_BY_DEVICE = {"cpu": True, "cuda": True}
# The up-sampling convs as four 2×2 convs on the small map: 4/9 of their multiply-adds and no ×2 copy of
# the input. On a CPU (fp32, 2 threads, channels-last, batch 2) the five up-sampling convs took 54 → 32 ms
# a frame, the synthesis network 0.723 → 0.714 s (benchmarks/layout_speed.py, variants "both" and "all").
# On the H200 run above they changed nothing beside channels-last and the fold (3.34 vs 3.35 ms at batch
# 32) and cost 7 % alone (3.61 vs 3.50): cuDNN's 3×3 kernels are as fast as four 2×2 ones, so off there.
UPSAMPLE_PHASES_BY_DEVICE = {"cpu": True}


def upsample_phase_weights(weight: torch.Tensor) -> torch.Tensor:
    """The four 2×2 kernels `[4·Co, Ci, 2, 2]` (phases (0,0), (0,1), (1,0), (1,1), each `[Co, Ci, 2, 2]`)
    equal to a 3×3 conv (`weight` `[Co, Ci, 3, 3]`, padding 1) on a nearest ×2 up-sampled map.

    Output pixel `(2i+a, 2j+b)` sees up-sampled rows `2i+a-1 … 2i+a+1`, i.e. small-map rows `i-1, i, i`
    (a = 0) or `i, i, i+1` (a = 1), and likewise for the columns; the taps that land on the same small
    row (column) are summed. Phase (a, b) is then a 2×2 conv over small rows `i-1+a, i+a` and columns
    `j-1+b, j+b` of the map padded by one (the up-sampled map's zero border is the small map's).
    Summed in the weight's dtype; callers pass float32 and cast afterwards.
    """
    def pairs(w: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        first, middle, last = w.unbind(dim)
        return torch.stack([first, middle + last], dim), torch.stack([first + middle, last], dim)

    phases = [col for row in pairs(weight, 2) for col in pairs(row, 3)]
    return torch.cat(phases, dim=0)


def fold_conv_batchnorm(weight: torch.Tensor, norm: nn.BatchNorm2d,
                        dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight `[Co, Ci, k, k]`, bias `[Co]`) of one conv equal to a bias-free conv with `weight`
    followed by `norm` in eval mode: `w·s` and `β − μ·s` with `s = γ / √(σ² + ε)`.

    Computed in float32 (float64 for a float64 model) and cast once to `dtype` (default: the
    weight's), so a half-precision fold rounds once instead of at every step.
    """
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    var = norm.running_var.to(work)
    mean = norm.running_mean.to(work)
    gamma = norm.weight.to(work) if norm.weight is not None else torch.ones_like(var)
    beta = norm.bias.to(work) if norm.bias is not None else torch.zeros_like(var)
    scale = gamma * torch.rsqrt(var + norm.eps)
    dtype = dtype or weight.dtype
    return (weight.to(work) * scale.view(-1, 1, 1, 1)).to(dtype), (beta - mean * scale).to(dtype)


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether a 4-D tensor is laid out channels-last (NHWC strides) and not also plain NCHW."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def inferring(module: nn.Module) -> bool:
    """Eval mode with autograd off: where the inference layouts and caches apply."""
    return not module.training and not torch.is_grad_enabled()


def layout_enabled(setting: bool | None, defaults: dict[str, bool], device: torch.device) -> bool:
    """`setting`, or the device type's entry in `defaults` (`CHANNELS_LAST_BY_DEVICE`,
    `FOLD_BATCHNORM_BY_DEVICE`) when it is None."""
    return defaults.get(device.type, False) if setting is None else setting


class InferenceConvs(ParameterCaches):
    """Base of modules whose convs can run from cached inference weights.

    `channels_last` and `fold_batchnorm`: False (the class default: blocks on their own, like the
    identity encoder's, which runs once per video, keep the plain path and hold no second copy of
    their weights), True, or None for the device defaults; the synthesis network sets its modules
    to None. Either applies only in eval mode with autograd off.

    `_conv(x, name, conv, norm)` computes `norm(conv(x))` (or `conv(x)` without `norm`) from a
    cached (weight, bias): BatchNorm folded in when folding is on, and channels-last when `x` is and
    channels-last is on. The cache is a plain attribute, so the state dict is unchanged. Its key holds
    every source tensor's storage, version, device and dtype and the input's dtype and layout, so a
    replaced, moved, cast or in-place modified parameter or statistic rebuilds it; moving or casting
    the module and `load_state_dict` also drop it (inference tensors, as under ComfyUI's inference
    mode, keep no version counter, so an in-place edit of one is not seen: load or cast instead).
    Training mode or autograd always takes the module's parameters.
    """

    channels_last: bool | None = False
    fold_batchnorm: bool | None = False
    upsample_phases: bool | None = False

    def __init__(self):
        super().__init__()
        self._conv_cache: dict[str, tuple[tuple, torch.Tensor, torch.Tensor | None]] = {}

    def drop_caches(self) -> None:
        self._conv_cache = {}

    def inferring(self) -> bool:
        """Eval mode with autograd off: the only state in which the layout settings apply."""
        return inferring(self)

    def _inference_weights(self, x: torch.Tensor, norm: nn.BatchNorm2d | None) -> tuple[bool, bool]:
        """(fold `norm` into the conv?, channels-last weights?) for an inference conv of `x`."""
        fold = (norm is not None and norm.running_mean is not None
                and layout_enabled(self.fold_batchnorm, FOLD_BATCHNORM_BY_DEVICE, x.device))
        channels_last = is_channels_last(x) and layout_enabled(self.channels_last, CHANNELS_LAST_BY_DEVICE,
                                                                x.device)
        return fold, channels_last

    def _conv(self, x: torch.Tensor, name: str, conv: nn.Conv2d, norm: nn.BatchNorm2d | None = None) -> torch.Tensor:
        """`norm(conv(x))` (`conv(x)` without `norm`); `name` keys the cache entry."""
        if not self.inferring():
            return norm(conv(x)) if norm is not None else conv(x)
        fold, channels_last = self._inference_weights(x, norm)
        if not (fold or channels_last):
            return norm(conv(x)) if norm is not None else conv(x)
        layout = torch.channels_last if channels_last else torch.contiguous_format
        weight, bias = self._cached_weights(name, conv, norm if fold else None, x.dtype, layout)
        out = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        return norm(out) if norm is not None and not fold else out

    def _upsampled_conv(self, x: torch.Tensor, name: str, conv: nn.Conv2d,
                        norm: nn.BatchNorm2d | None = None) -> torch.Tensor:
        """`norm(conv(interpolate(x, ×2, nearest)))` for a 3×3, stride-1, padding-1 `conv`: with
        `upsample_phases` on (inference), four 2×2 convs on `x` written into the ×2 output's pixel
        phases (`upsample_phase_weights`); same values up to rounding, in `x`'s layout."""
        if not (self.inferring() and layout_enabled(self.upsample_phases, UPSAMPLE_PHASES_BY_DEVICE, x.device)):
            return self._conv(F.interpolate(x, scale_factor=2.0, mode="nearest"), name, conv, norm)
        assert conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1) and conv.groups == 1
        fold, channels_last = self._inference_weights(x, norm)
        layout = torch.channels_last if channels_last else torch.contiguous_format
        weight, bias = self._cached_weights(name + "/phases", conv, norm if fold else None, x.dtype, layout,
                                            phases=True)
        b, _, h, w = x.shape
        padded = F.pad(x, (1, 1, 1, 1))
        out = torch.empty((b, weight.shape[0] // 4, 2 * h, 2 * w), dtype=x.dtype, device=x.device,
                          memory_format=layout)
        for phase, kernel in enumerate(weight.chunk(4)):
            a, c = divmod(phase, 2)
            out[:, :, a::2, c::2] = F.conv2d(padded[:, :, a:a + h + 1, c:c + w + 1], kernel, bias)
        return norm(out) if norm is not None and not fold else out

    def _cached_weights(self, name: str, conv: nn.Conv2d, norm: nn.BatchNorm2d | None, dtype: torch.dtype,
                        layout: torch.memory_format, phases: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if torch.compiler.is_compiling():
            # Built inside the graph under torch.compile (the key's storage pointers and version counters
            # cannot be traced; the compiled code keeps the result anyway).
            return self._build_weights(conv, norm, dtype, layout, phases)
        sources = (conv.weight, conv.bias) + ((norm.weight, norm.bias, norm.running_mean, norm.running_var)
                                              if norm is not None else ())
        key = (tuple(tensor_key(t) for t in sources), None if norm is None else norm.eps, dtype, layout)
        entry = self._conv_cache.get(name)
        if entry is None or entry[0] != key:
            entry = self._conv_cache[name] = (key, *self._build_weights(conv, norm, dtype, layout, phases))
        return entry[1], entry[2]

    @staticmethod
    def _build_weights(conv: nn.Conv2d, norm: nn.BatchNorm2d | None, dtype: torch.dtype,
                       layout: torch.memory_format, phases: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        # The phase sums are taken before the cast to a half dtype (one rounding, as for the fold).
        work = (torch.float64 if conv.weight.dtype == torch.float64 else torch.float32) if phases else dtype
        if norm is not None:
            assert conv.bias is None, "folding expects a bias-free conv"
            weight, bias = fold_conv_batchnorm(conv.weight, norm, work)
            bias = bias.to(dtype)
        else:
            weight = conv.weight.to(work)
            bias = conv.bias.to(dtype) if conv.bias is not None else None
        if phases:
            weight = upsample_phase_weights(weight)
        return weight.to(dtype).contiguous(memory_format=layout), bias


def configure_inference(module: nn.Module, channels_last: bool | None, fold_batchnorm: bool | None,
                        upsample_phases: bool | None = None) -> None:
    """Set `channels_last`, `fold_batchnorm` and `upsample_phases` on every `InferenceConvs` inside
    `module` (itself included)."""
    for m in module.modules():
        if isinstance(m, InferenceConvs):
            m.channels_last = channels_last
            m.fold_batchnorm = fold_batchnorm
            m.upsample_phases = upsample_phases


class NormLayer(nn.Module):
    """BatchNorm2d under the attribute name `norm` (official key layout)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class ConvBlock(InferenceConvs):
    """3×3 conv (no bias) → BatchNorm → optional LeakyReLU."""

    def __init__(self, channels: int, activate: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.norm = NormLayer(channels)
        self.activate = activate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._conv(x, "conv", self.conv, self.norm.norm)
        return F.leaky_relu(x, BLOCK_SLOPE) if self.activate else x


class FeatResBlock(nn.Module):
    """Two ConvBlocks with an identity shortcut, activated after the sum."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = ConvBlock(channels, activate=True)
        self.conv2 = ConvBlock(channels, activate=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.conv2(self.conv1(x)) + x, BLOCK_SLOPE)


class ConvResBlock(InferenceConvs):
    """conv → BN → LeakyReLU → [resample] → conv → two FeatResBlocks.

    `resample` is applied after the first activation ("down": 2×2 average pooling, as in the
    identity encoder) or before the first conv ("up": nearest ×2, as in the synthesis network).
    Every step keeps a channels-last input (canonical strides, see `synthesis.as_channels_last`)
    channels-last.
    """

    def __init__(self, in_channels: int, out_channels: int, resample: str | None = None):
        super().__init__()
        if resample not in (None, "up", "down"):
            raise ValueError(f"resample must be None, 'up' or 'down', not {resample!r}")
        self.resample = resample
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False)
        self.norm = NormLayer(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.feat_res_block1 = FeatResBlock(out_channels)
        self.feat_res_block2 = FeatResBlock(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "up":
            x = self._upsampled_conv(x, "conv1", self.conv1, self.norm.norm)
        else:
            x = self._conv(x, "conv1", self.conv1, self.norm.norm)
        x = F.leaky_relu(x, BLOCK_SLOPE)
        if self.resample == "down":
            x = F.avg_pool2d(x, 2)
        x = self._conv(x, "conv2", self.conv2)
        return self.feat_res_block2(self.feat_res_block1(x))
