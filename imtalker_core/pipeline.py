"""The IMTalker pipeline as small composable steps: encode → generate → render.

Order of work (as in diffusers' pipelines): check inputs → encode the source once → generate or
encode motion → render in batches with progress and cancellation callbacks. No file I/O here.

Images are `[B, 3, S, S]` float RGB in [0, 1] with S the renderer's size (512); motion is
`[T, latent_dim]` latents (32), one per frame at 25 fps for audio-driven motion.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from . import compiled
from .errors import IMTalkerError, InputError
from .generator import MotionGenerator
from .renderer import IMTRenderer
from .precision import model_fp32
from .sampling import NOISE_MODES
from .validation import check_batch_size, check_cfg, check_control, check_seed, check_sequence, check_steps

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
Interrupt = Callable[[], None]
RENDERER_CAUSES = "damaged renderer weights, or fp16 overflow (try --precision fp32 / precision fp32)"
MOTION_CAUSES = "damaged generator weights, an extreme cfg scale or extreme pose/cam/gaze values"


@dataclass
class Identity:
    """Everything the renderer needs from one source image, computed once per video.

    features: dense features, coarsest first (official `[1,512,8,8]` … `[1,32,256,256]`);
    vector: identity vector `[1, 512]`; motion: the source's motion latent `[1, 32]` (the
    generator's reference motion); motion_maps: decoded adapted source motion, coarsest first.
    All on the renderer's device and dtype.
    """

    features: list[torch.Tensor]
    vector: torch.Tensor
    motion: torch.Tensor
    motion_maps: list[torch.Tensor]

    def to(self, device=None, dtype=None) -> "Identity":
        move = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
        return Identity([move(f) for f in self.features], move(self.vector), move(self.motion),
                        [move(m) for m in self.motion_maps])


def _model_place(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


#: Image values may stray this far outside [0, 1] (resampling overshoot) before they count as wrong.
IMAGE_RANGE_SLACK = 1e-3
# Driving frames per motion-encoder call on a CPU, whatever the batch size (see encode_motion).
CPU_MOTION_ENCODE_FRAMES = 1


def check_images(images: torch.Tensor, size: int, name: str = "images") -> torch.Tensor:
    """Validate `[B, 3, size, size]` float images in [0, 1]; a 3-D tensor is taken as one image.

    numpy arrays are refused (their layout is usually `[H, W, 3]`): convert them with
    `imtalker_core.media.images.to_model_input`. Returns the images contiguous (see below).
    """
    if not isinstance(images, torch.Tensor):
        raise InputError(f"{name} must be a torch tensor [B, 3, {size}, {size}], got {type(images).__name__}; "
                         "convert an [H, W, 3] picture with imtalker_core.media.images.to_model_input")
    if not images.is_floating_point():
        raise InputError(f"{name} must be float values in [0, 1], got {images.dtype}; divide 8-bit images by 255")
    if images.dim() == 3:
        images = images[None]
    if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != (size, size):
        raise InputError(f"{name} must be RGB of shape [B, 3, {size}, {size}], got {list(images.shape)}; "
                         "crop/resize the image to the renderer's size first")
    if images.shape[0] == 0:
        raise InputError(f"{name} is an empty batch")
    if not torch.isfinite(images).all():
        raise InputError(f"{name} contains NaN or infinite values")
    low, high = images.min().item(), images.max().item()
    if low < -IMAGE_RANGE_SLACK or high > 1 + IMAGE_RANGE_SLACK:
        hint = "divide by 255" if high > 2 else "map [-1, 1] to [0, 1] with (x + 1) / 2" if low < 0 else "clamp them"
        raise InputError(f"{name} must be in [0, 1], got values from {low:.3g} to {high:.3g}; {hint}")
    # One memory layout for every caller: a channels-last view (e.g. a permuted HWC image) makes the
    # convolutions pick other kernels, whose different summation order can flip near-tied anchor
    # argmax picks and so change whole 8x8 blocks of the frame.
    return images.contiguous()


def check_motion(motion, latent_dim: int, name: str = "motion") -> torch.Tensor:
    """Motion latents `[T, latent_dim]` (torch, numpy or lists), finite and not empty, as float32."""
    return check_sequence(motion, latent_dim, name, noun="sequence of latents",
                          empty_hint="so there is nothing to render")


def check_finite_output(values: torch.Tensor, what: str, causes: str) -> None:
    """Stop with an `IMTalkerError` when a model produced NaN/inf (`causes`: the likely reasons)."""
    _check_finite_flag(torch.isfinite(values).all(), what, causes)


def _check_finite_flag(finite: torch.Tensor | bool, what: str, causes: str) -> None:
    """`check_finite_output` on a flag computed earlier (`torch.isfinite(values).all()`)."""
    if not bool(finite):
        raise IMTalkerError(f"the {what} came out as NaN or infinite values; likely cause: {causes}. "
                            "Nothing was written.")


@torch.no_grad()
def encode_identity(renderer: IMTRenderer, image: torch.Tensor, callback: Progress | None = None,
                    check_interrupt: Interrupt | None = None) -> Identity:
    """Encode one source image `[1, 3, S, S]` (or `[3, S, S]`) in [0, 1].

    Three stages (identity features, motion latent, motion maps): `callback(done, 3)` after each,
    `check_interrupt()` before each.
    """
    image = check_images(image, renderer.cfg.image_size, "source image")
    if image.shape[0] != 1:
        raise InputError(f"encode one source image at a time, got a batch of {image.shape[0]}")
    device, dtype = _model_place(renderer)
    image = image.to(device=device, dtype=dtype)
    stage = _Stages(3, callback, check_interrupt)
    with model_fp32(renderer):
        features, vector = stage(renderer.encode_identity, image)
        motion = stage(renderer.encode_motion, image)
        check_finite_output(torch.cat([vector.flatten(), motion.flatten()]), "identity of the source image",
                            RENDERER_CAUSES)
        maps = stage(lambda: renderer.decode_motion(renderer.adapt(motion, vector)))
    return Identity(features, vector, motion, maps)


class _Stages:
    """Runs the stages of one call: an interrupt check before each, a progress report after each."""

    def __init__(self, total: int, callback: Progress | None, check_interrupt: Interrupt | None):
        self.total, self.done = total, 0
        self.callback, self.check_interrupt = callback, check_interrupt

    def __call__(self, fn, *args):
        if self.check_interrupt is not None:
            self.check_interrupt()
        result = fn(*args)
        self.done += 1
        if self.callback is not None:
            self.callback(self.done, self.total)
        return result


@torch.no_grad()
def encode_motion(renderer: IMTRenderer, images: torch.Tensor, batch_size: int = 8,
                  callback: Progress | None = None, check_interrupt: Interrupt | None = None) -> torch.Tensor:
    """Motion latents `[T, latent_dim]` (float32, on the renderer's device) of driving frames
    `[T, 3, S, S]` in [0, 1]; frames may live on the CPU and are moved batch by batch."""
    images = check_images(images, renderer.cfg.image_size, "driving frames")
    batch_size = check_batch_size(batch_size)
    device, dtype = _model_place(renderer)
    # On a CPU one frame at a time: a 512² frame's activations (64 channels, 67 MB in float32) already
    # exceed the caches, and every frame more makes each conv slower per frame (channels-last, 2 threads:
    # 0.93 s a frame alone, 1.15 in twos, 1.22 in fours; benchmarks/motion_speed.py --parts encoder).
    step = CPU_MOTION_ENCODE_FRAMES if device.type == "cpu" else batch_size
    motion = compiled.motion_step(renderer)
    # Compiled: a short part is padded (with its last frame) to the step, so that it runs the graph compiled
    # for full parts instead of compiling another.
    pad_to = step if compiled.compile_mode(renderer) != "off" else None
    out = []
    for start in range(0, images.shape[0], batch_size):
        if check_interrupt is not None:
            check_interrupt()
        batch = images[start:start + batch_size].to(device=device, dtype=dtype)
        with model_fp32(renderer):
            out.append(torch.cat([_encode_part(renderer, motion, batch[i:i + step], pad_to)
                                  for i in range(0, batch.shape[0], step)]))
        check_finite_output(out[-1], "motion of the driving frames", RENDERER_CAUSES)
        if callback is not None:
            callback(min(start + batch_size, images.shape[0]), images.shape[0])
    return torch.cat(out)


def _encode_part(renderer: IMTRenderer, motion, part: torch.Tensor, pad_to: int | None) -> torch.Tensor:
    """Motion latents `[n, latent_dim]` in float32 (a copy, out of a CUDA graph's memory) of frames `[n, ...]`."""
    n = part.shape[0]
    if pad_to is not None and n < pad_to:
        part = torch.cat([part, part[-1:].expand(pad_to - n, *part.shape[1:])])
    return motion(renderer, part)[:n].to(torch.float32, copy=True)


@torch.no_grad()
def generate_motion(generator: MotionGenerator, audio_features: torch.Tensor, reference_motion: torch.Tensor,
                    pose: torch.Tensor | None = None, cam: torch.Tensor | None = None,
                    gaze: torch.Tensor | None = None, cfg_scale: float = 3.0, steps: int = 10, seed: int = 42,
                    noise: str = "reference", noise_device: torch.device | str = "cpu",
                    callback: Progress | None = None, check_interrupt: Interrupt | None = None) -> torch.Tensor:
    """Motion latents `[T, 32]` (float32) from wav2vec2 features `[T, 768]` or `[1, T, 768]`.

    reference_motion: the source's motion latent `[1, 32]` (`Identity.motion`). pose `[T', 3]`,
    cam `[T', 3]` and gaze `[T', 2]` are optional per-frame controls (cropped or zero-padded to T).
    noise: "reference" (seed once, fresh noise for every 50-frame window: the reference's default)
    or "fixed_per_window" (every window starts from the same noise: its `--fix_noise_seed`); see
    `imtalker_core.sampling`. Noise is drawn on `noise_device` (CPU: the same motion on every device).
    """
    cfg = generator.cfg
    if audio_features.dim() == 2:
        audio_features = audio_features[None]
    if audio_features.dim() != 3 or audio_features.shape[0] != 1 or audio_features.shape[2] != cfg.audio_dim:
        raise InputError(f"audio features must be [T, {cfg.audio_dim}], got {list(audio_features.shape)}")
    if not torch.isfinite(audio_features).all():
        raise InputError("audio features contain NaN or infinite values; check the audio clip")
    steps, cfg_scale, seed = check_steps(steps), check_cfg(cfg_scale), check_seed(seed)
    if noise not in NOISE_MODES:
        raise InputError(f"noise={noise!r}: use one of {', '.join(NOISE_MODES)}")
    reference_motion = check_motion(torch.as_tensor(reference_motion).reshape(1, -1), cfg.motion_dim,
                                    "reference motion")
    with model_fp32(generator):
        sample = generator.sample(
            audio_features, reference_motion,
            pose=check_control(pose, cfg.pose_dim, "pose"), cam=check_control(cam, cfg.cam_dim, "cam"),
            gaze=check_control(gaze, cfg.gaze_dim, "gaze"), cfg_scale=cfg_scale, steps=steps,
            seed=seed, noise=noise, noise_device=noise_device, callback=callback, check_interrupt=check_interrupt)
    check_finite_output(sample, "generated motion", MOTION_CAUSES)
    return sample[0].float()


@torch.no_grad()
def render_batches(renderer: IMTRenderer, identity: Identity, motion: torch.Tensor, batch_size: int = 4,
                   output_device: torch.device | str | None = "cpu", callback: Progress | None = None,
                   check_interrupt: Interrupt | None = None, allow_tf32: bool = False,
                   output_dtype: torch.dtype = torch.float32) -> Iterator[torch.Tensor]:
    """Yield frames `[b, 3, S, S]` for motion `[T, 32]`: float32 in [0, 1], or with `output_dtype=torch.uint8`
    0–255 (rounded on the renderer's device, as `media.images.to_uint8` rounds: a quarter of the bytes to copy).

    Work is done `batch_size` frames at a time on the renderer's device and each batch leaves it
    as soon as it is done, so device memory does not grow with T. The source-only work is done
    once per call. A float32 model computes in true float32 on CUDA (TF32 off) unless `allow_tf32`.
    Inputs are checked when this is called, not at the first batch.

    From a CUDA renderer to the CPU, batch k+1 is queued on the GPU before batch k is handed out, and
    batch k comes back through pinned memory without blocking the GPU: the caller's work on a batch
    (encoding, pasting back) overlaps the rendering of the next, at the cost of one more batch in
    device memory. `callback(done, total)` runs as each batch is handed out.
    """
    motion = check_motion(motion, renderer.cfg.latent_dim)
    batch_size = check_batch_size(batch_size)
    if output_dtype not in (torch.float32, torch.uint8):
        raise InputError(f"output_dtype={output_dtype}: use torch.float32 or torch.uint8")
    return _render_iter(renderer, identity, motion, batch_size, output_device, callback, check_interrupt,
                        allow_tf32, output_dtype)


# The generator body runs after render_batches has returned, outside its no_grad: it needs its own.
@torch.no_grad()
def _render_iter(renderer, identity, motion, batch_size, output_device, callback, check_interrupt, allow_tf32,
                 output_dtype):
    identity, source = prepare_render_source(renderer, identity, allow_tf32)
    total = motion.shape[0]
    ahead = _lookahead(identity.vector.device, output_device)
    pending: list[_PendingFrames] = []
    for start in range(0, total, batch_size):
        pending.append(launch_batch(renderer, identity, source, motion[start:start + batch_size], start,
                                    output_device, check_interrupt, allow_tf32,
                                    pad_to=compiled.bucket_size(renderer, batch_size), output_dtype=output_dtype))
        while len(pending) > ahead:
            yield _hand_out(pending.pop(0), total, callback)
    while pending:
        yield _hand_out(pending.pop(0), total, callback)


def _lookahead(device: torch.device, output_device) -> int:
    """Batches queued on the device beyond the one being handed out: 1 from a GPU to the CPU, where the copy
    is asynchronous; 0 otherwise (on a CPU "queued" would mean computed, delaying every batch by one)."""
    return int(device.type == "cuda" and output_device is not None and torch.device(output_device).type == "cpu")


def _hand_out(batch: "_PendingFrames", total: int, callback: Progress | None) -> torch.Tensor:
    frames = batch.result()
    if callback is not None:
        callback(min(batch.end, total), total)
    return frames


@torch.no_grad()
def prepare_render_source(renderer: IMTRenderer, identity: Identity, allow_tf32: bool = False):
    """`(identity, source)`: the identity on the renderer's device and dtype, and the source-only half of the
    transfer (key/value projections, pooled features, `IMTRenderer.prepare_source`), done once per render."""
    device, dtype = _model_place(renderer)
    identity = identity.to(device=device, dtype=dtype)
    with model_fp32(renderer, allow_tf32):
        source = renderer.prepare_source(identity.motion_maps, identity.features)
    return identity, source


@torch.no_grad()
def render_batch(renderer: IMTRenderer, identity: Identity, source, latents: torch.Tensor, first: int = 0,
                 output_device: torch.device | str | None = None, check_interrupt: Interrupt | None = None,
                 allow_tf32: bool = False, pad_to: int | None = None,
                 output_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Frames `[b, 3, S, S]` (float32 in [0, 1], or uint8 with `output_dtype`) of motion latents `[b, D]`
    (frames `first`… of the clip, for messages), from `prepare_render_source`'s identity and source;
    `check_interrupt` before the batch and (eager only) before its synthesis.

    `pad_to`: render a batch shorter than this as that many frames (the last latent repeated, the extra
    frames dropped), so that a compiled renderer (`compiled.set_compile`) sees one shape per run.
    """
    return launch_batch(renderer, identity, source, latents, first, output_device, check_interrupt, allow_tf32,
                        pad_to, output_dtype).result()


class _PendingFrames:
    """A rendered batch on its way to the output device. `result()` waits for its copy (a CUDA event; nothing
    on a CPU), then checks the finiteness flag computed on the device before the copy, so that neither
    the check nor the copy makes the CPU wait for batches queued after this one."""

    def __init__(self, frames: torch.Tensor, finite: torch.Tensor, copied, first: int, end: int):
        self.frames, self.finite, self.copied, self.first, self.end = frames, finite, copied, first, end

    def result(self) -> torch.Tensor:
        if self.copied is not None:
            self.copied.synchronize()
        _check_finite_flag(self.finite, f"frames {self.first}–{self.end - 1}", RENDERER_CAUSES)
        return self.frames


def launch_batch(renderer: IMTRenderer, identity: Identity, source, latents: torch.Tensor, first: int = 0,
                 output_device: torch.device | str | None = None, check_interrupt: Interrupt | None = None,
                 allow_tf32: bool = False, pad_to: int | None = None,
                 output_dtype: torch.dtype = torch.float32) -> _PendingFrames:
    """`render_batch` without waiting: the work and the copy to `output_device` are queued (on a GPU) and
    the returned handle's `result()` gives the frames."""
    device, dtype = _model_place(renderer)
    if check_interrupt is not None:
        check_interrupt()
    n = latents.shape[0]
    latents = latents.to(device=device, dtype=dtype)
    if pad_to is not None and n < pad_to:
        latents = torch.cat([latents, latents[-1:].expand(pad_to - n, -1)])
    vector = identity.vector.expand(latents.shape[0], -1)
    step = compiled.frames_step(renderer)
    # The TF32 switch is process-wide, so it covers the model calls only, never the caller's code that runs
    # between batches.
    with model_fp32(renderer, allow_tf32):
        if step is not compiled.eager_frames:
            # A copy: under "reduce-overhead" the output lives in the CUDA graph's memory until its next replay.
            frames = step(renderer, vector, source, latents)[:n].to(torch.float32, copy=True)
        else:
            maps = renderer.decode_motion(renderer.adapt(latents, vector))
            if check_interrupt is not None:  # the synthesis is most of a frame's time: a second cancel point
                check_interrupt()
            frames = renderer.render(maps, source=source)[:n].float()
    finite = torch.isfinite(frames).all()
    if output_dtype == torch.uint8:
        frames = to_uint8_tensor(frames)
    copied = None
    if output_device is not None and torch.device(output_device) != frames.device:
        asynchronous = frames.device.type == "cuda" and torch.device(output_device).type == "cpu"
        # non_blocking to the CPU lands in pinned memory; the event says when it has landed.
        frames = frames.to(output_device, non_blocking=asynchronous)
        finite = finite.to(output_device, non_blocking=asynchronous)
        if asynchronous:
            copied = torch.cuda.Event()
            copied.record()
    return _PendingFrames(frames, finite, copied, first, first + n)


def to_uint8_tensor(frames: torch.Tensor) -> torch.Tensor:
    """Float frames in [0, 1] → uint8 0–255 on their own device, with `media.images.to_uint8`'s arithmetic
    (clip, ×255 in float32, round half to even), so both give the same bytes."""
    return frames.float().clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)


def render_frames(renderer: IMTRenderer, identity: Identity, motion: torch.Tensor, batch_size: int = 4,
                  output_device: torch.device | str | None = "cpu", callback: Progress | None = None,
                  check_interrupt: Interrupt | None = None, allow_tf32: bool = False) -> torch.Tensor:
    """All frames `[T, 3, S, S]` in [0, 1]; see `render_batches`."""
    return torch.cat(list(render_batches(renderer, identity, motion, batch_size, output_device,
                                         callback, check_interrupt, allow_tf32)))
