"""Training and fine-tuning the flow-matching motion generator (paper §3.3; the reference's generator/train.py).

Objective, per training window (`data.GeneratorWindows`: 10 context + 50 frames of one clip):

- flow matching on the straight path: t ~ U[0, 1) per sample, noise ~ N(0, I) over the 50 window frames,
  x_t = t·m + (1 − t)·noise, target velocity m − noise; the model sees the 10 context frames clean;
- loss = D(v̂, v) + velocity_weight · D(Δv̂, Δv) with Δ the frame-to-frame difference along time and D the mean
  absolute error (the reference's code, default) or the mean squared error (the paper's text, `loss="mse"`);
- condition dropout: each of the window's audio, pose, cam and gaze embeddings is replaced by the null (zero)
  embedding independently per sample with p = 0.1 (the reference zeroes the projected embedding, the same
  null that guidance and an absent control use at inference);
- context dropout: each of the context's motion, audio, pose, cam and gaze is zeroed independently per sample
  with p = 0.5 (the reference; zeroed context is what the first window sees at inference). A clip without a
  control file gets the null embedding for that control everywhere;
- Adam β = (0.5, 0.999), lr 1e-4 with per-step cosine decay to 1e-5, gradients clipped at norm 1, EMA 0.9999.

Where this differs from the reference's script on purpose (its behaviour in brackets): the LR schedule steps
per optimizer step [its Lightning config steps the cosine once per epoch over T_max = 5M, so its LR stays at
about 1e-4]; gradients are clipped at 1 [it declares max_grad_norm=1 but never passes it to the trainer]; a
clip may lack pose/cam/gaze [it skips such clips]. `clip_grad_norm=0` turns clipping off.

A run folder holds `config.json`, `log.jsonl` (one JSON line per log step), `checkpoints/step-*/`
(see `engine`), `previews/step-*.mp4` when a preview renderer is given (`PreviewVideo`), and at the end
`generator.safetensors` (trained weights) and `generator_ema.safetensors` (EMA weights), bare state dicts
that `load_generator(path)` loads strictly (pass `cfg=` for the tiny architecture). When the starting file
carries wav2vec2 weights (official `generator.ckpt`), both exports keep them under `audio_encoder.wav2vec2.*`,
so inference uses the audio encoder the data was prepared with.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import GeneratorConfig, tiny_generator_config
from ..errors import IMTalkerError, InputError
from ..generator import MotionGenerator
from . import engine
from .data import LABEL_MODES, GeneratorWindows, clip_ids, iterate_windows, read_manifest

log = logging.getLogger(__name__)

LOSSES = ("l1", "mse")
ARCHITECTURES = ("official", "tiny")
CONTROL_NAMES = ("pose", "cam", "gaze")
# The preview video samples as inference does by default (`pipeline.generate_motion`, the node's defaults).
PREVIEW_CFG_SCALE = 3.0
PREVIEW_SAMPLING_STEPS = 10
PREVIEW_RENDER_BATCH = 4


@dataclass(frozen=True)
class GeneratorTrainConfig:
    """Settings of one generator training run (defaults: the reference's).

    data: a prepared folder (`data.prepare_clips`); output: the run folder. init: generator file to start
    from (`generator.ckpt`, or a `.safetensors` of ours); None trains from scratch. init_ema: start from the
    file's `ema_state_dict`. architecture: "official" (38.8M parameters) or "tiny" (tests, smoke runs); its
    audio width is the data's. steps: total optimizer steps of the run (a resumed run continues up to it).
    batch_size: windows per process and micro-step. resume: continue from the newest checkpoint in
    `output/checkpoints` when there is one (False refuses a folder that has checkpoints).
    val_clips: the last N prepared clips (sorted by id) are held out and the EMA's validation loss is logged
    every `preview_every` steps (0 clips: the loss on fixed training windows is logged instead).
    preview_renderer: a renderer file (`renderer.ckpt`, or a `.safetensors` that records its configuration);
    with it, every `preview_every` steps the EMA weights also sample motion for the first `preview_seconds`
    of the prepared clip `preview_clip` (None: the first validation clip, else the first training clip),
    rendered onto the portrait `preview_image` into `previews/step-XXXXXXXX.mp4` (see `PreviewVideo`).
    """

    data: str
    output: str
    init: str | None = None
    init_ema: bool = False
    architecture: str = "official"
    steps: int = 100_000
    batch_size: int = 16
    lr: float = 1e-4
    final_lr: float = 1e-5
    warmup: int = 0
    betas: tuple[float, float] = (0.5, 0.999)
    loss: str = "l1"
    velocity_weight: float = 1.0
    condition_dropout: float = 0.1
    context_dropout: float = 0.5
    ema_decay: float = 0.9999
    clip_grad_norm: float = 1.0
    mixed_precision: str = "no"
    cpu: bool = False
    seed: int = 0
    num_workers: int = 2
    gradient_accumulation_steps: int = 1
    log_every: int = 50
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    preview_every: int = 1000
    preview_windows: int = 32
    val_clips: int = 0
    resume: bool = True
    preview_renderer: str | None = None
    preview_image: str | None = None
    preview_clip: str | None = None
    preview_seconds: float = 4.0

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise InputError(f"loss={self.loss!r}: use one of {', '.join(LOSSES)}")
        if self.architecture not in ARCHITECTURES:
            raise InputError(f"architecture={self.architecture!r}: use one of {', '.join(ARCHITECTURES)}")
        for name in ("condition_dropout", "context_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise InputError(f"{name} must be a probability in [0, 1], got {value}")
        if self.steps < 1 or self.batch_size < 1:
            raise InputError(f"steps and batch_size must be positive, got {self.steps} and {self.batch_size}")
        if self.lr <= 0:
            raise InputError(f"lr must be positive, got {self.lr}")
        if self.val_clips < 0:
            raise InputError(f"val_clips cannot be negative, got {self.val_clips}")
        if self.preview_renderer and not self.preview_image:
            raise InputError(f"preview_renderer={self.preview_renderer!r} needs a portrait to animate: give "
                             "preview_image (--preview-image FILE), or leave the preview renderer out")
        if not self.preview_renderer:
            unused = [name for name in ("preview_image", "preview_clip") if getattr(self, name)]
            if unused:
                raise InputError(f"{' and '.join(unused)} only matter for the rendered preview: give "
                                 "preview_renderer (--preview-renderer FILE, e.g. models/imtalker/renderer.ckpt) "
                                 "too, or leave them out")
        if not self.preview_seconds > 0:
            raise InputError(f"preview_seconds must be positive, got {self.preview_seconds}")


def _keep_mask(batch: int, p: float, device: torch.device, rng: torch.Generator | None) -> torch.Tensor:
    """`[B, 1, 1]` float: 0 for the samples whose input is dropped (probability p), else 1."""
    draw = torch.rand(batch, device=device, generator=rng)
    return (draw >= p).float()[:, None, None]


def generator_loss(model: MotionGenerator, batch: dict[str, torch.Tensor], *, loss: str = "l1",
                   velocity_weight: float = 1.0, condition_dropout: float = 0.1, context_dropout: float = 0.5,
                   rng: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Flow-matching loss of `model` on a batch of `GeneratorWindows` items (objective in the module docstring).

    batch: "motion" `[B, C + W, M]`, "audio" `[B, C + W, D]`, "pose"/"cam"/"gaze" `[B, C + W, 3|3|2]`,
    "has_pose"/"has_cam"/"has_gaze" `[B]`, "reference" `[B, M]` (C, W: the model's context and window frames).
    Random draws, in this order, from `rng` (default: the global generator of the batch's device): noise
    `[B, W, M]`, t `[B]`, then keep masks `[B]` for the window's audio, pose, cam, gaze and the context's
    motion, audio, pose, cam, gaze. Returns scalars {"loss", "flow" (the velocity term), "velocity"
    (the frame-difference term)}; "loss" = flow + velocity_weight · velocity.
    """
    if loss not in LOSSES:
        raise InputError(f"loss={loss!r}: use one of {', '.join(LOSSES)}")
    cfg = model.cfg
    ctx = cfg.context_frames
    param = next(model.parameters())
    motion = batch["motion"].to(param.device, param.dtype)
    b, n, _ = motion.shape
    if n != ctx + cfg.window_frames:
        raise InputError(f"training windows have {n} frames; the generator needs {ctx} + {cfg.window_frames}")
    device = motion.device
    prev_x, target = motion[:, :ctx], motion[:, ctx:]
    noise = torch.randn(target.shape, device=device, dtype=target.dtype, generator=rng)
    t = torch.rand(b, device=device, generator=rng)
    tt = t.to(target.dtype)[:, None, None]
    noised = tt * target + (1 - tt) * noise
    flow = target - noise

    keep_now = {name: _keep_mask(b, condition_dropout, device, rng) for name in ("audio", *CONTROL_NAMES)}
    keep_ctx = {name: _keep_mask(b, context_dropout, device, rng) for name in ("motion", "audio", *CONTROL_NAMES)}

    def masked(emb: torch.Tensor, name: str) -> torch.Tensor:
        return torch.cat([emb[:, :ctx] * keep_ctx[name], emb[:, ctx:] * keep_now[name]], dim=1)

    audio_emb = model.audio_projection(batch["audio"].to(device, param.dtype))
    others = torch.zeros_like(audio_emb)
    projections = {"pose": model.pose_projection, "cam": model.cam_projection, "gaze": model.gaze_projection}
    for name in CONTROL_NAMES:
        present = batch[f"has_{name}"].to(device, param.dtype)[:, None, None]
        # A clip without this control gets the null embedding, as inference without it does; the projection
        # still runs so that every parameter takes part in every step (DDP needs no unused-parameter search).
        emb = projections[name](batch[name].to(device, param.dtype)) * present
        others = others + masked(emb, name)
    audio_emb = masked(audio_emb, "audio")
    pred = model.velocity(t, noised, batch["reference"].to(device, param.dtype), prev_x * keep_ctx["motion"],
                          audio_emb[:, ctx:], audio_emb[:, :ctx], others)
    distance = F.l1_loss if loss == "l1" else F.mse_loss
    flow_term = distance(pred.float(), flow.float())
    velocity_term = distance((pred[:, 1:] - pred[:, :-1]).float(), (flow[:, 1:] - flow[:, :-1]).float())
    return {"loss": flow_term + velocity_weight * velocity_term, "flow": flow_term, "velocity": velocity_term}


class FlowMatchingObjective(nn.Module):
    """The generator with its training loss as `forward`, so that DDP sees one forward per step.

    `forward(batch)` returns `generator_loss(self.generator, batch, **options)`.
    """

    def __init__(self, generator: MotionGenerator, loss: str = "l1", velocity_weight: float = 1.0,
                 condition_dropout: float = 0.1, context_dropout: float = 0.5):
        super().__init__()
        self.generator = generator
        self.options = {"loss": loss, "velocity_weight": velocity_weight, "condition_dropout": condition_dropout,
                        "context_dropout": context_dropout}

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return generator_loss(self.generator, batch, **self.options)


def build_generator(config: GeneratorTrainConfig, audio_dim: int) -> tuple[MotionGenerator, dict[str, torch.Tensor]]:
    """The generator to train (train mode, trainable) and the wav2vec2 copy of the init file (may be empty).

    From `config.init` (loaded strictly, optionally its EMA weights) or freshly initialised. The architecture's
    audio width must be `audio_dim`, the width of the prepared features.
    """
    from ..checkpoints import load_strict, model_entries, wav2vec2_copy
    from ..safe_read import read_file

    if config.architecture == "tiny":
        cfg = dataclasses.replace(tiny_generator_config(), audio_dim=audio_dim)
    else:
        cfg = GeneratorConfig()
        if cfg.audio_dim != audio_dim:
            raise InputError(f"the data's audio features are {audio_dim} wide but the official generator takes "
                             f"{cfg.audio_dim} (wav2vec2-base); prepare the data with the official wav2vec2")
    model = MotionGenerator(cfg)
    copy_of_wav2vec2: dict[str, torch.Tensor] = {}
    if config.init:
        source = os.fspath(config.init)
        raw = read_file(source)
        load_strict(model, model_entries(raw, "generator", use_ema=config.init_ema, source=source), source,
                    "generator")
        copy_of_wav2vec2 = wav2vec2_copy(raw)
        log.info("starting from %s%s", source, " (EMA weights)" if config.init_ema else "")
    else:
        log.info("training a %s generator from scratch (%d parameters)", config.architecture,
                 sum(p.numel() for p in model.parameters()))
    return model.float().train().requires_grad_(True), copy_of_wav2vec2


def _split_clips(config: GeneratorTrainConfig, length: int) -> tuple[list[str], list[str]]:
    clips = clip_ids(config.data, length)
    if config.val_clips >= len(clips):
        raise InputError(f"val_clips={config.val_clips} leaves no training clip (the data has {len(clips)} usable "
                         "clips); lower it")
    cut = len(clips) - config.val_clips
    return clips[:cut], clips[cut:]


def train_generator(config: GeneratorTrainConfig) -> dict[str, Any]:
    """Run (or resume) a training run; returns {"steps", "exports": {"trained", "ema"} paths, "checkpoint"}."""
    output = Path(config.output)
    manifest = read_manifest(config.data)
    audio_dim = manifest.get("audio_dim")
    if not audio_dim:
        raise InputError(f"{config.data} has no prepared clips yet; run prepare-data on some videos first")
    accelerator = engine.make_accelerator(config.mixed_precision, config.cpu, config.seed,
                                          config.gradient_accumulation_steps)
    generator, wav2vec2 = build_generator(config, int(audio_dim))
    gcfg = generator.cfg
    if manifest.get("motion_dim") != gcfg.motion_dim:
        raise InputError(f"the data's motion latents are {manifest.get('motion_dim')} wide, the generator's "
                         f"{gcfg.motion_dim}")
    train_ids, val_ids = _split_clips(config, gcfg.window_frames + gcfg.context_frames)
    video = _preview_video(config, manifest, val_ids or train_ids, accelerator.device, gcfg.fps)
    dataset = GeneratorWindows(config.data, gcfg.window_frames, gcfg.context_frames, clips=train_ids)
    objective = FlowMatchingObjective(generator, config.loss, config.velocity_weight, config.condition_dropout,
                                      config.context_dropout)
    optimizer = torch.optim.Adam(objective.parameters(), lr=config.lr, betas=tuple(config.betas))
    objective, optimizer = accelerator.prepare(objective, optimizer)
    scheduler = engine.cosine_schedule(optimizer, config.steps, config.warmup, config.final_lr)
    ema = engine.EMA(engine.unwrap(objective).generator, config.ema_decay)
    part = engine.Part("generator", objective, optimizer, scheduler, ema, config.clip_grad_norm or None)
    checkpoints = output / "checkpoints"
    start = 0
    if engine.latest_checkpoint(checkpoints) is not None:
        if not config.resume:
            raise InputError(f"{output} already holds a run's checkpoints; resume it or choose another output folder")
        start = engine.resume(checkpoints, accelerator, [part])
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        with open(output / "config.json", "w", encoding="utf-8") as f:
            json.dump(dataclasses.asdict(config), f, indent=1)

    def step_fn(batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        terms = objective(batch)
        norm = engine.optimize(accelerator, part, terms["loss"])
        return {**terms, **({"grad_norm": norm} if norm is not None else {})}

    preview = (_validation(accelerator, part, config, val_ids or train_ids, video) if config.preview_every
               else None)
    batches = engine.step_batches(dataset, config.batch_size, config.seed, accelerator,
                                  num_workers=config.num_workers)
    steps = engine.train_loop(accelerator, [part], step_fn, batches, config.steps, start_step=start,
                              log_every=config.log_every, checkpoint_dir=checkpoints,
                              checkpoint_every=config.checkpoint_every, keep_checkpoints=config.keep_checkpoints,
                              preview_fn=preview, preview_every=config.preview_every,
                              log_file=output / "log.jsonl", extra_state={"config": dataclasses.asdict(config)})
    exports = {}
    if accelerator.is_main_process:
        trained = engine.unwrap(objective).generator
        metadata = {"imtalker_kind": "generator", "generator_config": json.dumps(dataclasses.asdict(gcfg)),
                    "steps": str(steps)}
        extra = {"audio_encoder.wav2vec2." + k: v for k, v in wav2vec2.items()}
        exports["trained"] = output / "generator.safetensors"
        exports["ema"] = output / "generator_ema.safetensors"
        engine.export_safetensors(trained, exports["trained"], metadata, extra_tensors=extra)
        engine.export_safetensors(trained, exports["ema"], {**metadata, "ema_decay": str(config.ema_decay)},
                                  ema=ema, extra_tensors=extra)
    accelerator.wait_for_everyone()
    return {"steps": steps, "exports": exports, "checkpoint": engine.latest_checkpoint(checkpoints)}


def _validation(accelerator, part: engine.Part, config: GeneratorTrainConfig, clips: list[str],
                video: PreviewVideo | None = None):
    """preview_fn: the EMA weights' loss (no dropout, fixed noise) on fixed windows of `clips`, then the
    rendered preview `video` (when given) with the same EMA weights."""
    trained = engine.unwrap(part.model).generator
    cfg = trained.cfg
    windows = GeneratorWindows(config.data, cfg.window_frames, cfg.context_frames, clips=clips)
    items = list(iterate_windows(windows, config.preview_windows, seed=12345))
    batch = {k: torch.stack([it[k] for it in items]).to(accelerator.device) for k in items[0]}
    shadow = copy.deepcopy(trained).eval()

    def preview(step: int) -> dict[str, float]:
        part.ema.copy_to(shadow)
        rng = torch.Generator(accelerator.device).manual_seed(0)
        terms = generator_loss(shadow, batch, loss=config.loss, velocity_weight=config.velocity_weight,
                               condition_dropout=0.0, context_dropout=0.0, rng=rng)
        name = "val" if config.val_clips else "train_windows"
        if video is not None and not video.failed:
            video(shadow, Path(config.output) / "previews" / f"step-{step:08d}.mp4")
        return {f"ema_{name}_{k}": v.item() for k, v in terms.items()}

    return preview


class PreviewVideo:
    """The rendered preview: the EMA generator's motion for one prepared clip, rendered onto a portrait.

    `video(generator, path)` samples motion with `generator` (the EMA copy) for the clip's first `frames`
    frames of stored audio features (and its pose/cam/gaze where the clip has them) as inference does
    (`pipeline.generate_motion`: cfg 3, 10 Euler steps, CPU noise seeded with `seed`, so every preview of a
    run starts from the same noise), renders it (`pipeline.render_batches`) and writes `path`, an MP4 at the
    generator's 25 fps without sound: a prepared folder keeps the wav2vec2 features, not the waveform.

    The portrait and the clip's features are read when this is built, so a bad file stops the run before
    its first step; the renderer is loaded at the first call (on `device`, float32, eval, never trained) and
    the portrait, cut around its face as `prepare-data` cuts the clips (`crop_scale`; the centred square when
    no face is found), is encoded once (`pipeline.encode_identity`). A preview that fails (a renderer file
    that does not load, one whose latents are not the generator's width, a full disk) is logged and
    turns the videos off for the rest of the run (`failed`); training goes on.
    Called on the main process only, under the engine's forked random states and `torch.no_grad`.
    """

    def __init__(self, renderer_path: str | os.PathLike, image_path: str | os.PathLike,
                 clip_file: str | os.PathLike, frames: int, device: torch.device | str, seed: int = 0,
                 crop_scale: float = 1.6):
        from safetensors import safe_open

        from ..checkpoints import config_from_file
        from ..media.files import existing_file
        from ..media.images import load_image

        self.renderer_path = existing_file(renderer_path, "renderer")
        # Reads only the header: a damaged configuration record is reported now, not at the first preview.
        config_from_file(self.renderer_path, "renderer")
        self.image_name = Path(image_path).name
        self.portrait = load_image(image_path)  # [H, W, 3] float32 in [0, 1]
        with safe_open(os.fspath(clip_file), "pt") as f:
            names = set(f.keys())
            self.audio = f.get_slice("audio")[:frames].float()  # [frames, D]
            self.controls = {name: f.get_slice(name)[:frames].float() for name in CONTROL_NAMES if name in names}
        self.frames, self.device = self.audio.shape[0], torch.device(device)
        self.seed, self.crop_scale = seed, crop_scale
        self.renderer = None
        self.identity = None
        self.failed = False

    def _load(self, motion_dim: int) -> None:
        from ..checkpoints import load_renderer
        from ..media.face import crop_face
        from ..media.images import to_model_input
        from ..pipeline import encode_identity

        renderer = load_renderer(self.renderer_path, self.device, torch.float32)
        if renderer.cfg.latent_dim != motion_dim:
            raise InputError(f"{self.renderer_path}: its motion latents are {renderer.cfg.latent_dim} wide, the "
                             f"generator's {motion_dim}; give the renderer the data was prepared with")
        size = renderer.cfg.image_size
        face, _ = crop_face(self.portrait, self.crop_scale, size, on_no_face="center", name=self.image_name)
        self.identity = encode_identity(renderer, to_model_input(face, size))
        self.renderer = renderer
        self.portrait = None  # the identity is all the renderer needs from now on
        log.info("preview renderer %s loaded on %s (%d² frames)", self.renderer_path, self.device, size)

    def __call__(self, generator: MotionGenerator, path: Path) -> Path | None:
        """Write the preview of `generator`'s motion to `path`; returns it (None when the preview failed)."""
        from ..media.video import write_video
        from ..pipeline import generate_motion, render_batches

        try:
            if self.renderer is None:
                self._load(generator.cfg.motion_dim)
            motion = generate_motion(generator, self.audio.to(self.device), self.identity.motion,
                                     **self.controls, cfg_scale=PREVIEW_CFG_SCALE, steps=PREVIEW_SAMPLING_STEPS,
                                     seed=self.seed)  # [frames, motion_dim]
            # render_batches yields [b, 3, S, S] on the CPU; the writer takes [b, S, S, 3].
            batches = (b.permute(0, 2, 3, 1) for b in render_batches(self.renderer, self.identity, motion,
                                                                      PREVIEW_RENDER_BATCH))
            written = write_video(path, batches, fps=generator.cfg.fps)
        except (IMTalkerError, OSError) as err:
            self.failed = True
            log.error("the preview video failed (%s); no more preview videos this run, training goes on", err)
            return None
        log.info("preview video: %s (%d frames)", written, self.frames)
        return written


def _preview_video(config: GeneratorTrainConfig, manifest: dict[str, Any], clips: list[str],
                   device: torch.device, fps: float) -> PreviewVideo | None:
    """The run's `PreviewVideo`, or None without a preview renderer. Built on every process so that every
    process stops on the same bad setting; only the main process renders."""
    if not config.preview_renderer:
        return None
    if not config.preview_every:
        log.warning("preview_renderer is set but preview_every is 0: no preview video will be rendered")
        return None
    cid = config.preview_clip or clips[0]
    entry = manifest["clips"].get(cid)
    if entry is None or entry.get("status") != "ok":
        usable = sorted(c for c, e in manifest["clips"].items() if e.get("status") == "ok")
        state = "is not in" if entry is None else "was rejected in"
        raise InputError(f"preview clip {cid!r} {state} {Path(config.data) / 'manifest.json'}; give one of "
                         f"{', '.join(usable[:5])}{' …' if len(usable) > 5 else ''}")
    frames = min(int(entry["frames"]), max(1, round(config.preview_seconds * fps)))
    return PreviewVideo(config.preview_renderer, config.preview_image, Path(config.data) / entry["clip_file"],
                        frames, device, seed=config.seed, crop_scale=manifest.get("crop_scale") or 1.6)


# --- command line ----------------------------------------------------------------------------------------------


def register(subparsers) -> None:
    """Add the `prepare-data` and `train-generator` subcommands to the CLI's subparsers; each sets
    `handler` (a function of the parsed arguments returning the exit status)."""
    p = subparsers.add_parser("prepare-data", help="talking-head videos → prepared training clips",
                              description="Crop, encode motion and audio of every video under VIDEOS into OUTPUT "
                                          "(resumable; see imtalker_core/training/data.py for the layout).")
    p.add_argument("videos", type=Path, help="folder of talking-head videos (searched recursively)")
    p.add_argument("output", type=Path, help="prepared data folder (created; re-running skips finished clips)")
    p.add_argument("--models", type=Path, default=None, help="models folder (renderer, generator, wav2vec2)")
    p.add_argument("--renderer", type=Path, default=None, help="renderer file (default: the models folder's)")
    p.add_argument("--generator", type=Path, default=None,
                   help="generator file whose wav2vec2 copy encodes the audio (default: the models folder's)")
    p.add_argument("--wav2vec2", type=Path, default=None, help="wav2vec2 folder (default: the models folder's)")
    p.add_argument("--no-download", action="store_true", help="never download missing model files")
    p.add_argument("--frames", choices=["none", "png", "tensor"], default="none",
                   help="also keep the face crops (for renderer training)")
    p.add_argument("--crop-scale", type=float, default=1.6, help="crop side = scale × detected face box")
    p.add_argument("--batch-size", type=int, default=16, help="frames through the motion encoder at once")
    p.add_argument("--max-frame-mismatch", type=int, default=1,
                   help="largest allowed difference between video and audio frame counts")
    p.add_argument("--labels", choices=LABEL_MODES, default="auto",
                   help="pose/gaze labels: sidecar files, the rest measured from dlib landmarks (auto: if installed; "
                        "landmarks: required), sidecar files only, or none")
    p.add_argument("--relabel", action="store_true",
                   help="prepare again the clips prepared earlier with other labels (e.g. before dlib was installed)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(handler=main_prepare_data)

    t = subparsers.add_parser("train-generator", help="train or fine-tune the motion generator",
                              description="Flow-matching training of the motion generator on prepared clips. "
                                          "Multi-GPU: accelerate launch -m imtalker_core train-generator …")
    d = GeneratorTrainConfig
    t.add_argument("data", type=Path, help="prepared data folder (prepare-data)")
    t.add_argument("output", type=Path, help="run folder: config, log.jsonl, checkpoints, exported weights")
    t.add_argument("--init", type=Path, default=None,
                   help="start from this generator file (generator.ckpt or .safetensors); omit to train from scratch")
    t.add_argument("--init-ema", action="store_true", help="start from the init file's EMA weights")
    t.add_argument("--architecture", choices=ARCHITECTURES, default=d.architecture)
    t.add_argument("--steps", type=int, default=d.steps, help="total optimizer steps of the run")
    t.add_argument("--batch-size", type=int, default=d.batch_size, help="windows per GPU and micro-step")
    t.add_argument("--lr", type=float, default=d.lr)
    t.add_argument("--final-lr", type=float, default=d.final_lr, help="LR at the end of the cosine decay")
    t.add_argument("--warmup", type=int, default=d.warmup, help="linear LR warm-up steps")
    t.add_argument("--loss", choices=LOSSES, default=d.loss, help="l1 (the reference's code) or mse (the paper)")
    t.add_argument("--velocity-weight", type=float, default=d.velocity_weight,
                   help="weight of the frame-difference term")
    t.add_argument("--condition-dropout", type=float, default=d.condition_dropout)
    t.add_argument("--context-dropout", type=float, default=d.context_dropout)
    t.add_argument("--ema-decay", type=float, default=d.ema_decay)
    t.add_argument("--clip-grad-norm", type=float, default=d.clip_grad_norm, help="0 turns clipping off")
    engine.add_run_arguments(t, d)
    t.add_argument("--preview-every", type=int, default=d.preview_every,
                   help="steps between EMA validation losses and preview videos (0: never)")
    t.add_argument("--preview-renderer", type=Path, default=None,
                   help="renderer file (e.g. models/imtalker/renderer.ckpt): also render the EMA generator's "
                        "motion into previews/step-*.mp4 (needs --preview-image)")
    t.add_argument("--preview-image", type=Path, default=None, help="portrait the preview videos animate")
    t.add_argument("--preview-clip", default=None,
                   help="prepared clip id whose audio features drive the preview (default: the first validation "
                        "clip, else the first training clip)")
    t.add_argument("--preview-seconds", type=float, default=d.preview_seconds,
                   help="length of the preview videos (at most the clip's)")
    t.add_argument("--val-clips", type=int, default=d.val_clips, help="hold out the last N clips for validation")
    t.add_argument("--no-resume", action="store_true", help="refuse to continue a run folder that has checkpoints")
    t.add_argument("-v", "--verbose", action="store_true")
    t.set_defaults(handler=main_train_generator)


def main_prepare_data(args: argparse.Namespace) -> int:
    """`prepare-data`: load the renderer and the audio encoder, then `data.prepare_clips`."""
    from .. import model_files
    from ..checkpoints import load_audio_encoder, load_renderer, wav2vec2_copy
    from ..safe_read import read_file
    from ..validation import check_device
    from .data import prepare_clips

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = str(check_device(device))
    needs_folder = args.renderer is None or args.wav2vec2 is None
    root = model_files.ensure_models(args.models, download=not args.no_download) if needs_folder else None
    renderer_path = args.renderer or model_files.model_path(root, model_files.RENDERER_FILE)
    wav2vec2_folder = args.wav2vec2 or root / model_files.WAV2VEC2_DIR
    generator_path = args.generator or (model_files.model_path(root, model_files.GENERATOR_FILE) if root else None)
    renderer = load_renderer(renderer_path, device)
    weights = wav2vec2_copy(read_file(generator_path)) if generator_path and Path(generator_path).is_file() else {}
    encoder = load_audio_encoder(wav2vec2_folder, device, weights=weights or None,
                                 source=os.fspath(generator_path) if weights else "the given wav2vec2 weights")
    encoders = {"renderer": Path(renderer_path).name,
                "wav2vec2": f"copy in {Path(generator_path).name}" if weights else Path(wav2vec2_folder).name}
    report = prepare_clips(args.videos, args.output, renderer, encoder, frames=args.frames,
                           crop_scale=args.crop_scale, batch_size=args.batch_size,
                           max_frame_mismatch=args.max_frame_mismatch, labels=args.labels, relabel=args.relabel,
                           encoders=encoders)
    return 0 if report.prepared or report.skipped else 2


def main_train_generator(args: argparse.Namespace) -> int:
    """`train-generator`: `train_generator` with the command line's settings."""
    config = GeneratorTrainConfig(
        data=os.fspath(args.data), output=os.fspath(args.output),
        init=os.fspath(args.init) if args.init else None, init_ema=args.init_ema, architecture=args.architecture,
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, final_lr=args.final_lr, warmup=args.warmup,
        loss=args.loss, velocity_weight=args.velocity_weight, condition_dropout=args.condition_dropout,
        context_dropout=args.context_dropout, ema_decay=args.ema_decay, clip_grad_norm=args.clip_grad_norm,
        **engine.run_settings(args), preview_every=args.preview_every, val_clips=args.val_clips,
        resume=not args.no_resume,
        preview_renderer=os.fspath(args.preview_renderer) if args.preview_renderer else None,
        preview_image=os.fspath(args.preview_image) if args.preview_image else None,
        preview_clip=args.preview_clip, preview_seconds=args.preview_seconds)
    result = train_generator(config)
    for kind, path in result["exports"].items():
        log.info("%s weights: %s", kind, path)
    return 0
