"""StyleGAN2-family layers used by the renderer's motion encoder and motion decoder.

Attribute names (`weight`, `bias`, `kernel`, `modulation`, `blur`, `noise`, `activate`) follow the
official checkpoint so its state dict loads without renaming.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import fast_paths_enabled
from .parameter_cache import ParameterCaches, tensor_key

SQRT2 = math.sqrt(2.0)


def blur_kernel_2d(taps: tuple[int, ...] = (1, 3, 3, 1), gain: float = 1.0) -> torch.Tensor:
    """Separable FIR kernel (outer product of `taps`), normalised to sum to `gain`. Shape `[k, k]`."""
    k = torch.tensor(taps, dtype=torch.float32)
    k = k[None, :] * k[:, None]
    return k / k.sum() * gain


# In compiled code the blur is a sum of shifted copies, which inductor fuses into one elementwise kernel. As a
# depthwise conv it went to cuDNN's grouped direct kernel once inductor had made the motion decoder
# channels-last: 0.08 ms of a 1.08 ms compiled fp16 frame (H200, batch 32, four blurs of a few MB each;
# benchmarks/results/2026-11-27-h200/run2-profile_compiled.json). Eager code keeps the conv (one launch).
# A switch for A/B runs (benchmarks/profile_renderer.py --compiled-blur).
BLUR_BY_SHIFTS_WHEN_COMPILING = True


def blur_by_shifts(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Every channel of `x` `[B, C, H + k - 1, W + k - 1]` (already padded) correlated with `kernel` `[k, k]`.

    The same sums as the depthwise conv, in float32 (a half-precision conv accumulates in float32 too) and
    in another order, rounded once to `x.dtype`. Returns `[B, C, H, W]`.
    """
    k = kernel.shape[-1]
    h, w = x.shape[-2] - k + 1, x.shape[-1] - k + 1
    xf, taps = x.float(), kernel.float()
    out = None
    for row in range(k):
        for col in range(k):
            term = xf[..., row:row + h, col:col + w] * taps[row, col]
            out = term if out is None else out + term
    return out.to(x.dtype)


class Blur(nn.Module):
    """Depthwise FIR filter with asymmetric zero padding `(pad_before, pad_after)` on both axes."""

    def __init__(self, pad: tuple[int, int], gain: float = 1.0, taps: tuple[int, ...] = (1, 3, 3, 1)):
        super().__init__()
        self.register_buffer("kernel", blur_kernel_2d(taps, gain))
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        p0, p1 = self.pad
        x = F.pad(x, [p0, p1, p0, p1])
        # The taps are symmetric, so correlation equals the reference's flipped convolution.
        if BLUR_BY_SHIFTS_WHEN_COMPILING and torch.compiler.is_compiling():
            return blur_by_shifts(x, self.kernel)
        weight = self.kernel.to(x.dtype).expand(c, 1, *self.kernel.shape)
        return F.conv2d(x, weight, groups=c)


class EqualConv2d(nn.Module):
    """Conv2d with the weight scaled at run time by 1/sqrt(fan_in) (equalised learning rate)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.scale = 1.0 / math.sqrt(in_channels * kernel_size ** 2)
        self.stride = stride
        self.padding = padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.scale, self.bias, stride=self.stride, padding=self.padding)


class EqualLinear(nn.Module):
    """Linear layer with the weight scaled at run time by 1/sqrt(in_features)."""

    def __init__(self, in_features: int, out_features: int, bias_init: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init)))
        self.scale = 1.0 / math.sqrt(in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.scale, self.bias)


class FusedLeakyReLU(nn.Module):
    """`leaky_relu(x + bias, 0.2) * sqrt(2)` with a per-channel bias of shape `[1, C, 1, 1]`."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x + self.bias, 0.2) * SQRT2


class ConvLayer(nn.Sequential):
    """[Blur] → EqualConv2d → FusedLeakyReLU; the downsampling variant blurs then convolves with stride 2.

    Indices match the official keys: `0.kernel`, `1.weight`, `2.bias` when downsampling,
    `0.weight`, `1.bias` otherwise.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, downsample: bool = False):
        layers: list[nn.Module] = []
        if downsample:
            p = 2 + (kernel_size - 1)  # (taps - factor) + (kernel - 1)
            layers.append(Blur(pad=((p + 1) // 2, p // 2)))
            layers.append(EqualConv2d(in_channels, out_channels, kernel_size, stride=2, padding=0, bias=False))
        else:
            layers.append(EqualConv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2,
                                      bias=False))
        layers.append(FusedLeakyReLU(out_channels))
        super().__init__(*layers)


class ModulatedConv2d(ParameterCaches):
    """Style-modulated, demodulated convolution (StyleGAN2), optionally upsampling ×2.

    Input `[B, C_in, H, W]` and style `[B, style_dim]`; output `[B, C_out, H', W']` with
    `H' = 2H` when upsampling.

    The batched form's style-independent terms (the scaled weight, laid out for the conv, and its
    energy per channel pair) are cached in inference (a plain attribute keyed like the other
    parameter caches; the state dict is unchanged): at batch 1 on a CPU they were 15 % of the decoder.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, style_dim: int,
                 upsample: bool = False):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.upsample = upsample
        self.scale = 1.0 / math.sqrt(in_channels * kernel_size ** 2)
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.randn(1, out_channels, in_channels, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_channels, bias_init=1.0)
        if upsample:
            p = 2 - (kernel_size - 1)  # (taps - factor) - (kernel - 1)
            self.blur = Blur(pad=((p + 1) // 2 + 1, p // 2 + 1), gain=4.0)
        self._weight_cache: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None

    def drop_caches(self) -> None:
        self._weight_cache = None

    def _shared_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(the scaled weight `[C_out, C_in, k, k]`, or `[C_in, C_out, k, k]` contiguous for the transposed
        conv when upsampling; its energy `Σ_taps w²` as `[C_in, C_out]`)."""
        return self._cached("_weight_cache", self.weight, lambda: tensor_key(self.weight), self._build_shared_weight)

    def _build_shared_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        weight = self.weight[0] * self.scale
        energy = weight.square().sum([2, 3]).t()
        if self.upsample:
            weight = weight.transpose(0, 1).contiguous()
        return weight, energy

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        if fast_paths_enabled():
            return self._forward_batched(x, style)
        return self._forward_grouped(x, style)

    def _forward_grouped(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        """The reference's arithmetic: one modulated weight per sample, one grouped conv (groups = B)."""
        b, c, h, w = x.shape
        style = self.modulation(style).view(b, 1, c, 1, 1)
        weight = self.scale * self.weight * style
        weight = weight * torch.rsqrt(weight.pow(2).sum([2, 3, 4]) + 1e-8).view(b, self.out_channels, 1, 1, 1)
        k = self.kernel_size
        x = x.reshape(1, b * c, h, w)
        if self.upsample:
            weight = weight.transpose(1, 2).reshape(b * c, self.out_channels, k, k)
            out = F.conv_transpose2d(x, weight, stride=2, padding=0, groups=b)
            out = out.view(b, self.out_channels, out.shape[-2], out.shape[-1])
            return self.blur(out)
        weight = weight.view(b * self.out_channels, c, k, k)
        out = F.conv2d(x, weight, padding=self.padding, groups=b)
        return out.view(b, self.out_channels, out.shape[-2], out.shape[-1])

    def _forward_batched(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        """The same map with the style moved onto the activations: `conv(x·s, w)·d` equals
        `conv(x, w·s·d)` because `d` (the demodulation, `[B, C_out]`) is constant over each output
        channel. One conv with the shared weight instead of B per-sample weights and a grouped conv:
        1.2-2.3x faster for the whole motion decoder on a CPU at batch 2-32 (benchmarks/motion_speed.py),
        and equal up to rounding (~1e-6 relative in float32).

        Half precision: the demodulation makes the result invariant to a positive scale of each
        sample's style, so the style is divided by its largest magnitude first; the modulated
        activations then stay as large as `x`, which the grouped form's weights never exceed either.
        """
        b, c = x.shape[:2]
        style = self.modulation(style)  # [B, C_in]
        if style.dtype in (torch.float16, torch.bfloat16):
            style = style / style.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(style.dtype).tiny)
        weight, energy = self._shared_weight()
        # Σ over C_in and taps of (w·s)², without building the per-sample weights.
        demod = torch.rsqrt(style.square() @ energy + 1e-8)  # [B, C_out]
        x = x * style.view(b, c, 1, 1)
        if self.upsample:
            out = F.conv_transpose2d(x, weight, stride=2, padding=0)
            return self.blur(out * demod.view(b, -1, 1, 1))
        out = F.conv2d(x, weight, padding=self.padding)
        return out * demod.view(b, -1, 1, 1)


class NoiseInjection(nn.Module):
    """Learned noise strength. IMTalker never feeds noise, so this is the identity at inference."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        return x if noise is None else x + self.weight * noise


class StyledConv(nn.Module):
    """ModulatedConv2d → (noise) → FusedLeakyReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, style_dim: int,
                 upsample: bool = False):
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, kernel_size, style_dim, upsample=upsample)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_channels)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        return self.activate(self.noise(self.conv(x, style)))
