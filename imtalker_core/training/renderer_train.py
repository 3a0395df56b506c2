"""Training and fine-tuning the renderer (paper §3.2; the reference's renderer/train.py).

One step, on a batch of `RendererPairs` items (a source frame s and a target frame t of the same clip, a
frame n of another clip, and the eye + mouth mask of t):

- forward: identities `f_s, i_s = E_id(s)`, `i_t = E_id(t)`, `i_n = E_id(n)` (three calls, so BatchNorm sees
  each set alone, as in the reference); motion `m_s = E_m(s)`, `m_t = E_m(t)`; the prediction
  `t̂ = render(D_m(Φ(m_t, i_s)), D_m(Φ(m_s, i_s)), f_s)`;
- discriminator step (first, on `t̂` detached): non-saturating logistic loss of `D(t)` against `D(t̂)`,
  summed over the discriminator's two scales;
- generator step (against the updated, frozen discriminator):
  `l1 · |t̂ − t|₁ + vgg · VGG(t̂, t) + vgg_face · VGG_mask(t̂, t) + distance · L_dist + gan · softplus(−D(t̂))`,
  with the motion-distance consistency loss
  `L_dist = mean_b | ‖m_t − Φ(m_t, i_t)‖₂ − ‖m_t − Φ(m_t, i_n)‖₂ |`: the same motion adapted to its own
  identity and to another identity must move equally far from the unadapted latent (the paper writes an L1
  distance; the reference's code, followed here, the L2 norm over the 32 latent dimensions);
- both networks: Adam β = (0.5, 0.999), gradients clipped at norm 1; the discriminator's LR is
  `lr · gan` (the reference's rule). Default weights: L1 1, VGG 10, VGG-face 100, distance 1, GAN 1.

The LR follows `engine.cosine_schedule` from `lr` to `final_lr`, stepped per optimizer step. The reference
anneals to `eta_min = 1e-4`, its own LR, so its rate is constant: `final_lr = 1e-4` (the default) keeps
that, a lower value gives a real cosine decay.

Parameters that never take part in a forward pass (the identity encoder's `equalconv`, kept only so the
official file loads; the motion decoder's noise strengths, since IMTalker never injects noise) are frozen:
they would get no gradient anyway, and DDP then needs no unused-parameter search.

A run folder holds `config.json`, `log.jsonl`, `checkpoints/step-*/` (parts "renderer", with the official
`gen.*` names, and "discriminator", `disc.*`; see `engine`), `previews/step-*.png` (rows: source | target |
prediction, rendered in eval mode) and at the end `renderer.safetensors` (plus `renderer_ema.safetensors`
when an EMA is kept): bare state dicts that `load_renderer(path)` loads strictly (`cfg=` for the tiny
architecture).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import config_metadata
from ..config import RendererConfig, tiny_renderer_config
from ..errors import InputError
from ..renderer import IMTRenderer
from . import engine
from .data import clip_ids, read_manifest
from .discriminator import (
    DiscriminatorConfig,
    PatchDiscriminator,
    discriminator_loss,
    generator_adversarial_loss,
    load_discriminator_state,
    tiny_discriminator_config,
)
from .perceptual import (
    PerceptualLoss,
    eye_mouth_masks,
    fixed_region_masks,
    has_vgg19_weights,
    load_vgg19,
)

log = logging.getLogger(__name__)

ARCHITECTURES = ("official", "tiny")
# Parameters of the official structure that no forward pass uses (see the module docstring).
NEVER_USED = ("dense_feature_encoder.equalconv.",)
NEVER_USED_SUFFIXES = (".noise.weight",)
DISCRIMINATOR_PREFIX = "disc."
PREVIEW_PAIRS = 4


@dataclass(frozen=True)
class LossWeights:
    """Weights of the generator's loss terms (the reference's defaults). `gan` also scales the
    discriminator's LR; 0 turns the discriminator off."""

    l1: float = 1.0
    vgg: float = 10.0
    vgg_face: float = 100.0
    distance: float = 1.0
    gan: float = 1.0

    def __post_init__(self) -> None:
        for term in dataclasses.fields(self):
            value = getattr(self, term.name)
            if not value >= 0:
                raise InputError(f"loss weight {term.name}={value} must be zero or positive")

    @property
    def needs_vgg(self) -> bool:
        return self.vgg > 0 or self.vgg_face > 0


@dataclass(frozen=True)
class RendererTrainConfig:
    """Settings of one renderer training run (defaults: the reference's).

    data: a prepared folder with frames (`prepare-data --frames png|tensor`); output: the run folder.
    init: renderer file to start from (the official `renderer.ckpt`, or a `.safetensors` of ours); its
    `disc.*` entries, when present, start the discriminator too; None trains from scratch. vgg_weights:
    torchvision's VGG19 ImageNet weights (`vgg19-dcbb9e9d.pth` or `.safetensors`); may be omitted when
    `init` carries the loss network (`criterion_vgg.*`) or when both VGG weights are 0. architecture:
    "official" (512², 124M parameters) or "tiny" (128², tests and smoke runs); the data's frame size must
    match. steps: total optimizer steps of the run (a resumed run continues up to it). batch_size: pairs per
    process and micro-step, at most 4 or a multiple of 4 (the discriminator's standard-deviation groups).
    ema_decay: 0 keeps no EMA (the reference keeps none). reference_vgg_input: feed VGG as the reference
    does (see `perceptual.PerceptualLoss`). resume: continue from the newest checkpoint in
    `output/checkpoints` when there is one (False refuses a folder that has checkpoints).
    """

    data: str
    output: str
    init: str | None = None
    vgg_weights: str | None = None
    architecture: str = "official"
    steps: int = 7_000_000
    batch_size: int = 4
    lr: float = 1e-4
    final_lr: float = 1e-4
    warmup: int = 0
    betas: tuple[float, float] = (0.5, 0.999)
    weights: LossWeights = LossWeights()
    ema_decay: float = 0.0
    clip_grad_norm: float = 1.0
    reference_vgg_input: bool = True
    mixed_precision: str = "no"
    cpu: bool = False
    seed: int = 0
    num_workers: int = 2
    gradient_accumulation_steps: int = 1
    log_every: int = 50
    checkpoint_every: int = 5000
    keep_checkpoints: int = 2
    preview_every: int = 5000
    resume: bool = True

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise InputError(f"architecture={self.architecture!r}: use one of {', '.join(ARCHITECTURES)}")
        if self.steps < 1:
            raise InputError(f"steps must be positive, got {self.steps}")
        if self.batch_size < 1 or (self.batch_size > 4 and self.batch_size % 4):
            raise InputError(f"batch_size={self.batch_size}: use 1 to 4 or a multiple of 4 (the discriminator "
                             "compares images in groups of 4)")
        if self.lr <= 0:
            raise InputError(f"lr must be positive, got {self.lr}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise InputError(f"ema_decay must be in [0, 1) (0: no EMA), got {self.ema_decay}")
        # A config read back from config.json holds a dict and a list here.
        if isinstance(self.weights, Mapping):
            object.__setattr__(self, "weights", LossWeights(**self.weights))
        object.__setattr__(self, "betas", tuple(self.betas))

    def renderer_config(self) -> RendererConfig:
        return tiny_renderer_config() if self.architecture == "tiny" else RendererConfig()

    def discriminator_config(self) -> DiscriminatorConfig:
        size = self.renderer_config().image_size
        return tiny_discriminator_config(size) if self.architecture == "tiny" else DiscriminatorConfig(image_size=size)


# --- the objective ---------------------------------------------------------------------------------------------


def render_pair(renderer: IMTRenderer, source: torch.Tensor, target: torch.Tensor, negative: torch.Tensor
                ) -> dict[str, torch.Tensor]:
    """The training forward pass on frames `[B, 3, S, S]` in [0, 1] (source, target of the same clip,
    negative of another clip).

    Returns "pred" `[B, 3, S, S]` (the target's motion rendered onto the source), "motion" `[B, 32]`
    (the target's unadapted latent m_t), "adapted_own" Φ(m_t, i_t) and "adapted_other" Φ(m_t, i_n),
    both `[B, 32]`.
    """
    features, id_source = renderer.encode_identity(source)
    _, id_target = renderer.encode_identity(target)
    _, id_negative = renderer.encode_identity(negative)
    motion_source = renderer.encode_motion(source)
    motion_target = renderer.encode_motion(target)
    driving = renderer.decode_motion(renderer.adapt(motion_target, id_source))
    source_maps = renderer.decode_motion(renderer.adapt(motion_source, id_source))
    pred = renderer.render(driving, source_maps, features)
    return {"pred": pred, "motion": motion_target,
            "adapted_own": renderer.adapt(motion_target, id_target),
            "adapted_other": renderer.adapt(motion_target, id_negative)}


def distance_loss(motion: torch.Tensor, adapted_own: torch.Tensor, adapted_other: torch.Tensor) -> torch.Tensor:
    """Motion-distance consistency: `mean_b |‖m − Φ(m, i_own)‖₂ − ‖m − Φ(m, i_other)‖₂|` over latents `[B, D]`.

    Exactly 0 when Φ ignores the identity (both adapted latents equal)."""
    return (torch.norm(motion - adapted_own, dim=1) - torch.norm(motion - adapted_other, dim=1)).abs().mean()


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Parameters of `module` need no gradient inside the block (the generator step's discriminator)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def generator_losses(outputs: Mapping[str, torch.Tensor], target: torch.Tensor, mask: torch.Tensor,
                     discriminator: nn.Module | None, perceptual: PerceptualLoss | None,
                     weights: LossWeights) -> dict[str, torch.Tensor]:
    """The generator's terms and their weighted sum "total" (scalars), from `render_pair`'s outputs.

    target `[B, 3, S, S]` in [0, 1]; mask `[B, 1, S, S]` (eyes + mouth of the target). Terms whose weight
    is 0 are not computed (reported as 0): "vgg"/"vgg_face" need `perceptual`, "gan" the discriminator,
    which is frozen while its logits are taken.
    """
    pred = outputs["pred"]
    zero = pred.new_zeros((), dtype=torch.float32)
    terms = {"l1": F.l1_loss(pred, target), "vgg": zero, "vgg_face": zero, "gan": zero,
             "distance": distance_loss(outputs["motion"], outputs["adapted_own"], outputs["adapted_other"])}
    if weights.needs_vgg:
        if perceptual is None:
            raise InputError("the VGG loss weights are not 0 but no VGG19 network was given")
        terms["vgg"], terms["vgg_face"] = perceptual(pred, target, mask)
    if weights.gan > 0:
        if discriminator is None:
            raise InputError("the GAN loss weight is not 0 but no discriminator was given")
        with frozen(discriminator):
            terms["gan"] = generator_adversarial_loss(discriminator(pred))
    terms["total"] = (weights.l1 * terms["l1"] + weights.vgg * terms["vgg"] + weights.vgg_face * terms["vgg_face"]
                      + weights.distance * terms["distance"] + weights.gan * terms["gan"])
    return terms


def renderer_losses(renderer: IMTRenderer, discriminator: nn.Module | None, vgg: PerceptualLoss | None,
                    batch: Mapping[str, torch.Tensor], weights: LossWeights = LossWeights()
                    ) -> dict[str, torch.Tensor]:
    """Every loss of one training step, without optimizer steps (for evaluation and tests).

    batch: "source", "target", "negative" `[B, 3, S, S]` in [0, 1] and "mask" `[B, 1, S, S]`. Returns the
    generator's terms (`generator_losses`: "l1", "vgg", "vgg_face", "distance", "gan", "total") and
    "discriminator", the discriminator's loss on the target against the detached prediction (0 without one).
    In training the discriminator steps between the two, so its generator term uses the updated network.
    """
    outputs = render_pair(renderer, batch["source"], batch["target"], batch["negative"])
    terms = generator_losses(outputs, batch["target"], batch["mask"], discriminator, vgg, weights)
    if discriminator is not None and weights.gan > 0:
        terms["discriminator"] = discriminator_loss(discriminator(batch["target"]),
                                                    discriminator(outputs["pred"].detach()))
    else:
        terms["discriminator"] = torch.zeros((), device=terms["total"].device)
    return terms


class RendererObjective(nn.Module):
    """The renderer (attribute `gen`, the official checkpoint's name) with `render_pair` as `forward`, so
    DDP sees one forward per step: `forward(batch)` → `render_pair(gen, source, target, negative)`."""

    def __init__(self, renderer: IMTRenderer):
        super().__init__()
        self.gen = renderer

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return render_pair(self.gen, batch["source"], batch["target"], batch["negative"])


class DiscriminatorObjective(nn.Module):
    """The discriminator (attribute `disc`, official name) with its loss as `forward(real, fake)` (one DDP
    forward for both halves, each judged alone as in the reference)."""

    def __init__(self, discriminator: PatchDiscriminator):
        super().__init__()
        self.disc = discriminator

    def forward(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        return discriminator_loss(self.disc(real), self.disc(fake))


def freeze_never_used(renderer: IMTRenderer) -> list[str]:
    """Freeze the parameters no forward pass uses (`NEVER_USED`); returns their names."""
    names = []
    for name, param in renderer.named_parameters():
        if name.startswith(NEVER_USED) or name.endswith(NEVER_USED_SUFFIXES):
            param.requires_grad_(False)
            names.append(name)
    return names


# --- data ------------------------------------------------------------------------------------------------------


class RendererPairs(torch.utils.data.Dataset):
    """Training pairs of the renderer from a prepared folder with frames, one item per clip.

    An item (`dataset[SampleKey(clip, seed)]`, or `dataset[i]` with seed i) is a dict of float32 tensors:
    "source" and "target" `[3, S, S]` in [0, 1], two different uniformly random frames of the clip; "negative"
    `[3, S, S]`, a random frame of another uniformly random clip (the distance loss's other identity); "mask"
    `[1, S, S]`, the target's eye mask plus its mouth mask. Masks come from 68-point landmarks when the clip
    file holds "landmarks" `[T, 68, 2]` (x, y pixels of the crop), drawn as the reference does
    (`perceptual.eye_mouth_masks`); otherwise fixed regions of the aligned crop (`fixed_region_masks`).
    Clips with fewer than 2 frames are left out; at least 2 clips are needed.
    """

    def __init__(self, folder: str | os.PathLike, clips: Sequence[str] | None = None, image_size: int | None = None):
        self.folder = Path(folder)
        manifest = read_manifest(self.folder)
        if manifest.get("frames_format") not in ("png", "tensor"):
            raise InputError(f"{self.folder} was prepared without frames; prepare it again with --frames png or "
                             "--frames tensor to train the renderer")
        self.size = int(manifest["image_size"])
        if image_size is not None and image_size != self.size:
            raise InputError(f"{self.folder} holds {self.size}² frames but the renderer takes {image_size}²; "
                             f"prepare the data with a {image_size}² renderer or pick the matching architecture")
        usable = clip_ids(self.folder, 2)
        wanted = list(clips) if clips is not None else usable
        self.clips = [c for c in wanted if c in usable]
        if len(self.clips) < 2:
            raise InputError(f"{self.folder} has {len(self.clips)} usable clip(s) with frames; the distance loss "
                             "needs frames of at least 2 clips (2 identities)")
        self.entries = [manifest["clips"][c] for c in self.clips]
        self.frames_format = manifest["frames_format"]
        eyes, mouth = fixed_region_masks(self.size)
        self._fixed_mask = torch.from_numpy(eyes + mouth)[None]

    def __len__(self) -> int:
        return len(self.clips)

    def frame(self, clip: int, t: int) -> torch.Tensor:
        """Frame t of clip number `clip`: `[3, S, S]` float32 in [0, 1]."""
        entry = self.entries[clip]
        path = self.folder / entry["frames_file"]
        if self.frames_format == "tensor":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                pixels = f.get_slice("frames")[t]
        else:
            import cv2

            image = cv2.imread(str(path / f"{t:06d}.png"), cv2.IMREAD_COLOR)
            if image is None:
                raise InputError(f"cannot read {path / f'{t:06d}.png'}; prepare the clip again")
            pixels = torch.from_numpy(np.ascontiguousarray(image[:, :, ::-1]))
        if tuple(pixels.shape) != (self.size, self.size, 3):
            raise InputError(f"frame {t} of {path} is {tuple(pixels.shape)}, not {self.size}×{self.size}×3; "
                             "prepare the clip again")
        return pixels.permute(2, 0, 1).float().div(255.0)

    def mask(self, clip: int, t: int) -> torch.Tensor:
        """Eye + mouth mask `[1, S, S]` of frame t of clip number `clip`."""
        from safetensors import safe_open

        with safe_open(str(self.folder / self.entries[clip]["clip_file"]), "pt") as f:
            if "landmarks" not in f.keys():  # noqa: SIM118 - safe_open handles have no __contains__
                return self._fixed_mask.clone()
            landmarks = f.get_slice("landmarks")[t].numpy()
        eyes, mouth = eye_mouth_masks(landmarks, self.size)
        return torch.from_numpy(eyes + mouth)[None]

    def __getitem__(self, key: engine.SampleKey | int) -> dict[str, torch.Tensor]:
        index, seed = (key.index, key.seed) if isinstance(key, engine.SampleKey) else (int(key), int(key))
        rng = np.random.default_rng(seed)
        count = self.entries[index]["frames"]
        t_source, t_target = (int(t) for t in rng.choice(count, size=2, replace=False))
        other = int(rng.integers(0, len(self.clips) - 1))
        other += other >= index  # any clip but this one
        t_other = int(rng.integers(0, self.entries[other]["frames"]))
        return {"source": self.frame(index, t_source), "target": self.frame(index, t_target),
                "negative": self.frame(other, t_other), "mask": self.mask(index, t_target)}


# --- the run ---------------------------------------------------------------------------------------------------


def _state_tensors(raw: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    state = raw["state_dict"] if isinstance(raw.get("state_dict"), Mapping) else raw
    return {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def build_models(config: RendererTrainConfig) -> tuple[IMTRenderer, PatchDiscriminator, PerceptualLoss | None]:
    """The renderer (train mode, never-used parameters frozen), the discriminator and the perceptual loss.

    From `config.init` when given: the renderer strictly, the discriminator from the file's `disc.*`
    entries when it has them (strictly) and otherwise fresh; the VGG19 from `config.vgg_weights`, else from
    the init file's loss network. `InputError` when the VGG terms are weighted but no VGG19 is available.
    """
    from ..checkpoints import load_strict, model_entries
    from ..safe_read import read_file

    renderer = IMTRenderer(config.renderer_config())
    discriminator = PatchDiscriminator(config.discriminator_config())
    raw: Mapping[str, Any] = {}
    if config.init:
        source = os.fspath(config.init)
        raw = read_file(source)
        load_strict(renderer, model_entries(raw, "renderer", source=source), source, "renderer")
        disc_entries = {k[len(DISCRIMINATOR_PREFIX):]: v for k, v in _state_tensors(raw).items()
                        if k.startswith(DISCRIMINATOR_PREFIX)}
        if disc_entries:
            load_discriminator_state(discriminator, disc_entries, source)
            log.info("starting from %s (renderer and discriminator)", source)
        else:
            log.info("starting from %s; the discriminator starts from scratch (the file has no disc.* entries)",
                     source)
    else:
        log.info("training a %s renderer from scratch (%d parameters)", config.architecture,
                 sum(p.numel() for p in renderer.parameters()))
    perceptual = None
    if config.weights.needs_vgg:
        if config.vgg_weights:
            vgg = load_vgg19(config.vgg_weights)
        elif raw and has_vgg19_weights(raw):
            vgg = load_vgg19(raw, os.fspath(config.init))
        else:
            raise InputError("the perceptual loss needs VGG19 weights: pass torchvision's vgg19 ImageNet file "
                             "(vgg19-dcbb9e9d.pth) with --vgg-weights, or set both VGG loss weights to 0")
        perceptual = PerceptualLoss(vgg, reference_input_mapping=config.reference_vgg_input)
    frozen_names = freeze_never_used(renderer)
    log.debug("frozen (never used): %s", ", ".join(frozen_names))
    return renderer.float().train(), discriminator.float().train(), perceptual


def _write_preview(path: Path, rows: Sequence[torch.Tensor]) -> None:
    """A PNG of `rows`, each `[3, S, 3·S]` in [0, 1], stacked vertically."""
    from PIL import Image

    from ..media.images import to_uint8

    grid = torch.cat(list(rows), dim=1).permute(1, 2, 0).float().cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    Image.fromarray(to_uint8(grid)).save(part, format="PNG")
    os.replace(part, path)


def make_preview(renderer: IMTRenderer, items: Sequence[Mapping[str, torch.Tensor]], path: Path
                 ) -> dict[str, float]:
    """Render each item's target motion onto its source in eval mode, write `path` (rows source | target |
    prediction) and return the mean L1 of the predictions; the renderer's mode is restored."""
    was_training = renderer.training
    renderer.eval()
    param = next(renderer.parameters())
    rows, errors = [], []
    try:
        with torch.no_grad():
            for item in items:
                source = item["source"][None].to(param.device, param.dtype)
                target = item["target"][None].to(param.device, param.dtype)
                pred = renderer(target, source).float()
                errors.append(F.l1_loss(pred, target.float()).item())
                rows.append(torch.cat([source[0].float(), target[0].float(), pred[0]], dim=2))
    finally:
        renderer.train(was_training)
    _write_preview(path, rows)
    return {"l1": float(np.mean(errors))}


def _export(renderer_part: engine.Part, output: Path, cfg: RendererConfig, steps: int) -> dict[str, Path]:
    """Bare renderer state dicts (without the `gen.` prefix) for `load_renderer`."""
    model = engine.unwrap(renderer_part.model)
    metadata = {"imtalker_kind": "renderer", **config_metadata(cfg), "steps": str(steps)}
    exports = {"trained": output / "renderer.safetensors"}
    engine.export_safetensors(model.gen, exports["trained"], metadata)
    if renderer_part.ema is not None:
        prefix = "gen."
        merged = renderer_part.ema.merged_state_dict(model)
        exports["ema"] = output / "renderer_ema.safetensors"
        engine.export_safetensors({k[len(prefix):]: v for k, v in merged.items() if k.startswith(prefix)},
                                  exports["ema"], {**metadata, "ema_decay": str(renderer_part.ema.decay)})
    return exports


def train_renderer(config: RendererTrainConfig) -> dict[str, Any]:
    """Run (or resume) a renderer training run; returns {"steps", "exports": {"trained"[, "ema"]} paths,
    "checkpoint"}."""
    output = Path(config.output)
    dataset = RendererPairs(config.data, image_size=config.renderer_config().image_size)
    accelerator = engine.make_accelerator(config.mixed_precision, config.cpu, config.seed,
                                          config.gradient_accumulation_steps)
    renderer, discriminator, perceptual = build_models(config)
    weights = config.weights
    g_model = RendererObjective(renderer)
    d_model = DiscriminatorObjective(discriminator)
    betas = tuple(config.betas)
    g_opt = torch.optim.Adam([p for p in g_model.parameters() if p.requires_grad], lr=config.lr, betas=betas)
    # parity: the reference's discriminator learns at lr · gan weight.
    d_lr = config.lr * weights.gan
    d_opt = torch.optim.Adam(d_model.parameters(), lr=d_lr, betas=betas)
    g_model, g_opt, d_model, d_opt = accelerator.prepare(g_model, g_opt, d_model, d_opt)
    if perceptual is not None:
        perceptual = perceptual.to(accelerator.device)
    g_sched = engine.cosine_schedule(g_opt, config.steps, config.warmup, config.final_lr)
    d_sched = engine.cosine_schedule(d_opt, config.steps, config.warmup, min(config.final_lr, d_lr))
    ema = engine.EMA(g_model, config.ema_decay) if config.ema_decay > 0 else None
    clip = config.clip_grad_norm or None
    g_part = engine.Part("renderer", g_model, g_opt, g_sched, ema, clip)
    d_part = engine.Part("discriminator", d_model, d_opt, d_sched, None, clip)
    parts = [g_part, d_part]
    checkpoints = output / "checkpoints"
    start = 0
    if engine.latest_checkpoint(checkpoints) is not None:
        if not config.resume:
            raise InputError(f"{output} already holds a run's checkpoints; resume it or choose another output folder")
        start = engine.resume(checkpoints, accelerator, parts)
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        with open(output / "config.json", "w", encoding="utf-8") as f:
            json.dump(dataclasses.asdict(config), f, indent=1)
    disc = engine.unwrap(d_model).disc

    def step_fn(batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        outputs = g_model(batch)
        values: dict[str, torch.Tensor] = {}
        if weights.gan > 0:
            loss_d = d_model(batch["target"], outputs["pred"].detach())
            engine.optimize(accelerator, d_part, loss_d)
            values["discriminator"] = loss_d
        terms = generator_losses(outputs, batch["target"], batch["mask"], disc, perceptual, weights)
        norm = engine.optimize(accelerator, g_part, terms["total"])
        values.update(terms)
        if norm is not None:
            values["grad_norm"] = norm
        return values

    preview = None
    if config.preview_every:
        items = [dataset[engine.SampleKey(i % len(dataset), 12345 + i)] for i in range(PREVIEW_PAIRS)]

        def preview(step: int) -> dict[str, float]:
            return make_preview(engine.unwrap(g_model).gen, items, output / "previews" / f"step-{step:08d}.png")

    batches = engine.step_batches(dataset, config.batch_size, config.seed, accelerator,
                                  num_workers=config.num_workers)
    steps = engine.train_loop(accelerator, parts, step_fn, batches, config.steps, start_step=start,
                              log_every=config.log_every, checkpoint_dir=checkpoints,
                              checkpoint_every=config.checkpoint_every, keep_checkpoints=config.keep_checkpoints,
                              preview_fn=preview, preview_every=config.preview_every,
                              log_file=output / "log.jsonl", extra_state={"config": dataclasses.asdict(config)})
    exports: dict[str, Path] = {}
    if accelerator.is_main_process:
        exports = _export(g_part, output, renderer.cfg, steps)
    accelerator.wait_for_everyone()
    return {"steps": steps, "exports": exports, "checkpoint": engine.latest_checkpoint(checkpoints)}


# --- command line ----------------------------------------------------------------------------------------------


def register(subparsers) -> None:
    """Add the `train-renderer` subcommand to the CLI's subparsers; it sets `handler` (a function of the
    parsed arguments returning the exit status)."""
    t = subparsers.add_parser("train-renderer", help="train or fine-tune the renderer",
                              description="GAN training of the renderer on prepared clips with frames (prepare-data "
                                          "--frames png|tensor). Multi-GPU: accelerate launch -m imtalker_core "
                                          "train-renderer …")
    d = RendererTrainConfig
    w = LossWeights()
    t.add_argument("data", type=Path, help="prepared data folder with frames")
    t.add_argument("output", type=Path, help="run folder: config, log.jsonl, checkpoints, previews, exported weights")
    t.add_argument("--init", type=Path, default=None,
                   help="start from this renderer file (renderer.ckpt or .safetensors); omit to train from scratch")
    t.add_argument("--vgg-weights", type=Path, default=None,
                   help="torchvision's VGG19 ImageNet weights (vgg19-dcbb9e9d.pth or .safetensors) for the "
                        "perceptual loss; not needed when --init carries the loss network")
    t.add_argument("--architecture", choices=ARCHITECTURES, default=d.architecture)
    t.add_argument("--steps", type=int, default=d.steps, help="total optimizer steps of the run")
    t.add_argument("--batch-size", type=int, default=d.batch_size, help="pairs per GPU and micro-step (≤ 4 or ×4)")
    t.add_argument("--lr", type=float, default=d.lr)
    t.add_argument("--final-lr", type=float, default=d.final_lr,
                   help="LR at the end of the cosine decay (default 1e-4, the reference's: with the default lr the "
                        "rate stays constant)")
    t.add_argument("--warmup", type=int, default=d.warmup, help="linear LR warm-up steps")
    for name in ("l1", "vgg", "vgg_face", "distance", "gan"):
        t.add_argument(f"--loss-{name.replace('_', '-')}", dest=f"loss_{name}", type=float,
                       default=getattr(w, name), help=f"weight of the {name} term")
    t.add_argument("--ema-decay", type=float, default=d.ema_decay, help="0: keep no EMA")
    t.add_argument("--clip-grad-norm", type=float, default=d.clip_grad_norm, help="0 turns clipping off")
    t.add_argument("--plain-vgg-input", action="store_true",
                   help="feed VGG the [0, 1] frames as they are instead of the reference's remapping")
    engine.add_run_arguments(t, d)
    t.add_argument("--preview-every", type=int, default=d.preview_every, help="steps between preview PNGs (0: never)")
    t.add_argument("--no-resume", action="store_true", help="refuse to continue a run folder that has checkpoints")
    t.add_argument("-v", "--verbose", action="store_true")
    t.set_defaults(handler=main_train_renderer)


def main_train_renderer(args: argparse.Namespace) -> int:
    """`train-renderer`: `train_renderer` with the command line's settings."""
    weights = LossWeights(**{name: getattr(args, f"loss_{name}")
                             for name in ("l1", "vgg", "vgg_face", "distance", "gan")})
    config = RendererTrainConfig(
        data=os.fspath(args.data), output=os.fspath(args.output), init=os.fspath(args.init) if args.init else None,
        vgg_weights=os.fspath(args.vgg_weights) if args.vgg_weights else None, architecture=args.architecture,
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, final_lr=args.final_lr, warmup=args.warmup,
        weights=weights, ema_decay=args.ema_decay, clip_grad_norm=args.clip_grad_norm,
        reference_vgg_input=not args.plain_vgg_input, **engine.run_settings(args), preview_every=args.preview_every,
        resume=not args.no_resume)
    result = train_renderer(config)
    for kind, path in result["exports"].items():
        log.info("%s weights: %s", kind, path)
    return 0
