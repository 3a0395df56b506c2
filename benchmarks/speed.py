"""Speed of the renderer, the generator, the audio encoder and a whole clip (stand-in weights).

    python benchmarks/speed.py --device cpu --frames 2 --batch-sizes 1 2
    python benchmarks/speed.py --device cuda --dtypes fp32 fp16 bf16 --batch-sizes 1 8 16 32 \\
        --frames 64 --json speed_cuda.json

Speed does not depend on the weights' values, so everything runs on deterministic stand-in weights
(tests/helpers/standin.py), random audio features and, for the audio encoder, a randomly
initialised wav2vec2-base built from `transformers.Wav2Vec2Config()` (no files). Nothing here reads
or writes media, so the machine needs neither av, cv2, soxr nor soundfile.

Sections (`--skip` any of them):
- anchor:   the 64² anchor attention alone (queries → attended values + head-averaged argmax),
            plain vs fast path, plus chunk sizes of the fast argmax on CUDA (`--chunk-mib`) and the
            fast path with the fused Triton argmax (path "triton"; CUDA with triton only, else a
            row saying why it was skipped);
- renderer: ms/frame, frames/s and peak memory per precision × path × batch size (motion latents →
            frames on the device, after one warm-up batch); batch 1 is the latency;
- reference: with `--reference DIR` (a checkout of github.com/bigai-nlco/IMTalker, never vendored), the
            reference's own per-frame loop (app.py) on the same stand-in weights, device and precision
            (`--frames` frames), and the renderer section's best fast-path frames/s against it;
- generator: a `--clip-seconds` clip (25 fps; cfg 3, 10 steps) from random 768-wide features;
- audio:    wav2vec2-base features of a `--clip-seconds` random waveform;
- clip:     audio → features → motion → uint8 frames on the CPU through the pipeline
            (`generate_motion`, `render_batches`: what the runner hands its video writer) at the best
            batch size of the renderer section (on a CPU only `--clip-render-frames` are rendered and
            the time is scaled to the clip, marked "scaled"); path "compiled" compiles the generator
            too, in an untimed first clip;
- parity:   on the parity inputs (tests/data/parity), PSNR of each precision's frames against the
            same path's fp32 frames and against the reference's golden frames, and the anchor picks
            that differ from fp32's.

Paths (`--paths`): "plain" is the renderer as it was before issue 11 (float32 anchor map used for
values and argmax, source-only work redone per batch, explicit window attention); "fast" is the
current default (`imtalker_core.layers.attention.fast_paths`) with the source prepared once
(`IMTRenderer.prepare_source`); its anchor picks come from the Triton kernel on CUDA where it can
run (`--argmax-kernel`, `imtalker_core.layers.attention.argmax_kernel`), and its shifted-window attention
from one Triton kernel for half precision on CUDA (`--window-kernel`, `attention.window_kernel`).
Precision "tf32" is fp32 weights with TF32 allowed; "fp32" is true float32 (TF32 off,
`imtalker_core.precision.fp32_matmul`).

CUDA timings use CUDA events after a warm-up and `torch.cuda.synchronize()`; peak memory is
`torch.cuda.max_memory_allocated()` (weights included). Prints one markdown table; `--json OUT`
writes every row plus the environment.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import functools
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from imtalker_core import compiled, pipeline  # noqa: E402
from imtalker_core.compiled import COMPILE_MODES  # noqa: E402
from imtalker_core.config import GeneratorConfig, RendererConfig  # noqa: E402
from imtalker_core.generator import MotionGenerator  # noqa: E402
from imtalker_core.layers import attention  # noqa: E402
from imtalker_core.precision import fp32_matmul, tf32_state  # noqa: E402
from imtalker_core.renderer import IMTRenderer  # noqa: E402
from imtalker_core.renderer.transfer import CoarseTransfer  # noqa: E402
from tests.helpers.standin import parity_file, standin_renderer, standin_state_dict  # noqa: E402

DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SECTIONS = ("anchor", "renderer", "reference", "generator", "audio", "clip", "parity")
FPS = 25
SAMPLE_RATE = 16000


# --------------------------------------------------------------------------- timing helpers

class Timer:
    """Seconds of GPU work (CUDA events) or wall time (CPU) around a callable, plus peak memory."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def __call__(self, fn, repeats: int = 1) -> tuple[float, float | None]:
        """(best seconds over `repeats`, peak GiB or None). On a CPU, `self.cpu_seconds` is the best
        process CPU time (all threads): less disturbed than wall time when others share the cores."""
        best = self.cpu_seconds = math.inf
        if self.cuda:
            self.sync()
            torch.cuda.reset_peak_memory_stats(self.device)
        for _ in range(repeats):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                self.sync()
                start.record()
                fn()
                end.record()
                end.synchronize()
                best = min(best, start.elapsed_time(end) / 1000)
            else:
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                best = min(best, time.perf_counter() - t0)
                self.cpu_seconds = min(self.cpu_seconds, time.process_time() - c0)
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.cuda else None
        return best, peak

    def cpu_note(self) -> str:
        return "" if self.cuda else f"process CPU time {self.cpu_seconds:.2f} s"


def precision_context(name: str, device: torch.device):
    """True fp32 for "fp32", TF32 allowed for "tf32"; nothing for half precisions."""
    if name in ("fp32", "tf32"):
        return fp32_matmul(allow_tf32=name == "tf32", device=device)
    return contextlib.nullcontext()


def path_context(path: str):
    return attention.fast_paths(path in ("fast", "compiled"))


# --------------------------------------------------------------------------- models

class Renderers:
    """Stand-in renderers, one precision at a time on the device (so that peak memory counts one
    model), copied from one float32 master built once on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.master = standin_renderer()
        self.current: tuple[str, IMTRenderer] | None = None

    def get(self, name: str) -> IMTRenderer:
        if self.current is None or self.current[0] != name:
            self.current = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.current = (name, copy.deepcopy(self.master).to(self.device, DTYPES[name]))
        return self.current[1]


class Source:
    """One identity: features, identity vector, motion maps and the fast path's source cache."""

    def __init__(self, model: IMTRenderer, image: torch.Tensor):
        p = next(model.parameters())
        image = image.to(p)
        self.features, self.vector = model.encode_identity(image)
        self.motion = model.encode_motion(image)
        self.maps = model.decode_motion(model.adapt(self.motion, self.vector))
        self.cache = model.prepare_source(self.maps, self.features)


def render_batch(model: IMTRenderer, source: Source, latents: torch.Tensor, path: str) -> torch.Tensor:
    """Motion latents `[b, 32]` → frames `[b, 3, S, S]` as the pipeline does it, on either path."""
    if path == "compiled":  # the fast path under torch.compile (imtalker_core.compiled; set up by bench_renderer)
        return compiled.frames_step(model)(model, source.vector.expand(latents.shape[0], -1), source.cache, latents)
    maps = model.decode_motion(model.adapt(latents, source.vector.expand(latents.shape[0], -1)))
    if path == "fast":
        return model.render(maps, source=source.cache)
    return model.render(maps, source.maps, source.features)


def render_all(model, source, motion, batch, path) -> list[torch.Tensor]:
    """Frames on the device, batch by batch (the renderer alone)."""
    out = []
    with path_context(path):
        for start in range(0, motion.shape[0], batch):
            out.append(render_batch(model, source, motion[start:start + batch], path).float())
    return out


def compile_state(model, path: str):
    """`path` "compiled" runs `model`'s compiled code (set up before), the others run it eagerly."""
    return contextlib.nullcontext() if path == "compiled" else compiled.suspended(model)


def render_to_cpu(model, identity, motion, batch, path, output_dtype=torch.float32,
                  hand_outs: list[float] | None = None) -> torch.Tensor:
    """Frames `[T, 3, S, S]` on the CPU through `pipeline.render_batches`, consumed as the nodes and the runner
    consume them: each batch copied into one pageable canvas (the IMAGE output) or encoded, then dropped, so
    that the pinned staging memory is reused. Float32 for IMAGE outputs, uint8 for video (pinned copies,
    the next batch queued before one is handed out, a compiled renderer padded to whole batches).
    `hand_outs` gets the wall-clock seconds from the call to each batch's hand-out."""
    size = model.cfg.image_size
    canvas = torch.empty(motion.shape[0], 3, size, size, dtype=output_dtype)
    done = 0
    start = time.perf_counter()
    with path_context(path), compile_state(model, path):
        for frames in pipeline.render_batches(model, identity, motion, batch, output_device="cpu",
                                              output_dtype=output_dtype):
            canvas[done:done + frames.shape[0]] = frames
            done += frames.shape[0]
            if hand_outs is not None:
                hand_outs.append(time.perf_counter() - start)
    return canvas


def hand_out_note(hand_outs: list[float], batch: int) -> str:
    """Per-batch wall times from `render_to_cpu`'s hand-out marks: the first, the median of the middle
    ones and the last (a short last batch is a new shape for eager kernels)."""
    gaps = [b - a for a, b in zip([0.0, *hand_outs], hand_outs)]
    if len(gaps) < 3:
        return "batches " + " / ".join(f"{1000 * g:.0f}" for g in gaps) + " ms"
    middle = sorted(gaps[1:-1])[len(gaps[1:-1]) // 2]
    return (f"batches of {batch}: first {1000 * gaps[0]:.0f} ms, median {1000 * middle:.0f} ms, "
            f"last {1000 * gaps[-1]:.0f} ms")


@functools.lru_cache(maxsize=1)
def _generator_state() -> dict[str, torch.Tensor]:
    return standin_state_dict("generator")


def standin_generator(device, dtype) -> MotionGenerator:
    model = MotionGenerator(GeneratorConfig()).eval()
    model.load_state_dict(_generator_state(), strict=False)
    return model.to(device, dtype).requires_grad_(False)


def random_audio_encoder(device, dtype):
    """wav2vec2-base (`Wav2Vec2Config()` defaults: 12 layers, width 768) with random weights."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from imtalker_core.generator.audio import AudioEncoder

    torch.manual_seed(0)
    wav2vec2 = Wav2Vec2Model._from_config(Wav2Vec2Config(), attn_implementation="eager")
    return AudioEncoder(wav2vec2.eval(), do_normalize=True, sample_rate=SAMPLE_RATE, fps=FPS).to(
        device, dtype).requires_grad_(False)


# --------------------------------------------------------------------------- sections

def bench_anchor(args, device, timer, rows):
    """The anchor attention alone at `--anchor-batch`: plain (expanded source, float32 map for both
    values and argmax) vs fast (prepared kv, values by SDPA on GPUs, chunked argmax) vs triton (the
    fast path with the fused Triton argmax kernel)."""
    cfg = RendererConfig()
    size, dim = cfg.anchor_resolution, cfg.feature_dims[::-1][3]
    b = args.anchor_batch
    torch.manual_seed(0)
    for name in args.dtypes:
        dtype = DTYPES[name]
        attn = attention.FullAttention(dim, cfg.num_heads).eval().to(device, dtype).requires_grad_(False)
        query = torch.randn(b, size * size, dim, device=device, dtype=dtype)
        key = torch.randn(1, size * size, dim, device=device, dtype=dtype)
        value = torch.randn(1, size * size, dim, device=device, dtype=dtype)
        with precision_context(name, device):
            if "plain" in args.paths:
                with attention.fast_paths(False):
                    keys, values = key.expand(b, -1, -1), value.expand(b, -1, -1)
                    fn = lambda: attn(query, keys, values, return_argmax=True)  # noqa: E731
                    fn()
                    seconds, peak = timer(fn, repeats=3)
                    plain_picks = fn()[1]
                rows.append(dict(section="anchor", precision=name, path="plain", batch=b, seconds=seconds,
                                 ms_per_frame=1000 * seconds / b, peak_gib=peak, note=timer.cpu_note()))
            if "fast" in args.paths:
                kv = attn.project_kv(key, value)
                chunks = [None] + [mib << 20 for mib in args.chunk_mib]
                for chunk in chunks:
                    def fn(chunk=chunk):
                        q = attention._split_heads(attn.q_proj(query), attn.num_heads)
                        argmax, values = attention.head_mean_argmax(
                            q, kv[0], attn.scale, kv[1] if attention._values_from_probs(device) else None, chunk)
                        if values is None:
                            values = attention.attend(q, *kv)
                        return attn.proj(attention._merge_heads(values)), argmax
                    fn()
                    seconds, peak = timer(fn, repeats=3)
                    note = "default chunk" if chunk is None else f"chunk {chunk >> 20} MiB"
                    note += f"; {timer.cpu_note()}" if not timer.cuda else ""
                    if chunk is None and "plain" in args.paths:
                        note += f"; picks ≠ plain: {int((fn()[1] != plain_picks).sum())}"
                    rows.append(dict(section="anchor", precision=name, path="fast", batch=b, seconds=seconds,
                                     ms_per_frame=1000 * seconds / b, peak_gib=peak, note=note))
                    if chunk is None:
                        fast_picks = fn()[1]
                rows.append(_bench_anchor_kernel(attn, query, kv, name, device, timer, b,
                                                 {"plain": plain_picks if "plain" in args.paths else None,
                                                  "fast": fast_picks}))


def _bench_anchor_kernel(attn, query, kv, name, device, timer, b, picks) -> dict:
    """One anchor row for the fast path with the Triton argmax kernel, or a row saying why not."""
    from imtalker_core.layers import anchor_argmax_triton

    row = dict(section="anchor", precision=name, path="triton", batch=b)
    if device.type not in attention.ARGMAX_KERNEL_DEVICE_TYPES:
        reason = f"{device.type} device: the kernel is for CUDA"
    else:
        q = attention._split_heads(attn.q_proj(query), attn.num_heads)
        reason = anchor_argmax_triton.unavailable_reason(device) or anchor_argmax_triton.unsupported_reason(q, kv[0])
    if reason is not None:
        return {**row, "note": f"skipped: {reason}"}

    def fn():
        with attention.argmax_kernel("triton"):
            return attn(query, return_argmax=True, kv=kv)
    fn()
    seconds, peak = timer(fn, repeats=3)
    kernel_picks = fn()[1]
    note = "fused Triton argmax, values by SDPA" + "".join(
        f"; picks ≠ {other}: {int((kernel_picks != ref).sum())}" for other, ref in picks.items() if ref is not None)
    return {**row, "seconds": seconds, "ms_per_frame": 1000 * seconds / b, "peak_gib": peak, "note": note}


def bench_renderer(args, device, timer, renderers, rows, best):
    torch.manual_seed(0)
    image = torch.rand(1, 3, 512, 512)
    motion = torch.randn(max(args.batch_sizes) * math.ceil(args.frames / min(args.batch_sizes)), 32)
    for name in args.dtypes:
        model = renderers.get(name)
        p = next(model.parameters())
        with torch.no_grad(), precision_context(name, device):
            prep, _ = timer(lambda: Source(model, image))
            source = Source(model, image)
            prep_cache, _ = timer(lambda: model.prepare_source(source.maps, source.features))
            rows.append(dict(section="renderer", precision=name, path="fast", batch=1, seconds=prep_cache,
                             note=f"prepare_source once per identity (identity encoding {1000 * prep:.1f} ms)"))
            for bs in args.batch_sizes:
                n = bs * math.ceil(args.frames / bs)
                latents = motion[:n].to(p)
                compile_seconds = None
                for path in args.paths:
                    if path == "compiled":
                        compiled.set_compile(model, args.compile_mode)
                        compile_seconds, _ = timer(lambda: render_all(model, source, latents[:bs], bs, path))
                    for _ in range(args.warmup):
                        render_all(model, source, latents[:bs], bs, path)
                # Repeats alternate between the paths so that a busy machine slows both alike.
                results = {}
                for _ in range(args.repeats):
                    for path in args.paths:
                        seconds, peak = timer(lambda: render_all(model, source, latents, bs, path))
                        old = results.get(path, (math.inf, None, math.inf))
                        results[path] = (min(seconds, old[0]), peak if old[1] is None else max(peak, old[1]),
                                         min(timer.cpu_seconds, old[2]))
                for path in args.paths:
                    seconds, peak, cpu = results[path]
                    note = "" if timer.cuda else f"process CPU time {cpu:.2f} s"
                    if path == "compiled":
                        note = f"torch.compile {args.compile_mode}: first batch {compile_seconds:.1f} s; {note}"
                    rows.append(dict(section="renderer", precision=name, path=path, batch=bs, frames=n,
                                     seconds=seconds, ms_per_frame=1000 * seconds / n, fps=n / seconds,
                                     peak_gib=peak, note=note))
                    key = (name, path)
                    if key not in best or rows[-1]["fps"] > best[key][1]:
                        best[key] = (bs, rows[-1]["fps"])
            identity = pipeline.encode_identity(model, image)
            for path in args.paths:
                # The IMAGE nodes' output path: float32 frames on the CPU, through pipeline.render_batches.
                bs = best[(name, path)][0]
                n = bs * math.ceil(args.frames / bs)
                # Warmed up and the best of the repeats, like the rows above (one cold run read 40 % slower
                # on a CPU than the same frames through render_batch).
                for _ in range(args.warmup):
                    render_to_cpu(model, identity, motion[:bs], bs, path)
                seconds, peak = timer(lambda: render_to_cpu(model, identity, motion[:n], bs, path), args.repeats)
                rows.append(dict(section="renderer", precision=name, path=path, batch=bs, frames=n, seconds=seconds,
                                 ms_per_frame=1000 * seconds / n, fps=n / seconds, peak_gib=peak,
                                 note="float32 frames to the CPU (pipeline.render_batches)"
                                      + (f"; {timer.cpu_note()}" if not timer.cuda else "")))


def _time_each_precision(args, device, timer, rows, cache, section: str, frames: int, build, call, note: str):
    """For each precision: `model = build(dtype)`, then time `call(model)` after the warm-ups, one row each."""
    for name in args.dtypes:
        model = build(DTYPES[name])
        with torch.no_grad(), precision_context(name, device):
            for _ in range(args.warmup):
                call(model)
            seconds, peak = timer(lambda: call(model))
        rows.append(dict(section=section, precision=name, path="-", batch=1, frames=frames, seconds=seconds,
                         ms_per_frame=1000 * seconds / frames, peak_gib=peak, note=note))
        cache[name] = model if "clip" in args.sections else None


def bench_reference(args, device, timer, rows, best):
    """The reference's own loop (its app.py: one frame at a time, the source-only work redone per frame) on
    the same stand-in weights and device, and our best frames/s of the renderer section against it."""
    if args.reference is None:
        rows.append(dict(section="reference", note="skipped: pass --reference DIR, a checkout of "
                                                   "github.com/bigai-nlco/IMTalker"))
        return
    import reference_speed  # benchmarks/reference_speed.py (needs Pillow)

    renderer_cls = _reference_class(args.reference)
    for name in args.dtypes:
        n = args.frames
        seconds, peak = _time_reference(reference_speed, renderer_cls, name, n, device, timer, args.repeats)
        note = "the reference's own loop (app.py), one frame at a time"
        ours = best.get((name, "fast"))
        if ours is not None:
            note += f"; ours (fast, batch {ours[0]}) {ours[1]:.1f} frames/s = {ours[1] * seconds / n:.2f}× it"
        rows.append(dict(section="reference", precision=name, path="reference", batch=1, frames=n, seconds=seconds,
                         ms_per_frame=1000 * seconds / n, fps=n / seconds, peak_gib=peak, note=note))
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _time_reference(reference_speed, renderer_cls, name, frames, device, timer, repeats):
    """(seconds for `frames` frames, peak GiB) of the reference's loop in precision `name`."""
    dtype = DTYPES[name]
    model = reference_speed.build_reference(renderer_cls, standin_state_dict("renderer")).to(device, dtype)
    loop = reference_speed.ReferenceLoop(model)
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 512, 512, generator=generator).to(device, dtype)
    latents = torch.randn(frames, 32, generator=generator).to(device, dtype)
    with torch.no_grad(), precision_context(name, device):
        loop.encode_source(image)
        loop.render(latents[:1])  # warm-up
        return timer(lambda: loop.render(latents), repeats=repeats)


@functools.lru_cache(maxsize=1)
def _reference_class(reference_dir: Path) -> type:
    """The reference's renderer class, imported once per process (its package is named `renderer`)."""
    import reference_speed

    return reference_speed.import_reference(reference_dir)[0]


def bench_generator(args, device, timer, rows, cache):
    frames = round(args.clip_seconds * FPS)
    torch.manual_seed(0)
    features = torch.randn(1, frames, 768)
    ref = torch.randn(1, 32)
    _time_each_precision(
        args, device, timer, rows, cache, "generator", frames, lambda dtype: standin_generator(device, dtype),
        lambda gen: gen.sample(features.to(device), ref.to(device), cfg_scale=3.0, steps=10, seed=0),
        f"{args.clip_seconds:g} s clip, cfg 3, 10 steps")


def bench_audio(args, device, timer, rows, cache):
    try:
        import transformers  # noqa: F401
    except ImportError:
        rows.append(dict(section="audio", precision="-", path="-", note="skipped: transformers is not installed"))
        return
    torch.manual_seed(0)
    wave = torch.randn(1, round(args.clip_seconds * SAMPLE_RATE)) * 0.1
    frames = round(args.clip_seconds * FPS)
    _time_each_precision(
        args, device, timer, rows, cache, "audio", frames, lambda dtype: random_audio_encoder(device, dtype),
        lambda enc: enc(wave.to(device), num_frames=frames), f"random wav2vec2-base, {args.clip_seconds:g} s")


def bench_clip(args, device, timer, renderers, rows, best, generators, encoders):
    """Audio → uint8 frames on the CPU through the pipeline (`generate_motion`, `render_batches`), as the
    runner feeds its video writer; the parts are timed in one pass each. Path "compiled" compiles the
    generator and the renderer (an untimed first clip compiles them)."""
    frames = round(args.clip_seconds * FPS)
    torch.manual_seed(0)
    wave = torch.randn(1, round(args.clip_seconds * SAMPLE_RATE)) * 0.1
    image = torch.rand(1, 3, 512, 512)
    render_frames = frames if args.clip_render_frames is None else min(frames, args.clip_render_frames)
    for name in args.dtypes:
        model = renderers.get(name)
        gen = generators.get(name) or standin_generator(device, DTYPES[name])
        enc = encoders.get(name)
        if enc is None:
            try:
                enc = random_audio_encoder(device, DTYPES[name])
            except ImportError:
                enc = None
        with torch.no_grad(), precision_context(name, device):
            identity = pipeline.encode_identity(model, image)
            for path in args.paths:
                bs = best.get((name, path), (max(args.batch_sizes), 0))[0]
                if path == "compiled":
                    compiled.set_compile(model, args.compile_mode)
                    compiled.set_compile(gen, args.compile_mode)
                parts, out = {}, {}

                def features():
                    if enc is None:
                        return torch.randn(1, frames, 768, device=device)
                    return enc(wave.to(device), num_frames=frames)

                def motion(feats):
                    return pipeline.generate_motion(gen, feats, identity.motion, cfg_scale=3.0, steps=10, seed=0)

                hand_outs: list[float] = []

                def render(latents):
                    hand_outs.clear()
                    return render_to_cpu(model, identity, latents[:render_frames], bs, path, torch.uint8, hand_outs)

                warm = ""
                with compile_state(gen, path):
                    if path == "compiled":
                        first, _ = timer(lambda: render(motion(features())))
                        warm = f"; first clip (compiling) {first:.1f} s"
                    parts["audio"], _ = timer(lambda: out.update(features=features()))
                    parts["motion"], _ = timer(lambda: out.update(motion=motion(out["features"])))
                    seconds, peak = timer(lambda: out.update(frames=render(out["motion"])))
                assert out["frames"].shape[0] == render_frames
                parts["render"] = seconds * frames / render_frames
                total = sum(parts.values())
                scaled = "" if render_frames == frames else f"; render scaled from {render_frames} frames"
                detail = ", ".join(f"{k} {v:.2f} s" for k, v in parts.items())
                rows.append(dict(section="clip", precision=name, path=path, batch=bs, frames=frames, seconds=total,
                                 ms_per_frame=1000 * total / frames, fps=frames / total, peak_gib=peak,
                                 note=f"{args.clip_seconds:g} s clip → uint8 CPU frames: {detail}; "
                                      f"{args.clip_seconds / total:.1f}× real time{scaled}{warm}; "
                                      f"{hand_out_note(hand_outs, bs)}"
                                      + ("" if enc is not None else "; no transformers: random features")))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.double().cpu() - b.double().cpu()).pow(2).mean().item()
    return 10 * math.log10(1 / mse) if mse else math.inf


def bench_parity(args, device, renderers, rows):
    from safetensors.torch import load_file

    golden = load_file(parity_file("renderer_golden.safetensors"))
    images = {k: golden[k].permute(0, 3, 1, 2).float().div(255) if golden[k].dim() == 4
              else golden[k].permute(2, 0, 1)[None].float().div(255) for k in ("source_u8", "driving_u8")}
    results = {}
    order = ["fp32"] + [d for d in args.dtypes if d != "fp32"]
    for name in order:
        model = renderers.get(name)
        anchor = [m for m in model.imt if isinstance(m, CoarseTransfer)][-1]
        p = next(model.parameters())
        for path in args.paths:
            picks = {}
            hook = anchor.register_forward_hook(lambda mod, a, out: picks.update(argmax=out[1].cpu()))
            try:
                with torch.no_grad(), precision_context(name, device), path_context(path):
                    source = Source(model, images["source_u8"])
                    latents = model.encode_motion(images["driving_u8"].to(p))
                    frames = render_batch(model, source, latents, path).float().cpu()
            finally:
                hook.remove()
            results[(name, path)] = (frames, picks["argmax"])
    for (name, path), (frames, picks) in results.items():
        ref_frames, ref_picks = results[("fp32", path)]
        note = f"PSNR vs golden (reference fp32 CPU) {psnr(frames, golden['frames']):.1f} dB"
        if name != "fp32":
            changed = int((picks != ref_picks).sum())
            note += (f"; vs our fp32: {psnr(frames, ref_frames):.1f} dB, "
                     f"anchor picks changed {changed} of {picks.numel()}")
        elif path == "fast" and ("fp32", "plain") in results:
            plain_frames, plain_picks = results[("fp32", "plain")]
            note += (f"; vs plain fp32: max |Δ| {(frames - plain_frames).abs().max().item():.1e}, "
                     f"picks changed {int((picks != plain_picks).sum())} of {picks.numel()}")
        rows.append(dict(section="parity", precision=name, path=path, batch=2, note=note))


# --------------------------------------------------------------------------- output

def environment(device: torch.device) -> dict:
    env = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "python": platform.python_version(),
           "device": str(device), "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["tf32_default"] = tf32_state()
        try:
            import triton
            env["triton"] = triton.__version__
        except ImportError:
            env["triton"] = None
    env["commit"] = git_commit()
    return env


def git_commit() -> str | None:
    """HEAD's short hash, with "+changes" when tracked files differ from it (a copied working tree)."""
    def git(*args):
        return subprocess.run(["git", *args], check=False, cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    try:
        commit = git("rev-parse", "--short", "HEAD")
        return None if not commit else commit + ("+changes" if git("status", "--porcelain", "-uno") else "")
    except (OSError, subprocess.SubprocessError):
        return None


def fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    lines = ["| section | precision | path | batch | frames | time s | ms/frame | frames/s | peak GiB | notes |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['section']} | {r.get('precision', '')} | {r.get('path', '')} | "
                     f"{fmt(r.get('batch'), 'd')} | {fmt(r.get('frames'), 'd')} | {fmt(r.get('seconds'), '.3f')} | "
                     f"{fmt(r.get('ms_per_frame'), '.2f')} | {fmt(r.get('fps'), '.1f')} | "
                     f"{fmt(r.get('peak_gib'), '.2f')} | {r.get('note', '')} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", nargs="+", default=["fp32"], choices=list(DTYPES))
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--frames", type=int, default=8,
                    help="frames rendered per measurement (rounded up to full batches)")
    ap.add_argument("--paths", nargs="+", default=["plain", "fast"], choices=["plain", "fast", "compiled"],
                    help="compiled: the fast path under torch.compile (--compile-mode), compiled once per batch size")
    ap.add_argument("--compile-mode", default="default", choices=[m for m in COMPILE_MODES if m != "off"])
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    ap.add_argument("--skip", nargs="+", default=[], choices=SECTIONS)
    ap.add_argument("--warmup", type=int, default=1, help="warm-up batches before each measurement")
    ap.add_argument("--repeats", type=int, default=1, help="renderer measurements per row (the best counts)")
    ap.add_argument("--clip-seconds", type=float, default=10.0)
    ap.add_argument("--clip-render-frames", type=int, default=None,
                    help="frames actually rendered in the clip section (default: all on CUDA, --frames on a CPU)")
    ap.add_argument("--anchor-batch", type=int, default=None, help="default: 8 on CUDA, 2 on a CPU")
    ap.add_argument("--chunk-mib", type=int, nargs="*", default=None,
                    help="extra fast-argmax chunk sizes for the anchor section "
                         "(default: 64 1024 on CUDA, none on a CPU)")
    ap.add_argument("--argmax-kernel", default="auto", choices=list(attention.ARGMAX_KERNEL_MODES),
                    help="anchor picks of the fast path outside the anchor section: the Triton kernel on CUDA "
                         "where it can run (auto), always (triton: fails where it cannot) or never (torch)")
    ap.add_argument("--window-kernel", default="auto", choices=list(attention.WINDOW_KERNEL_MODES),
                    help="shifted-window attention on CUDA: the Triton kernel for half precision (auto), always "
                         "(triton) or never (torch)")
    ap.add_argument("--reference", type=Path, default=None,
                    help="a checkout of github.com/bigai-nlco/IMTalker: the reference section times its own loop")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    args.sections = [s for s in args.sections if s not in args.skip]
    if args.anchor_batch is None:
        args.anchor_batch = 8 if cuda else 2
    if args.chunk_mib is None:
        args.chunk_mib = [64, 1024] if cuda else []
    if args.clip_render_frames is None and not cuda:
        args.clip_render_frames = args.frames
    torch.set_grad_enabled(False)
    env = environment(device)
    print(f"torch {env['torch']}, {env['threads']} threads, "  # noqa: T201
          f"device {env.get('gpu', env['device'])}", flush=True)

    timer = Timer(device)
    rows: list[dict] = []
    best: dict = {}
    generators: dict = {}
    encoders: dict = {}
    renderers = Renderers(device)
    t0 = time.perf_counter()
    steps = [("anchor", lambda a: bench_anchor(a, device, timer, rows)),
             ("renderer", lambda a: bench_renderer(a, device, timer, renderers, rows, best)),
             ("reference", lambda a: bench_reference(a, device, timer, rows, best)),
             ("generator", lambda a: bench_generator(a, device, timer, rows, generators)),
             ("audio", lambda a: bench_audio(a, device, timer, rows, encoders)),
             ("clip", lambda a: bench_clip(a, device, timer, renderers, rows, best, generators, encoders)),
             ("parity", lambda a: bench_parity(a, device, renderers, rows))]
    for section, run in steps:
        if section not in args.sections:
            continue
        start = time.perf_counter()
        before = len(rows)
        # One precision at a time (parity needs them together), so that a failure (an unsupported
        # kernel, out of memory) costs only its own rows.
        groups = [args.dtypes] if section == "parity" else [[name] for name in args.dtypes]
        for group in groups:
            try:
                with attention.argmax_kernel(args.argmax_kernel), attention.window_kernel(args.window_kernel):
                    run(argparse.Namespace(**{**vars(args), "dtypes": group}))
            except Exception as err:  # noqa: BLE001 - reported in the table, the other rows kept
                rows.append({"section": section, "precision": " ".join(group),
                             "note": f"FAILED: {type(err).__name__}: {(str(err).splitlines() or [''])[0][:300]}"})
                if cuda:
                    torch.cuda.empty_cache()
        print(f"[{section}: {time.perf_counter() - start:.1f} s]", flush=True)  # noqa: T201
        for r in rows[before:]:
            shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
            print("   ", shown, flush=True)  # noqa: T201
    print(f"\n{env}\n\n{table(rows)}\n\ntotal {time.perf_counter() - t0:.0f} s")  # noqa: T201
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"environment": env, "args": {k: str(v) if isinstance(v, Path) else v
                                                                      for k, v in vars(args).items()},
                                         "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
