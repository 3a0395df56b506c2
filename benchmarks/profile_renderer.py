"""Where a rendered frame's time goes: per module of the frames step, and the top device kernels.

    python benchmarks/profile_renderer.py --device cpu --batch-size 1 --batches 1 --threads 2
    python benchmarks/profile_renderer.py --device cuda --dtype fp16 --batch-size 32 --batches 4 \
        [--compile reduce-overhead] --json profile.json

Builds the full-size renderer on deterministic stand-in weights (tests/helpers/standin.py; speed does not
depend on the values), encodes a random 512² source once (`pipeline.encode_identity`,
`pipeline.prepare_render_source`), then renders `--batches` batches of random motion latents with the
frames step the pipeline uses (`compiled.frames_step`), after `--warmup` untimed batches:

- modules (eager only): each module of the frames step (the identity-adaptive module, the motion decoder,
  the six transfer levels, every block of the synthesis network) timed by forward hooks, with CUDA events
  on a GPU (device time, in stream order) or the wall clock on a CPU; ms per frame and share of the step.
  "(rest)" is the step's time outside these modules (the final conv, pixel shuffle and sigmoid among it).
  Hooks add a little host time per module; on a GPU that hides behind the queued work. Beside it, each
  module's GFLOP per frame (`torch.utils.flop_counter`: matmuls, convolutions and, on CUDA, attention;
  elementwise work is not counted) and the TFLOP/s it reached.
- kernels: `torch.profiler` over the same batches, the `--top` operators / kernels by device time (self
  time on a CPU), per frame. Under `--compile` (hooks cannot run inside a whole compiled graph) this is
  the only table, and it names inductor's fused kernels.

Prints markdown tables; `--json OUT` writes the rows and the environment. It needs neither av, cv2, soxr
nor soundfile, so `benchmarks/gpu_check.sh profile` runs it on the GPU machines' stock image.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _timing import sync  # noqa: E402
from imtalker_core import compiled, pipeline  # noqa: E402
from imtalker_core.compiled import COMPILE_MODES  # noqa: E402
from imtalker_core.precision import fp32_matmul  # noqa: E402
from imtalker_core.layers import attention, stylegan  # noqa: E402
from imtalker_core.renderer import IMTRenderer  # noqa: E402
from tests.helpers.standin import standin_renderer  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def profiled_modules(model: IMTRenderer) -> dict[str, torch.nn.Module]:
    """The modules of the frames step, in the order they run, by their state-dict path."""
    names = ["adapt", "latent_token_decoder"] + [f"imt.{i}" for i in range(len(model.imt))]
    decoder = model.frame_decoder
    for group in ("upconv_blocks", "resblocks", "transformer_blocks"):
        names += [f"frame_decoder.{group}.{i}" for i in range(len(getattr(decoder, group)))]
    return {name: model.get_submodule(name) for name in names}


class ModuleTimer:
    """Forward hooks that time every listed module: CUDA events on a GPU, the wall clock on a CPU."""

    def __init__(self, modules: dict[str, torch.nn.Module], device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: dict[str, list] = {name: [] for name in modules}
        self.handles = []
        for name, module in modules.items():
            self.handles.append(module.register_forward_pre_hook(self._start(name)))
            self.handles.append(module.register_forward_hook(self._stop(name)))

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _start(self, name):
        def hook(module, args):
            self.marks[name].append([self._now(), None])
        return hook

    def _stop(self, name):
        def hook(module, args, output):
            self.marks[name][-1][1] = self._now()
        return hook

    def seconds(self) -> dict[str, float]:
        """Total seconds per module over everything since the last `clear`."""
        if self.cuda:
            torch.cuda.synchronize()
            span = lambda a, b: a.elapsed_time(b) / 1000  # noqa: E731
        else:
            span = lambda a, b: b - a  # noqa: E731
        return {name: sum(span(a, b) for a, b in marks) for name, marks in self.marks.items()}

    def clear(self):
        for marks in self.marks.values():
            marks.clear()

    def remove(self):
        for handle in self.handles:
            handle.remove()


def module_flops(modules: dict[str, torch.nn.Module], step) -> dict[str, int]:
    """FLOPs of one call of each module during `step()` (`torch.utils.flop_counter`): each module's first
    inputs are captured by a hook, then the module alone is run again on them under a FLOP counter (eval
    mode, so a module is a function of its inputs)."""
    from torch.utils.flop_counter import FlopCounterMode

    captured: dict[str, tuple] = {}
    handles = [module.register_forward_pre_hook(
        lambda module, args, kwargs, name=name: captured.setdefault(name, (args, kwargs)), with_kwargs=True)
        for name, module in modules.items()]
    try:
        step()
    finally:
        for handle in handles:
            handle.remove()
    flops = {}
    for name, (args, kwargs) in captured.items():
        with FlopCounterMode(display=False) as counter:
            modules[name](*args, **kwargs)
        flops[name] = counter.get_total_flops()
    return flops


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=DTYPES, default=None, help="fp16 on CUDA, fp32 elsewhere")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--batches", type=int, default=3, help="batches profiled")
    ap.add_argument("--warmup", type=int, default=1, help="untimed batches first (compiling, if any)")
    ap.add_argument("--compile", choices=COMPILE_MODES, default="off")
    ap.add_argument("--argmax-kernel", default="auto", choices=list(attention.ARGMAX_KERNEL_MODES),
                    help="the anchor picks: Triton kernel for half precision on CUDA (auto), always, or never")
    ap.add_argument("--window-kernel", default="auto", choices=list(attention.WINDOW_KERNEL_MODES),
                    help="the window attention: Triton kernel for half precision on CUDA (auto), always, or never")
    ap.add_argument("--anchor-values", default="kernel", choices=("kernel", "sdpa"),
                    help="where the argmax kernel runs, the anchor level's values from its first pass (default) "
                         "or from a second attention")
    ap.add_argument("--window-bias", default="table", choices=("table", "bias"),
                    help="the window kernel gathers the relative-position bias from its table (default) "
                         "or reads it gathered")
    ap.add_argument("--compiled-blur", default="shifts", choices=("shifts", "conv"),
                    help="the motion decoder's blurs in compiled code: shifted sums (default) or the depthwise conv")
    ap.add_argument("--top", type=int, default=25, help="rows of the kernel table")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    stylegan.BLUR_BY_SHIFTS_WHEN_COMPILING = args.compiled_blur == "shifts"
    attention.ANCHOR_VALUES_IN_KERNEL = args.anchor_values == "kernel"
    attention.WINDOW_BIAS_FROM_TABLE = args.window_bias == "table"
    device = torch.device(args.device)
    name = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    dtype = DTYPES[name]

    model = standin_renderer(device, dtype)
    torch.manual_seed(0)
    image = torch.rand(1, 3, 512, 512)
    latents = torch.randn(args.batches * args.batch_size, 32)
    b = args.batch_size
    rows: list[dict] = []
    env = dict(torch=torch.__version__, device=str(device), dtype=name, batch=b, batches=args.batches,
               compile=args.compile, argmax_kernel=args.argmax_kernel, window_kernel=args.window_kernel,
               anchor_values=args.anchor_values, window_bias=args.window_bias, compiled_blur=args.compiled_blur,
               threads=torch.get_num_threads(),
               gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    print(f"torch {env['torch']}, {env['gpu'] or device}, {name}, batch {b} × {args.batches}, compile {args.compile}, "
          f"argmax kernel {args.argmax_kernel}, window kernel {args.window_kernel}", file=sys.stderr)

    with (torch.no_grad(), fp32_matmul(device=device), attention.argmax_kernel(args.argmax_kernel),
          attention.window_kernel(args.window_kernel)):
        identity = pipeline.encode_identity(model, image)
        identity, source = pipeline.prepare_render_source(model, identity)
        if args.compile != "off":
            compiled.set_compile(model, args.compile)
        step = compiled.frames_step(model)
        vector = identity.vector.expand(b, -1)

        def run(i: int) -> torch.Tensor:
            # A copy, as the pipeline makes: under reduce-overhead the output lives in the graph's memory.
            return step(model, vector, source, latents[i * b:(i + 1) * b].to(device, dtype)).clone()

        start = time.perf_counter()
        for _ in range(args.warmup):
            run(0)
        sync(device)
        print(f"warm-up: {time.perf_counter() - start:.1f} s", file=sys.stderr)

        flops = None
        if args.compile == "off":  # FLOPs of one frame (they grow linearly with the batch)
            one = latents[:1].to(device, dtype)
            flops = module_flops(profiled_modules(model), lambda: step(model, identity.vector, source, one))
        timer = None if args.compile != "off" else ModuleTimer(profiled_modules(model), device)
        sync(device)
        start = time.perf_counter()
        for i in range(args.batches):
            run(i)
        sync(device)
        step_seconds = time.perf_counter() - start
        frames = b * args.batches
        print(f"\nframes step: {1000 * step_seconds / frames:.3f} ms/frame (with hooks: "
              f"{'no' if timer is None else 'yes'})")
        if timer is not None:
            per_module = timer.seconds()
            timer.remove()
            print("\n| module | ms/frame | share | GFLOP/frame | TFLOP/s |\n| --- | --- | --- | --- | --- |")
            for module_name, seconds in [*per_module.items(), ("(rest)", step_seconds - sum(per_module.values()))]:
                gflop = flops[module_name] / 1e9 if module_name in flops else None
                row = dict(table="modules", name=module_name, ms_per_frame=1000 * seconds / frames,
                           share=seconds / step_seconds, gflop_per_frame=gflop,
                           tflops=gflop * frames / seconds / 1e3 if gflop and seconds > 0 else None)
                rows.append(row)
                gflop_text = "" if gflop is None else f"{gflop:.2f}"
                tflops_text = "" if row["tflops"] is None else f"{row['tflops']:.1f}"
                print(f"| {module_name} | {row['ms_per_frame']:.3f} | {100 * row['share']:.1f} % | {gflop_text} | "
                      f"{tflops_text} |")

        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            for i in range(args.batches):
                run(i)
            sync(device)
        key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        events = [e for e in prof.key_averages() if getattr(e, key, 0) > 0]
        events.sort(key=lambda e: getattr(e, key), reverse=True)
        total = sum(getattr(e, key) for e in events) or 1
        print(f"\n| kernel / operator ({key}) | calls | ms/frame | share |\n| --- | --- | --- | --- |")
        for event in events[:args.top]:
            us = getattr(event, key)
            row = dict(table="kernels", name=event.key, calls=event.count, ms_per_frame=us / 1000 / frames,
                       share=us / total)
            rows.append(row)
            print(f"| {event.key[:90]} | {event.count} | {row['ms_per_frame']:.3f} | {100 * row['share']:.1f} % |")

    if args.json:
        args.json.write_text(json.dumps(dict(environment=env, step_ms_per_frame=1000 * step_seconds / frames,
                                             rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
