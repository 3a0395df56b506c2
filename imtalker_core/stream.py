"""Streaming audio-driven generation for live avatars: frames come out as each motion window is ready.

The generator makes motion in windows of 50 frames (2 s at 25 fps), each depending only on the
previous window (`MotionGenerator.iter_windows`), so the frames of window 0 can be rendered and
handed out before window 1 exists. `stream_frames` does that:

    audio features → window 0 → render its batches → yield → window 1 → render → yield → …

Time to the first frame is then the audio features, one window of Euler steps and one render
batch, whatever the clip's length (with `audio_mode="chunked"`; see below), instead of the whole
clip's motion and frames.

**Exactness.** With the defaults (`audio_mode="whole"`, `first_batch_size=None`) the frames are
exactly those of the batch pipeline (`generate_motion` then `render_batches` with the same
`batch_size`): the same motion windows (same arithmetic and noise stream) and the same renderer
batches (frames `[k·b, (k+1)·b)`, a batch being rendered as soon as the motion covering it exists,
so a batch may straddle two windows). A smaller `first_batch_size` shortens the time to the first
frame; the later batches are then shifted, and frames equal the batch pipeline's only up to float
rounding (a different batch composition can pick other kernels).

**Audio features: whole clip or chunks.** The reference computes wav2vec2 features for the whole clip
at once, and they are not local: the waveform is normalised with the clip's mean and variance, the
first convolution's GroupNorm takes per-channel statistics over the whole clip, and the transformer
attends over all frames in both directions (its convolutional position embedding too). So the
features of a prefix differ from the whole clip's, and the exact mode (`"whole"`, the default) needs
all the audio before the first window; its cost grows with the clip (wav2vec2 is quadratic above
the encoder's window). The interpolation of the CNN features to the frame count is *not* a source of
non-locality: a clip of T frames is padded to T·640 samples, whose CNN output has 2T - 1 frames, and
the align-corners interpolation to T frames then picks CNN frame 2i for frame i exactly.

`"chunked"` computes each window's features from a bounded span of audio: `context_frames` before
the window and `lookahead_frames` after it (normalised and encoded on their own; the window's frames
are cut out of the span's features, aligned because spans start on frame boundaries). The audio may
then arrive in pieces (an iterable of waveform chunks: live input). Latency for live input is at
least one window of audio plus the look-ahead (2 s + `lookahead_frames`/25 s), because the
generator conditions each 50-frame window on all of its audio. The features, and so the motion,
differ slightly from the whole clip's (`benchmarks/stream_latency.py` measures by how much).

**Generator and renderer on one device** run one after the other here (window w is rendered, then
window w + 1 generated). Overlapping them would need the generator on another CUDA stream or thread
(and a synchronisation per window); it is not done: a window's generation is small next to
rendering its 50 frames (H200, fp16, from the clip figures in benchmarks/README.md: ~0.05 s vs ~0.2 s at
batch 32), so the gain in steady frames/s would be about a fifth at best, and none for the first frame, which
needs its window first anyway. Encoding overlaps rendering instead (`media.video.BackgroundWriter`).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from . import compiled, timing
from .errors import InputError
from .generator import MotionGenerator
from .generator.audio import AudioEncoder
from .pipeline import (MOTION_CAUSES, Identity, _model_place, check_finite_output, check_motion,
                       prepare_render_source, render_batch)
from .precision import model_fp32
from .renderer import IMTRenderer
from .renderer.model import SourceCache
from .sampling import NOISE_MODES
from .validation import (
    check_batch_size,
    check_cfg,
    check_control,
    check_seed,
    check_steps,
)

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
Interrupt = Callable[[], None]
AUDIO_MODES = ("whole", "chunked")


@dataclass
class WindowTiming:
    """Seconds spent on one motion window: `audio_s` its features (chunked mode; 0 in whole mode),
    `motion_s` its Euler steps, `render_s` the render batches its motion completed (0 when it
    completed none), `frames` its motion frames."""

    index: int
    frames: int
    audio_s: float = 0.0
    motion_s: float = 0.0
    render_s: float = 0.0


@dataclass
class StreamTimings:
    """Where the time of one `stream_frames` run went (seconds; filled in while it runs).

    Only the stream's own work is counted: the time the consumer holds a yielded batch (writing it,
    showing it) is not. Device work is synchronised before each reading on CUDA, so the figures are
    when results exist, not when work was queued.

    audio_s: the whole clip's features (whole mode; chunked mode counts them per window);
    source_s: the renderer's source-only work (0 when a `PreparedIdentity` was given);
    first_frame_s: from the first `next()` until the first batch is out (on `output_device`);
    total_s: until the last batch; frames, batches: how many came out; windows: per window.
    """

    audio_s: float = 0.0
    source_s: float = 0.0
    first_frame_s: float | None = None
    first_batch_frames: int = 0
    total_s: float = 0.0
    frames: int = 0
    batches: int = 0
    windows: list[WindowTiming] = field(default_factory=list)

    @property
    def steady_fps(self) -> float | None:
        """Frames per second after the first batch (None until a second batch is out)."""
        if self.first_frame_s is None or self.batches < 2 or self.total_s <= self.first_frame_s:
            return None
        return (self.frames - self.first_batch_frames) / (self.total_s - self.first_frame_s)

    def as_dict(self) -> dict:
        return {"audio_s": self.audio_s, "source_s": self.source_s, "first_frame_s": self.first_frame_s,
                "first_batch_frames": self.first_batch_frames, "total_s": self.total_s, "frames": self.frames,
                "batches": self.batches, "steady_fps": self.steady_fps,
                "windows": [vars(w).copy() for w in self.windows]}


@dataclass(frozen=True)
class PreparedIdentity:
    """An `Identity` on the renderer's device and dtype with the renderer's source-only work done
    (`IMTRenderer.prepare_source`), for streams that reuse one avatar: prepare once, stream many."""

    identity: Identity
    source: SourceCache


@torch.no_grad()
def prepare_identity(renderer: IMTRenderer, identity: Identity, allow_tf32: bool = False) -> PreparedIdentity:
    """The renderer's source-only work for `identity`, once (see `PreparedIdentity`). Prepare it again
    after moving or casting the renderer."""
    if isinstance(identity, PreparedIdentity):
        return identity
    if not isinstance(identity, Identity):
        raise InputError(f"identity must be an Identity from encode_identity, got {type(identity).__name__}")
    return PreparedIdentity(*prepare_render_source(renderer, identity, allow_tf32))


class _Clock:
    """Seconds of the stream's own work: stopped while a yielded batch is with the consumer."""

    def __init__(self, device: torch.device | None):
        self.cuda = device is not None and device.type == "cuda"
        self.elapsed = 0.0
        self._since: float | None = None

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def start(self) -> None:
        self._since = time.perf_counter()

    def now(self) -> float:
        """Work seconds so far (device work finished)."""
        self._sync()
        assert self._since is not None, "the clock is stopped"
        return self.elapsed + time.perf_counter() - self._since

    def stop(self) -> float:
        self.elapsed = self.now()
        self._since = None
        return self.elapsed


class _BatchRenderer:
    """Renders motion as it arrives, in the batches `render_batches` uses for the whole motion:
    frames `[0, first)`, then `batch_size` at a time; a batch is rendered once its motion is there."""

    def __init__(self, renderer: IMTRenderer, prepared: PreparedIdentity, batch_size: int, first_batch_size: int,
                 output_device, check_interrupt: Interrupt | None, allow_tf32: bool):
        self.renderer, self.prepared = renderer, prepared
        self.batch_size, self.next_size = batch_size, first_batch_size
        self.output_device, self.check_interrupt, self.allow_tf32 = output_device, check_interrupt, allow_tf32
        self.pending: list[torch.Tensor] = []
        self.pending_frames = 0
        self.start = 0  # index of the first frame not yet rendered

    def add(self, motion: torch.Tensor) -> None:
        self.pending.append(motion)
        self.pending_frames += motion.shape[0]

    def ready(self, final: bool = False) -> Iterator[torch.Tensor]:
        """Render every complete batch (with `final`, the rest too)."""
        while self.pending_frames >= self.next_size or (final and self.pending_frames):
            motion = torch.cat(self.pending) if len(self.pending) > 1 else self.pending[0]
            take = min(self.next_size, self.pending_frames)
            latents, rest = motion[:take], motion[take:]
            self.pending, self.pending_frames = ([rest] if rest.shape[0] else []), rest.shape[0]
            yield self._render(latents, self.next_size)
            self.start += take
            self.next_size = self.batch_size

    def _render(self, motion: torch.Tensor, size: int) -> torch.Tensor:
        # pipeline.render_batch, as render_batches uses it, so the frames are the batch pipeline's; a compiled
        # renderer sees two shapes at most (the first batch's and the others').
        return render_batch(self.renderer, self.prepared.identity, self.prepared.source, motion, self.start,
                            self.output_device, self.check_interrupt, self.allow_tf32,
                            pad_to=compiled.bucket_size(self.renderer, size))


class ChunkedAudioFeatures:
    """wav2vec2 features window by window from audio that may arrive in pieces (live input).

    For the window of frames `[f, f + n)` the audio of frames `[f - context_frames, f + n +
    lookahead_frames)` (clipped to the clip) is normalised and encoded on its own, and the window's
    n frames are cut out of the result. Frames are 640 samples at 16 kHz / 25 fps; spans start on frame
    boundaries, so frame i of a span is frame `start + i` of the clip. Memory holds one span of audio.

    `windows(chunks)` takes an iterable of 16 kHz mono waveform pieces (`[S]` float arrays or tensors,
    any lengths) and yields `(first_frame, features [1, n, hidden])` as soon as a window's audio (and
    its look-ahead) has arrived; the last window, when the input ends, may be shorter than 50 frames.
    """

    def __init__(self, encoder: AudioEncoder, window_frames: int = 50, context_frames: int = 100,
                 lookahead_frames: int = 25):
        for name, value, low in (("window_frames", window_frames, 1), ("context_frames", context_frames, 0),
                                 ("lookahead_frames", lookahead_frames, 0)):
            if int(value) != value or value < low:
                raise InputError(f"{name} must be a whole number ≥ {low}, got {value}")
        self.encoder = encoder
        self.window, self.context, self.lookahead = int(window_frames), int(context_frames), int(lookahead_frames)
        self.samples_per_frame = encoder.samples_per_frame

    def windows(self, chunks: Iterable) -> Iterator[tuple[int, torch.Tensor]]:
        spf = self.samples_per_frame
        pieces = iter(chunks)
        buffer = torch.zeros(0)
        buffer_start = 0  # clip sample index of buffer[0]
        received, ended, first = 0, False, 0
        while True:
            wanted = (first + self.window + self.lookahead) * spf
            while not ended and received < wanted:
                try:
                    piece = _check_wave(next(pieces), "an audio chunk", allow_empty=True)
                except StopIteration:
                    ended = True
                    break
                buffer = torch.cat([buffer, piece])
                received += piece.shape[0]
            if ended:
                total = timing.frame_count(received, self.encoder.fps, self.encoder.sample_rate)
                if total == 0:
                    raise InputError("the audio stream ended without any samples; there is nothing to animate")
                if first >= total:
                    return
                n = min(self.window, total - first)
            else:
                n = self.window
            span_first = max(0, first - self.context)
            span_end = min(received, (first + n + self.lookahead) * spf)
            span = buffer[span_first * spf - buffer_start: span_end - buffer_start]
            span_frames = -(-(span_end - span_first * spf) // spf)
            features = self.encoder(span, num_frames=span_frames, window_frames=None)
            yield first, features[:, first - span_first: first - span_first + n]
            first += n
            keep_from = max(0, first - self.context) * spf
            buffer, buffer_start = buffer[keep_from - buffer_start:], keep_from


def _check_wave(wave, name: str, allow_empty: bool = False) -> torch.Tensor:
    """16 kHz mono samples `[S]` (numpy or torch) as a float32 CPU tensor: finite, one channel."""
    if isinstance(wave, np.ndarray):
        wave = torch.from_numpy(np.ascontiguousarray(wave))
    if not isinstance(wave, torch.Tensor):
        raise InputError(f"{name} must be a 16 kHz mono waveform (numpy array or tensor [samples]), "
                         f"got {type(wave).__name__}")
    if wave.dim() == 2 and wave.shape[0] == 1:
        wave = wave[0]
    if wave.dim() != 1:
        raise InputError(f"{name} must be mono samples [samples], got shape {list(wave.shape)}; "
                         "mix it down with imtalker_core.media.audio.to_mono_16k")
    if not wave.is_floating_point():
        raise InputError(f"{name} must be float samples in [-1, 1], got {wave.dtype}")
    if wave.shape[0] == 0 and not allow_empty:
        raise InputError(f"{name} is empty (zero samples); give audio with speech in it")
    wave = wave.detach().to("cpu", torch.float32)
    if not torch.isfinite(wave).all():
        raise InputError(f"{name} contains NaN or infinite samples")
    return wave


def _window_controls(control: torch.Tensor | None, first: int, n: int) -> torch.Tensor | None:
    """Frames `[first, first + n)` of a control; beyond its end raw zeros, as the whole-clip rule pads."""
    if control is None:
        return None
    part = control[first:first + n]
    # parity: the reference pads missing control frames with raw zeros before projecting them.
    return F.pad(part, (0, 0, 0, n - part.shape[0])) if part.shape[0] < n else part


def stream_frames(renderer: IMTRenderer, generator: MotionGenerator, audio_encoder: AudioEncoder,
                  identity: Identity | PreparedIdentity, audio, *, pose=None, cam=None, gaze=None,
                  cfg_scale: float = 3.0, steps: int = 10, seed: int = 42, noise: str = "reference",
                  noise_device: torch.device | str = "cpu", batch_size: int = 4, first_batch_size: int | None = None,
                  audio_mode: str = "whole", audio_window_frames: int | None = 1500, context_frames: int = 100,
                  lookahead_frames: int = 25, output_device: torch.device | str | None = "cpu",
                  allow_tf32: bool = False, callback: Progress | None = None,
                  check_interrupt: Interrupt | None = None,
                  timings: StreamTimings | None = None) -> Iterator[torch.Tensor]:
    """Yield frames `[b, 3, S, S]` in [0, 1] (float32 on `output_device`) for 16 kHz mono `audio`,
    each batch as soon as the motion window(s) covering it are generated.

    audio: a waveform `[S]` (numpy or tensor, raw: normalised here as in the reference), or, in
    `audio_mode="chunked"`, also an iterable of waveform pieces arriving over time (in whole mode an
    iterable is read to its end first). identity: from `encode_identity` (or `prepare_identity`, to
    skip the source-only work per stream). Generation settings as in `generate_motion` (pose `[T,3]`,
    cam `[T,3]`, gaze `[T,2]`, cfg_scale, steps, seed, noise, noise_device); `audio_window_frames` as
    `AudioEncoder.forward`'s `window_frames` (whole mode); `context_frames`, `lookahead_frames` as in
    `ChunkedAudioFeatures` (chunked mode). Models are used on their own devices and dtypes.

    batch_size: frames rendered at once; first_batch_size: frames of the first batch (default
    batch_size; smaller = earlier first frame; see the module docstring on exactness).
    `callback(frames_done, frames_total)` after each batch (in chunked mode the total is what is known
    so far); `check_interrupt()` is called between Euler steps and render stages and may raise.
    `timings`: a `StreamTimings` to fill in. Inputs are checked here, before the first `next()`;
    the work starts at the first `next()`.
    """
    if audio_mode not in AUDIO_MODES:
        raise InputError(f"audio_mode={audio_mode!r}: use one of {', '.join(AUDIO_MODES)}")
    steps, cfg_scale, seed = check_steps(steps), check_cfg(cfg_scale), check_seed(seed)
    if noise not in NOISE_MODES:
        raise InputError(f"noise={noise!r}: use one of {', '.join(NOISE_MODES)}")
    batch_size = check_batch_size(batch_size)
    first_batch_size = batch_size if first_batch_size is None else check_batch_size(first_batch_size,
                                                                                     "first batch size")
    gcfg = generator.cfg
    controls = {"pose": check_control(pose, gcfg.pose_dim, "pose"), "cam": check_control(cam, gcfg.cam_dim, "cam"),
                "gaze": check_control(gaze, gcfg.gaze_dim, "gaze")}
    if not isinstance(identity, (Identity, PreparedIdentity)):
        raise InputError(f"identity must be an Identity from encode_identity, got {type(identity).__name__}")
    reference_motion = check_motion(identity.identity.motion if isinstance(identity, PreparedIdentity)
                                    else identity.motion, gcfg.motion_dim, "reference motion").reshape(1, -1)
    if audio_mode == "whole":
        wave = _check_wave(audio if isinstance(audio, (np.ndarray, torch.Tensor))
                           else torch.cat([_check_wave(c, "an audio chunk", True) for c in audio]), "the audio")
        source = None
    else:
        chunker = ChunkedAudioFeatures(audio_encoder, gcfg.window_frames, context_frames, lookahead_frames)
        source = [audio] if isinstance(audio, (np.ndarray, torch.Tensor)) else audio
        wave = None
    timings = timings if timings is not None else StreamTimings()
    settings = {"cfg_scale": cfg_scale, "steps": steps, "seed": seed, "noise": noise, "noise_device": noise_device}
    renderer_place = _model_place(renderer)[0]

    @torch.no_grad()
    def run() -> Iterator[torch.Tensor]:
        clock = _Clock(renderer_place)
        clock.start()
        prepared = identity
        if not isinstance(prepared, PreparedIdentity):
            prepared = prepare_identity(renderer, prepared, allow_tf32)
            timings.source_s = clock.now()
        batches = _BatchRenderer(renderer, prepared, batch_size, first_batch_size, output_device, check_interrupt,
                                 allow_tf32)
        sampler = generator.window_sampler(reference_motion, 1, **settings)

        def step_callback(i: int, n: int) -> None:
            if check_interrupt is not None:
                check_interrupt()

        if wave is not None:
            mark = clock.now()
            device = next(audio_encoder.parameters()).device
            features = audio_encoder(wave.to(device), window_frames=audio_window_frames)
            _check_features(features, gcfg.audio_dim)
            total = features.shape[1]
            with model_fp32(generator):
                audio_emb, others_emb = generator.embed_controls(features.to(next(generator.parameters())),
                                                                 **controls)
            timings.audio_s = clock.now() - mark
            spans = ((f, None) for f in range(0, total, gcfg.window_frames))
        else:
            total = None
            spans = chunker.windows(source)

        index = 0
        while True:
            mark = clock.now()
            try:
                first, window_features = next(spans)
            except StopIteration:
                break
            n = min(gcfg.window_frames, total - first) if window_features is None else window_features.shape[1]
            record = WindowTiming(index, n)
            if window_features is not None:  # chunked: this window's features and embeddings
                _check_features(window_features, gcfg.audio_dim)
                with model_fp32(generator):
                    a_w, o_w = generator.embed_controls(
                        window_features.to(next(generator.parameters())),
                        **{k: _window_controls(v, first, n) for k, v in controls.items()})
                after_audio = clock.now()
                record.audio_s = after_audio - mark
                mark = after_audio
            else:
                a_w, o_w = audio_emb[:, first:first + n], others_emb[:, first:first + n]
            with model_fp32(generator):  # per call: the flags are process-wide, and this generator yields
                motion = sampler.step(a_w, o_w, step_callback)
            check_finite_output(motion, "generated motion", MOTION_CAUSES)
            batches.add(motion[0].float())
            after_motion = clock.now()
            record.motion_s = after_motion - mark
            timings.windows.append(record)
            index += 1
            known = total if total is not None else first + n
            yield from _emit(batches.ready(), record, clock, timings, known, callback)
        if timings.windows:
            yield from _emit(batches.ready(final=True), timings.windows[-1], clock, timings,
                             batches.start + batches.pending_frames, callback)
        timings.total_s = clock.stop()
        log.debug("stream: %d frames, first after %.3f s, %.3f s in all", timings.frames,
                  timings.first_frame_s or 0.0, timings.total_s)

    return run()


def _emit(rendered: Iterator[torch.Tensor], record: WindowTiming, clock: _Clock, timings: StreamTimings,
          total: int, callback: Progress | None) -> Iterator[torch.Tensor]:
    """Yield rendered batches, timing each and stopping the clock while the consumer has it."""
    while True:
        mark = clock.now()
        try:
            frames = next(rendered)
        except StopIteration:
            return
        now = clock.now()
        record.render_s += now - mark
        timings.frames += frames.shape[0]
        timings.batches += 1
        if timings.first_frame_s is None:
            timings.first_frame_s, timings.first_batch_frames = now, frames.shape[0]
        timings.total_s = now
        clock.stop()
        yield frames
        clock.start()
        if callback is not None:
            callback(timings.frames, max(total, timings.frames))


def _check_features(features: torch.Tensor, width: int) -> None:
    if features.dim() != 3 or features.shape[0] != 1 or features.shape[2] != width:
        raise InputError(f"the audio encoder gives features {list(features.shape)}, but the generator wants "
                         f"[1, T, {width}]; load the wav2vec2 that belongs to the generator")
    if not torch.isfinite(features).all():
        raise InputError("audio features contain NaN or infinite values; check the audio and the wav2vec2 weights")
