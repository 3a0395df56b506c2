"""Flow-matching sampling: the time grid, initial noise, Euler integration and classifier-free guidance.

Time grid: `steps` points evenly spaced from t=0 (noise) to t=1 (data), both ends included, so
there are `steps - 1` Euler updates and `steps - 1` velocity evaluations (the official default
steps=10 gives 9 updates). The update is `x ← x + (t[i+1] - t[i]) · v(t[i], x)`.

Initial noise, for a clip sampled in successive windows (`NOISE_MODES`):
- "reference": one generator seeded once with `seed`; every window draws fresh noise from it, in
  order. This is what the reference runs by default (`torch.manual_seed(seed)`, then `randn` per
  window), so a 10 s clip starts each of its five windows from different noise.
- "fixed_per_window": the generator is re-seeded for every window, so all windows start from the
  same noise (the reference's opt-in `--fix_noise_seed`).
Noise is drawn on the CPU by default, which makes a seed give the same motion on every device.
"""
from __future__ import annotations

from typing import Callable

import torch

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseSource = Callable[[tuple[int, ...]], torch.Tensor]
NOISE_MODES = ("reference", "fixed_per_window")


def window_noise(seed: int, mode: str = "reference", device: torch.device | str = "cpu") -> NoiseSource:
    """A source of initial noise: each call `draw(shape)` returns the next window's standard
    normal noise (float32, on `device`) under the rule of `mode` (see the module docstring)."""
    if mode not in NOISE_MODES:
        raise ValueError(f"noise mode {mode!r} is not one of {', '.join(NOISE_MODES)}")
    generator = torch.Generator(device).manual_seed(seed)

    def draw(shape: tuple[int, ...]) -> torch.Tensor:
        if mode == "fixed_per_window":
            generator.manual_seed(seed)
        return torch.randn(shape, generator=generator, device=device)

    return draw


def time_grid(steps: int, device: torch.device | str | None = None) -> torch.Tensor:
    """`[steps]` float32 times from 0 to 1 inclusive."""
    if steps < 2:
        raise ValueError(f"steps must be at least 2 (a grid of {steps} points has no Euler step)")
    return torch.linspace(0.0, 1.0, steps, device=device)


def euler(velocity: Velocity, x: torch.Tensor, grid: torch.Tensor,
          callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Integrate dx/dt = velocity(t, x) over `grid` with explicit Euler; returns x at grid[-1].

    `velocity` receives t as a 1-element tensor. `callback(step, total)` runs after each update.
    """
    total = len(grid) - 1
    for i in range(total):
        t0, t1 = grid[i], grid[i + 1]
        x = x + (t1 - t0) * velocity(t0.reshape(1), x)
        if callback is not None:
            callback(i + 1, total)
    return x


def guided(velocity_fn: Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor], scale: float) -> Velocity:
    """Classifier-free guidance: `uncond + scale · (cond - uncond)`.

    `velocity_fn(t, x, doubled)` evaluates the model; with `doubled=True` it must return the
    unconditional and conditional velocities stacked along the batch (unconditional first), which
    lets both passes share one forward. Scale 1 skips the unconditional pass entirely.
    """
    if scale == 1.0:
        return lambda t, x: velocity_fn(t, x, False)

    def velocity(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        uncond, cond = velocity_fn(t, torch.cat([x, x], dim=0), True).chunk(2, dim=0)
        return uncond + scale * (cond - uncond)

    return velocity
