"""The renderer's adversary: a two-scale StyleGAN2 discriminator and the non-saturating GAN losses.

Structure and parameter names are those of the official training run (`disc.*` in a Lightning
`renderer.ckpt` that kept it): `scale1` judges the frame at full size, `scale2` the frame halved by
bilinear interpolation. Each scale is a StyleGAN2 discriminator: a 1×1 `ConvLayer` from RGB,
residual blocks that halve the resolution down to 4², the minibatch standard-deviation channel,
a 3×3 `ConvLayer` and two equalised linear layers to one logit per image. The reference trains
it without R1 or any other gradient penalty, so none is offered here.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import key_mismatches
from ..errors import CheckpointError
from ..layers.stylegan import SQRT2, Blur, ConvLayer, EqualConv2d, EqualLinear

log = logging.getLogger(__name__)

# Logit count the standard-deviation statistic is pooled over (StyleGAN2's group size) and how many
# feature groups get their own statistic channel.
STDDEV_GROUP = 4
STDDEV_FEATURES = 1
FINAL_SIZE = 4


@dataclass(frozen=True)
class DiscriminatorConfig:
    """Dimensions of the two-scale discriminator.

    The channel count at resolution r is `min(max_channels, width // r)`: the official values
    (width 16384, at most 512) give StyleGAN2's table with channel multiplier 1
    (512² → 32, 256² → 64, 128² → 128, 64² → 256, 32² … 4² → 512). `image_size` is the renderer's
    frame size; scale k sees it divided by 2**(k-1).
    """

    image_size: int = 512
    width: int = 16384
    max_channels: int = 512
    num_scales: int = 2

    def __post_init__(self) -> None:
        smallest = self.image_size // 2 ** (self.num_scales - 1)
        if self.num_scales < 1 or smallest < 2 * FINAL_SIZE or smallest & (smallest - 1):
            raise ValueError(f"image_size {self.image_size} with {self.num_scales} scales needs every scale to be "
                             f"a power of two of at least {2 * FINAL_SIZE}")

    def channels(self, resolution: int) -> int:
        return max(1, min(self.max_channels, self.width // resolution))


def tiny_discriminator_config(image_size: int = 128) -> DiscriminatorConfig:
    """A discriminator with the official structure and 4–16 channels, for unit tests."""
    return DiscriminatorConfig(image_size=image_size, width=512, max_channels=16)


class FusedLeakyReLULinear(EqualLinear):
    """Equalised linear layer whose bias is added before `leaky_relu(·, 0.2) · √2` (StyleGAN2's
    'fused_lrelu' activation; keys `weight`, `bias`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(F.linear(x, self.weight * self.scale) + self.bias, 0.2) * SQRT2


class DownsampleSkip(nn.Sequential):
    """The residual shortcut: blur, then a 1×1 equalised convolution with stride 2, no bias and no
    activation (keys `0.kernel`, `1.weight`)."""

    def __init__(self, in_channels: int, out_channels: int):
        # Blur padding for a 4-tap kernel before a stride-2 1×1 conv: (taps - 2) + (1 - 1) = 2 → (1, 1).
        super().__init__(Blur(pad=(1, 1)),
                         EqualConv2d(in_channels, out_channels, 1, stride=2, padding=0, bias=False))


class DiscriminatorBlock(nn.Module):
    """`(conv2(conv1(x)) + skip(x)) / √2`, halving the resolution: `[B, C_in, H, W]` → `[B, C_out, H/2, W/2]`."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = ConvLayer(in_channels, in_channels, 3)
        self.conv2 = ConvLayer(in_channels, out_channels, 3, downsample=True)
        self.skip = DownsampleSkip(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.conv2(self.conv1(x)) + self.skip(x)) / SQRT2


def minibatch_stddev(x: torch.Tensor, group: int = STDDEV_GROUP) -> torch.Tensor:
    """Append StyleGAN2's minibatch standard-deviation channel: `[B, C, H, W]` → `[B, C + 1, H, W]`.

    Images are split into `min(B, group)` interleaved groups (image b is member `b // (B/g)` of
    subgroup `b % (B/g)`); the statistic of a subgroup is the mean over C, H, W of the per-value
    standard deviation across its members, broadcast as one constant channel. B must be a
    multiple of `min(B, group)` (any batch up to 4, or a multiple of 4).
    """
    b, c, h, w = x.shape
    g = min(b, group)
    if b % g:
        raise ValueError(f"the discriminator needs a batch that is at most {group} or a multiple of {group}, got {b}")
    grouped = x.view(g, -1, STDDEV_FEATURES, c // STDDEV_FEATURES, h, w)
    std = torch.sqrt(grouped.var(0, unbiased=False) + 1e-8)
    std = std.mean(dim=(2, 3, 4), keepdim=True).squeeze(2)  # [B/g, 1, 1, 1]
    return torch.cat([x, std.repeat(g, 1, h, w)], dim=1)


class ScaleDiscriminator(nn.Module):
    """StyleGAN2 discriminator for `[B, 3, size, size]` images → logits `[B, 1]`."""

    def __init__(self, cfg: DiscriminatorConfig, size: int):
        super().__init__()
        self.size = size
        ch = cfg.channels
        layers: list[nn.Module] = [ConvLayer(3, ch(size), 1)]
        resolution = size
        while resolution > FINAL_SIZE:
            layers.append(DiscriminatorBlock(ch(resolution), ch(resolution // 2)))
            resolution //= 2
        self.convs = nn.Sequential(*layers)
        last = ch(FINAL_SIZE)
        self.final_conv = ConvLayer(last + STDDEV_FEATURES, last, 3)
        self.final_linear = nn.Sequential(FusedLeakyReLULinear(last * FINAL_SIZE ** 2, last), EqualLinear(last, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] != self.size or images.shape[-2] != self.size:
            raise ValueError(f"this discriminator scale takes {self.size}² images, got {tuple(images.shape)}")
        x = self.final_conv(minibatch_stddev(self.convs(images)))
        return self.final_linear(x.flatten(1))


class PatchDiscriminator(nn.Module):
    """Two-scale discriminator: frames `[B, 3, S, S]` (renderer range [0, 1]) → one logit tensor
    `[B, 1]` per scale, full size first. Attributes `scale1`, `scale2` (official names)."""

    def __init__(self, cfg: DiscriminatorConfig | None = None):
        super().__init__()
        self.cfg = cfg or DiscriminatorConfig()
        for k in range(self.cfg.num_scales):
            self.add_module(f"scale{k + 1}", ScaleDiscriminator(self.cfg, self.cfg.image_size // 2 ** k))

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        logits = []
        x = images
        for k in range(self.cfg.num_scales):
            if k:
                x = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
            logits.append(getattr(self, f"scale{k + 1}")(x))
        return logits


def _as_list(logits: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [logits] if isinstance(logits, torch.Tensor) else list(logits)


def discriminator_loss(real_logits: torch.Tensor | Sequence[torch.Tensor],
                       fake_logits: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Non-saturating logistic loss of the discriminator, summed over scales:
    `Σ_scales mean(softplus(-real)) + mean(softplus(fake))` (scalar; log 2 · 2 per scale at zero logits)."""
    real, fake = _as_list(real_logits), _as_list(fake_logits)
    if len(real) != len(fake):
        raise ValueError(f"{len(real)} real and {len(fake)} fake logit scales")
    return sum(F.softplus(-r).mean() + F.softplus(f).mean() for r, f in zip(real, fake))


def generator_adversarial_loss(fake_logits: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Non-saturating generator loss, summed over scales: `Σ_scales mean(softplus(-fake))` (scalar)."""
    return sum(F.softplus(-f).mean() for f in _as_list(fake_logits))


def load_discriminator_state(disc: PatchDiscriminator, entries: Mapping[str, torch.Tensor], source: str) -> None:
    """Load a discriminator state dict strictly (blur kernels, which the model computes, may be absent).

    `entries` are unprefixed (`scale1.convs.0.0.weight`, ...), e.g. the `disc.*` entries of an official
    training checkpoint with the prefix removed. Raises `CheckpointError` naming `source` on any missing,
    unexpected or wrongly shaped key.
    """
    own = disc.state_dict()
    derived = {name for name, _ in disc.named_buffers()}
    entries = dict(entries)
    for name in derived:
        entries.setdefault(name, own[name])
    parts = key_mismatches(own, entries)
    if parts:
        raise CheckpointError(f"{source}: its discriminator entries do not match the discriminator configuration: "
                              + "; ".join(parts) + ". Train the discriminator from scratch (omit its weights) or "
                              "use a matching configuration.")
    bad = [k for k, v in entries.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{source}: discriminator entry {bad[0]} has NaN/inf values; train it from scratch")
    disc.load_state_dict(entries, strict=True)
