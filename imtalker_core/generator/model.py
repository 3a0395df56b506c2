"""Motion generator: condition projections, the flow-matching transformer, and windowed sampling."""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .. import compiled
from ..config import GeneratorConfig
from ..sampling import euler, guided, time_grid, window_noise
from .dit import FlowMatchingTransformer

log = logging.getLogger(__name__)


def _projection(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim), nn.SiLU())


def _fit_length(seq: torch.Tensor, length: int, name: str) -> torch.Tensor:
    """Crop or zero-pad a `[T', D]` control sequence to `[length, D]`, logging any change."""
    if seq.shape[0] != length:
        log.info("%s has %d frames for %d motion frames; %s", name, seq.shape[0], length,
                 "cropping it" if seq.shape[0] > length else "padding the end with zeros")
    if seq.shape[0] >= length:
        return seq[:length]
    # parity: the reference pads missing control frames with raw zeros before projecting them.
    return F.pad(seq, (0, 0, 0, length - seq.shape[0]))


def _pad_window(seq: torch.Tensor, length: int) -> torch.Tensor:
    """Extend `[B, n, D]` to `[B, length, D]` by repeating its last frame."""
    missing = length - seq.shape[1]
    return seq if missing == 0 else torch.cat([seq, seq[:, -1:].expand(-1, missing, -1)], dim=1)


class MotionGenerator(nn.Module):
    """Audio (+ pose, camera, gaze) → motion latents, by flow matching (38,821,536 parameters).

    Attribute names follow the official checkpoint (`model.*` entries, wav2vec2 excluded).
    """

    def __init__(self, cfg: GeneratorConfig | None = None):
        super().__init__()
        self.cfg = cfg or GeneratorConfig()
        c = self.cfg
        self.fmt = FlowMatchingTransformer(c)
        self.audio_projection = _projection(c.audio_dim, c.cond_dim)
        self.gaze_projection = _projection(c.gaze_dim, c.cond_dim)
        self.pose_projection = _projection(c.pose_dim, c.cond_dim)
        self.cam_projection = _projection(c.cam_dim, c.cond_dim)

    def embed_controls(self, audio: torch.Tensor, pose: torch.Tensor | None = None,
                       cam: torch.Tensor | None = None, gaze: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Project the conditions of a whole clip.

        audio: `[B, T, audio_dim]` wav2vec2 features at the video frame rate. pose `[T', 3]`,
        cam `[T', 3]`, gaze `[T', 2]` (shared by the batch; cropped or zero-padded to T); an
        absent control is a zero embedding. Returns (audio embedding, pose+cam+gaze embedding),
        both `[B, T, cond_dim]`; they stay separate because guidance nulls only the audio.
        """
        b, t, _ = audio.shape
        a = self.audio_projection(audio)
        others = torch.zeros_like(a)
        for seq, proj, name in ((pose, self.pose_projection, "pose"), (cam, self.cam_projection, "cam"),
                                (gaze, self.gaze_projection, "gaze")):
            if seq is not None:
                seq = _fit_length(seq.to(a), t, name)
                others = others + proj(seq)[None].expand(b, -1, -1)
        return a, others

    def velocity(self, t: torch.Tensor, x: torch.Tensor, ref: torch.Tensor, prev_x: torch.Tensor,
                 audio: torch.Tensor, prev_audio: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
        """Velocity for the current window `[B, W, motion_dim]`.

        `prev_x` `[B, C, motion_dim]` is the context (previous window's last frames); `audio` and
        `others` cover context + window `[B, C + W, cond_dim]` except that `audio` holds only
        the window and `prev_audio` the context, so that guidance can null the window's audio alone.
        """
        seq = torch.cat([prev_x, x], dim=1)
        # parity: the reference sums the embeddings as audio + pose + cam + gaze; `others` holds
        # pose + cam + gaze in that order.
        cond = torch.cat([prev_audio, audio], dim=1) + others
        return self.fmt(t, seq, ref, cond)[:, prev_x.shape[1]:]

    def window_sampler(self, ref_motion: torch.Tensor, batch: int = 1, cfg_scale: float = 3.0, steps: int = 10,
                       seed: int = 0, noise: str = "reference",
                       noise_device: torch.device | str = "cpu") -> WindowSampler:
        """A `WindowSampler` that generates a clip window by window from embedded conditions
        (see `iter_windows`, which drives one over a whole clip)."""
        return WindowSampler(self, ref_motion, batch, cfg_scale, steps, seed, noise, noise_device)

    @torch.no_grad()
    def iter_windows(self, audio: torch.Tensor, ref_motion: torch.Tensor, pose: torch.Tensor | None = None,
                     cam: torch.Tensor | None = None, gaze: torch.Tensor | None = None, cfg_scale: float = 3.0,
                     steps: int = 10, seed: int = 0, noise: str = "reference",
                     noise_device: torch.device | str = "cpu", callback: Callable[[int, int], None] | None = None,
                     check_interrupt: Callable[[], None] | None = None) -> Iterator[torch.Tensor]:
        """Yield the motion latents of audio features `[B, T, audio_dim]` window by window:
        `[B, n, motion_dim]` with n = `window_frames` (50) except for a shorter last window.

        Window w is generated when the iterator is advanced to it, from window w - 1 only, so the
        first window is out after one window's work. The windows concatenated are `sample`'s
        result exactly (it is built on this). Arguments as in `sample`.
        """
        c = self.cfg
        b, total, _ = audio.shape
        if total == 0:
            raise ValueError("audio features have no frames; the audio clip is empty")
        param = next(self.parameters())
        a, others = self.embed_controls(audio.to(param), pose, cam, gaze)
        sampler = self.window_sampler(ref_motion, b, cfg_scale, steps, seed, noise, noise_device)
        n_windows = math.ceil(total / c.window_frames)
        for w in range(n_windows):
            span = slice(w * c.window_frames, (w + 1) * c.window_frames)

            def step_callback(i, n, w=w):
                if check_interrupt is not None:
                    check_interrupt()
                if callback is not None:
                    callback(w * n + i, n_windows * n)

            yield sampler.step(a[:, span], others[:, span], step_callback)

    @torch.no_grad()
    def sample(self, audio: torch.Tensor, ref_motion: torch.Tensor, pose: torch.Tensor | None = None,
               cam: torch.Tensor | None = None, gaze: torch.Tensor | None = None, cfg_scale: float = 3.0,
               steps: int = 10, seed: int = 0, noise: str = "reference", noise_device: torch.device | str = "cpu",
               callback: Callable[[int, int], None] | None = None,
               check_interrupt: Callable[[], None] | None = None) -> torch.Tensor:
        """Generate motion latents `[B, T, motion_dim]` for audio features `[B, T, audio_dim]`.

        The clip is generated in windows of `window_frames` (50), each conditioned on the last
        `context_frames` (10) of the previous one; the last window is padded by repeating its
        last frame and cropped afterwards. Each window starts from `randn(B, 50, motion_dim)` drawn on
        `noise_device` by `sampling.window_noise(seed, noise)`: "reference" (seeded once, fresh noise
        per window, the reference's default) or "fixed_per_window" (its `--fix_noise_seed`).
        `callback(done, total)` counts Euler steps over all windows; `check_interrupt()` may raise.
        The windows one at a time: `iter_windows`.
        """
        return torch.cat(list(self.iter_windows(audio, ref_motion, pose, cam, gaze, cfg_scale, steps, seed, noise,
                                                noise_device, callback, check_interrupt)), dim=1)


class WindowSampler:
    """The state carried from one generated window to the next: the context (last `context_frames`
    motion latents and condition embeddings of the previous window) and the noise source.

    `step(audio_emb, others_emb)` generates the next window from its condition embeddings
    `[B, n, cond_dim]` (1 <= n <= `window_frames`; `MotionGenerator.embed_controls` of the window's
    frames) and returns its latents `[B, n, motion_dim]`. A window shorter than `window_frames` is
    padded by repeating its last frame, as the last window of a clip is. Windows may be fed as their
    audio arrives (live input); `MotionGenerator.iter_windows` feeds the windows of a whole clip.
    """

    def __init__(self, model: MotionGenerator, ref_motion: torch.Tensor, batch: int, cfg_scale: float, steps: int,
                 seed: int, noise: str, noise_device: torch.device | str):
        c = model.cfg
        param = next(model.parameters())
        self.model, self.cfg_scale, self.param = model, cfg_scale, param
        self.ref_motion = ref_motion.to(param).expand(batch, -1)
        self.grid = time_grid(steps, device=param.device)
        self.draw_noise = window_noise(seed, noise, noise_device)
        self.prev_x = torch.zeros(batch, c.context_frames, c.motion_dim, device=param.device, dtype=param.dtype)
        self.prev_a = torch.zeros(batch, c.context_frames, c.cond_dim, device=param.device, dtype=param.dtype)
        self.prev_o = torch.zeros_like(self.prev_a)
        self.windows_done = 0

    @torch.no_grad()
    def step(self, audio_emb: torch.Tensor, others_emb: torch.Tensor,
             step_callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Latents `[B, n, motion_dim]` of the next window; `step_callback(step, steps)` after each Euler
        step (it may raise to cancel)."""
        c = self.model.cfg
        n = audio_emb.shape[1]
        if not 1 <= n <= c.window_frames:
            raise ValueError(f"a window has 1 to {c.window_frames} frames, got {n}")
        a_w = _pad_window(audio_emb.to(self.param), c.window_frames)
        o_w = _pad_window(others_emb.to(self.param), c.window_frames)
        o_full = torch.cat([self.prev_o, o_w], dim=1)
        prev_x, prev_a, ref_motion = self.prev_x, self.prev_a, self.ref_motion
        velocity = compiled.velocity_fn(self.model)  # the model's own method unless compiled

        def velocity_fn(t, x, doubled):
            if doubled:
                # parity: guidance nulls only the window's audio, not the context's.
                return velocity(t, x, ref_motion.repeat(2, 1), prev_x.repeat(2, 1, 1),
                                      torch.cat([torch.zeros_like(a_w), a_w]), prev_a.repeat(2, 1, 1),
                                      o_full.repeat(2, 1, 1))
            return velocity(t, x, ref_motion, prev_x, a_w, prev_a, o_full)

        x0 = self.draw_noise((self.ref_motion.shape[0], c.window_frames, c.motion_dim))
        x = euler(guided(velocity_fn, self.cfg_scale), x0.to(self.param), self.grid, step_callback)
        ctx = c.context_frames
        self.prev_x, self.prev_a, self.prev_o = x[:, -ctx:], a_w[:, -ctx:], o_w[:, -ctx:]
        self.windows_done += 1
        return x[:, :n]
