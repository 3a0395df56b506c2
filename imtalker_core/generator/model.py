"""Motion generator: condition projections, the flow-matching transformer, and windowed sampling."""
from __future__ import annotations

import logging
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

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
        """
        c = self.cfg
        b, total, _ = audio.shape
        if total == 0:
            raise ValueError("audio features have no frames; the audio clip is empty")
        param = next(self.parameters())
        audio = audio.to(param)
        ref_motion = ref_motion.to(param).expand(b, -1)
        a, others = self.embed_controls(audio, pose, cam, gaze)
        grid = time_grid(steps, device=param.device)
        draw_noise = window_noise(seed, noise, noise_device)
        n_windows = math.ceil(total / c.window_frames)
        ctx = c.context_frames
        prev_x = torch.zeros(b, ctx, c.motion_dim, device=param.device, dtype=param.dtype)
        prev_a = torch.zeros(b, ctx, c.cond_dim, device=param.device, dtype=param.dtype)
        prev_o = torch.zeros_like(prev_a)
        outputs = []
        for w in range(n_windows):
            span = slice(w * c.window_frames, (w + 1) * c.window_frames)
            a_w = _pad_window(a[:, span], c.window_frames)
            o_w = _pad_window(others[:, span], c.window_frames)
            o_full = torch.cat([prev_o, o_w], dim=1)

            def velocity_fn(t, x, doubled, a_w=a_w, o_full=o_full, prev_x=prev_x, prev_a=prev_a):
                if doubled:
                    # parity: guidance nulls only the window's audio, not the context's.
                    return self.velocity(t, x, ref_motion.repeat(2, 1), prev_x.repeat(2, 1, 1),
                                         torch.cat([torch.zeros_like(a_w), a_w]), prev_a.repeat(2, 1, 1),
                                         o_full.repeat(2, 1, 1))
                return self.velocity(t, x, ref_motion, prev_x, a_w, prev_a, o_full)

            x0 = draw_noise((b, c.window_frames, c.motion_dim))

            def step_callback(i, n, w=w):
                if check_interrupt is not None:
                    check_interrupt()
                if callback is not None:
                    callback(w * n + i, n_windows * n)

            x = euler(guided(velocity_fn, cfg_scale), x0.to(param), grid, step_callback)
            outputs.append(x)
            prev_x, prev_a, prev_o = x[:, -ctx:], a_w[:, -ctx:], o_w[:, -ctx:]
        return torch.cat(outputs, dim=1)[:, :total]
