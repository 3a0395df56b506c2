"""Perceptual loss of the renderer: VGG19 features of an image pyramid, on the whole frame and on the
eye and mouth regions (paper §3.2.1; the reference's masked VGG loss).

- `VGG19Features` / `load_vgg19`: VGG19's convolutional stack up to relu5_1 under torchvision's key
  names (`features.N.weight`), so torchvision's `vgg19` ImageNet state dict (or the `criterion_vgg.*`
  copy an official training checkpoint may carry) loads strictly; nothing is ever downloaded.
- `PerceptualLoss`: for the pyramid scales 1, ½, ¼, ⅛ (Gaussian anti-aliased downsampling), the L1
  distance of relu1_1, relu2_1, relu3_1, relu4_1 and relu5_1 features (weight 1 each), once over
  the whole frame and once inside a region mask, summed over scales and layers.
- `eye_mouth_masks` (from 68 landmarks, as the reference's data loader) and `fixed_region_masks`
  (fixed boxes of the aligned face crop, when no landmarks were prepared).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import key_mismatches
from ..errors import CheckpointError, InputError
from ..safe_read import read_file

log = logging.getLogger(__name__)

# torchvision's VGG19 ("configuration E"): output channels of each conv, "M" a 2×2 max pool.
VGG19_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")
# Indices in `features` of relu1_1, relu2_1, relu3_1, relu4_1, relu5_1: the layers the loss compares.
FEATURE_TAPS = (1, 6, 11, 20, 29)
LAYER_WEIGHTS = (1.0, 1.0, 1.0, 1.0, 1.0)
PYRAMID_SCALES = (1.0, 0.5, 0.25, 0.125)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Where the loss network sits inside an official Lightning training checkpoint, and how its layers are
# grouped there (`criterion_vgg.vgg.slice<k>.<N>.weight`, N the torchvision index).
CHECKPOINT_VGG_PREFIX = "criterion_vgg.vgg."

# Landmark indices (68-point scheme) of the two eyes and the outer lip.
LEFT_EYE = tuple(range(36, 42))
RIGHT_EYE = tuple(range(42, 48))
OUTER_LIP = tuple(range(48, 60))
# The reference dilates both regions twice with a 7×7 square (no erosion of the eyes).
MASK_KERNEL = 7
EYE_DILATIONS = 2
MOUTH_DILATIONS = 2
# Fallback regions as fractions of the aligned crop (x0, y0, x1, y1) for the reference's 1.6× square around
# a detected face: boxes that hold both eyes (with the brows' lower edge) and the lips with some margin in
# the project's crop of tests/data/media/photo_512.png (eyes near y = 0.38, mouth near y = 0.66).
FIXED_EYE_BOX = (0.27, 0.35, 0.73, 0.50)
FIXED_MOUTH_BOX = (0.35, 0.60, 0.65, 0.78)


class VGG19Features(nn.Module):
    """VGG19 convolutions up to relu5_1 (torchvision indices 0–29) → the five tapped activations.

    Input `[B, 3, H, W]` already normalised with the ImageNet mean and std; output a list of
    `[B, 64/d, H, W]`, `[B, 128/d, H/2, W/2]`, `[B, 256/d, H/4, W/4]`, `[B, 512/d, H/8, W/8]`,
    `[B, 512/d, H/16, W/16]` with d = `channel_divisor` (1: VGG19 itself; larger values give a thin
    network of the same shape for tests). Random weights (`torch.manual_seed` decides) until
    `load_vgg19` fills them.
    """

    def __init__(self, channel_divisor: int = 1):
        super().__init__()
        if channel_divisor < 1 or 64 % channel_divisor:
            raise InputError(f"channel_divisor must divide 64, got {channel_divisor}")
        self.channel_divisor = channel_divisor
        layers: list[nn.Module] = []
        channels = 3
        for item in VGG19_LAYOUT:
            if len(layers) > FEATURE_TAPS[-1]:
                break
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                width = item // channel_divisor
                layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
                channels = width
        self.features = nn.Sequential(*layers[:FEATURE_TAPS[-1] + 1])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in FEATURE_TAPS:
                taps.append(x)
        return taps


def _state_tensors(raw: Mapping) -> dict[str, torch.Tensor]:
    tensors = raw["state_dict"] if isinstance(raw.get("state_dict"), Mapping) else raw
    return {k: v for k, v in tensors.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def has_vgg19_weights(raw: Mapping) -> bool:
    """Whether a loaded file (`safe_read.read_file`) holds VGG19 weights: torchvision's `features.*`
    or an official training checkpoint's loss network (`criterion_vgg.vgg.*`)."""
    return any(k.startswith((CHECKPOINT_VGG_PREFIX, "features.0.")) for k in _state_tensors(raw))


def _vgg_entries(raw: Mapping, source: str) -> dict[str, torch.Tensor]:
    """`features.N.*` tensors of a torchvision state dict or of an official training checkpoint."""
    tensors = _state_tensors(raw)
    if not any(k.startswith(CHECKPOINT_VGG_PREFIX) for k in tensors):
        return tensors
    out = {}
    for key, value in tensors.items():
        parts = key[len(CHECKPOINT_VGG_PREFIX):].split(".")
        if key.startswith(CHECKPOINT_VGG_PREFIX) and len(parts) == 3 and parts[0].startswith("slice"):
            out[f"features.{parts[1]}.{parts[2]}"] = value
    log.info("%s: using the loss network stored under %s*", source, CHECKPOINT_VGG_PREFIX)
    return out


def load_vgg19(weights: str | os.PathLike | Mapping, source: str | None = None) -> VGG19Features:
    """A frozen `VGG19Features` (eval mode, no gradients) filled from a weights file or its loaded mapping.

    Accepted: torchvision's `vgg19` ImageNet state dict (`vgg19-dcbb9e9d.pth`, or the same tensors as
    `.safetensors`), read with `weights_only=True`; its classifier and the convolutions after relu5_1
    (`features.30`–`34`) are not used and are dropped. Also an official IMTalker training checkpoint that
    carries its loss network (`criterion_vgg.vgg.slice<k>.<N>.*`). The width is read from the first
    convolution (64 filters: VGG19 itself); every convolution up to relu5_1 must then be present with
    that network's shape, else `CheckpointError` naming `source`.
    """
    if isinstance(weights, Mapping):
        raw, source = weights, source or "the given VGG19 weights"
    else:
        source = os.fspath(weights)
        raw = read_file(source)
    entries = _vgg_entries(raw, source)
    first = entries.get("features.0.weight")
    if first is None or first.ndim != 4 or first.shape[0] == 0 or 64 % first.shape[0]:
        raise CheckpointError(f"{source} is not a torchvision VGG19 state dict (no usable features.0.weight); "
                              "give torchvision's vgg19 ImageNet weights (e.g. vgg19-dcbb9e9d.pth) as a .pth or "
                              ".safetensors file")
    vgg = VGG19Features(64 // first.shape[0])
    own = vgg.state_dict()

    def past_relu5_1(key: str) -> bool:
        index = key.split(".")[1] if key.startswith("features.") else ""
        return index.isdigit() and int(index) > FEATURE_TAPS[-1]

    unused = [k for k in entries if k not in own and (k.startswith("classifier.") or past_relu5_1(k))]
    entries = {k: v for k, v in entries.items() if k not in unused}
    parts = key_mismatches(own, entries)
    if parts:
        raise CheckpointError(f"{source} is not a torchvision VGG19 state dict: " + "; ".join(parts) + ". Give "
                              "torchvision's vgg19 ImageNet weights (e.g. vgg19-dcbb9e9d.pth) as a .pth or "
                              ".safetensors file.")
    bad = [k for k, v in entries.items() if not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{source} has NaN/inf values in {bad[0]}; get the VGG19 weights file again")
    if unused:
        log.debug("%s: %d VGG19 entries past relu5_1 are not used (e.g. %s)", source, len(unused), unused[0])
    vgg.load_state_dict({k: v.float() for k, v in entries.items()}, strict=True)
    return vgg.eval().requires_grad_(False)


def gaussian_downsample(images: torch.Tensor, scale: float) -> torch.Tensor:
    """Band-limited downsampling by `1/scale` (an integer): Gaussian blur, then every (1/scale)-th pixel.

    σ = (1/scale − 1) / 2 and kernel size 2·round(4σ) + 1, zero padding (`[B, C, H, W]` →
    `[B, C, H·scale, W·scale]`); scale 1 returns the input.
    """
    if scale == 1.0:
        return images
    step = round(1 / scale)
    sigma = (1 / scale - 1) / 2
    size = 2 * round(sigma * 4) + 1
    grid = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    taps = torch.exp(-grid ** 2 / (2 * sigma ** 2))
    kernel = taps[:, None] * taps[None, :]
    kernel = (kernel / kernel.sum()).to(images)
    c = images.shape[1]
    pad = size // 2
    blurred = F.conv2d(F.pad(images, (pad, pad, pad, pad)), kernel.expand(c, 1, size, size), groups=c)
    return blurred[:, :, ::step, ::step]


class PerceptualLoss(nn.Module):
    """Multi-scale VGG19 L1 loss on the whole frame and inside a region mask (the reference's `VGGLoss_mask`).

    `forward(pred, target, mask)`: frames `[B, 3, H, W]` in [0, 1], mask `[B, 1, H, W]` (1 inside the
    eye/mouth regions; the reference adds the eye and mouth masks, so overlaps count twice). Returns
    `(whole, region)` scalars:

    - whole = Σ_scales Σ_layers mean |φ(pred) − φ(target)|;
    - region = Σ_scales Σ_layers Σ|(φ(pred) − φ(target))·m| / Σ m, with the mask resized (nearest) to
      the layer and broadcast over its channels, so it is a per-pixel sum over channels; a layer whose
      resized mask is empty adds nothing.

    Target features carry no gradient. `reference_input_mapping` (default True) feeds VGG
    `clamp(x, −1, 1)/2 + 0.5` before the ImageNet normalisation, as the reference does although its
    frames are in [0, 1] (VGG then sees [0.5, 1]); False feeds the [0, 1] frames as they are.
    """

    def __init__(self, vgg: VGG19Features, scales: Sequence[float] = PYRAMID_SCALES,
                 layer_weights: Sequence[float] = LAYER_WEIGHTS, reference_input_mapping: bool = True):
        super().__init__()
        if len(layer_weights) != len(FEATURE_TAPS):
            raise InputError(f"layer_weights needs {len(FEATURE_TAPS)} values (relu1_1 … relu5_1), "
                             f"got {len(layer_weights)}")
        self.vgg = vgg.eval().requires_grad_(False)
        self.scales = tuple(float(s) for s in scales)
        self.layer_weights = tuple(float(w) for w in layer_weights)
        self.reference_input_mapping = reference_input_mapping
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> PerceptualLoss:
        super().train(mode)
        self.vgg.eval()  # the loss network is frozen whatever mode the training loop sets
        return self

    def _features(self, images: torch.Tensor) -> list[torch.Tensor]:
        if self.reference_input_mapping:
            # parity: the reference maps [-1, 1] to [0, 1] here although its frames are already in [0, 1].
            images = images.clamp(-1, 1) / 2 + 0.5
        return self.vgg((images - self.mean) / self.std)

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if pred.shape != target.shape or mask.shape[0] != pred.shape[0] or mask.shape[-2:] != pred.shape[-2:]:
            raise ValueError(f"pred {tuple(pred.shape)}, target {tuple(target.shape)} and mask {tuple(mask.shape)} "
                             "must share batch and size")
        whole = pred.new_zeros(())
        region = pred.new_zeros(())
        mask = mask.to(pred.dtype)
        for scale in self.scales:
            pred_feats = self._features(gaussian_downsample(pred, scale))
            with torch.no_grad():
                target_feats = self._features(gaussian_downsample(target, scale))
            scaled_mask = mask if scale == 1.0 else F.interpolate(mask, scale_factor=scale, mode="nearest",
                                                                  recompute_scale_factor=True)
            for weight, fp, ft in zip(self.layer_weights, pred_feats, target_feats):
                diff = (fp - ft).abs()
                whole = whole + diff.mean() * weight
                m = F.interpolate(scaled_mask, size=fp.shape[-2:], mode="nearest")
                total = m.sum()
                if total > 1e-6:
                    region = region + (diff * m).sum() / total * weight
        return whole, region


def eye_mouth_masks(landmarks: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Eye and mouth masks `[size, size]` float32 in {0, 1} from 68 landmarks `[68, 2]` (x, y pixels
    of the `size`² crop), as the reference's data loader draws them: both eye polygons and the convex
    hull of the outer lip, filled, then each dilated twice with a 7×7 square."""
    import cv2

    points = np.asarray(landmarks, dtype=np.float64)
    if points.shape != (68, 2) or not np.isfinite(points).all():
        raise InputError(f"landmarks must be 68 finite (x, y) points, got an array of shape {points.shape}")
    # parity: pixel coordinates are truncated toward zero, as int() does in the reference.
    pixels = points.astype(np.int32)
    kernel = np.ones((MASK_KERNEL, MASK_KERNEL), dtype=np.uint8)
    eyes = np.zeros((size, size), dtype=np.uint8)
    for idx in (LEFT_EYE, RIGHT_EYE):
        cv2.fillConvexPoly(eyes, pixels[list(idx)], 255)
    mouth = np.zeros((size, size), dtype=np.uint8)
    cv2.fillConvexPoly(mouth, cv2.convexHull(pixels[list(OUTER_LIP)]), 255)
    eyes = cv2.dilate(eyes, kernel, iterations=EYE_DILATIONS)
    mouth = cv2.dilate(mouth, kernel, iterations=MOUTH_DILATIONS)
    return (eyes > 0).astype(np.float32), (mouth > 0).astype(np.float32)


def fixed_region_masks(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Eye and mouth masks `[size, size]` float32 in {0, 1} from fixed boxes of the aligned face crop
    (`FIXED_EYE_BOX`, `FIXED_MOUTH_BOX`): the fallback when a clip has no landmarks."""
    out = []
    for x0, y0, x1, y1 in (FIXED_EYE_BOX, FIXED_MOUTH_BOX):
        m = np.zeros((size, size), dtype=np.float32)
        m[int(y0 * size):int(y1 * size), int(x0 * size):int(x1 * size)] = 1.0
        out.append(m)
    return out[0], out[1]
