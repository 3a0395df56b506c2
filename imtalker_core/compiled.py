"""Optional `torch.compile` of the per-batch work: the renderer's frames step and motion encoder, and the
generator's velocity.

    set_compile(renderer, "default")        # compiled on its next use, once per batch size
    set_compile(generator, "reduce-overhead")
    set_compile(renderer, "off")            # back to eager

What is compiled, and why there:
- the renderer: `frames_step` (motion latents → adapt → decode → transfer → synthesis), everything that
  runs per batch once `pipeline.prepare_render_source` has done the source-only work. One graph per
  batch size; `pipeline` pads a short last batch up to the run's batch size (its frames are dropped), so
  a clip compiles once instead of once more for its remainder (`bucket_size`). With it, the renderer's
  motion encoder (`motion_step`: driving frames → motion latents, the video-driven route's other
  per-frame cost: more multiply-adds than rendering a frame), likewise once per batch size.
- the generator: `MotionGenerator.velocity`, the DiT call each Euler step makes (60 tokens of width 512:
  launch-bound on a GPU, where "reduce-overhead" replays it as a CUDA graph). Its shapes are fixed by the
  window, so it compiles once (twice with guidance off and on).

Modes are `torch.compile`'s: "default", "reduce-overhead" (CUDA graphs on a GPU; outputs live in the
graph's memory until the next replay, so `pipeline` copies frames out before the next batch) and
"max-autotune". The first call of each shape compiles: tens of seconds on a GPU, minutes on a CPU. It pays
for long clips and repeated runs on a GPU; on a CPU it is rarely worth it (see benchmarks/README.md).

The compiled functions live in a weak table keyed by the model, not on it: the state dict, `.to()` and
ComfyUI's model management see the plain module. Moving or casting the model makes torch recompile
(its guards check the parameters), never run stale code. Frames agree with eager ones to float rounding
(inductor fuses and reorders operations), not bit for bit.

The renderer's Triton kernels (the anchor argmax, the window attention; `layers.attention`) enter its
graph as custom ops (`layers.kernel_ops`) where `attention.prepare_compiled_kernels`, run eagerly before
each compiling call, found them working for the model's device and dtype; elsewhere the torch code is
traced, so a kernel that cannot run never breaks a compiled graph.

Each function is compiled whole (`fullgraph=True`): a graph break would make torch trace every layer
separately, hit its recompile limit on the layers' differing shapes and quietly fall back to eager for
some of them; an error on the first call is the honest outcome instead. Caches keyed on tensor identity
(the window attention's bias, the synthesis network's folded channels-last conv weights) are rebuilt inside
the graph while compiling, where they cost a few small ops.
"""
from __future__ import annotations

import contextlib
import logging
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .errors import InputError
from .layers import attention

log = logging.getLogger(__name__)

COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")

_compiled: weakref.WeakKeyDictionary[nn.Module, "_Compiled"] = weakref.WeakKeyDictionary()


class _Compiled:
    """A model's compiled function, the settings it was made with, and the input shapes it has compiled for.

    `fn` calls the compiled function and logs the first call of each input shape (the one that compiles:
    tens of seconds on a GPU, with nothing else to show for it), and how long it took.
    """

    def __init__(self, compiled_fn: Callable, mode: str, backend: Any, name: str,
                 prepare: Callable[[], None] | None = None, motion: "_Compiled | None" = None):
        self.compiled_fn, self.mode, self.backend, self.name = compiled_fn, mode, backend, name
        self.prepare = prepare  # run eagerly before each compiling call
        self.motion = motion  # a renderer's compiled motion encoder
        self.shapes: set[tuple] = set()
        self.fn = self._call  # one bound method, so that callers may compare it

    def _call(self, *args, **kwargs):
        shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
        if shapes in self.shapes:
            return self.compiled_fn(*args, **kwargs)
        log.info("%s: compiling (mode %s) for inputs of shapes %s, once per shape in this process: tens of "
                 "seconds on a GPU, minutes on a CPU", self.name, self.mode, [list(s) for s in shapes])
        start = time.perf_counter()
        if self.prepare is not None:
            self.prepare()
        out = self.compiled_fn(*args, **kwargs)
        self.shapes.add(shapes)
        log.info("%s: compiled in %.1f s (first call included)", self.name, time.perf_counter() - start)
        return out


def check_compile_mode(mode: str) -> str:
    if mode not in COMPILE_MODES:
        raise InputError(f"compile={mode!r}: use one of {', '.join(COMPILE_MODES)}")
    return mode


def set_compile(model: nn.Module, mode: str = "default", backend: Any = "inductor") -> None:
    """Compile `model`'s per-batch work from its next use (see the module docstring); "off" undoes it.

    `model` is an `IMTRenderer` or a `MotionGenerator`. `backend` is `torch.compile`'s (a name or a
    callable; tests use "eager" or a counting backend to check the tracing without code generation).
    Calling it again with the same settings keeps the compiled code.
    """
    from .generator import MotionGenerator
    from .renderer import IMTRenderer

    mode = check_compile_mode(mode)
    if mode == "off":
        _compiled.pop(model, None)
        return
    current = _compiled.get(model)
    if current is not None and current.mode == mode and current.backend == backend:
        return
    prepare = motion = None
    options = {} if mode == "default" else {"mode": mode}
    if isinstance(model, IMTRenderer):
        target = eager_frames
        motion = _Compiled(torch.compile(eager_motion, backend=backend, dynamic=False, fullgraph=True, **options),
                           mode, backend, "IMTRenderer motion encoder")

        def prepare():  # which Triton kernels the traced code may call, for the model's device and dtype now
            weight = next(model.parameters())
            attention.prepare_compiled_kernels(weight.device, weight.dtype)
    elif isinstance(model, MotionGenerator):
        target = model.velocity
    else:
        raise TypeError(f"set_compile takes an IMTRenderer or a MotionGenerator, not {type(model).__name__}")
    _compiled[model] = _Compiled(torch.compile(target, backend=backend, dynamic=False, fullgraph=True,
                                               **options), mode, backend, type(model).__name__, prepare, motion)
    log.info("%s will be compiled (mode %s) at its first use of each shape", type(model).__name__, mode)


@contextlib.contextmanager
def suspended(model: nn.Module) -> Iterator[None]:
    """Run `model` eagerly inside the block and give it its compiled code back after it (nothing to
    recompile), e.g. to time the eager and compiled forms of one model side by side."""
    current = _compiled.pop(model, None)
    try:
        yield
    finally:
        if current is not None:
            _compiled[model] = current


def compile_mode(model: nn.Module) -> str:
    """The mode `model` is compiled with, or "off"."""
    current = _compiled.get(model)
    return current.mode if current is not None else "off"


def bucket_size(model: nn.Module, batch_size: int) -> int | None:
    """The batch every renderer batch is padded to when `model` is compiled (`batch_size`), else None."""
    return batch_size if model in _compiled else None


def frames_step(renderer: nn.Module) -> Callable:
    """`step(renderer, vector, source, latents) → frames` for this renderer: compiled or eager.

    vector: identity vector `[b, identity_dim]`; source: `SourceCache`; latents `[b, latent_dim]`; all on
    the renderer's device and dtype. Frames `[b, 3, S, S]` in [0, 1], in the renderer's dtype.
    """
    current = _compiled.get(renderer)
    return current.fn if current is not None else eager_frames


def motion_step(renderer: nn.Module) -> Callable:
    """`step(renderer, images) → latents` for this renderer: compiled or eager.

    images: driving frames `[b, 3, S, S]` in [0, 1] on the renderer's device and dtype; latents
    `[b, latent_dim]` in the renderer's dtype (under "reduce-overhead" in the graph's memory until the next
    call: copy them out).
    """
    current = _compiled.get(renderer)
    return current.motion.fn if current is not None and current.motion is not None else eager_motion


def velocity_fn(generator: nn.Module) -> Callable:
    """The generator's `velocity` (same arguments): compiled or its own method."""
    current = _compiled.get(generator)
    return current.fn if current is not None else generator.velocity


def eager_motion(renderer, images: torch.Tensor) -> torch.Tensor:
    """The uncompiled motion step (see `motion_step`)."""
    return renderer.encode_motion(images)


def eager_frames(renderer, vector: torch.Tensor, source, latents: torch.Tensor) -> torch.Tensor:
    """The uncompiled frames step (see `frames_step`)."""
    maps = renderer.decode_motion(renderer.adapt(latents, vector))
    return renderer.render(maps, source=source)
